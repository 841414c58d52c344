"""The ``bilevel`` command: LightningCLI over ``BilevelModule``.

    bilevel fit --config experiments/configs/cleaning_digits.yaml

A config names the problem and the engine by class path (``problems.DigitsCleaning``,
``hypergrad.CG``) with their ``init_args``; the problem's ``data()`` feeds both levels.
Unknown classes and misspelled keys are rejected by jsonargparse, naming the key, before any
training starts.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
from typing import Any

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from bilevel.checkpoint import LIGHTNING_CKPT_NAMES, CheckpointError, prepare_resume, read_checkpoint, resume_logger
from bilevel.console import quiet_lightning
from bilevel.distributed import check_parallel, check_strategy
from bilevel.module import BilevelModule
from bilevel.precision import check_requested
from bilevel.tensorboard import DEFAULT_LOG_EVERY
from hypergrad import ENGINES


def engines_help() -> str:
    """One line per engine: its class path and keyword hyperparameters with defaults."""
    lines = ["engines (set with --model.engine CLASS and --model.engine.init_args.NAME VALUE):"]
    for cls in ENGINES:
        params = inspect.signature(cls.__init__).parameters.values()
        args = ", ".join(f"{p.name}={p.default!r}" for p in params if p.name != "self")
        lines.append(f"  hypergrad.{cls.__name__}({args})")
    return "\n".join(lines)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """Keeps the engines list in the epilog one engine per line."""


def focus_union_error(message: str) -> str:
    """A jsonargparse error on a Union-typed key (``model.problem`` is a problem or a Population), focused.

    jsonargparse reports why the value fails every subtype, so a misspelled problem argument comes
    with "does not correspond to a subclass of Population". When some subtype did accept the class
    (and failed on its arguments), only that subtype's error is kept.
    """
    lines = message.splitlines()
    if not any("Does not validate against any of the Union subtypes" in line for line in lines):
        return message
    head = lines[0]
    start = next(i for i, line in enumerate(lines) if line.strip() == "Errors:") + 1
    items: list[list[str]] = []
    for line in lines[start:]:
        if line.startswith("    - "):
            items.append([line[len("    - "):]])
        elif line.startswith("      ") and items:
            items[-1].append(line[len("      "):])
        else:
            break  # "Given value ..." lines follow the errors
    relevant = [item for item in items if "does not correspond to a subclass of" not in item[0]]
    if len(relevant) != 1:
        return message
    return "\n".join([head, *("  " + line for line in relevant[0])])


class _Parser(LightningArgumentParser):
    """Lightning's parser with Union errors focused on the subtype the user meant (``focus_union_error``)."""

    def error(self, message: str, ex: Exception | None = None):  # noqa: ANN201 (NoReturn in the base)
        return super().error(focus_union_error(message), ex)


class BilevelCLI(LightningCLI):
    """LightningCLI with the defaults of ``bilevel.fit``: 100 outer steps, a log line per step."""

    def before_instantiate_classes(self) -> None:
        # FSDP and DeepSpeed are refused before the Trainer is built (which may fail on its own first).
        subcommand = self.config.get("subcommand")
        if subcommand is not None:
            strategy = self.config[subcommand].get("trainer.strategy")
            name = strategy if isinstance(strategy, str) else getattr(strategy, "class_path", None)
            try:
                check_strategy(_resolve_class(name) if name and "." in name else name)
                check_requested(self.config[subcommand].get("trainer.precision"),
                                self.config[subcommand].get("trainer.accelerator", "auto"))
            except ValueError as err:
                raise SystemExit(f"error: {err}") from None

    def before_fit(self) -> None:
        # The CLI feeds both levels from the problem's data(); say so before the Trainer starts.
        if self.datamodule is None and self.model.default_data_error is not None:
            raise SystemExit(f"error: {self.model.default_data_error}")
        try:
            check_parallel(self.trainer, self.model.trainable.is_population, self.model.problem_name)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
        # --ckpt_path is checked before the Trainer starts; the run continues the checkpoint's TensorBoard run.
        config = self.config[self.subcommand]
        ckpt_path = config.get("ckpt_path")
        step = prepare_resume(self.model, ckpt_path, self.trainer.max_steps)
        if step is not None and config.get("trainer.logger") in (None, True):
            logger = resume_logger(ckpt_path, step)  # None when the checkpoint lies in no TensorBoard run
            if logger is not None:
                self.trainer.logger = logger

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse as LightningCLI does, then read ``--ckpt_path`` before LightningCLI unpickles it for hyperparameters.

        LightningCLI loads the checkpoint right after parsing; a truncated or empty file would end
        in a pickle traceback there instead of one line naming the file.
        """
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path is not None and str(ckpt_path) not in LIGHTNING_CKPT_NAMES:
            read_checkpoint(ckpt_path)

    def add_arguments_to_parser(self, parser) -> None:
        defaults = {"trainer.max_steps": 100, "trainer.log_every_n_steps": DEFAULT_LOG_EVERY,
                    "trainer.enable_model_summary": False}
        parser.set_defaults(defaults)


def _resolve_class(path: str) -> type | None:
    """The class a ``class_path`` names, or None when it cannot be imported (jsonargparse reports that)."""
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``bilevel`` console script."""
    try:
        with quiet_lightning():
            BilevelCLI(
                BilevelModule,
                parser_class=_Parser,
                auto_configure_optimizers=False,
                save_config_kwargs={"overwrite": True},
                parser_kwargs={"formatter_class": _HelpFormatter, "fit": {"epilog": engines_help()}},
                args=args,
            )
    except CheckpointError as err:
        # A checkpoint that cannot be resumed is a usage error: one line naming the file, no traceback.
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
