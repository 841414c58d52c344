"""Checkpoints of a bilevel run: written every ``checkpoint_every`` steps, checked before a resume, logged on.

A checkpoint holds, next to Lightning's own entries (the problem's parameters, the loops, the
data stream's position), the engine state (``engine_state``) and a record of what wrote it
(``bilevel``: the problem class, the engine class and every engine hyperparameter). A resume is
checked against that record before any step: another problem or engine class is refused, other
hyperparameters are refused unless the run allows them (``resume_changed_engine``) and the
state keeps its shape, and a ``max_steps`` at or below the checkpoint's step is an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from bilevel.population import Population
from bilevel.tasks import Tasks
from hypergrad import Engine
from hypergrad.compile import CompiledEngine

if TYPE_CHECKING:
    from bilevel.module import BilevelModule

# A checkpoint costs about 3.5 ms on the default job (Lightning's checkpoint dict, torch.save, removing the
# previous file; `python -m experiments.bench.checkpoint`, experiments/results/speed/checkpoint.md): 0.35 ms of
# every outer step when written every 10 steps, 0.07 ms every 50, while a kill -9 loses at most 50 outer steps.
DEFAULT_CHECKPOINT_EVERY = 50

# ``Trainer.fit(ckpt_path=...)`` names Lightning resolves itself; they are checked when loaded.
LIGHTNING_CKPT_NAMES = ("last", "hpc", "registry", "best")


class CheckpointError(ValueError):
    """A checkpoint this run cannot resume from; the message names the file, what differs and what to do."""


class StepCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, writing every ``every`` outer steps and at the last step, keeping the latest.

    ModelCheckpoint's own ``every_n_train_steps`` under manual optimization warns that the state
    saved is the post-step one; that is the state a bilevel step leaves (x, y, engine state and data
    position all after step k), so the save is done here without the warning. The last step is
    written at the end of training so a finished run always leaves its final state.
    """

    def __init__(self, every: int) -> None:
        super().__init__(every_n_train_steps=every)

    @property
    def state_key(self) -> str:
        # One key whatever ``every`` is, so a run resumed with another checkpoint_every still restores
        # the callback's state (its latest path) instead of warning that the callback is missing.
        return self._generate_state_key(name="bilevel")

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step % self._every_n_train_steps == 0:
            self._save_now(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: Any) -> None:
        self._save_now(trainer)

    # ModelCheckpoint's epoch and validation ends save nothing with every_n_train_steps set, but first deep-copy
    # every callback metric (``_monitor_candidates``); a full-batch run ends an epoch at every step.
    def on_train_epoch_end(self, trainer: Trainer, pl_module: Any) -> None:
        """Nothing: checkpoints are written by outer steps (``on_train_batch_end``) and at the end."""

    def on_validation_end(self, trainer: Trainer, pl_module: Any) -> None:
        """Nothing: checkpoints are written by outer steps (``on_train_batch_end``) and at the end."""

    def _save_now(self, trainer: Trainer) -> None:
        if self._should_skip_saving_checkpoint(trainer):  # fast_dev_run, sanity check, already saved this step
            return
        # What the default file name "{epoch}-{step}" formats, and all a checkpoint without a monitor needs:
        # ModelCheckpoint's own candidates are a deep copy of every callback metric, at every save.
        candidates = {"epoch": torch.tensor(trainer.current_epoch), "step": torch.tensor(trainer.global_step)}
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)


def is_default_checkpoint(callback: ModelCheckpoint) -> bool:
    """Whether a ModelCheckpoint is the one the Trainer adds by itself (nothing set by the user)."""
    return (type(callback) is ModelCheckpoint and callback.dirpath is None and callback.filename is None
            and callback.monitor is None and callback.save_top_k == 1 and not callback.save_last
            and callback._every_n_train_steps == 0 and callback._every_n_epochs == 1
            and callback._train_time_interval is None)


def _plain(value: Any) -> Any:
    """A hyperparameter as checkpoints store it: Python scalars and strings as they are, anything else by repr."""
    return value if isinstance(value, (bool, int, float, str, type(None))) else repr(value)


def engine_record(engine: Engine) -> dict[str, Any]:
    """The engine's class and every hyperparameter (``vars``); a compiled engine is recorded as the engine it wraps.

    Compilation is a run option, not part of the algorithm: a compiled run may resume an eager
    checkpoint and the other way round. Private attributes (a leading underscore) are caches, not
    hyperparameters.
    """
    inner = engine.engine if isinstance(engine, CompiledEngine) else engine
    params = {k: _plain(v) for k, v in vars(inner).items() if not k.startswith("_")}
    return {"class": type(inner).__name__, "module": type(inner).__module__, "hyperparameters": params}


