r"""The handlers outside :class:`~pyro_avf.IterativeGuide` on Pyro's stack, as the sites of a step see them.

The guide runs the model itself, so every handler that a caller puts around the guide (a ``pyro.plate``,
``poutine.scale``, ``poutine.mask``, an ELBO's vectorized particle plate, an ``AutoGuideList``'s trace) lies
*below* it on ``_PYRO_STACK``. What those handlers do to a site is what ``apply_stack`` does after the guide:
each processes the message in turn, from the one nearest the guide outwards, until one stops it.

:func:`step_context` reads from them the plates, scale and mask of one filtering step (the re-runs apply
them to their own sites), and :func:`spread_factor` shapes a scalar log factor :math:`S` as a factor site
under those plates, :math:`S / |B|` at each of the :math:`|B|` elements of their batch, so that a loss that
reads the site per particle (``RenyiELBO``, ``TraceTailAdaptive_ELBO``) sees its share and the sum is
:math:`S`.

Example: the plates and scale that the handlers around a guide give a site::

    >>> import pyro, pyro.distributions as dist
    >>> from pyro import poutine
    >>> from pyro.poutine.messenger import Messenger
    >>> guide = Messenger()  # stands for IterativeGuide
    >>> with pyro.plate("particles", 3, dim=-2), poutine.scale(scale=2.0), guide:
    ...     ctx = step_context(guide, new_message("z_0", dist.Normal(0.0, 1.0)))
    >>> [frame.name for frame in ctx.frames], ctx.scale, tuple(ctx.batch_shape)
    (['particles'], 2.0, (3, 1))
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import pyro.distributions as dist
import torch
from pyro.poutine.condition_messenger import ConditionMessenger
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK, Message

from pyro_avf.free_energy import StepContext


def new_message(name: str, fn, **fields) -> Message:
    """A fresh sample-site message for ``fn``, as ``pyro.sample`` makes one, with ``fields`` changed."""
    msg = Message(type="sample", name=name, fn=fn, is_observed=False, args=(), kwargs={}, value=None, scale=1.0,
                  mask=None, cond_indep_stack=(), done=False, stop=False, continuation=None, infer={})  # fmt: skip
    msg.update(fields)
    return msg


def frames_below(handler: Messenger) -> List[Messenger]:
    """The handlers below ``handler`` on Pyro's stack (outside it), nearest first."""
    return list(reversed(_PYRO_STACK[: _PYRO_STACK.index(handler)])) if handler in _PYRO_STACK else []


def frames_above(handler: Messenger) -> List[Messenger]:
    """The handlers above ``handler`` on Pyro's stack (inside it, between it and the model's code)."""
    return _PYRO_STACK[_PYRO_STACK.index(handler) + 1 :] if handler in _PYRO_STACK else []


def process_outside(handler: Messenger, msg: Message) -> None:
    """Let the handlers below ``handler`` process ``msg`` as ``apply_stack`` would, up to one that stops it."""
    for frame in frames_below(handler):
        frame._process_message(msg)
        if msg["stop"]:
            break


def step_context(handler: Messenger, msg: Message, whole_model: bool = False) -> StepContext:
    """The plates, scale and mask that the handlers below ``handler`` add to the sites of the step whose
    message is ``msg``, and the ``poutine.condition`` handlers between ``handler`` and the step."""
    probe = Message(**{**msg, "cond_indep_stack": tuple(msg["cond_indep_stack"]), "stop": False})
    process_outside(handler, probe)
    conditions = tuple(frame for frame in frames_above(handler) if isinstance(frame, ConditionMessenger))
    return StepContext(tuple(probe["cond_indep_stack"]), probe["scale"], probe["mask"], whole_model, conditions)


def spread_factor(handler: Messenger, name: str, log_factor: torch.Tensor) -> Message:
    r"""A processed factor site ``name`` whose log factor, :math:`S` = ``log_factor`` (a scalar that already
    carries the outer scale), is spread evenly over the batch of the plates below ``handler``: :math:`S/|B|`
    per element, scale 1, no mask."""
    msg = new_message(name, dist.Unit(log_factor.new_zeros(())), is_observed=True, value=log_factor.new_zeros(0))
    process_outside(handler, msg)
    shape = msg["fn"].batch_shape
    msg["fn"] = dist.Unit((log_factor / max(shape.numel(), 1)).expand(shape))
    msg["scale"], msg["mask"], msg["stop"], msg["done"] = 1.0, None, False, True
    return msg


def place_surrogate(handler: Messenger, name: str, surrogate: torch.Tensor,
                    outer_trace: bool) -> Tuple[Optional[Message], Optional[torch.Tensor]]:  # fmt: skip
    r"""Where a pass's surrogate :math:`S` (value 0) reaches the loss: ``(site, None)``, a factor site of log
    factor :math:`-S` for the model trace (the loss is :math:`\ldots - \log f`), or, when a trace outside
    ``handler`` records the pass (an ``AutoGuideList``, ``poutine.trace(guide)``), ``(None, S')``: the log
    factor of an auxiliary guide factor to add after the pass (the loss is :math:`\ldots + \log f`, and the
    outer plates see it as they see the guide's sites)."""
    if outer_trace:
        return None, spread_factor(handler, name, surrogate)["fn"].log_factor
    return spread_factor(handler, name, -surrogate), None
