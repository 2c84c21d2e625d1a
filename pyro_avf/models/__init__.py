"""Reference dynamical models written as Pyro programs with a marked filtering step."""

from pyro_avf.models.hierarchical import TwoLevelSSM
from pyro_avf.models.lgssm import LinearGaussianSSM
from pyro_avf.models.volatility import StochasticVolatility

__all__ = ["LinearGaussianSSM", "StochasticVolatility", "TwoLevelSSM"]
