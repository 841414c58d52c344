"""Hypergradient engines and kernels: pure tensor math on dicts of tensors (imports torch only)."""

from hypergrad.borep import BOREP
from hypergrad.cg import CG
from hypergrad.compile import CompiledEngine, compile_engine
from hypergrad.engine import Engine, Functions, Metrics, State
from hypergrad.exact import Exact
from hypergrad.f2sa import F2SA
from hypergrad.implicit import ImplicitEngine
from hypergrad.lvhba import LVHBA
from hypergrad.neumann import Neumann
from hypergrad.penalty import Penalty
from hypergrad.pes import PES
from hypergrad.tasks import TaskBatchEngine
from hypergrad.two_copy import TwoCopy
from hypergrad.unrolled import Unrolled

ENGINES = (Exact, Neumann, CG, Unrolled, F2SA, Penalty, BOREP, LVHBA, PES)
"""Every concrete engine, for listings such as ``bilevel fit --help``."""

__all__ = [
    "BOREP", "CG", "CompiledEngine", "ENGINES", "Engine", "Exact", "F2SA", "Functions", "ImplicitEngine", "LVHBA",
    "Metrics", "Neumann", "PES", "Penalty", "State", "TaskBatchEngine", "TwoCopy", "Unrolled", "compile_engine",
]
