"""What a bilevel run writes to TensorBoard: grouped scalar tags, its hyperparameters, small x as scalars, histograms.

Tags are grouped so the dashboard reads as a bilevel run, not as an alphabetical list:

==============================  ============================================================
``objective/upper``, ``/lower``  f and g at the step's (x, y)
``hypergradient/norm``           |dF/dx| as the engine estimates it
``solver/...``                   ``residual`` of the IFT solve, ``lower_stationarity`` |grad_y g|,
                                 ``fallback``, ``negative_curvature``
``engine/...``                   everything else an engine reports (lam, sigma, step_size, ...)
``time/...``                     seconds per phase, ``steps_per_second`` of the whole outer step
``upper/<name>``                 x itself when it has at most ``SCALAR_ENTRIES`` entries
``val/...``                      the validation loop's metrics
==============================  ============================================================

A metric whose name already has a group (``meta_loss/w32`` from a problem's ``upper_metrics``)
keeps it; a population's per-member entries keep their suffix (``objective/upper/member_07``).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from tensorboard.compat.proto.summary_pb2 import Summary
from torch import Tensor
from torch.utils.tensorboard.summary import hparams

from hypergrad import Engine
from hypergrad.tree import Tree

# Steps between logger writes (the Trainer's log_every_n_steps) in ``bilevel.fit`` and ``bilevel fit``. Writing
# every step adds about 0.5 ms to every outer step of a cheap engine (experiments/results/speed/fit_loop.md, "the
# logger every step"); every 10 steps the default 100-step run still draws ten points. Lightning's own default, 50,
# would leave it two.
DEFAULT_LOG_EVERY = 10

GROUPS = {
    "upper_objective": "objective/upper",
    "lower_objective": "objective/lower",
    "hypergradient_norm": "hypergradient/norm",
    "solve_residual": "solver/residual",
    "lower_stationarity": "solver/lower_stationarity",
    "solve_fallback": "solver/fallback",
    "negative_curvature": "solver/negative_curvature",
    "nonfinite_skipped": "guard/nonfinite_skipped",
}
"""Engine metric names and their TensorBoard tags."""

SCALAR_ENTRIES = 16
"""Upper variables with at most this many entries in all are also logged as scalars, entry by entry."""

HISTOGRAM_BINS = 64
"""Equal-width bins of each histogram over its values' range. TensorBoard's default ("tensorflow": 1549
exponential bins, some 10 kB an event) cost about 2 ms a histogram, most of it the event's checksum,
which tensorboard computes in pure Python; 64 bins cost a quarter of that (the dashboard draws 30)."""


def tag(name: str) -> str:
    """The TensorBoard tag of a metric: ``upper_objective`` -> ``objective/upper``; ``lam`` -> ``engine/lam``."""
    base, slash, rest = name.partition("/")
    if base in GROUPS:
        return GROUPS[base] + slash + rest
    return name if slash else f"engine/{name}"


def upper_scalars(x: Tree) -> dict[str, Tensor]:
    """x entry by entry (``upper/log_l2``, ``upper/weights/3``) when it has at most ``SCALAR_ENTRIES`` entries."""
    if sum(v.numel() for v in x.values()) > SCALAR_ENTRIES:
        return {}
    # One copy of all entries, split: a few operations in all, and no views of the engine's state.
    entries = iter(torch.cat([value.detach().reshape(-1) for value in x.values()]).unbind())
    out = {}
    for name, value in x.items():
        if value.numel() == 1:
            out[f"upper/{name}"] = next(entries)
        else:
            out.update({f"upper/{name}/{i}": next(entries) for i in range(value.numel())})
    return out


def log_scalars(logger: Any, scalars: dict[str, float], step: int) -> None:
    """``scalars`` at ``step`` in ``logger``: for Lightning's own TensorBoardLogger as one event, else ``log_metrics``.

    One event holding every tag reads in TensorBoard as the same points as one event per tag (what
    ``add_scalar`` writes), at a fraction of the cost: each event is a protobuf and a hand-off to the
    writer thread, and a cheap outer step logs a dozen tags.
    """
    if type(logger) is TensorBoardLogger:  # not a subclass, which may have its own log_metrics
        _write_scalars(logger, scalars, step)
    else:
        logger.log_metrics(scalars, step=step)


@rank_zero_only
def _write_scalars(logger: TensorBoardLogger, scalars: dict[str, float], step: int) -> None:
    prefix = getattr(logger, "_prefix", "")  # TensorBoardLogger(prefix=...), as its log_metrics applies it
    join = logger.LOGGER_JOIN_CHAR
    values = [Summary.Value(tag=f"{prefix}{join}{k}" if prefix else k, simple_value=v) for k, v in scalars.items()]
    logger.experiment._get_file_writer().add_summary(Summary(value=values), step)


def native_checksums() -> bool:
    """Have TensorBoard's event writer checksum events in C (``google-crc32c``); True when it does.

    TensorBoard computes the masked CRC-32C of every event it writes in pure Python (about 0.25 us a
    byte, 0.2 ms for one step's scalars) on its writer thread, which holds the GIL meanwhile, so the
    training loop waits for it. ``google_crc32c.value`` is the same CRC-32C (Castagnoli) in C; the mask
    is TensorFlow's record format's. Idempotent; without ``google-crc32c`` installed nothing changes.
    """
    try:
        import google_crc32c
        from tensorboard.summary.writer import record_writer
    except ImportError:
        return False

    def masked_crc32c(data: bytes) -> int:
        x = google_crc32c.value(data)
        return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    if getattr(record_writer.masked_crc32c, "native", False):
        return True
    masked_crc32c.native = True  # type: ignore[attr-defined]
    record_writer.masked_crc32c = masked_crc32c
    return True


def hyperparameters(problem: Any, engine: Engine, options: dict[str, Any]) -> dict[str, Any]:
    """A flat record of the run for TensorBoard's HPARAMS tab and ``hparams.yaml``.

    ``problem``: its class and the arguments it was built with (``BilevelProblem`` records them; a
    population adds its size); ``engine``: its class and every hyperparameter (``vars``); ``options``:
    the loop's own.
    """
    inner = getattr(engine, "engine", engine)  # compiled or vmapped: the engine it wraps
    record: dict[str, Any] = {"problem": getattr(problem, "title", type(problem).__name__)}
    for name, value in getattr(problem, "init_arguments", {}).items():
        record[f"problem/{name}"] = value
    record["engine"] = type(inner).__name__
    record.update({f"engine/{k}": v for k, v in vars(inner).items() if not k.startswith("_")})
    record.update(options)
    return {k: _plain(v) for k, v in record.items()}


HPARAMS_COLUMNS = ("objective/upper", "objective/lower", "hypergradient/norm")
"""The scalars TensorBoard's HPARAMS tab shows next to each run's hyperparameters (their latest values)."""


def log_hyperparameters(logger: Any, record: dict[str, Any]) -> None:
    """``record`` in ``hparams.yaml`` and, for TensorBoard, in the HPARAMS tab with ``HPARAMS_COLUMNS`` as metrics.

    Lightning writes the HPARAMS summary only together with metric values logged at step 0 (its
    ``hp_metric`` placeholder by default); here the summary names the run's own scalars instead, whose
    values TensorBoard reads from the curves, so no extra point is logged.
    """
    if not isinstance(logger, TensorBoardLogger):
        logger.log_hyperparams(record)
        return
    logger.log_hyperparams(record, metrics={})  # hparams.yaml only: {} writes no summary and no hp_metric
    _write_hparams_summary(logger, record)


@rank_zero_only
def _write_hparams_summary(logger: TensorBoardLogger, record: dict[str, Any]) -> None:
    experiment, start, end = hparams(record, dict.fromkeys(HPARAMS_COLUMNS, 0.0))
    writer = logger.experiment._get_file_writer()
    for summary in (experiment, start, end):
        writer.add_summary(summary)


def without_epoch_chart(logger: Any) -> None:
    """Make ``logger`` drop the ``epoch`` value Lightning adds to every logged dict (idempotent).

    Lightning adds it "for convenience"; in a bilevel run epochs are an artefact of how the data
    cycles (a full-batch run has one step per epoch), and the chart sat first on the dashboard.
    """
    if getattr(logger, "_bilevel_without_epoch", False):
        return
    log_metrics = logger.log_metrics

    def without_epoch(metrics: dict[str, Any], step: int | None = None) -> None:
        log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)

    logger.log_metrics = without_epoch
    logger._bilevel_without_epoch = True


def _plain(value: Any) -> Any:
    """What TensorBoard's HPARAMS accepts: numbers, strings and bools as they are, anything else as its repr."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return "None" if value is None else repr(value)