def problem_record(module: BilevelModule) -> str:
    """The problem's class (``module.qualname``), ``Population[<class> x P]`` or ``Tasks[<class>]``."""
    problem = module.problem
    if isinstance(problem, Population):
        member = problem.members[0]
        return f"Population[{type(member).__module__}.{type(member).__qualname__} x {len(problem)}]"
    if isinstance(problem, Tasks):
        return f"Tasks[{type(problem.problem).__module__}.{type(problem.problem).__qualname__}]"
    return f"{type(problem).__module__}.{type(problem).__qualname__}"


def run_record(module: BilevelModule) -> dict[str, Any]:
    """What a checkpoint records about the run that wrote it."""
    return {"version": 1, "problem": problem_record(module), "engine": engine_record(module.engine)}


def describe(engine: dict[str, Any]) -> str:
    """``CG(iters=10, inner_lr=0.5, ...)`` from an engine record."""
    args = ", ".join(f"{k}={v!r}" for k, v in engine["hyperparameters"].items())
    return f"{engine['class']}({args})"


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file for the checks before a resume; one-line errors for missing, empty or corrupt files."""
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (ckpt_path): pass the path of a .ckpt file")
    if file.stat().st_size == 0:
        raise CheckpointError(
            f"checkpoint {path} is empty (0 bytes; the run was probably killed while writing it): resume from the "
            "previous checkpoint of that run, or start without ckpt_path"
        )
    try:
        # weights_only, as Lightning loads local checkpoints: tensors and plain containers only.
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (any failure of unpickling means the same thing to the user)
        reason = (str(err).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(err).__name__}: {reason}); the file is truncated, corrupt or "
            "not a checkpoint: resume from another checkpoint of that run, or start without ckpt_path"
        ) from None
    if not isinstance(checkpoint, dict) or "global_step" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} is not a Lightning checkpoint (no global_step entry)")
    return checkpoint


def check_resume(module: BilevelModule, checkpoint: dict[str, Any], path: str | Path, max_steps: int | None) -> None:
    """Refuse, before any step, a checkpoint this run cannot continue; name every difference and the way out."""
    if checkpoint.get("engine_state") is None:
        raise CheckpointError(
            f"checkpoint {path} holds no engine state (not written by a bilevel run, or before its first step): "
            "resuming would restart the engine's y, adjoint and optimizer moments from scratch; start without "
            "ckpt_path"
        )
    step = int(checkpoint["global_step"])
    if max_steps is not None and max_steps != -1 and max_steps <= step:
        raise CheckpointError(
            f"max_steps={max_steps} is at or below step {step} of checkpoint {path}, so the run would train no step: "
            f"pass max_steps > {step} (max_steps counts every step of the run, those before the checkpoint included)"
        )
    record = checkpoint.get("bilevel")
    ours = run_record(module)
    if record is None:
        # Checkpoints written before the record existed hold the engine's repr only.
        theirs = checkpoint.get("engine")
        if theirs is not None and theirs not in (repr(module.engine), repr(_unwrapped(module.engine))):
            raise CheckpointError(
                f"checkpoint {path} was written by {theirs}; this run has {_unwrapped(module.engine)!r}: resume "
                "with the checkpoint's engine"
            )
        return
    if not _same_class(record["problem"], ours["problem"]):
        raise CheckpointError(
            f"checkpoint {path} was written for the problem {record['problem']}; this run's problem is "
            f"{ours['problem']}: resume with the checkpoint's problem, or start without ckpt_path"
        )
    old, new = record["engine"], ours["engine"]
    if old["class"] != new["class"]:
        raise CheckpointError(
            f"checkpoint {path} was written by {describe(old)}; this run's engine is {describe(new)}: another engine "
            "cannot continue the checkpoint's engine state, even with resume_changed_engine; resume with "
            f"{old['class']}, or start without ckpt_path"
        )
    changed = _changed(old["hyperparameters"], new["hyperparameters"])
    if not changed:
        return
    if not module.resume_changed_engine:
        raise CheckpointError(
            f"checkpoint {path} was written by {describe(old)}; this run has {changed}: resume with the checkpoint's "
            "hyperparameters, or allow the change with resume_changed_engine=True (CLI: "
            "--model.resume_changed_engine true) when it keeps the engine state's shape"
        )
    fresh = module.initial_state()
    mismatch = state_differences(checkpoint["engine_state"], fresh)
    if mismatch:
        raise CheckpointError(
            f"checkpoint {path} was written by {describe(old)}; this run has {changed}, allowed by "
            f"resume_changed_engine, but its engine state has another shape: {'; '.join(mismatch)}. Resume with "
            "hyperparameters that keep the state's keys and shapes, or start without ckpt_path"
        )


def _same_class(old: str, new: str) -> bool:
    """Equal class names; a class of a script run as ``__main__`` matches the same class imported by name."""
    if old == new:
        return True
    (old_module, old_name), (new_module, new_name) = (_split_class(old), _split_class(new))
    return old_name == new_name and "__main__" in (old_module, new_module)


def _split_class(name: str) -> tuple[str, str]:
    """``("pkg.mod", "Class")`` from ``"pkg.mod.Class"`` or ``"Population[pkg.mod.Class x 3]"`` (the x P kept)."""
    inner = name.removeprefix("Population[").removeprefix("Tasks[").removesuffix("]")
    path, _, size = inner.partition(" x ")
    module, _, qualname = path.rpartition(".")
    return module, f"{qualname} x {size}" if size else qualname


def _unwrapped(engine: Engine) -> Engine:
    return engine.engine if isinstance(engine, CompiledEngine) else engine


def _changed(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Every hyperparameter that differs, as ``inner_lr=5.0 (checkpoint: 0.5), outer_optimizer='sgd' (...)``."""
    missing = object()
    parts = []
    for name in dict.fromkeys([*new, *old]):
        a, b = old.get(name, missing), new.get(name, missing)
        if a == b and type(a) is type(b):
            continue
        now = "(not set)" if b is missing else repr(b)
        before = "not set" if a is missing else repr(a)
        parts.append(f"{name}={now} (checkpoint: {before})")
    return ", ".join(parts)


