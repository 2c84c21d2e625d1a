"""A small VAE for 28x28 digits as a Pyro program with no marked step, and a direct encoder as its baseline guide.

Generative model (Kingma & Welling, 2014), one latent vector per image::

    z ~ N(0, I)                                 site "z", (B, z_dim), under pyro.plate("data", B)
    x ~ p(x | Decoder(z))                       site "x", (B, 784)

Decoder: two ReLU layers, then a Bernoulli head (logits; binarised digits) or a Gaussian head
:math:`\\mathcal{N}(\\mu_x(z), \\sigma_x(z))` (real-valued, e.g. dequantised intensities), the variant that
error encoding needs.

Since :meth:`VAE.model` has no :func:`~pyro_avf.filtering_step`, :class:`~pyro_avf.IterativeGuide` treats the
whole model as one step: it starts :math:`q(z)` at the prior and refines :math:`\\lambda = (\\mu, \\log\\sigma)`
with K learned updates (iterative amortized inference, Marino et al., ICML 2018). :class:`DirectEncoder` is the
standard amortized encoder :math:`q_\\phi(z \\mid x) = \\mathcal{N}(\\mu_\\phi(x), \\sigma_\\phi(x))`.

Both guides are scored with the same free energy (negative ELBO, nats per image), :meth:`VAE.free_energy`:

.. math::

    \\mathcal{F}(x; \\mu, \\sigma) = -\\frac{1}{S} \\sum_{s=1}^{S} \\log p_\\theta(x \\mid z_s)
        + D_{KL}\\left(\\mathcal{N}(\\mu, \\sigma) \\,\\|\\, \\mathcal{N}(0, I)\\right),
    \\qquad z_s = \\mu + \\sigma \\odot \\epsilon_s.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from pyro_avf.models._layers import LIKELIHOODS, NormalHead, check_sizes, mlp, observation_mlp

X_DIM = 28 * 28


def check_digits(x: object, x_dim: int, likelihood: str) -> Tensor:
    """Check that ``x`` is a finite float tensor (B, x_dim), B >= 1, binary for a Bernoulli likelihood."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point torch.Tensor of shape (B, {x_dim}), got {x!r:.80}")
    if x.dim() != 2 or x.size(1) != x_dim or x.size(0) == 0:
        raise ValueError(f"x must have shape (B, {x_dim}) with B >= 1 (flattened digits), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or infinite values")
    if likelihood == "bernoulli" and not ((x == 0) | (x == 1)).all():
        raise ValueError("x must be binary (0/1) for a Bernoulli likelihood; binarise it or use likelihood='gaussian'")
    return x


class VAE(nn.Module):
    """The VAE generative model; :meth:`model` is the Pyro program (no marked step).

    :param int z_dim: latent size.
    :param int hidden_dim: units in each of the decoder's two hidden layers.
    :param str likelihood: ``"bernoulli"`` (binary pixels) or ``"gaussian"`` (real pixels, learned scale).
    :param int x_dim: flattened image size.

    Example::

        vae = VAE(z_dim=32)
        guide = IterativeGuide(vae.model, num_iterations=5)
        svi = SVI(vae.model, guide, pyro.optim.Adam({"lr": 1e-3}), loss=AmortizedFilteringELBO())
        svi.step(x)  # x: (B, 784) binary
    """

    def __init__(self, z_dim: int = 32, hidden_dim: int = 256, likelihood: str = "bernoulli", x_dim: int = X_DIM):
        super().__init__()
        check_sizes(z_dim=z_dim, hidden_dim=hidden_dim, x_dim=x_dim)
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        self.z_dim, self.x_dim, self.likelihood = z_dim, x_dim, likelihood
        self.decoder = observation_mlp(z_dim, [hidden_dim, hidden_dim], x_dim, likelihood)

    def model(self, x: Tensor) -> Tensor:
        """Score ``x`` (B, 784): z ~ N(0, I), x ~ p(x | Decoder(z)) under ``pyro.plate("data", B)``. Returns z."""
        x = check_digits(x, self.x_dim, self.likelihood)
        pyro.module("vae_decoder", self.decoder)
        zeros = x.new_zeros(x.size(0), self.z_dim)
        with pyro.plate("data", x.size(0)):
            z = pyro.sample("z", dist.Normal(zeros, 1.0).to_event(1))
            pyro.sample("x", self.decoder(z), obs=x)
        return z

    def free_energy(self, x: Tensor, loc: Tensor, scale: Tensor, num_samples: int = 1) -> Tensor:
        """Per-image :math:`\\mathcal{F}(x; \\mu, \\sigma)` of the module docstring, shape (B,); differentiable
        in ``loc``, ``scale`` and the decoder. KL is analytic, the reconstruction averages ``num_samples`` draws."""
        x = check_digits(x, self.x_dim, self.likelihood)
        if loc.shape != (x.size(0), self.z_dim) or scale.shape != loc.shape:
            raise ValueError(
                f"loc and scale must have shape {(x.size(0), self.z_dim)}, got {tuple(loc.shape)} and "
                f"{tuple(scale.shape)}"
            )
        z = dist.Normal(loc, scale).rsample((num_samples,))
        nll = -self.decoder(z).log_prob(x).mean(0)
        kl = 0.5 * (scale.pow(2) + loc.pow(2) - 1).sum(-1) - scale.log().sum(-1)
        return nll + kl


class DirectEncoder(nn.Module):
    """Standard amortized encoder :math:`x \\mapsto (\\mu_\\phi(x), \\sigma_\\phi(x))`: two ELU layers and a Normal
    head (softplus scale). The module itself is the Pyro guide for :meth:`VAE.model`.

    Example::

        encoder = DirectEncoder(z_dim=32, hidden_dim=256)
        svi = SVI(vae.model, encoder, pyro.optim.Adam({"lr": 1e-3}), loss=Trace_ELBO())
    """

    def __init__(self, z_dim: int = 32, hidden_dim: int = 256, x_dim: int = X_DIM):
        super().__init__()
        check_sizes(z_dim=z_dim, hidden_dim=hidden_dim, x_dim=x_dim)
        self.z_dim, self.x_dim = z_dim, x_dim
        self.body = mlp([x_dim, hidden_dim, hidden_dim], nn.ELU)
        self.head = NormalHead(hidden_dim, z_dim)

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(loc, scale) of q(z | x), each (B, z_dim)."""
        return self.head(self.body(x))

    def forward(self, x: Tensor) -> Tensor:
        """The guide: z ~ N(loc, scale) under ``pyro.plate("data", B)``. Returns z."""
        x = check_digits(x, self.x_dim, "gaussian")
        pyro.module("vae_encoder", self)
        loc, scale = self.posterior(x)
        with pyro.plate("data", x.size(0)):
            return pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def num_parameters(module: nn.Module) -> int:
    """Number of scalar parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


def encoder_hidden_for(num_params: int, z_dim: int = 32, x_dim: int = X_DIM) -> int:
    """The hidden size h at which :class:`DirectEncoder` has about ``num_params`` parameters: the positive root of
    :math:`h^2 + (x + 2 z + 2) h + 2 z = n` (layers x->h, h->h, and the two h->z heads, with biases)."""
    if num_params < 1:
        raise ValueError(f"num_params must be positive, got {num_params}")
    b = x_dim + 2 * z_dim + 2
    return max(1, round((-b + math.sqrt(b * b + 4 * (num_params - 2 * z_dim))) / 2))
