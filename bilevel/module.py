"""The Lightning loop: one engine step per training step, metrics to the logger, state in checkpoints."""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import CombinedLoader, rank_zero_only, rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from bilevel.checkpoint import DEFAULT_CHECKPOINT_EVERY, StepCheckpoint, check_resume, is_default_checkpoint, run_record
from bilevel.data import BilevelStream, as_reiterable, combined, first_batch
from bilevel.distributed import UnsupportedStrategy, check_parallel, shard_level, shards_data
from bilevel.functional import levels, write_back
from bilevel.guard import NonFiniteStep, StepGuard, step_quantities
from bilevel.population import Population
from bilevel.precision import StepPrecision, step_precision
from bilevel.problem import BilevelProblem
from bilevel.structure import BatchStructure
from bilevel.validate import check_engine
from hypergrad import Engine, Functions, State, compile_engine
from hypergrad.finite import finite_flags

PROGRESS_BAR_METRICS = ("upper_objective", "lower_objective")


class _OuterStepCounter(torch.optim.Optimizer):
    """Advances Lightning's step count and nothing else.

    Under manual optimization Lightning counts ``global_step`` (and so ``max_steps``) in optimizer
    steps, while the engine updates x itself inside its pure ``step``. This optimizer holds no
    state and changes no parameter.
    """

    def __init__(self, params: Any) -> None:
        super().__init__(params, defaults={})

    def step(self, closure: Any = None) -> None:
        return None