def _structure(tree: Any, prefix: str = "") -> dict[str, str]:
    """Every leaf of a state by path: tensors as shape and dtype, anything else by type."""
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out.update(_structure(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(tree, (list, tuple)):
        out = {}
        for i, value in enumerate(tree):
            out.update(_structure(value, f"{prefix}[{i}]"))
        return out
    if isinstance(tree, Tensor):
        return {prefix: f"shape {tuple(tree.shape)} {tree.dtype}"}
    return {prefix: type(tree).__name__}


def state_differences(checkpoint_state: Any, run_state: Any) -> list[str]:
    """Each entry whose presence, shape or dtype differs between the checkpoint's engine state and this run's."""
    old, new = _structure(checkpoint_state), _structure(run_state)
    out = []
    for key in dict.fromkeys([*old, *new]):
        if old.get(key) != new.get(key):
            out.append(f"{key}: checkpoint {old.get(key, 'absent')}, this run {new.get(key, 'absent')}")
    return out


def resume_logger(path: str | Path, step: int, **kwargs: Any) -> TensorBoardLogger | None:
    """The TensorBoard run a checkpoint was written in, continued: same version directory, nothing logged twice.

    A checkpoint at ``<save_dir>/<name>/<version>/checkpoints/`` next to TensorBoard event files
    continues in that version directory. ``purge_step=step`` makes TensorBoard drop what the
    interrupted run logged after the checkpoint (scalars of step k are logged at k - 1, so those of
    steps after the checkpoint start at ``step``); the resumed run logs those steps again. None when
    the checkpoint lies in no TensorBoard run.
    """
    version_dir = Path(path).resolve().parent.parent
    if Path(path).resolve().parent.name != "checkpoints" or not any(version_dir.glob("events.out.tfevents.*")):
        return None
    return TensorBoardLogger(save_dir=str(version_dir.parent.parent), name=version_dir.parent.name,
                             version=version_dir.name, purge_step=step, **kwargs)


def prepare_resume(module: BilevelModule, ckpt_path: str | Path | None, max_steps: int | None) -> int | None:
    """Read and check a checkpoint before the Trainer starts; the checkpoint's step, or None without a file to check.

    Lightning's own names (``"last"``, ...) are resolved by Lightning and checked when loaded
    (``BilevelModule.on_load_checkpoint``).
    """
    if ckpt_path is None or str(ckpt_path) in LIGHTNING_CKPT_NAMES:
        return None
    checkpoint = read_checkpoint(ckpt_path)
    check_resume(module, checkpoint, ckpt_path, max_steps)
    return int(checkpoint["global_step"])
