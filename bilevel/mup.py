"""Moved to ``bilevel.learned.mup``; this path keeps working for existing imports."""

from bilevel.learned.mup import MuMLP, Parametrization, coordinate_check, coordinate_trajectory, mlp, mu_param_groups

__all__ = ["MuMLP", "Parametrization", "coordinate_check", "coordinate_trajectory", "mlp", "mu_param_groups"]
