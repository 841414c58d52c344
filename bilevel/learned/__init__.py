"""The learned-optimizer family: the muP / SP MLP family and the learned optimizer (muLO).

A problem family of its own, not part of the DSL or the Lightning loop: these modules import only
``torch`` and the standard library. ``problems.mulo`` builds the meta-training problem on them.
"""

from bilevel.learned.mup import MuMLP, Parametrization, coordinate_check, coordinate_trajectory, mlp, mu_param_groups
from bilevel.learned.optimizer import (
    LearnedOptimizer,
    LearnedOptimizerNet,
    lo_init_state,
    lo_step,
    step_embedding,
    theta_of,
)

__all__ = ["LearnedOptimizer", "LearnedOptimizerNet", "MuMLP", "Parametrization", "coordinate_check",
           "coordinate_trajectory", "lo_init_state", "lo_step", "mlp", "mu_param_groups", "step_embedding",
           "theta_of"]
