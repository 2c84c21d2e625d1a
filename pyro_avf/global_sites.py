r"""Mean-field posteriors of the latent sites outside any filtering step (a model's global latents).

Each such site gets, per element, a Normal in the unconstrained space of its support, pushed forward:

.. math::

    q(z) = T_\# \mathcal{N}(u;\, \mu, \operatorname{diag} e^{2\rho}),

with :math:`T` = ``biject_to(prior.support)``, :math:`\mu` starting at the prior's unconstrained mean and
:math:`\rho = \log` ``init_scale``; :math:`(\mu, \rho)` are Pyro params named ``{prefix}.{site}.loc`` and
``{prefix}.{site}.log_scale``, so the param store saves and restores them.
"""

from __future__ import annotations

import math
from typing import Tuple

import pyro
import pyro.distributions as dist
import torch

from pyro_avf.posterior import posterior, unconstrained_moments


class MeanFieldSites:
    """The posteriors of the global latent sites (see the module docstring).

    Example::

        >>> sites = MeanFieldSites("avf_global", init_scale=0.1)
        >>> q, (loc, log_scale) = sites("noise", dist.LogNormal(torch.zeros(2), 1.0))
        >>> tuple(loc.shape), round(log_scale.exp()[0].item(), 3)
        ((2,), 0.1)
    """

    def __init__(self, prefix: str, init_scale: float):
        self.prefix, self.init_scale = prefix, init_scale

    def __call__(self, name: str, prior: dist.Distribution) -> Tuple[dist.Distribution, Tuple[torch.Tensor, ...]]:
        """The posterior of site ``name`` and its parameters :math:`(\\mu, \\rho)`."""
        prefix = f"{self.prefix}.{name}"
        loc = pyro.param(f"{prefix}.loc", lambda: unconstrained_moments(prior)[0])
        log_scale = pyro.param(f"{prefix}.log_scale", lambda: torch.full_like(loc, math.log(self.init_scale)))
        expected = prior.batch_shape + loc.shape[len(prior.batch_shape) :]
        if loc.shape != expected or loc.shape[: len(prior.batch_shape)] != prior.batch_shape:
            raise ValueError(
                f"pyro_avf: global latent site '{name}' changed shape from {tuple(loc.shape)}; latent sites "
                "outside a filtering step keep one posterior per element, so their batch shape must not change."
            )
        return posterior(loc, log_scale, prior), (loc, log_scale)
