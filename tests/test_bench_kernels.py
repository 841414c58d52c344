"""Smoke test of experiments/bench/kernels.py: --quick writes a sane kernels.md and plot (no timing asserted)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from experiments.bench import kernels as bench
from hypergrad import kernels


def _row(text: str, name: str) -> list[str]:
    """The cells after the name of the first table row named ``name``."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == name:
            return cells[1:]
    raise AssertionError(f"no row {name!r}")


def _sections(text: str) -> dict[str, str]:
    parts = text.split("\n### ")[1:]
    return {part.splitlines()[0]: part for part in parts}


def test_quick_run_writes_every_kernel_and_engine_row(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    try:
        path = bench.main(["--device", "cpu", "--quick", "--threads", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    text = path.read_text()
    assert path == tmp_path / "kernels.md" and (tmp_path / "kernels.png").stat().st_size > 1000
    assert text.startswith("# Kernel cost\n") and "torch " in text and "python -m experiments.bench.kernels" in text
    sections = _sections(text)
    assert list(sections) == ["MLP 784-16-16-10", "CNN (2 channels)", "transformer block (d 16)",
                              "transformer block (d 16), math attention"]

    mlp = sections["MLP 784-16-16-10"]
    assert _row(mlp, "gradient grad_y g")[1] == "1"  # the unit of every ratio
    for name in [f"HVP {m}" for m in kernels.HVP_MODES] + ["operator product (kept graph)", "mixed VJP"]:
        ms, ratio, peak = (float(c) for c in _row(mlp, name))
        assert ms > 0 and math.isfinite(ratio) and ratio > 0 and peak > 0
    for name in ("CG K=1", "Neumann K=1", "F2SA T=2", "Penalty T=2"):
        cells = [float(c) for c in _row(mlp, name)]
        assert len(cells) == 9 and all(math.isfinite(c) and c > 0 for c in cells)
    assert "CG K=1" not in sections["CNN (2 channels)"]  # --quick times engines on the MLP only

    # PyTorch's fused CPU attention has no forward-mode derivative and no double backward; the math backend has.
    fused = sections["transformer block (d 16)"]
    assert all(_row(fused, f"HVP {m}")[0].startswith("n/a") for m in kernels.HVP_MODES)
    assert "HVP modes native here: none" in fused
    math_backend = sections["transformer block (d 16), math attention"]
    assert all(float(_row(math_backend, f"HVP {m}")[1]) > 0 for m in kernels.HVP_MODES)
    targets = text.split("## Targets")[1].split("## Per network")[0]
    assert "| MLP 784-16-16-10 |" in targets and "| transformer block (d 16), math attention |" in targets
