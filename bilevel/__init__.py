"""The user's surface: the problem DSL, the Lightning loop and ``fit``."""

from bilevel.checkpoint import CheckpointError
from bilevel.fit import fit
from bilevel.guard import NonFiniteStep
from bilevel.learned import (
    LearnedOptimizer,
    LearnedOptimizerNet,
    MuMLP,
    coordinate_check,
    coordinate_trajectory,
    lo_init_state,
    lo_step,
    mlp,
    mu_param_groups,
)
from bilevel.module import BilevelModule
from bilevel.population import Population
from bilevel.problem import BilevelProblem, Hyper
from bilevel.tasks import Tasks
from hypergrad.sets import Ball, Box, NonNegative

__all__ = ["Ball", "Box", "NonNegative", "BilevelModule", "BilevelProblem", "CheckpointError", "Hyper", "NonFiniteStep",
           "Population", "Tasks", "fit"]
__all__ += ["LearnedOptimizer", "LearnedOptimizerNet", "MuMLP", "coordinate_check", "lo_init_state", "lo_step",
            "coordinate_trajectory", "mlp", "mu_param_groups"]
