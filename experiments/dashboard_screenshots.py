"""Screenshots of the default job's TensorBoard dashboard, taken in a real browser engine (docs/dashboard/).

    pip install -e ".[screenshots]"
    bilevel fit --config experiments/configs/cleaning_digits.yaml --trainer.val_check_interval 25 \\
        --trainer.default_root_dir /tmp/dash
    python -m experiments.dashboard_screenshots /tmp/dash/lightning_logs

Starts ``tensorboard`` on the log directory, opens three views (time series filtered to the
objectives, hypergradient, validation and solver; HPARAMS; histograms) in Qt WebEngine, the Chromium
engine Qt ships as a wheel, rendered offscreen (no display, no GPU), and saves each page after
TensorBoard has drawn its charts. Playwright's own Chromium cannot be downloaded on machines that
reach only package registries; Qt WebEngine comes from PyPI.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "docs" / "dashboard"
VIEWS = {
    "time_series.png": "?tagFilter=objective%7Chypergradient%7Cval%2Ftest_acc%7Csolver%2Fres#timeseries",
    "hparams.png": "#hparams",
    "histograms.png": "?tagFilter=upper%7Chypergradient#histograms",
}
RENDER_SECONDS = 12  # TensorBoard draws its charts after the page's load event


def shoot(base: str, out: Path) -> None:
    """Load every view of ``VIEWS`` from ``base`` and save it under ``out`` (1600 x 1200)."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    os.environ.setdefault("QTWEBENGINE_CHROMIUM_FLAGS", "--no-sandbox --disable-gpu")
    from PyQt6.QtCore import QSize, QTimer, QUrl
    from PyQt6.QtWebEngineWidgets import QWebEngineView
    from PyQt6.QtWidgets import QApplication

    app = QApplication(["dashboard"])
    view = QWebEngineView()
    view.resize(QSize(1600, 1200))
    view.show()
    queue = list(VIEWS.items())

    def load_next() -> None:
        if not queue:
            app.quit()
            return
        view.load(QUrl(base + queue[0][1]))

    def save() -> None:
        name, _ = queue.pop(0)
        view.grab().save(str(out / name))
        print(f"saved {out / name}", flush=True)
        load_next()

    view.loadFinished.connect(lambda ok: QTimer.singleShot(RENDER_SECONDS * 1000, save))
    load_next()
    app.exec()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir", type=Path, help="a lightning_logs directory with the run to show")
    parser.add_argument("--port", type=int, default=6066)
    args = parser.parse_args(argv)
    try:
        import PyQt6.QtWebEngineWidgets  # noqa: F401
    except ImportError:
        raise SystemExit('PyQt6-WebEngine is missing: pip install -e ".[screenshots]"') from None
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(args.logdir),
                               "--port", str(args.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://localhost:{args.port}/"
    try:
        for _ in range(60):
            try:
                urllib.request.urlopen(base, timeout=1)
                break
            except OSError:
                time.sleep(1)
        OUT.mkdir(parents=True, exist_ok=True)
        shoot(base, OUT)
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
