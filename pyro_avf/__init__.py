"""pyro-avf: amortized variational filtering for Pyro programs."""

from pyro_avf.elbo import AmortizedFilteringELBO
from pyro_avf.guide import IterativeGuide
from pyro_avf.step import filtering_step

__version__ = "0.1.0"

__all__ = ["AmortizedFilteringELBO", "IterativeGuide", "filtering_step", "__version__"]
