"""Hand-designed and exact filters that variational filtering is measured against."""

from pyro_avf.baselines.kalman import (
    diagonal_gap,
    expected_step_free_energy,
    kalman_filter,
    step_optimum,
)

__all__ = ["diagonal_gap", "expected_step_free_energy", "kalman_filter", "step_optimum"]
