"""The learned-optimizer family: the muP / SP MLP family and the learned optimizers (muLO).

A problem family of its own, not part of the DSL or the Lightning loop: these modules import only
``torch`` and the standard library. ``problems.mulo`` builds the meta-training problem on them.
Two learned optimizers share one interface, ``LORule``: the reduced one (``bilevel.learned.optimizer``:
``LearnedOptimizerNet``, ``lo_init_state``, ``lo_step``, ``reduced_rule``) and muLO's faithful one
(``bilevel.learned.adafac``: ``AdafacLONet``, ``adafac_init_state``, ``adafac_step``, ``adafac_rule``);
``LearnedOptimizer`` runs either as a ``torch.optim.Optimizer``.
"""

from bilevel.learned.adafac import AdafacLONet, adafac_init_state, adafac_rule, adafac_step
from bilevel.learned.mup import MuMLP, Parametrization, coordinate_check, coordinate_trajectory, mlp, mu_param_groups
from bilevel.learned.optimizer import (
    LearnedOptimizer,
    LearnedOptimizerNet,
    lo_init_state,
    lo_step,
    make_rule,
    reduced_rule,
    rule_of,
    step_embedding,
    theta_of,
)
from bilevel.learned.rule import LORule

__all__ = ["AdafacLONet", "LORule", "LearnedOptimizer", "LearnedOptimizerNet", "MuMLP", "Parametrization",
           "adafac_init_state", "adafac_rule", "adafac_step", "coordinate_check", "coordinate_trajectory",
           "lo_init_state", "lo_step", "make_rule", "mlp", "mu_param_groups", "reduced_rule", "rule_of",
           "step_embedding", "theta_of"]
