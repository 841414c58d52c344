"""Smoke test of experiments/bench/distributed.py: --quick on 1 rank and 2 gloo ranks writes a sane table."""

from __future__ import annotations

from pathlib import Path

import torch

from experiments.bench import distributed as bench


def _rows(text: str) -> dict[str, list[str]]:
    """problem / engine -> the remaining cells of each table row."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if " / " in cells[0] and len(cells) == len(bench.HEADERS) and cells[0] != bench.HEADERS[0]:
            out[cells[0]] = cells[1:]
    return out


def test_quick_run_times_one_and_two_ranks_and_counts_all_reduces(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    out = tmp_path / "distributed.md"
    try:
        text = bench.main(["--device", "cpu", "--quick", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)  # the benchmark pins this process to 1 thread
    assert out.read_text() == text
    assert text.startswith("# Data parallelism") and "torch " in text and "backend gloo" in text
    assert "python -m experiments.bench.distributed --device cpu --quick" in text
    rows = _rows(text)
    assert list(rows) == [job.label for job in bench.jobs(quick=True, with_mlp=True)]
    for label, cells in rows.items():
        one, rank0, slowest, speedup, alone = (float(c.rstrip("x")) for c in cells[:5])
        reduces, kib, reduce_ms, comm_ms = (float(c) for c in cells[5:9])
        assert min(one, rank0, slowest, alone, reduce_ms) > 0, label
        assert rank0 <= slowest and abs(speedup - one / slowest) <= 0.01 + 0.01 * speedup, label
        # Every engine reduces something each step on 2 ranks; the estimate is the count times one all-reduce.
        assert reduces > 0 and kib > 0, label
        assert abs(comm_ms - reduces * reduce_ms) <= 0.01 * comm_ms + 0.01, label
        # 2 ranks on halves of the batch follow 1 rank on the whole batch (float32 rounding apart).
        assert float(cells[-1]) < 1e-3, label
        for gap in cells[-3:-1]:
            assert gap == "x did not move" or float(gap) < 1e-2, label
