"""Hand-written plain-PyTorch AVF training loss for SRNN: the speed reference for the library.

It reuses the networks of :class:`pyro_avf.models.srnn.SRNN` (LSTM over :math:`x_{<t}`, prior MLP, emission
MLP) and one :class:`pyro_avf.updates.UpdateNetwork`, and computes what
:class:`pyro_avf.IterativeGuide` + :class:`pyro_avf.AmortizedFilteringELBO` compute, with no Pyro in the loop.
Per time step t, with :math:`(\\mu_p, \\sigma_p) = \\mathrm{prior}(z_{t-1}, d_t)`:

1. :math:`\\lambda_0 = (\\mu_p, \\log\\sigma_p)` (detached);
2. for :math:`k = 0..K-1`: :math:`z = \\mu_k + e^{\\log\\sigma_k}\\,\\epsilon`, the step free energy

   .. math::

       \\mathcal{F}_t(\\lambda_k) = -\\log p(x_t \\mid \\mathrm{emitter}(z, d_t))
           + \\beta\\, D_{KL}(\\mathcal{N}(\\mu_k, \\sigma_k^2) \\,\\|\\, \\mathcal{N}(\\mu_p, \\sigma_p^2)),

   :math:`g_k = \\nabla_\\lambda \\mathcal{F}_t(\\lambda_k)` (``torch.autograd.grad``) and
   :math:`\\lambda_{k+1} = f_\\phi(\\lambda_k, g_k)`;
3. the final sample :math:`z_t \\sim q_{\\lambda_K}` scores :math:`\\mathcal{F}_t(\\lambda_K)`, which trains θ
   (and φ through :math:`\\lambda_K`; the update network's inputs are detached, so :math:`\\lambda_K` is a
   function of φ only); :math:`z_t` (detached) feeds step t+1.

The loss is :math:`\\sum_t \\mathcal{F}_t(\\lambda_{t,K}) + \\sum_t \\sum_{0<k<K} \\lambda_{t,k}^\\top
\\mathrm{sg}[g_{t,k}] - \\mathrm{sg}[\\cdot]` — the library's, with its value and gradients (same random draws
in the same order: one standard-normal ``(B, z_dim)`` draw per iteration, then one for the final sample).

Usage::

    python benchmarks/plain_torch_srnn_avf.py --steps 5 --batch-size 8 --iterations 5
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyro_avf.models.srnn import SRNN  # noqa: E402  (networks only; no Pyro runs in this module)
from pyro_avf.updates import UpdateNetwork  # noqa: E402


class AVFLoss(NamedTuple):
    """``loss`` (scalar, differentiable), ``free_energy`` (B, T) of the final posteriors (detached, masked)."""

    loss: Tensor
    free_energy: Tensor


def normal_kl(loc: Tensor, log_scale: Tensor, p_loc: Tensor, p_scale: Tensor) -> Tensor:
    """:math:`\\sum_i \\log\\frac{\\sigma_{p,i}}{\\sigma_i}
    + \\frac{\\sigma_i^2 + (\\mu_i - \\mu_{p,i})^2}{2\\sigma_{p,i}^2} - \\frac12`, summed over the last dim
    (the library's formula, term for term)."""
    var_ratio = (2 * log_scale).exp() / p_scale.pow(2)
    return (0.5 * (var_ratio + (loc - p_loc).pow(2) / p_scale.pow(2) - 1 - var_ratio.log())).sum(-1)


def step_free_energy(
    srnn: SRNN, lam: Tuple[Tensor, Tensor], prior: Tuple[Tensor, Tensor], d_t: Tensor, x_t: Tensor, kl_weight: float
) -> Tuple[Tensor, Tensor]:
    """One sample :math:`z \\sim \\mathcal{N}(\\mu, e^{\\log\\sigma})`; returns (per-row :math:`\\mathcal{F}_t`, z)."""
    loc, log_scale = lam
    z = loc + torch.empty_like(loc).normal_() * log_scale.exp()
    features = srnn.generative.emitter[0](torch.cat([z, d_t], -1))
    if srnn.likelihood == "bernoulli":
        logits = srnn.generative.emitter[1].head(features)
        reconstruction = F.binary_cross_entropy_with_logits(logits, x_t, reduction="none").sum(-1)
    else:  # -log N(x; μ, σ) = (x - μ)²/(2σ²) + log σ + log √(2π), torch's formula
        x_loc, x_scale = srnn.generative.emitter[1].head(features)
        log_normal = -((x_t - x_loc) ** 2) / (2 * x_scale**2) - x_scale.log() - math.log(math.sqrt(2 * math.pi))
        reconstruction = -log_normal.sum(-1)
    return reconstruction + kl_weight * normal_kl(loc, log_scale, *prior), z


def avf_loss(
    srnn: SRNN,
    update: UpdateNetwork,
    xs: Tensor,
    mask: Optional[Tensor] = None,
    num_iterations: int = 5,
    kl_weight: float = 1.0,
) -> AVFLoss:
    """The AVF training loss of a batch ``xs`` (B, T, x_dim) with ``mask`` (B, T) bool (False: padding).

    Bernoulli (music) or Gaussian (speech) output, as ``srnn.likelihood``; an update network built with
    ``obs_dim = x_dim`` also sees :math:`x_t` (the paper's speech setting, ``encode_observation=True``)."""
    if num_iterations < 1:
        raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
    gen = srnn.generative
    batch, steps, _ = xs.shape
    mask = torch.ones(batch, steps, dtype=torch.bool) if mask is None else mask
    d = gen.deterministic(xs)
    z = xs.new_zeros(batch, srnn.z_dim)
    total = surrogate = xs.new_zeros(())
    free_energies = []
    for t in range(steps):
        d_t, x_t, m_t = d[:, t], xs[:, t], mask[:, t]
        p_loc, p_scale = gen.prior(torch.cat([z, d_t], -1))
        prior_const = (p_loc.detach(), p_scale.detach())
        lam = (p_loc.detach().requires_grad_(), p_scale.detach().log().requires_grad_())
        current = lam
        for k in range(num_iterations):
            fe, _ = step_free_energy(srnn, lam, prior_const, d_t.detach(), x_t, kl_weight)
            g_loc, g_log_scale = torch.autograd.grad(torch.where(m_t, fe, 0.0).sum(), lam)
            if k > 0:  # λ_k as a function of φ, paired with its own free-energy gradient
                term = (g_loc * current[0]).sum() + (g_log_scale * current[1]).sum()
                surrogate = surrogate + term - term.detach()
            current = update(lam, grads=(g_loc, g_log_scale), obs=x_t if update.obs_dim else None)
            lam = (current[0].detach().requires_grad_(), current[1].detach().requires_grad_())
        fe, z = step_free_energy(srnn, current, (p_loc, p_scale), d_t, x_t, kl_weight)
        fe = torch.where(m_t, fe, 0.0)
        total = total + fe.sum()
        free_energies.append(fe.detach())
        z = z.detach()
    return AVFLoss(total + surrogate, torch.stack(free_energies, 1))


def jsb_crops(batch_size: int, length: int = 25, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """``batch_size`` random crops of real quarter-note JSB training songs: ``xs`` (B, length, 88), ``mask``."""
    from data_loaders.files import default_data_dir
    from data_loaders.polyphonic import RandomCropDataset, collate_sequences, load_polyphonic

    songs = load_polyphonic("jsb_chorales", "train", path=default_data_dir())
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(songs), generator=generator)[:batch_size].tolist()
    crops = RandomCropDataset([songs[i] for i in order], length, generator=generator)
    return collate_sequences([crops[i] for i in range(len(order))])


def main(argv=None) -> dict:
    """Train the plain loop for a few Adam steps on one batch of JSB crops; return the loss per step."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop-length", type=int, default=25)
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--hidden-size", type=int, default=1024, help="update network width")
    p.add_argument("--model-size", type=int, default=None, help="width of the SRNN layers (default: music sizes)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    s = args.model_size
    srnn = SRNN.music(**({} if s is None else {"d_dim": s, "a_dim": s, "hidden_dim": s}))
    update = UpdateNetwork(srnn.z_dim, hidden=args.hidden_size)
    params = list(srnn.generative.parameters()) + list(update.parameters())
    optimizer = torch.optim.Adam(params, lr=args.lr)
    xs, mask = jsb_crops(args.batch_size, args.crop_length, args.seed)
    losses = []
    for i in range(args.steps):
        out = avf_loss(srnn, update, xs, mask, args.iterations)
        (out.loss / xs.size(0)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append((out.free_energy.sum() / mask.sum()).item())
        print(f"step {i}: free energy {losses[-1]:.4f} nats/step")
    return {"free_energy_per_step": losses}


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
