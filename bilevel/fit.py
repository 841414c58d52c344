"""``bilevel.fit``: train a problem in place with an engine, through a Lightning Trainer."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Trainer

from bilevel.checkpoint import DEFAULT_CHECKPOINT_EVERY, prepare_resume, resume_logger
from bilevel.console import quiet_lightning
from bilevel.distributed import UnsupportedStrategy, check_parallel, check_strategy
from bilevel.module import BilevelModule
from bilevel.population import Population
from bilevel.precision import check_requested
from bilevel.problem import BilevelProblem
from bilevel.tasks import Tasks
from bilevel.tensorboard import DEFAULT_LOG_EVERY
from hypergrad import Engine


@quiet_lightning()  # Lightning's advertisements and upstream deprecation noise, not the user's warnings
def fit(
    problem: BilevelProblem | Population | Tasks,
    engine: Engine,
    lower_data: Any = None,
    upper_data: Any = None,
    max_steps: int = 100,
    *,
    tasks: Any = None,
    log_histograms_every: int = 50,
    compile: bool | dict[str, Any] = False,
    on_nonfinite: str = "raise",
    ckpt_path: str | None = None,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    resume_changed_engine: bool = False,
    val_data: Any = None,
    val_check_interval: int | None = None,
    **trainer_kwargs: Any,
) -> Trainer:
    """Run ``max_steps`` outer steps of ``engine`` on ``problem`` and return the Trainer.

    Args:
        problem: trained in place (its upper and lower parameters hold the result); or a
            ``bilevel.Population`` of problems, every phase vmapped over the members, each member
            trained in place and its metrics logged as ``name/member_07`` next to the mean ``name``; or,
            with ``tasks``, the problem of one task (or a ``bilevel.Tasks`` around it).
        engine: a ``hypergrad`` engine.
        lower_data, upper_data: a DataLoader, any re-iterable of batches (cycled), or a tuple of
            tensors meaning the full batch every step. Both None: the problem's ``data()``. For a
            population with ``batches="per_member"`` every tensor of a batch has a leading dimension P.
        tasks: instead of lower_data and upper_data, meta-learning over batches of tasks: a DataLoader
            (or re-iterable, cycled) whose every item is a task batch ``(support, query)``, each a
            tuple of tensors with a leading task dimension T; or one such pair, served at every step.
            The problem (the problem of one task) is then run as ``bilevel.Tasks(problem)``: per task its
            own y, fed the support set through g, scored on the query set through f, x shared, the
            hypergradient the mean over the T tasks (``hypergrad.TaskBatchEngine``). Support and query
            of a step come from one item, so they are always the same tasks. One process only.
        max_steps: outer steps (one engine step = one Lightning training step).
        log_histograms_every: steps between histograms of the upper variables.
        compile: run the engine's phases through ``torch.compile`` (``hypergrad.compile_engine``; no
            engine has a graph break): True, or a dict of ``torch.compile`` options. Pays off for
            long runs: compiling takes seconds to minutes.
        on_nonfinite: "raise" (default) stops the run at the first step that produces a non-finite
            value, with ``bilevel.NonFiniteStep`` naming the step and the quantity; "skip" discards
            such steps and counts them (metric ``nonfinite_skipped``). The problem and checkpoints
            keep the last finite state either way.
        ckpt_path: a checkpoint to resume from, written at any step: the run continues bit for bit
            (x, y, engine state, each level's data position and shuffling state) in the TensorBoard
            run the checkpoint lies in. Checked before any step: another problem or engine class,
            other engine hyperparameters, a max_steps at or below its step, or an unreadable file
            is refused with a message naming the file and each difference.
        checkpoint_every: outer steps between checkpoints (and one at the last step); a killed run
            loses at most that many steps. The default (50) costs about 0.07 ms an outer step
            (experiments/results/speed/checkpoint.md).
        resume_changed_engine: allow ckpt_path to have been written with other hyperparameters of the
            same engine, provided the engine state keeps its keys and shapes.
        val_data: batches for the problem's ``validation_step(batch) -> {name: value}`` (a DataLoader,
            re-iterable or tuple, like the training data), run by Lightning's validation loop every
            ``val_check_interval`` outer steps (default 10 when val_data is given) and logged as
            ``val/<name>``. Without val_data, ``val_check_interval=N`` validates with the problem's
            ``validation_data()`` or, lacking that, its ``evaluate()``. Lightning's EarlyStopping and
            ModelCheckpoint(monitor="val/<name>") work on these.
        val_check_interval: outer steps between validations (None: no validation loop unless val_data).
        trainer_kwargs: anything ``lightning.pytorch.Trainer`` takes (accelerator, devices,
            logger, callbacks, default_root_dir, ...); ``log_every_n_steps`` defaults to 10 here
            (``bilevel.tensorboard.DEFAULT_LOG_EVERY``). ``devices=N, strategy="ddp"`` (or
            ``"ddp_spawn"``, ``num_nodes=M``) trains on N x M processes, each on its shard of every
            batch (``bilevel.distributed``), the engines averaging every batch-dependent quantity over
            them: the result equals one process fed the union of the shards. Strategies that shard
            parameters (FSDP, DeepSpeed) and populations on several processes are refused.

    The problem and engine are checked on the first batches before training starts.
    """
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"fit: max_steps must be an integer >= 1, got {max_steps!r}")
    if (lower_data is None) != (upper_data is None):
        raise ValueError("fit: pass both lower_data and upper_data, or neither to use the problem's data()")
    if tasks is not None:
        if lower_data is not None:
            raise ValueError("fit: pass tasks (a stream of (support, query) task batches) or lower_data and "
                             "upper_data, not both")
        if isinstance(problem, Population):
            raise TypeError("fit: tasks runs one problem over batches of tasks; a Population cannot take them")
        trained: Any = problem if isinstance(problem, Tasks) else Tasks(problem)
    else:
        trained = problem
    check_strategy(trainer_kwargs.get("strategy"))  # before the Trainer, which may fail on its own first
    check_requested(trainer_kwargs.get("precision"), trainer_kwargs.get("accelerator", "auto"))
    module = BilevelModule(trained, engine, log_histograms_every=log_histograms_every, compile=compile,
                           on_nonfinite=on_nonfinite, checkpoint_every=checkpoint_every,
                           resume_changed_engine=resume_changed_engine)
    if val_data is not None:
        module.use_val_data(val_data)
        val_check_interval = 10 if val_check_interval is None else val_check_interval
    if val_check_interval is not None:
        if isinstance(val_check_interval, bool) or not isinstance(val_check_interval, int) or val_check_interval < 1:
            raise ValueError(f"fit: val_check_interval must be an integer >= 1 (outer steps), "
                             f"got {val_check_interval!r}")
        trainer_kwargs = {"val_check_interval": val_check_interval, "num_sanity_val_steps": 0, **trainer_kwargs}
    if tasks is not None:
        module.use_tasks(tasks)
    elif lower_data is not None:
        module.use_data(lower_data, upper_data)
    elif module.default_data_error is not None:
        raise module.default_data_error
    options = {"max_steps": max_steps, "log_every_n_steps": DEFAULT_LOG_EVERY, "enable_model_summary": False,
               **trainer_kwargs}
    resumed_step = prepare_resume(module, ckpt_path, max_steps)
    if resumed_step is not None and trainer_kwargs.get("logger", True) is True:
        # Lightning's default logger would open a new version; continue the checkpoint's TensorBoard run.
        logger = resume_logger(ckpt_path, resumed_step)  # type: ignore[arg-type]
        if logger is not None:
            options["logger"] = logger
    trainer = Trainer(**options)
    check_parallel(trainer, module.trainable.is_population, module.problem_name)
    if isinstance(trained, Tasks) and trainer.world_size > 1:
        raise UnsupportedStrategy(
            f"{module.problem_name}: a batch of tasks runs on one process ({trainer.world_size} requested): the "
            "engines average over ranks inside each task's lower problem, which would mix the ranks' tasks"
        )
    # No train_dataloaders: Lightning asks module.train_dataloader in every process, which shards the data.
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer
