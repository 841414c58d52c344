"""Smoke test of experiments/bench/population.py: --quick writes a sane table and a plot."""

from __future__ import annotations

import re

from experiments.bench import population


def test_quick_run_writes_table_and_plot(tmp_path) -> None:
    path = population.main(["--device", "cpu", "--quick", "--threads", "1", "--out", str(tmp_path)])
    text = path.read_text()
    assert (tmp_path / "population.png").stat().st_size > 1000
    assert "torch " in text and "Regenerate: `python -m experiments.bench.population" in text
    rows = [line.split("|")[1:-1] for line in text.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [int(r[0]) for r in rows] == [*population.QUICK_SIZES] * 2  # both populations, every size
    for row in rows:
        vmapped, loop, speedup, difference = float(row[1]), float(row[2]), float(row[4]), float(row[5])
        assert vmapped > 0 and loop > 0
        assert abs(speedup - loop / vmapped) <= 0.01 * speedup + 0.01  # the table's ratio is its columns'
        assert difference < 1e-5  # the vmapped step computed what the loop did
