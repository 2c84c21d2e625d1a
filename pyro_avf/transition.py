r"""A model as a transition: the protocol that lets one model run a whole sequence or one step at a time.

A model with a :func:`~pyro_avf.filtering_step` already is its own transition. It follows this protocol by
exposing that transition around the marked step:

- ``initial_state(batch_size, like) -> carry``: what the first step needs (:math:`z_0`, an RNN state,
  :math:`x_0 = 0`, ...), every tensor leading with the batch dimension, of ``like``'s dtype and device;
- ``advance(t, carry, x_t, mask_t) -> carry``: step ``t`` (1-based). It computes whatever deterministic
  inputs the step needs from the carry (an RNN state from :math:`x_{t-1}`, a frame encoding, ...), calls the
  marked step exactly once, and returns the next carry. ``x_t`` is ``None`` to *simulate* the step (the
  step's ``pyro.sample(..., obs=None)`` draws :math:`x_t`, and the carry moves on with the draw); ``mask_t``
  (batch,) bool or ``None`` masks the step's sites of sequences that have ended;
- ``plate_name`` (optional, default ``"sequences"``): the name of the batch plate the steps run in;
- ``validate(xs, mask) -> (xs, mask)`` (optional): check a batch ``xs`` (batch, time, ...) and its mask,
  raising ``ValueError`` naming what is wrong (the stream checks every observation with it);
- ``stream()`` (optional): the model's own stream, a :class:`~pyro_avf.online.StepStream` with more to it
  (SRNN's also steps its baseline filter); without it the model streams through a plain ``StepStream``.

The carry may be any nest of tuples, named tuples, lists and dicts of tensors; every tensor in it leads with
the batch dimension. A model's ``model(xs, mask)`` is then :func:`run_steps`,

.. math::

    c_0 = \mathrm{initial\_state}(B), \qquad c_t = \mathrm{advance}(t, c_{t-1}, x_t, m_t), \quad t = 1..T,

under one ``pyro.plate`` over the batch and ``pyro.markov`` over time, and
:class:`~pyro_avf.online.StepStream` runs the same ``advance`` one observation at a time, so the batch pass
and the stream are the same code by construction.

Example (``advance`` calls the marked ``step`` once)::

    >>> import pyro, pyro.distributions as dist, torch, pyro_avf
    >>> class RandomWalk:
    ...     plate_name = "sequences"
    ...     def initial_state(self, batch_size, like):
    ...         return like.new_zeros(batch_size, 2)
    ...     @pyro_avf.filtering_step
    ...     def step(self, t, z_prev, x_t, mask_t=None):
    ...         z = pyro.sample(f"z_{t}", dist.Normal(0.9 * z_prev, 1.0).to_event(1))
    ...         pyro.sample(f"x_{t}", dist.Normal(z, 0.5).to_event(1), obs=x_t)
    ...         return z
    ...     def advance(self, t, carry, x_t, mask_t=None):
    ...         return self.step(t, carry, x_t, mask_t)
    ...     def model(self, xs, mask=None):
    ...         return run_steps(self, xs, mask)
    >>> missing_members(RandomWalk())
    []
    >>> run_steps(RandomWalk(), torch.zeros(3, 4, 2)).shape
    torch.Size([3, 2])
"""

from __future__ import annotations

from typing import Any, List, Optional, Protocol, runtime_checkable

import pyro
from torch import Tensor

__all__ = ["DEFAULT_PLATE", "StepModel", "missing_members", "plate_name", "run_steps"]

DEFAULT_PLATE = "sequences"
REQUIRED = {
    "initial_state": "initial_state(batch_size, like) -> carry",
    "advance": "advance(t, carry, x_t, mask_t) -> carry (calling the @pyro_avf.filtering_step once)",
}


@runtime_checkable
class StepModel(Protocol):
    """A model that exposes its transition around its marked step (see the module docstring)."""

    def initial_state(self, batch_size: int, like: Tensor) -> Any: ...

    def advance(self, t: int, carry: Any, x_t: Optional[Tensor], mask_t: Optional[Tensor] = None) -> Any: ...


def missing_members(model: object) -> List[str]:
    """The signatures of the protocol's required methods that ``model`` lacks (empty when it has them all)."""
    return [signature for name, signature in REQUIRED.items() if not callable(getattr(model, name, None))]


def plate_name(model: object) -> str:
    """The name of the model's batch plate: its ``plate_name`` attribute, else ``"sequences"``."""
    return getattr(model, "plate_name", DEFAULT_PLATE)


def run_steps(model: StepModel, xs: Tensor, mask: Optional[Tensor] = None) -> Any:
    """The batch pass: :math:`c_t = \\mathrm{advance}(t, c_{t-1}, x_t, m_t)` for t = 1..T from
    ``initial_state(B, xs)``, under ``pyro.plate(plate_name, B)`` and ``pyro.markov``; returns :math:`c_T`.

    ``xs`` is (B, T, ...) and ``mask`` (B, T) bool or ``None``; both are used as given (validate them first).
    """
    batch, steps = xs.shape[:2]
    carry = model.initial_state(batch, xs)
    with pyro.plate(plate_name(model), batch):
        for t in pyro.markov(range(1, steps + 1)):
            carry = model.advance(t, carry, xs[:, t - 1], None if mask is None else mask[:, t - 1])
    return carry
