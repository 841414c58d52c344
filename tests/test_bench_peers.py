"""Smoke test of the peer comparison (experiments/bench/peers.py) without the peers installed.

Runs ``main`` with --quick as if no peer were importable: our rows only, and the report says which
peers are missing and how to install them. The numbers are held to P1's closed forms.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments.bench import peers


@pytest.fixture
def no_peers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peers, "find_spec", lambda name: None)


def test_quick_run_without_peers_reports_our_rows(no_peers: None, tmp_path: Path) -> None:
    rows = peers.main(["--quick", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)])
    text = (tmp_path / "peers.md").read_text()
    assert "Peers not installed: torchopt, higher, betty" in text
    assert 'pip install -e ".[compare]"' in text
    assert (tmp_path / "peers.png").stat().st_size > 0
    assert {r["method"] for r in rows} == {"ours Neumann", "ours CG", "ours Unrolled"}
    assert {r["problem"] for r in rows} == {s.split("## ")[1] for s in text.splitlines() if s.startswith("## ")}
    p1 = {(r["method"], r["K"]): r for r in rows if r["problem"].startswith("P1")}
    # CG is exact after dim(y) = 3 iterations on P1's quadratic lower level; one iteration is not.
    assert p1[("ours CG", 3)]["error"] < 1e-8
    assert p1[("ours CG", 1)]["error"] > 1e-2
    # From y*(x), T unrolled steps of size alpha equal K = T - 1 Neumann terms with step alpha.
    assert p1[("ours Unrolled", 3)]["error"] == pytest.approx(p1[("ours Neumann", 2)]["error"], rel=1e-9)
    # Neumann's error falls with K (alpha = 0.2 < 2 / lambda_max(A)).
    assert p1[("ours Neumann", 10)]["error"] < p1[("ours Neumann", 1)]["error"]
    assert all(r["time"] > 0 and r["peak"] > 0 for r in rows)
