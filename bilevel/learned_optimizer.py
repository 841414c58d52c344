"""Moved to ``bilevel.learned.optimizer``; this path keeps working for existing imports."""

from bilevel.learned.optimizer import (
    ADAM_CHANNEL,
    EPS,
    FEATURES,
    INPUTS,
    MAGNITUDE_SCALE,
    MOMENTUM_DECAYS,
    RMS_DECAY,
    TIMESCALES,
    LearnedOptimizer,
    LearnedOptimizerNet,
    Tree,
    lo_init_state,
    lo_step,
    step_embedding,
    theta_of,
)

__all__ = ["ADAM_CHANNEL", "EPS", "FEATURES", "INPUTS", "MAGNITUDE_SCALE", "MOMENTUM_DECAYS", "RMS_DECAY", "TIMESCALES",
           "LearnedOptimizer", "LearnedOptimizerNet", "Tree", "lo_init_state", "lo_step", "step_embedding", "theta_of"]
