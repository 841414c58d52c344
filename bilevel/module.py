"""The Lightning loop: one engine step per training step, metrics to the logger, state in checkpoints."""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import CombinedLoader, rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from bilevel.checkpoint import DEFAULT_CHECKPOINT_EVERY, StepCheckpoint, check_resume, is_default_checkpoint, run_record
from bilevel.console import SHOWN, OuterStepBar
from bilevel.data import BilevelStream, Reiterable, as_reiterable, combined, combined_tasks
from bilevel.distributed import UnsupportedStrategy, check_parallel, shard_level, shards_data
from bilevel.guard import NonFiniteStep, StepGuard, all_finite, step_quantities
from bilevel.population import Population
from bilevel.precision import StepPrecision, step_precision
from bilevel.problem import BilevelProblem
from bilevel.structure import BatchStructure
from bilevel.tasks import TaskData, Tasks
from bilevel.tensorboard import (
    HISTOGRAM_BINS,
    hyperparameters,
    log_hyperparameters,
    log_scalars,
    native_checksums,
    tag,
    upper_scalars,
    without_epoch_chart,
)
from bilevel.trainable import Trainable, as_trainable
from bilevel.validate import check_engine
from hypergrad import CompiledEngine, Engine, Functions, State, compile_engine


class _OuterStepCounter(torch.optim.Optimizer):
    """Advances Lightning's step count and nothing else.

    Under manual optimization Lightning counts ``global_step`` (and so ``max_steps``) in optimizer
    steps, while the engine updates x itself inside its pure ``step``. This optimizer holds no
    state and changes no parameter.
    """

    def __init__(self, params: Any) -> None:
        super().__init__(params, defaults={})

    def step(self, closure: Any = None) -> None:  # type: ignore[override]  # counts only; never calls closure
        return None