class BilevelModule(LightningModule):
    """Trains a ``BilevelProblem`` (or a ``Population`` of them) with a hypergradient ``Engine`` (manual optimization).

    Each training step takes one batch per level, runs the engine's three phases (timed), writes
    the new x and y into the problem's parameters and logs the engine's metrics. The engine state
    (y, adjoint, outer-optimizer moments, step counter) is saved in every checkpoint and restored
    from it, so a resumed run continues bit for bit. A population runs each phase vmapped over its
    members, logs every metric per member (``upper_objective/member_07``) and as the mean over the
    members (``upper_objective``), and keeps the stacked state (every tensor [P, ...]).

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

    def __init__(self, problem: BilevelProblem | Population, engine: Engine, log_histograms_every: int = 50,
                 compile: bool | dict[str, Any] = False, on_nonfinite: str = "raise",
                 checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY, resume_changed_engine: bool = False) -> None:
        super().__init__()
        if not isinstance(problem, (BilevelProblem, Population)):
            raise TypeError(
                f"problem must be a bilevel.BilevelProblem or a bilevel.Population, got {type(problem).__name__}"
            )
        every = log_histograms_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"log_histograms_every must be an integer >= 0, got {log_histograms_every!r}")
        self._population = isinstance(problem, Population)
        lower, upper = levels(problem.members[0] if self._population else problem)
        # Running statistics (BatchNorm) need one refresh per step; decided once, not in every step.
        self._levels_have_buffers = any(True for m in (lower, upper) for _ in m.buffers())
        self.problem = problem
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
        self._first_lower_batch: Any = None  # for the engine state a changed-engine resume is compared with
        self._resumed_step: int | None = None
        self._guard = StepGuard(on_nonfinite, problem.name if self._population else type(problem).__name__)
        self._structure = BatchStructure()
        self.automatic_optimization = False
        self.state: State | None = None
        self.final_metrics: dict[str, float] = {}
        self._fns: Functions | None = None
        self._precision = StepPrecision()  # the Trainer's, from on_fit_start (bilevel.precision)
        self._default_loader: CombinedLoader | None = None
        self._fit_loader: CombinedLoader | None = None  # the data given to bilevel.fit (use_data), else None
        self._default_error: ValueError | None = None
        try:
            default = problem.data()
        except ValueError as err:
            if not self._population:
                raise
            # A population whose members' data() cannot be combined may still be fit on data
            # passed to fit; the error is raised only when the default data is asked for.
            default, self._default_error = None, err
        if default is not None:
            self._default_loader = self.prepare_data_for(*default)

    def prepare_data_for(self, lower_data: Any, upper_data: Any) -> CombinedLoader:
        """Check the problem and engine on the first batch of each level; return the combined loader."""
        lower = as_reiterable(lower_data, "lower")
        upper = as_reiterable(upper_data, "upper")
        batches = (first_batch(lower, "lower"), first_batch(upper, "upper"))
        self._first_lower_batch = batches[0]
        if self._population:
            self.problem.check(self.engine, *batches)
        else:
            self._fns, _, _ = self.problem.to_functions(batches)
            check_engine(self._fns, self.engine)
        return combined(lower, upper)

    def use_data(self, lower_data: Any, upper_data: Any) -> None:
        """Train on this data instead of the problem's ``data()``, checked now (``prepare_data_for``).

        It is served by ``train_dataloader``, which Lightning calls in every process, so under DDP
        each rank gets its shard of each level (``bilevel.distributed``).
        """
        self._fit_loader = self.prepare_data_for(lower_data, upper_data)

    @property
    def problem_name(self) -> str:
        """The problem's class name, or ``Population of <class>`` (for messages)."""
        return f"Population of {self.problem.name}" if self._population else type(self.problem).__name__

    @property
    def default_data_error(self) -> ValueError | None:
        """Why the problem's own ``data()`` cannot feed this module (None when it can)."""
        if self._default_error is not None:
            return self._default_error
        if self._default_loader is None:
            name = self.problem_name
            return ValueError(
                f"{name} defines no data(), so there is nothing to train on: define {name}.data() returning "
                "(lower_data, upper_data), each a DataLoader, a list of batches or a tuple of tensors (the full "
                "batch), which the CLI and bilevel.fit without data use; or, from Python, pass them to "
                "bilevel.fit(problem, engine, lower_data, upper_data)"
            )
        return None

    def train_dataloader(self) -> CombinedLoader:
        """The data of ``use_data`` (``bilevel.fit``), else the problem's ``data()``; under DDP this rank's shard."""
        loader = self._fit_loader
        if loader is None:
            error = self.default_data_error
            if error is not None:
                raise error
            loader = self._default_loader
        trainer = self._trainer
        if trainer is None or not shards_data(trainer):
            return loader
        # Lightning injects its DistributedSampler only into DataLoaders it is handed, and it is
        # handed the BilevelStream; each level is sharded here with the same machinery.
        stream = loader.iterables.sharded(lambda data, level: shard_level(data, level, trainer), trainer.world_size)
        return CombinedLoader(stream, mode="max_size_cycle")

    def setup(self, stage: str) -> None:
        """Refuse what the Trainer's processes cannot run (FSDP, DeepSpeed, a population on several)."""
        check_parallel(self.trainer, self._population, self.problem_name)

    def __getstate__(self) -> dict[str, Any]:
        # The problem's functions are closures (bilevel.functional), which pickle cannot carry to the
        # processes of ddp_spawn; every process builds its own in on_fit_start.
        state = super().__getstate__()
        state["_fns"] = None
        return state

    def on_fit_start(self) -> None:
        """Take the Trainer's precision (``bilevel.precision``): refuse what the engines cannot honour, and build
        f, g, c once more, under the plugin's autocast when mixed.

        Built here, not in ``setup``: Lightning has now converted the problem ("64-true": float64) and
        moved it to its device, and the functions hold the levels' buffers (BatchNorm statistics).
        """
        self._precision = step_precision(self.trainer.precision_plugin, self._population, self.device.type)
        if not self._population:
            fns, _, _ = self.problem.to_functions()
            self._fns = self._precision.functions(fns)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        problem = self.problem.members[0] if self._population else self.problem
        return _OuterStepCounter(problem.upper.parameters())

    def _initial_state(self, lower_batch: Any) -> State:
        if self._population:
            return self.problem.init(self.engine, lower_batch)
        fns, x, y = self.problem.to_functions()
        if self._fns is None:
            self._fns = fns
        return self.engine.init(self._fns, x, y, lower_batch=lower_batch)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # Lightning calls this under its precision plugin's autocast ("bf16-mixed", "16-mixed"); the engine's
        # own arithmetic (solvers, tree ops, outer optimizer, state) leaves it and stays in float32, the
        # objectives re-enter it (StepPrecision.functions).
        with self._precision.engine_context():
            self._engine_step(batch, batch_idx)

    def _engine_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        lower_batch, upper_batch = batch["lower"], batch["upper"]
        step = self.global_step + 1
        self._structure.check("lower", lower_batch, step)
        self._structure.check("upper", upper_batch, step)
        if self.state is None:
            self.state = self._initial_state(lower_batch)
        state = apply_to_collection(self.state, Tensor, lambda t: t.to(self.device))
        engine = self.engine
        # A population runs the same phases vmapped over its members, on the stacked state.
        runner = self.problem if self._population else engine
        first = engine if self._population else self._fns
        clock = _PhaseClock(self.device)
        state = runner.inner(first, state, lower_batch)
        clock.lap("inner")
        state, hypergrad, metrics = runner.estimate(first, state, (lower_batch, upper_batch))
        clock.lap("hypergradient")
        state = runner.outer(first, state, hypergrad)
        clock.lap("outer")
        accepted = self._guard.accept(step, step_quantities(state, hypergrad, metrics), metrics)
        if self._guard.on_nonfinite == "skip":
            self.log("nonfinite_skipped", float(self._guard.skipped), on_step=True)
        if not accepted:
            self.optimizers().step()  # the step counts (Lightning's max_steps); x, y and the state stay as they were
            return
        self.state = state
        if self._population:
            self.problem.write_back(engine, state)
        else:
            write_back(self.problem, state["x"], engine.lower_solution(state))
        self._refresh_buffers(lower_batch)
        self.optimizers().step()

        for name, value in metrics.items():
            if self._population:
                self._log_members(name, value)
            else:
                self.log(name, value, on_step=True, prog_bar=name in PROGRESS_BAR_METRICS)
        self.log_dict({f"time/{k}": v for k, v in clock.laps.items()}, on_step=True)
        every = self.log_histograms_every
        if every and self.global_step % every == 0 and isinstance(self.logger, TensorBoardLogger):
            for name, value in state["x"].items():
                self.logger.experiment.add_histogram(f"upper/{name}", value, self.global_step)

    @torch.no_grad()
    def _refresh_buffers(self, lower_batch: Any) -> None:
        # Engines see buffers as constants (cloned per call), so running statistics such as
        # BatchNorm's are updated here by one forward of g at the new parameters.
        if self.problem.training and self._levels_have_buffers:
            if self._population:
                for i, member in enumerate(self.problem.members):
                    member.lower_objective(self.problem.member_batch(lower_batch, i))
            else:
                self.problem.lower_objective(lower_batch)

    def _log_members(self, name: str, value: Tensor) -> None:
        """A population's metric [P]: its mean under ``name`` and member i's value under ``name/member_i``."""
        mean = (value if value.is_floating_point() else value.double()).mean()
        self.log(name, mean, on_step=True, prog_bar=name in PROGRESS_BAR_METRICS)
        for i, member_value in enumerate(value.unbind(0)):
            self.log(f"{name}/{member_name(i, value.shape[0])}", member_value, on_step=True)

    def on_train_end(self) -> None:
        if self._population:
            self._end_population()
            return
        self.final_metrics = {k: float(v) for k, v in self.problem.evaluate().items()}
        if not self.final_metrics:
            return
        if self.logger is not None:
            self.logger.log_metrics({f"final/{k}": v for k, v in self.final_metrics.items()}, step=self.global_step)
            self.logger.save()
        _print_table(type(self.problem).__name__, self.final_metrics)

    def _end_population(self) -> None:
        """Every member's ``evaluate()``: logged per member and as the mean, printed as one table."""
        size = len(self.problem)
        per_member = self.problem.evaluate()
        names = list(dict.fromkeys(k for metrics in per_member for k in metrics))
        if not names:
            return
        self.final_metrics = {k: sum(m[k] for m in per_member if k in m) / sum(k in m for m in per_member)
                              for k in names}
        self.final_metrics.update({f"{k}/{member_name(i, size)}": m[k] for i, m in enumerate(per_member) for k in m})
        if self.logger is not None:
            self.logger.log_metrics({f"final/{k}": v for k, v in self.final_metrics.items()}, step=self.global_step)
            self.logger.save()
        _print_member_table(f"Population of {size} {self.problem.name}", names, per_member)

    def initial_state(self) -> State:
        """The engine state this run starts from without a checkpoint (from the first lower batch)."""
        return self._initial_state(self._first_lower_batch)

    def configure_callbacks(self) -> list[Callback]:
        """A checkpoint every ``checkpoint_every`` steps and at the last, in place of the Trainer's default one.

        Lightning replaces the Trainer's ModelCheckpoint by the one returned here; a ModelCheckpoint
        the user configured (any setting changed) is kept, and checkpoint_every does not apply.
        """
        existing = self.trainer.checkpoint_callbacks
        if len(existing) == 1 and is_default_checkpoint(existing[0]):
            return [StepCheckpoint(self.checkpoint_every)]
        if existing and self.checkpoint_every != DEFAULT_CHECKPOINT_EVERY:
            rank_zero_warn(f"checkpoint_every={self.checkpoint_every} does not apply: the Trainer has its own "
                           "ModelCheckpoint, which decides when checkpoints are written")
        return []

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
        # A resumed TensorBoard run purges what was logged at the checkpoint's step and after; the
        # histogram of that step (logged after it, so part of the checkpoint's past) is written again.
        step, every = self._resumed_step, self.log_histograms_every
        if step is None or not every or step % every or self.state is None:
            return
        if isinstance(self.logger, TensorBoardLogger):
            for name, value in self.state["x"].items():
                self.logger.experiment.add_histogram(f"upper/{name}", value, step)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The guard keeps non-finite steps out of self.state; this is the last line of that defence.
        if self.state is not None and not bool(finite_flags({"engine_state": self.state}).all()):
            raise NonFiniteStep(f"{self._guard.name}: refusing to write a checkpoint whose engine state holds "
                                "non-finite values (a bug: the step guard should have stopped the step)")
        checkpoint["engine_state"] = self.state
        checkpoint["guard"] = self._guard.state_dict()
        checkpoint["engine"] = repr(self.engine)
        checkpoint["bilevel"] = run_record(self)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # bilevel.fit and the CLI ran the same check on the file before the Trainer started; this
        # one covers a Trainer.fit(module, ckpt_path=...) of one's own and Lightning's "last".
        trainer = self._trainer
        check_resume(self, checkpoint, getattr(trainer, "ckpt_path", None) or "(in memory)",
                     getattr(trainer, "max_steps", None))
        self.state = checkpoint.get("engine_state")
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


def member_name(index: int, size: int) -> str:
    """``member_07``: the index zero-padded to the width of the largest index (at least two digits)."""
    return f"member_{index:0{max(2, len(str(size - 1)))}d}"


@rank_zero_only
def _print_member_table(title: str, names: list[str], per_member: list[dict[str, float]]) -> None:
    rows = [(member_name(i, len(per_member)), m) for i, m in enumerate(per_member)]
    mean = {k: sum(m[k] for m in per_member if k in m) / max(1, sum(k in m for m in per_member)) for k in names}
    width = max(len(rows[-1][0]), 4)
    print(f"\n{title}: final metrics")
    print(f"  {'':<{width}}  " + "  ".join(f"{k:>12}" for k in names))
    for label, metrics in [*rows, ("mean", mean)]:
        cells = (f"{metrics[k]:>12.4g}" if k in metrics else f"{'-':>12}" for k in names)
        print(f"  {label:<{width}}  " + "  ".join(cells))


@rank_zero_only
def _print_table(title: str, metrics: dict[str, float]) -> None:
    width = max(map(len, metrics))
    print(f"\n{title}: final metrics")
    for name, value in metrics.items():
        print(f"  {name:<{width}}  {value:.4g}")
