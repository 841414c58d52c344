"""Smoke test of experiments/bench/memory.py: --quick writes sane tables and both plots."""

from __future__ import annotations

import re

from experiments.bench import memory


def _rows(text: str, section: str) -> list[list[str]]:
    """The data rows of the first table after the heading ``section``."""
    body = text.split(f"## {section}", 1)[1]
    table = re.search(r"(\|.*\|\n)+", body).group(0)
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.strip().splitlines()[2:]]


def test_quick_run_writes_tables_and_plots(tmp_path) -> None:
    path = memory.main(["--device", "cpu", "--quick", "--threads", "1", "--out", str(tmp_path)])
    text = path.read_text()
    for plot in ("memory.png", "memory_time.png"):
        assert (tmp_path / plot).stat().st_size > 1000
    assert "torch " in text and "Regenerate: `python -m experiments.bench.memory" in text

    sweep = _rows(text, "Peak memory and time per outer step")
    assert [int(r[0]) for r in sweep] == list(memory.QUICK.steps)
    unrolled = [float(r[1]) for r in sweep]
    assert unrolled == sorted(unrolled) and unrolled[-1] > 1.5 * unrolled[0]  # grows with T
    assert all(float(c) > 0 for r in sweep for c in r[1:])

    slope = {r[0]: float(r[2]) for r in _rows(text, "Unrolled: memory per differentiated step")}
    assert slope["y_t (one parameter copy)"] == 1.0
    assert 0.8 < slope["measured slope (least squares over T)"] / slope["predicted slope (sum)"] < 1.25

    for row in _rows(text, f"Live memory over {memory.QUICK.long_run} outer steps"):
        assert int(row[4]) == 0, row  # max - min of the live bytes over the run: flat
        assert float(row[3]) >= float(row[6]) > 0  # at least the state is alive after the last step

    for row in _rows(text, "Truncation"):
        assert 0.8 < float(row[3]) < 1.25, row  # truncate=k costs about T=k
