"""Reference dynamical models written as Pyro programs with a marked filtering step.

Each follows the step-model protocol of :mod:`pyro_avf.transition` (``initial_state``, ``advance`` around the
marked step, ``model`` as that loop), so :class:`~pyro_avf.online.OnlineFilter` streams any of them as it is.
"""

from pyro_avf.models.hierarchical import TwoLevelSSM
from pyro_avf.models.lgssm import LinearGaussianSSM
from pyro_avf.models.volatility import StochasticVolatility

__all__ = ["LinearGaussianSSM", "StochasticVolatility", "TwoLevelSSM"]
