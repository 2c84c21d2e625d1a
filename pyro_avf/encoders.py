r"""What a learned update sees besides λ: gradients, prediction errors, observations.

For the slots :math:`i \in G` that one update network serves, every term is flattened to ``batch + (-1,)``
(``batch``: the slots' own batch dims when they agree, else the step's outer plates) and the slots'
terms are joined along the last dim:

- *gradient encoding* (Marino et al., 2018): :math:`(\mu_i, \log\sigma_i, \nabla_{\mu_i} \mathcal{F},
  \nabla_{\log\sigma_i} \mathcal{F})_{i \in G}`;
- *error encoding* (Gaussian models): :math:`(\mu_i, \log\sigma_i, \varepsilon_{z_i})_{i \in G}` and
  :math:`\varepsilon_x`, with :math:`\varepsilon_z = (u - \mu_p)/\sigma_p` the latent's prediction error under its
  prior (in the unconstrained space) and :math:`\varepsilon_x = (x - \mu_x)/\sigma_x` the observations';
- *observation encoding* (added to either): the step's observed values :math:`x_t`.

A full-covariance slot (``IterativeGuide(posterior="full")``) adds the strictly-lower entries of its Cholesky
factor, :math:`\ell_i`, to λ and (gradient encoding) :math:`\nabla_{\ell_i} \mathcal{F}` to the gradients; a
group without one gets exactly the inputs above.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from pyro_avf.posterior import unconstrained_event_dim

Lambda = Tuple[torch.Tensor, ...]
SIGNALS = ("gradient", "error")


class NetworkInputs(NamedTuple):
    """The flattened inputs of one update network and how to give its output back its slots' shapes."""

    lam: Lambda  # (loc, log_scale), plus the joined lower entries when a slot has full covariance
    grads: Lambda  # the same parts' gradients
    errors: Optional[Lambda]
    obs: Optional[torch.Tensor]
    shapes: List[Tuple[torch.Size, ...]]  # each slot's λ shapes
    slot_dims: List[int]
    lower_dims: List[int]  # each slot's number of lower entries (0: diagonal)

    @property
    def dim(self) -> int:
        return sum(self.slot_dims)

    @property
    def error_dim(self) -> int:
        return 0 if self.errors is None else self.errors[1].size(-1)

    @property
    def obs_dim(self) -> int:
        return 0 if self.obs is None else self.obs.size(-1)

    def unflatten(self, loc: torch.Tensor, log_scale: torch.Tensor, lower: Optional[torch.Tensor] = None
                  ) -> List[Lambda]:  # fmt: skip
        """Split a network's output into the slots' ``(loc, log_scale)`` (and ``lower`` of a full-covariance
        slot) of their own shapes."""
        parts = [loc.split(self.slot_dims, -1), log_scale.split(self.slot_dims, -1)]
        if lower is not None:
            parts.append(lower.split(self.lower_dims, -1))
        slots = zip(zip(*parts), self.shapes)
        return [tuple(p.reshape(shape) for p, shape in zip(slot, shapes)) for slot, shapes in slots]


class Encoding:
    """Gradient or error encoding, optionally with the observations.

    :param str signal: ``"gradient"`` or ``"error"``.
    :param bool observation: also feed the step's observed values.

    Example::

        >>> Encoding("error", observation=True)
        Encoding('error', observation=True)
    """

    def __init__(self, signal: str = "gradient", observation: bool = False):
        if signal not in SIGNALS:
            raise ValueError(f"encoding must be 'gradient' or 'error', got {signal!r}")
        self.signal, self.observation = signal, observation

    def __repr__(self) -> str:
        return f"Encoding({self.signal!r}, observation={self.observation})"

    def inputs(self, run, group: Sequence[int], lambdas: List[Lambda], grads: List[Lambda]) -> NetworkInputs:
        """The network inputs for slots ``group`` after the re-run ``run``."""
        # the slots' own batch dims when they agree (a single slot, or sites batched alike with or without
        # plates), else the step's outer plates
        batches = {_own_batch(lambdas[i][0], run.latents[i].prior) for i in group}
        batch = batches.pop() if len(batches) == 1 else run.terms.batch_shape

        def flat(x: torch.Tensor, i: int) -> torch.Tensor:
            return flatten_to(x, batch, run.latents[i].name)

        def joined(parts: List[torch.Tensor]) -> torch.Tensor:
            return parts[0] if len(parts) == 1 else torch.cat(parts, -1)

        locs = [flat(lambdas[i][0], i) for i in group]
        lam = (joined(locs), joined([flat(lambdas[i][1], i) for i in group]))
        g = (joined([flat(grads[i][0], i) for i in group]), joined([flat(grads[i][1], i) for i in group]))
        lower_dims = [flat(lambdas[i][2], i).size(-1) if len(lambdas[i]) > 2 else 0 for i in group]
        if any(lower_dims):
            full = [i for i in group if len(lambdas[i]) > 2]
            lam += (joined([flat(lambdas[i][2], i) for i in full]),)
            g += (joined([flat(grads[i][2], i) for i in full]),)
        errors = None
        if self.signal == "error":
            errors = (joined([flat(run.latent_errors(i), i) for i in group]), run.observation_errors(batch, lam[0]))
        obs = run.observed_values(batch, lam[0]) if self.observation else None
        shapes = [tuple(p.shape for p in lambdas[i]) for i in group]
        return NetworkInputs(lam, g, errors, obs, shapes, [x.size(-1) for x in locs], lower_dims)


def _own_batch(loc: torch.Tensor, prior) -> torch.Size:
    return loc.shape[: loc.dim() - unconstrained_event_dim(prior)]


def flatten_to(x: torch.Tensor, batch_shape: torch.Size, name: str, shared: bool = False) -> torch.Tensor:
    """Reshape ``x`` to ``batch_shape + (-1,)``: its leading dims are the batch dims, broadcast where ``x`` has
    size 1. With ``shared`` (observations, which are only read, never written back), dims where
    ``batch_shape`` has size 1 and ``x`` does not (a latent shared by the elements of a plate inside the step,
    such as one state over several observed sensors) join the features, so each latent element sees every
    observation it explains. Error if the dims do not align.

    Example::

        >>> flatten_to(torch.arange(6.0).reshape(2, 3), torch.Size([2, 1]), "x", shared=True).shape
        torch.Size([2, 1, 3])
    """
    n = len(batch_shape)
    if x.shape[:n] == batch_shape:  # the common case, on the hot path
        return x.reshape(batch_shape + (-1,))
    lead = x.shape[:n] if x.dim() >= n else None
    moved = [i for i in range(n) if batch_shape[i] == 1 and lead[i] != 1] if shared and lead is not None else []
    if lead is None or any(lead[i] not in (1, batch_shape[i]) for i in range(n) if i not in moved):
        also = ", or any size where the latent has size 1" if shared else ""
        raise ValueError(
            f"pyro_avf: cannot align site '{name}' of shape {tuple(x.shape)} with the latent batch shape "
            f"{tuple(batch_shape)} for encoding; its leading dims must be the latent's batch dims (or size 1 "
            f"there{also})."
        )
    target = tuple(lead[i] if i in moved else batch_shape[i] for i in range(n))
    x = x.expand(target + x.shape[n:])
    if moved:  # the dims the latent is shared over go right after the batch dims, then into the features
        x = x.movedim(moved, list(range(n - len(moved), n)))
    return x.reshape(batch_shape + (-1,))