class BilevelModule(LightningModule):
    """Trains a ``BilevelProblem`` (or a ``Population`` of them) with a hypergradient ``Engine`` (manual optimization).

    Each training step takes one batch per level, runs the engine's three phases (timed), writes
    the new x and y into the problem's parameters and logs the engine's metrics. The engine state
    (y, adjoint, outer-optimizer moments, step counter) is saved in every checkpoint and restored
    from it, so a resumed run continues bit for bit. A population is stepped the same way by its
    vmapped engine (``Population.engine_for``), logs every metric per member
    (``upper_objective/member_07``) and as the mean over the members (``upper_objective``), and keeps
    the stacked state (every tensor [P, ...]).

    Lifecycle: ``__init__`` only stores and checks its arguments; the problem's functions are built
    and the problem and engine checked once, at the first training step, on the batches it trains
    on (after Lightning has moved the problem to its device and converted its precision); the state
    moves to the device once, after it is created or loaded.

    Args:
        problem: the bilevel problem or population, trained in place.
        engine: a ``hypergrad`` engine, e.g. ``hypergrad.CG(iters=10)``.
        log_histograms_every: steps between histograms of the upper variables (0 = never).
        compile: run the engine's phases through ``torch.compile`` (``hypergrad.compile_engine``):
            True, or a dict of ``torch.compile`` options (e.g. ``{"backend": "aot_eager"}``). The
            first step pays the compilation, later steps run the compiled graphs.
        on_nonfinite: what a step that produces a non-finite x, y, hypergradient, objective or
            engine state does: "raise" stops the run with ``bilevel.NonFiniteStep`` naming the step
            and the quantity; "skip" discards the step and counts it in ``nonfinite_skipped``.
            Either way nothing non-finite reaches the problem or a checkpoint.
        checkpoint_every: outer steps between checkpoints (Lightning's ModelCheckpoint, the latest
            kept, plus one at the last step), so a killed run loses at most that many steps. Applies
            when the Trainer has its default ModelCheckpoint; a ModelCheckpoint of your own is kept.
        resume_changed_engine: allow resuming a checkpoint written with other hyperparameters of the
            same engine class, provided the engine state keeps its keys and shapes (otherwise such a
            resume is refused before any step, naming each difference).
    """

    _trainable: Trainable

    def __init__(self, problem: BilevelProblem | Population | Tasks, engine: Engine, log_histograms_every: int = 50,
                 compile: bool | dict[str, Any] = False, on_nonfinite: str = "raise",
                 checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY, resume_changed_engine: bool = False) -> None:
        super().__init__()
        # Not registered as a submodule: for a population it is self.problem itself.
        object.__setattr__(self, "_trainable", as_trainable(problem))
        every = log_histograms_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"log_histograms_every must be an integer >= 0, got {log_histograms_every!r}")
        self.problem = problem
        if not isinstance(engine, Engine):
            raise TypeError(f"engine must be a hypergrad.Engine (e.g. hypergrad.CG(iters=10)), got "
                            f"{type(engine).__name__}")
        if not isinstance(compile, (bool, dict)):
            raise TypeError(f"compile must be True, False or a dict of torch.compile options, got {compile!r}")
        options = compile if isinstance(compile, dict) else {}
        self.engine = compile_engine(engine, **options) if compile is not False else engine
        self.log_histograms_every = log_histograms_every
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be an integer >= 1 (outer steps), got {checkpoint_every!r}")
        if not isinstance(resume_changed_engine, bool):
            raise TypeError(f"resume_changed_engine must be True or False, got {resume_changed_engine!r}")
        self.checkpoint_every = checkpoint_every
        self.resume_changed_engine = resume_changed_engine
        self._resumed_step: int | None = None
        self._guard = StepGuard(on_nonfinite, self._trainable.title.removeprefix("Population of "))
        self._structure = BatchStructure()
        self.automatic_optimization = False
        self.state: State | None = None
        self._state_on_device = False
        self._last_step_end: float | None = None
        self._shown: dict[str, Tensor] = {}  # the latest step's bar metrics (console.SHOWN) by tag, as tensors
        self.final_metrics: dict[str, float] = {}
        self._fns: Functions | None = None  # built at the first step (_build)
        self._runner: Engine | None = None  # the engine that steps the problem (vmapped for a population)
        self._precision = StepPrecision()  # the Trainer's, from on_fit_start (bilevel.precision)
        self._fit_loader: CombinedLoader | None = None  # the data given to bilevel.fit (use_data), else None
        self._val_data: Any = None  # the data given to bilevel.fit(val_data=...) (use_val_data), else None
        self._default: tuple[CombinedLoader | None, ValueError | None] | None = None  # from data(), when asked

    @property
    def trainable(self) -> Trainable:
        """The problem or population as the loop sees it (``bilevel.trainable``)."""
        return self._trainable

    @property
    def problem_name(self) -> str:
        """The problem's class name, or ``Population of <class>`` (for messages)."""
        return self._trainable.title

    # -- data ------------------------------------------------------------------------------------

    def prepare_data_for(self, lower_data: Any, upper_data: Any) -> CombinedLoader:
        """The combined loader of the two levels' data (each re-iterable; see ``bilevel.data``)."""
        return combined(as_reiterable(lower_data, "lower"), as_reiterable(upper_data, "upper"))

    def use_data(self, lower_data: Any, upper_data: Any) -> None:
        """Train on this data instead of the problem's ``data()``.

        It is served by ``train_dataloader``, which Lightning calls in every process, so under DDP
        each rank gets its shard of each level (``bilevel.distributed``). The problem and engine are
        checked on its first batches at the first training step.
        """
        self._fit_loader = self.prepare_data_for(lower_data, upper_data)

    def use_tasks(self, tasks: Any) -> None:
        """Train on batches of tasks: one stream whose every item ``(support, query)`` gives a step's lower batch
        (the support sets) and upper batch (the query sets), so they are always the same tasks
        (``bilevel.data.combined_tasks``). Served by ``train_dataloader`` like ``use_data``'s data."""
        self._fit_loader = combined_tasks(tasks)

    def use_val_data(self, val_data: Any) -> None:
        """Validate on this data (batches for the problem's ``validation_step``) when the Trainer validates."""
        if not self._trainable.can_validate_batches:
            raise ValueError(f"{self.problem_name}: val_data was given, but the problem defines no "
                             "validation_step(batch) to run on it; define one returning {name: value}, or leave "
                             "val_data out to validate with evaluate()")
        self._val_data = as_reiterable(val_data, "val")

    def _default_data(self) -> tuple[CombinedLoader | None, ValueError | None]:
        """The loader of the problem's ``data()`` or why there is none; ``data()`` is called once."""
        if self._default is None:
            loader, error = None, None
            try:
                default = self._trainable.data()
            except ValueError as err:
                if not self._trainable.is_population:
                    raise
                # A population whose members' data() cannot be combined may still be fit on data
                # passed to fit; the error is raised only when the default data is asked for.
                default, error = None, err
            if isinstance(default, TaskData):  # one stream of (support, query) task batches
                loader = combined_tasks(default.tasks)
            elif default is not None:
                loader = self.prepare_data_for(*default)
            elif error is None:
                name = self.problem_name
                error = ValueError(
                    f"{name} defines no data(), so there is nothing to train on: define {name}.data() returning "
                    "(lower_data, upper_data), each a DataLoader, a list of batches or a tuple of tensors (the full "
                    "batch), which the CLI and bilevel.fit without data use; or, from Python, pass them to "
                    "bilevel.fit(problem, engine, lower_data, upper_data)"
                )
            self._default = (loader, error)
        return self._default

    @property
    def default_data_error(self) -> ValueError | None:
        """Why the problem's own ``data()`` cannot feed this module (None when it can)."""
        return self._default_data()[1]

    def _loader(self) -> CombinedLoader:
        """The data of ``use_data``, else the problem's ``data()``."""
        if self._fit_loader is not None:
            return self._fit_loader
        loader, error = self._default_data()
        if error is not None:
            raise error
        assert loader is not None
        return loader

    def train_dataloader(self) -> CombinedLoader:
        """The data of ``use_data`` (``bilevel.fit``), else the problem's ``data()``; under DDP this rank's shard."""
        loader = self._loader()
        trainer = self._trainer
        if trainer is None or not shards_data(trainer):
            return loader
        # Lightning injects its DistributedSampler only into DataLoaders it is handed, and it is
        # handed the BilevelStream; each level is sharded here with the same machinery.
        stream = loader.iterables.sharded(lambda data, level: shard_level(data, level, trainer), trainer.world_size)
        return CombinedLoader(stream, mode="max_size_cycle")

    # -- Lightning's lifecycle ---------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Refuse what the Trainer's processes cannot run (FSDP, DeepSpeed, a population on several); validate
        every ``val_check_interval`` outer steps when that is an int, and not at all otherwise."""
        check_parallel(self.trainer, self._trainable.is_population, self.problem_name)
        trainer = self.trainer
        if isinstance(trainer.val_check_interval, int):
            # Counted in outer steps across epochs: a full-batch run's epoch is one step long.
            trainer.check_val_every_n_epoch = None
        elif self._val_data is None:
            # Lightning would validate at every epoch's end, i.e. after every full-batch step.
            trainer.limit_val_batches = 0

    def val_dataloader(self) -> Any:
        """The data of ``use_val_data``, else the problem's ``validation_data()``, else one pass of ``evaluate()``."""
        if self._val_data is not None:
            return self._val_data
        data = self._trainable.validation_data()
        # One batch None, wrapped: Lightning reads a bare list as a list of dataloaders.
        return Reiterable([None]) if data is None else as_reiterable(data, "val")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """The problem's ``validation_step(batch)`` (or ``evaluate()``), logged as ``val/<name>`` at this step."""
        metrics = self._trainable.validate(batch)
        logged = {f"val/{k}": torch.as_tensor(v, dtype=torch.float64) for k, v in metrics.items()}
        self.log_dict(logged, on_step=False, on_epoch=True, sync_dist=True)

    def __getstate__(self) -> dict[str, Any]:
        # The problem's functions are closures (bilevel.functional), which pickle cannot carry to the
        # processes of ddp_spawn; every process builds its own at its first step.
        state = super().__getstate__()
        state["_fns"] = None
        state["_runner"] = None
        return state

    def on_fit_start(self) -> None:
        """Take the Trainer's precision (``bilevel.precision``): refuse what the engines cannot honour; record
        the run's hyperparameters in every logger (TensorBoard's HPARAMS tab, ``hparams.yaml``)."""
        self._precision = step_precision(self.trainer.precision_plugin, self._trainable.is_population,
                                         self.device.type)
        record = hyperparameters(self._trainable, self.engine, {
            "compile": isinstance(self.engine, CompiledEngine), "on_nonfinite": self._guard.on_nonfinite,
            "checkpoint_every": self.checkpoint_every, "log_histograms_every": self.log_histograms_every,
            "max_steps": self.trainer.max_steps, "precision": str(self.trainer.precision)})
        for logger in self.loggers:
            without_epoch_chart(logger)
            log_hyperparameters(logger, record)
        if any(isinstance(logger, TensorBoardLogger) for logger in self.loggers):
            native_checksums()  # TensorBoard's pure-Python checksums cost the loop ~0.3 ms a step

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return _OuterStepCounter(self._trainable.step_parameters())

    def _build(self, batches: tuple[Any, Any]) -> None:
        """Build the functions once, check the problem on ``batches`` and the engine; the initial state unless loaded.

        At the first step, not in ``setup``: Lightning has now converted the problem ("64-true":
        float64) and moved it to its device, the functions hold the levels' buffers (BatchNorm
        statistics), and the batches are those the run trains on (this rank's shard under DDP).
        """
        fns, x, y = self._trainable.to_functions(batches)
        check_engine(fns, self.engine)
        self._fns = self._precision.functions(fns)
        self._runner = self._trainable.engine_for(self.engine)
        if self.state is None:
            self.state = self._runner.init(self._fns, x, y, lower_batch=batches[0])
            self._state_on_device = True

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # Lightning calls this under its precision plugin's autocast ("bf16-mixed", "16-mixed"); the engine's
        # own arithmetic (solvers, tree ops, outer optimizer, state) leaves it and stays in float32, the
        # objectives re-enter it (StepPrecision.functions).
        with self._precision.engine_context():
            self._engine_step(batch)

    def _engine_step(self, batch: dict[str, Any]) -> None:
        lower_batch, upper_batch = batch["lower"], batch["upper"]
        step = self.global_step + 1
        self._structure.check("lower", lower_batch, step)
        self._structure.check("upper", upper_batch, step)
        if self._runner is None:
            self._build((lower_batch, upper_batch))
        if not self._state_on_device:  # a loaded checkpoint's state
            self.state = apply_to_collection(self.state, Tensor, lambda t: t.to(self.device))
            self._state_on_device = True
        engine, fns, state = self._runner, self._fns, self.state
        assert engine is not None and fns is not None and state is not None  # built above
        index = self.global_step  # the step's index in the logs: its scalars are logged at it
        x_before = state["x"]
        clock = _PhaseClock(self.device)
        state = engine.inner(fns, state, lower_batch)
        clock.lap("inner")
        state, hypergrad, metrics = engine.estimate(fns, state, (lower_batch, upper_batch))
        clock.lap("hypergradient")
        state = engine.outer(fns, state, hypergrad)
        clock.lap("outer")
        accepted = self._guard.accept(step, step_quantities(state, hypergrad, metrics), metrics)
        counters = {tag("nonfinite_skipped"): float(self._guard.skipped)} if self._guard.on_nonfinite == "skip" else {}
        if not accepted:
            self._count_step()  # the step counts (Lightning's max_steps); x, y and the state stay as they were
            self._publish({}, counters, index)
            return
        self.state = state
        self._trainable.assign(state["x"], engine.lower_solution(state))
        self._trainable.refresh_statistics(lower_batch)
        self._count_step()

        scalars = {tag(name): value for name, value in self._trainable.named_metrics(metrics).items()}
        scalars.update(upper_scalars(state["x"]))
        numbers = {f"time/{k}": v for k, v in clock.laps.items()}
        now = time.perf_counter()
        if self._last_step_end is not None:  # the whole outer step, Lightning's work between steps included
            numbers["time/steps_per_second"] = 1.0 / (now - self._last_step_end)
        self._last_step_end = now
        self._publish(scalars, {**numbers, **counters}, index)
        every = self.log_histograms_every
        if every and index % every == 0 and isinstance(self.logger, TensorBoardLogger):
            # x and the hypergradient at x (this step's), the lower solution after it: step 0 included.
            trees = {"upper": x_before, "hypergradient": hypergrad, "lower": engine.lower_solution(state)}
            for group, tree in trees.items():
                for name, value in tree.items():
                    self.logger.experiment.add_histogram(f"{group}/{name}", value, index, bins=HISTOGRAM_BINS)

    def _publish(self, scalars: dict[str, Tensor], numbers: dict[str, float], index: int) -> None:
        """Hand one step's metrics (0-d tensors and Python floats, by tag) to callbacks, the bar and the loggers.

        In place of one ``self.log`` per metric: Lightning's result collection runs a ``.to(device)``
        over each entry's attributes per key and step, and its logger wrote one TensorBoard event per
        key and flushed at every step; with a dozen keys that was most of fit's fixed cost (11 ms CPU a
        step before, 1.6 ms after: experiments/results/speed/fit_loop.md). What Lightning's logging
        would leave is left: ``trainer.callback_metrics`` and ``trainer.logged_metrics`` hold every tag
        as a tensor after each step (EarlyStopping and ModelCheckpoint(monitor=...) read them), the
        loggers get the floats at this step's index on the Trainer's ``log_every_n_steps`` cadence and at
        the last step (one read-back for all tensors, none on the other steps; for TensorBoard one event,
        flushed with each checkpoint), and the bar reads its few values only when it redraws.
        """
        trainer = self.trainer
        # As self.log stores them: float32 and float64 as they are, other dtypes (integer counts, bfloat16) in the
        # default dtype, Python floats as float32 tensors.
        kept = (torch.float32, torch.float64)
        tensors = {k: v if v.dtype in kept else v.to(torch.get_default_dtype()) for k, v in scalars.items()}
        if numbers:
            as_tensors = torch.tensor(list(numbers.values()), dtype=torch.float32).unbind()
            tensors.update(zip(numbers, as_tensors, strict=True))
        trainer.callback_metrics.update(tensors)
        trainer.logged_metrics.update(tensors)
        self._shown = {k: v for k, v in tensors.items() if k in SHOWN}
        if not isinstance(trainer.progress_bar_callback, (OuterStepBar, type(None))):  # a bar of the user's
            trainer.progress_bar_metrics.update(self.bar_metrics())
        loggers = trainer.loggers
        every: int = getattr(trainer, "log_every_n_steps", 1)  # set on the Trainer by its logger connector
        # Lightning's cadence (its logger connector's should_update_logs): every n-th step and a stopping one; and
        # the last of max_steps, which Lightning's own cadence skips, so that a run's final values are on the board.
        last = 0 < trainer.max_steps <= index + 1
        if not loggers or not every or ((index + 1) % every and not trainer.should_stop and not last):
            return
        floats = torch.stack(list(scalars.values())).tolist() if scalars else []  # one read-back (stack promotes)
        logged = {**dict(zip(scalars, floats, strict=True)), **numbers}
        for logger in loggers:
            log_scalars(logger, logged, index)

    def bar_metrics(self) -> dict[str, float]:
        """The progress bar's values of the latest step by tag (``console.SHOWN``), read back when a bar redraws."""
        return {name: float(value) for name, value in self._shown.items()}

    def _count_step(self) -> None:
        """One step of the step-counting optimizer: Lightning's global_step and max_steps advance."""
        optimizer = self.optimizers()
        assert not isinstance(optimizer, list)  # configure_optimizers returns one
        optimizer.step()

    def on_train_end(self) -> None:
        self.final_metrics = self._trainable.finish()
        if self.final_metrics and self.logger is not None:
            self.logger.log_metrics({f"final/{k}": v for k, v in self.final_metrics.items()}, step=self.global_step)
            self.logger.save()

    def initial_state(self) -> State:
        """The engine state this run starts from without a checkpoint (built on the first batches of its data)."""
        batches = self._loader().iterables.peek()
        fns, x, y = self._trainable.to_functions(batches)
        return self._trainable.engine_for(self.engine).init(fns, x, y, lower_batch=batches[0])

    def configure_callbacks(self) -> list[Callback]:
        """A checkpoint every ``checkpoint_every`` steps and at the last, and a bar over the outer steps, in place
        of the Trainer's defaults.

        Lightning replaces a Trainer callback by one of its type returned here; a ModelCheckpoint or
        progress bar the user configured is kept (and checkpoint_every does not apply).
        """
        callbacks: list[Callback] = []
        existing = self.trainer.checkpoint_callbacks
        if len(existing) == 1 and isinstance(existing[0], ModelCheckpoint) and is_default_checkpoint(existing[0]):
            callbacks.append(StepCheckpoint(self.checkpoint_every))
        elif existing and self.checkpoint_every != DEFAULT_CHECKPOINT_EVERY:
            rank_zero_warn(f"checkpoint_every={self.checkpoint_every} does not apply: the Trainer has its own "
                           "ModelCheckpoint, which decides when checkpoints are written")
        bar = self.trainer.progress_bar_callback
        if type(bar) is TQDMProgressBar:  # Lightning's default, not one the user chose
            callbacks.append(OuterStepBar(refresh_rate=bar.refresh_rate))
        return callbacks

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # The stream's checkpointed position is that of the batch the step trains on, not of a
        # batch Lightning has read ahead (it does for streams without length).
        stream = self.trainer.train_dataloader
        if isinstance(stream, BilevelStream):
            stream.delivered()

    def on_train_start(self) -> None:
        stream = self.trainer.train_dataloader
        if isinstance(stream, BilevelStream) and shards_data(self.trainer) and stream.world_size == 1:
            raise UnsupportedStrategy(
                f"{self.problem_name}: the data handed to Trainer.fit(train_dataloaders=...) is the whole data on "
                f"each of the {self.trainer.world_size} processes, so every rank would train on all of it: use "
                "bilevel.fit(problem, engine, lower_data, upper_data, ...), or module.use_data(lower_data, "
                "upper_data) and Trainer.fit(module), which shard each level over the processes"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Scalars are logged without a flush per step (Lightning flushed at every one): flush them with each
        # checkpoint, so a run killed after it has logged every step the checkpoint holds.
        for logger in self.loggers:
            logger.save()
        # The guard keeps non-finite steps out of self.state; this is the last line of that defence.
        if self.state is not None and not all_finite(self.state):
            raise NonFiniteStep(f"{self._guard.name}: refusing to write a checkpoint whose engine state holds "
                                "non-finite values (a bug: the step guard should have stopped the step)")
        checkpoint["engine_state"] = self.state
        checkpoint["guard"] = self._guard.state_dict()
        checkpoint["engine"] = repr(self.engine)
        checkpoint["bilevel"] = run_record(self)
        if self.state is not None and self._runner is not None:
            # The level parameters equal the state's x and lower solution (assign); the state_dict's
            # entries become views of those tensors, so the file holds each tensor once.
            views = self._trainable.parameter_views(self.state["x"], self._runner.lower_solution(self.state))
            entries = checkpoint["state_dict"]
            entries.update({f"problem.{k}": v for k, v in views.items() if f"problem.{k}" in entries})

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # bilevel.fit and the CLI ran the same check on the file before the Trainer started; this
        # one covers a Trainer.fit(module, ckpt_path=...) of one's own and Lightning's "last".
        trainer = self._trainer
        check_resume(self, checkpoint, getattr(trainer, "ckpt_path", None) or "(in memory)",
                     getattr(trainer, "max_steps", None))
        self.state = checkpoint.get("engine_state")
        self._state_on_device = False
        if "guard" in checkpoint:
            self._guard.load_state_dict(checkpoint["guard"])
        self._resumed_step = int(checkpoint["global_step"])


class _PhaseClock:
    """Wall time of consecutive phases, synchronizing the accelerator so each lap is its own."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.laps[name] = now - self._last
        self._last = now
