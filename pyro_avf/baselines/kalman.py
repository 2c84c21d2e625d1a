"""Exact inference for the linear-Gaussian state-space model, as a reference for variational filtering.

Model (see :class:`pyro_avf.models.lgssm.LinearGaussianSSM`), with z_0 = 0::

    z_t ~ N(A z_{t-1}, Q),    x_t ~ N(C z_t, R),    t = 1..T

``A`` is (d, d), ``C`` is (n, d), ``Q`` (d, d) and ``R`` (n, n) are covariance matrices (any symmetric
positive-definite matrices, not only diagonal ones).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch.distributions import MultivariateNormal, kl_divergence


class KalmanFilterResult(NamedTuple):
    """Output of :func:`kalman_filter`.

    ``nll`` (B, T): -log p(x_t | x_<t) per step (0 where masked); ``means`` (B, T, d) and ``covs``
    (B, T, d, d): moments of the filtering distribution p(z_t | x_≤t).
    """

    nll: Tensor
    means: Tensor
    covs: Tensor


class StepOptimum(NamedTuple):
    """Output of :func:`step_optimum`: optimal step free energy F*_t (...), posterior mean m (..., d),
    posterior precision L (..., d, d)."""

    free_energy: Tensor
    mean: Tensor
    precision: Tensor


def _check_params(A: Tensor, C: Tensor, Q: Tensor, R: Tensor) -> tuple[int, int]:
    if A.dim() != 2 or A.size(0) != A.size(1):
        raise ValueError(f"A must be a square (d, d) matrix, got shape {tuple(A.shape)}")
    d = A.size(0)
    if C.dim() != 2 or C.size(1) != d:
        raise ValueError(f"C must have shape (n, {d}), got {tuple(C.shape)}")
    n = C.size(0)
    if tuple(Q.shape) != (d, d):
        raise ValueError(f"Q must have shape ({d}, {d}), got {tuple(Q.shape)}")
    if tuple(R.shape) != (n, n):
        raise ValueError(f"R must have shape ({n}, {n}), got {tuple(R.shape)}")
    return d, n


def kalman_filter(
    A: Tensor, C: Tensor, Q: Tensor, R: Tensor, xs: Tensor, mask: Optional[Tensor] = None
) -> KalmanFilterResult:
    """Exact Kalman filter for z_0 = 0 (so z_1 ~ N(0, Q)), batched over sequences.

    With m_0 = 0, P_0 = 0, for t = 1..T::

        predict:   m⁻_t = A m_{t-1},              P⁻_t = A P_{t-1} Aᵀ + Q
        evidence:  e_t = x_t - C m⁻_t,            S_t = C P⁻_t Cᵀ + R
                   -log p(x_t | x_<t) = ½ (n log 2π + log det S_t + e_tᵀ S_t⁻¹ e_t)
        update:    K_t = P⁻_t Cᵀ S_t⁻¹,           m_t = m⁻_t + K_t e_t
                   P_t = (I - K_t C) P⁻_t (I - K_t C)ᵀ + K_t R K_tᵀ      (Joseph form)

    Where ``mask[b, t]`` is False the observation is missing: its NLL is 0 and the update is skipped
    (m_t = m⁻_t, P_t = P⁻_t). The total NLL -log p(x_{1:T}) is ``result.nll.sum(-1)``.

    :param xs: observations (B, T, n).
    :param mask: optional bool (B, T), True where x_t is observed.
    """
    d, n = _check_params(A, C, Q, R)
    if xs.dim() != 3 or xs.size(-1) != n:
        raise ValueError(f"xs must have shape (B, T, {n}), got {tuple(xs.shape)}")
    batch, steps, _ = xs.shape
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (batch, steps)):
        raise ValueError(
            f"mask must be a bool tensor of shape ({batch}, {steps}), got {mask.dtype} {tuple(mask.shape)}"
        )
    eye = torch.eye(d, dtype=xs.dtype)
    m = xs.new_zeros(batch, d)
    P = xs.new_zeros(batch, d, d)
    nlls, means, covs = [], [], []
    for t in range(steps):
        m_pred = m @ A.T
        P_pred = A @ P @ A.T + Q
        S = C @ P_pred @ C.T + R
        S = (S + S.transpose(-1, -2)) / 2
        x = xs[:, t]
        nll = -MultivariateNormal(m_pred @ C.T, covariance_matrix=S).log_prob(x)
        K = torch.linalg.solve(S, C @ P_pred).transpose(-1, -2)  # P⁻ Cᵀ S⁻¹ (S, P⁻ symmetric)
        m_new = m_pred + (K @ (x - m_pred @ C.T).unsqueeze(-1)).squeeze(-1)
        IKC = eye - K @ C
        P_new = IKC @ P_pred @ IKC.transpose(-1, -2) + K @ R @ K.transpose(-1, -2)
        if mask is not None:
            obs = mask[:, t]
            nll = torch.where(obs, nll, torch.zeros_like(nll))
            m_new = torch.where(obs[:, None], m_new, m_pred)
            P_new = torch.where(obs[:, None, None], P_new, P_pred)
        m, P = m_new, P_new
        nlls.append(nll)
        means.append(m)
        covs.append(P)
    return KalmanFilterResult(torch.stack(nlls, 1), torch.stack(means, 1), torch.stack(covs, 1))


def step_optimum(A: Tensor, C: Tensor, Q: Tensor, R: Tensor, z_prev: Tensor, x_t: Tensor) -> StepOptimum:
    """Exact one-step posterior given the guide's own sample z_{t-1} (batched over leading dims).

    The step posterior p(z_t | z_{t-1}, x_t) is Gaussian with::

        precision  L = Q⁻¹ + Cᵀ R⁻¹ C
        mean       m = L⁻¹ (Q⁻¹ A z_{t-1} + Cᵀ R⁻¹ x_t)

    and the minimum over all q(z_t) of the step free energy
    F_t(q) = E_q[-log N(x_t; C z_t, R)] + KL(q || N(A z_{t-1}, Q)) is the negative log evidence::

        F*_t = -log N(x_t; C A z_{t-1}, C Q Cᵀ + R)

    :param z_prev: (..., d). :param x_t: (..., n); the leading dims broadcast.
    """
    d, _ = _check_params(A, C, Q, R)
    prior_loc = z_prev @ A.T
    S = C @ Q @ C.T + R
    free_energy = -MultivariateNormal(prior_loc @ C.T, covariance_matrix=(S + S.T) / 2).log_prob(x_t)
    Q_inv = torch.cholesky_inverse(torch.linalg.cholesky(Q))
    CtRinv = torch.linalg.solve(R, C).T  # Cᵀ R⁻¹ (R symmetric)
    L = Q_inv + CtRinv @ C
    rhs = prior_loc @ Q_inv + x_t @ CtRinv.T
    mean = torch.linalg.solve(L, rhs.unsqueeze(-1)).squeeze(-1)
    precision = L.expand(*mean.shape[:-1], d, d)
    return StepOptimum(free_energy, mean, precision)


def diagonal_gap(L: Tensor) -> Tensor:
    """Extra free energy of the best diagonal-Normal q for a Gaussian posterior of precision L (..., d, d).

    The best diagonal q has the posterior mean and variances 1/L_ii, and its KL to the posterior is::

        gap = ½ (Σᵢ log L_ii - log det L)   (≥ 0, = 0 iff L is diagonal)
    """
    return 0.5 * (torch.diagonal(L, dim1=-2, dim2=-1).log().sum(-1) - torch.logdet(L))


def expected_step_free_energy(
    A: Tensor,
    C: Tensor,
    Q: Tensor,
    R: Tensor,
    z_prev: Tensor,
    x_t: Tensor,
    q_loc: Tensor,
    q_scale: Optional[Tensor] = None,
    *,
    q_scale_tril: Optional[Tensor] = None,
) -> Tensor:
    """Closed-form step free energy of a diagonal Normal q(z_t) = N(μ, diag σ²) (``q_loc``, ``q_scale``), or of
    a full-covariance q(z_t) = N(μ, Σ_q = L Lᵀ) (``q_loc``, ``q_scale_tril`` L)::

        F_t(q) = E_q[-log N(x_t; C z_t, R)] + KL(q || N(A z_{t-1}, Q))
        E_q[-log N(x_t; C z, R)] = -log N(x_t; C μ, R) + ½ tr(Cᵀ R⁻¹ C Σ_q)
        KL = ½ (tr(Q⁻¹ Σ_q) + (A z_{t-1} - μ)ᵀ Q⁻¹ (A z_{t-1} - μ) - d + log det Q - log det Σ_q)

    Equivalently F_t(q) = F*_t + KL(q || exact step posterior) (see :func:`step_optimum`).
    Shapes: z_prev, q_loc, q_scale (..., d); q_scale_tril (..., d, d); x_t (..., n); result (...).
    """
    _check_params(A, C, Q, R)
    if (q_scale is None) == (q_scale_tril is None):
        raise ValueError("give exactly one of q_scale (diagonal q) and q_scale_tril (full-covariance q)")
    CtRinvC = C.T @ torch.linalg.solve(R, C)
    expected_nll = -MultivariateNormal(q_loc @ C.T, covariance_matrix=R).log_prob(x_t)
    if q_scale_tril is None:
        q_scale_tril = torch.diag_embed(q_scale)
    trace = (q_scale_tril * (CtRinvC @ q_scale_tril)).sum((-2, -1))  # tr(Lᵀ M L) = tr(M Σ_q)
    expected_nll = expected_nll + 0.5 * trace
    q = MultivariateNormal(q_loc, scale_tril=q_scale_tril)
    prior = MultivariateNormal(z_prev @ A.T, covariance_matrix=Q)
    return expected_nll + kl_divergence(q, prior)


__all__ = [
    "KalmanFilterResult",
    "StepOptimum",
    "diagonal_gap",
    "expected_step_free_energy",
    "kalman_filter",
    "step_optimum",
]
