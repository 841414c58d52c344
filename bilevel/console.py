"""What a bilevel run prints: one progress bar over the outer steps, and none of the noise it does not need.

``OuterStepBar`` replaces Lightning's default bar, which counts batches per epoch (a full-batch run
is one batch per epoch, so the default job showed ``Epoch 399: 1/1``): it counts outer steps against
the run's ``max_steps`` with an ETA and shows both objectives and the hypergradient norm.

``quiet_lightning()`` silences, for the duration of a fit, what the framework itself triggers and
upstream noise that says nothing about the run: Lightning's advertisements ("Tip: ... litlogger",
"litmodels"), its notice that ``configure_callbacks`` replaced the default ModelCheckpoint and
progress bar (this module's own doing), and a deprecation warning Lightning's pytree helper raises
against torch >= 2.10. Every other log line and warning, the user's own included, passes.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, convert_inf

SHOWN = {"objective/upper": "upper", "objective/lower": "lower", "hypergradient/norm": "|hypergradient|"}
"""The bar's metrics (logged tags) and the short names it shows them under."""

_NOISE = (
    "💡 Tip:",  # advertisements for Lightning's cloud products
    "returned in `LightningModule.configure_callbacks` will override existing callbacks",
)
_LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
_UPSTREAM_WARNINGS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)


class OuterStepBar(TQDMProgressBar):
    """One bar for the whole run: outer steps done / ``max_steps``, an ETA, the objectives and |hypergradient|."""

    _drawn = -math.inf  # time.monotonic() of the last redraw

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._drawn = -math.inf
        self.train_progress_bar = Tqdm(
            desc="Outer steps", total=convert_inf(trainer.max_steps) if trainer.max_steps > 0 else None,
            initial=trainer.global_step,  # a resumed run continues the count
            position=2 * self.process_position, disable=self.is_disabled, leave=True, dynamic_ncols=True,
            file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT)

    def on_train_epoch_start(self, trainer: Trainer, *_: Any) -> None:
        """Nothing: epochs are an artefact of how the data cycles, the bar counts outer steps."""

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        bar, n = self.train_progress_bar, trainer.global_step
        if bar is None or not self._should_update(n, bar.total or 0):
            return
        # Redrawn (and its metrics read back) at most every tqdm mininterval (0.1 s) and at the last step: a
        # redraw per step cost more than a cheap engine step, and no eye follows the bar faster.
        now = time.monotonic()
        if n != bar.total and now - self._drawn < bar.mininterval:
            return
        self._drawn = now
        bar.n = n
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.refresh()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Nothing: the bar stays open across epochs."""

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        # A BilevelModule logs its step metrics past Lightning's progress_bar_metrics and reads them back only here.
        bar_metrics = getattr(pl_module, "bar_metrics", None)
        metrics = bar_metrics() if callable(bar_metrics) else trainer.progress_bar_metrics
        return {short: metrics[tag] for tag, short in SHOWN.items() if tag in metrics}


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in _NOISE)


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Within the block, drop Lightning's advertisements, its callback-override notice and known upstream warnings."""
    noise = _DropNoise()
    loggers = [logging.getLogger(name) for name in _LIGHTNING_LOGGERS]
    for logger in loggers:
        logger.addFilter(noise)
    try:
        with warnings.catch_warnings():
            for message in _UPSTREAM_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(noise)
