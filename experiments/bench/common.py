"""What every benchmark shares: arguments, the environment header, interleaved timing, peak memory, tables.

Timing is interleaved: every repetition runs each case once, in turn, so a load spike on the machine
hits all cases alike and the ratios between them (the targets) stay meaningful. Reported figures are
medians over the repetitions after warm-up.

Peak memory on CUDA is the allocator's peak; on CPU, where torch keeps no allocator statistics, it is
the peak of the bytes held by live tensor storages, tracked by a dispatch mode (``LiveBytes``). Both
count memory allocated during the call above what was alive before it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

RESULTS = Path(__file__).resolve().parents[1] / "results"


def parser(description: str) -> argparse.ArgumentParser:
    """The arguments of every benchmark: --device, --threads, --warmup, --repeats, --quick."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads (pinned)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repeats: a smoke test, not a result")
    return p


def setup(args: argparse.Namespace) -> torch.device:
    """Pin threads, check the device exists, and return it."""
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    if args.quick:
        args.warmup, args.repeats = 1, 3
    return torch.device(args.device)


def environment(device: torch.device) -> str:
    """One line naming torch, the hardware and the threads, for the top of every table."""
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = _cpu_model()
    date = datetime.date.today().isoformat()
    return (f"torch {torch.__version__}, {hardware}, {torch.get_num_threads()} CPU thread(s), "
            f"Python {platform.python_version()}, {date}")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(cases: dict[str, Callable[[], Any]], device: torch.device, warmup: int = 3,
                        repeats: int = 15) -> dict[str, float]:
    """Median wall time in seconds of each case, the cases run in turn within every repetition."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


class LiveBytes(TorchDispatchMode):
    """Tracks the bytes held by live tensor storages created while the mode is active; keeps the peak.

    Every op's outputs are seen here (under ``torch.func`` transforms too, which run below the
    Python dispatch key); a storage is counted once, when first seen, and uncounted when it dies.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # A view or an in-place result shares an argument's storage: no allocation. Counting it would
        # charge a tensor made before the mode (a batch flattened, a weight transposed) to the call.
        shared = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta and t.untyped_storage()._cdata not in shared:
                self._count(t.untyped_storage())
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        if storage in self._seen:
            return
        size = storage.nbytes()
        self._seen[storage] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, size)

    def _release(self, size: int) -> None:
        self.live -= size


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated by tensors during ``fn()`` above what was alive before it."""
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with LiveBytes() as mode:
        fn()
    return mode.peak


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table; floats printed with 3 significant digits."""
    def cell(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def mib(n: int) -> float:
    return n / 2**20


def run_worker(tree: Path, script: str, flags: list[str], threads: int, env: dict[str, str] | None = None) -> Any:
    """Run ``script`` (a benchmark file) with ``flags`` in a subprocess whose imports come from ``tree``.

    For before/after tables: the worker prints one JSON line last, returned parsed. ``tree`` is a
    checkout of the revision compared (``git worktree add``), put first on PYTHONPATH; ``env`` adds variables.
    """
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, str(Path(script).resolve()), *flags], env=env, cwd=tree,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def revision(tree: Path) -> str:
    """The short commit of the checkout at ``tree``, with " + uncommitted changes" when it has any."""
    found = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return found.stdout.strip() + (" + uncommitted changes" if dirty else "")
