"""The ``filtering_step`` marker: makes one time step of a model re-runnable.

A dynamical model advances by one step at a time. Marking the function that does so
turns each call into a Pyro message of type ``"filtering_step"``. With no handler
on the stack the function simply runs; under :class:`~pyro_avf.IterativeGuide`
the call arrives at the guide, which may execute the step as often as inference
needs before letting the model continue.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import pyro
import pyro.distributions as dist
import torch
from pyro.poutine.markov_messenger import MarkovMessenger
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK, Message, am_i_wrapped, apply_stack
from pyro.poutine.util import site_is_subsample
from torch.utils._pytree import tree_leaves

STEP_TYPE = "filtering_step"

_F = TypeVar("_F", bound=Callable)


def filtering_step(fn: _F) -> _F:
    r"""Mark ``fn`` as the function that advances a model by one time step.

    The step may take any arguments and return whatever the next step needs. All its
    latent sample sites form the step's latent *slots* (matched across steps by their
    order within the step and their shape), and its observed sites give the step free
    energy

    .. math::

        \mathcal{F}_t = -\mathbb{E}_{q(z_t)}\left[\log p_\theta(x_t \mid x_{<t}, z_{\le t})\right]
            + D_{KL}\left(q(z_t) \,\|\, p_\theta(z_t \mid x_{<t}, z_{<t})\right).

    Example (``examples_model`` below is reused by the other docstring examples)::

        >>> import pyro, pyro.distributions as dist, torch, pyro_avf
        >>> @pyro_avf.filtering_step
        ... def step(t, z_prev, x_t):
        ...     z = pyro.sample(f"z_{t}", dist.Normal(0.9 * z_prev, 1.0).to_event(1))
        ...     pyro.sample(f"x_{t}", dist.Normal(z, 0.5).to_event(1), obs=x_t)
        ...     return z
        >>> def model(xs):
        ...     z = torch.zeros(xs.size(0), 2)
        ...     with pyro.plate("sequences", xs.size(0)):
        ...         for t in pyro.markov(range(xs.size(1))):
        ...             z = step(t, z, xs[:, t])
        >>> step(0, torch.zeros(2), torch.zeros(2)).shape  # with no handler the step simply runs
        torch.Size([2])

    Unlike :func:`pyro.poutine.runtime.effectful`, every keyword argument (``name``,
    ``obs`` and ``infer`` included) is passed through to ``fn`` unchanged.
    """
    if getattr(fn, "_is_filtering_step", False):
        return fn

    @functools.wraps(fn)
    def step(*args, **kwargs):
        if not am_i_wrapped():
            return fn(*args, **kwargs)
        msg = Message(
            type=STEP_TYPE,
            name=getattr(fn, "__qualname__", "filtering_step"),
            fn=fn,
            is_observed=False,
            args=args,
            kwargs=kwargs,
            value=None,
            scale=1.0,
            mask=None,
            cond_indep_stack=(),
            done=False,
            stop=False,
            continuation=None,
            infer={},
        )
        apply_stack(msg)
        return msg["value"]

    step._is_filtering_step = True  # type: ignore[attr-defined]
    return step  # type: ignore[return-value]


def is_filtering_step(fn: Callable) -> bool:
    """Whether ``fn`` was marked with :func:`filtering_step`."""
    return bool(getattr(fn, "_is_filtering_step", False))


class StepDetector(Messenger):
    """Finds out whether a model has a marked step (stopping at the first one), refusing latent sites in a
    ``pyro.markov`` loop outside any marked step on the way."""

    class Found(Exception):
        pass

    def _pyro_filtering_step(self, msg: Message) -> None:
        raise self.Found()

    def _pyro_sample(self, msg: Message) -> None:
        if not msg["is_observed"] and not site_is_subsample(msg):
            check_not_in_markov_loop(msg["name"], _PYRO_STACK)


def check_not_in_markov_loop(name: str, stack) -> None:
    """Latent sites inside ``pyro.markov`` but outside any marked step are almost surely a forgotten marker."""
    if any(isinstance(f, MarkovMessenger) for f in stack):
        raise ValueError(
            f"pyro_avf: latent site '{name}' is sampled inside a pyro.markov loop but not inside a function "
            "marked with @pyro_avf.filtering_step. Move the body of the loop into a function, decorate it with "
            "@pyro_avf.filtering_step and call it once per time step, e.g.\n"
            "    @pyro_avf.filtering_step\n"
            "    def step(t, state, x_t): ...\n"
            "    for t in pyro.markov(range(T)):\n"
            "        state = step(t, state, xs[:, t])"
        )


def has_filtering_step(model, *args, **kwargs) -> bool:
    """Whether ``model(*args, **kwargs)`` calls a :func:`filtering_step` (run once, blocked, without gradients).

    When it does, the random stream is put back as it was: the draws of sites before the first step do not
    shift the caller's samples, so a fresh guide restored from the param store gives the loss of the guide it
    was saved from. (A model without a step keeps the stream as its detection run left it, as before.)
    """
    cuda = sorted({v.device for v in tree_leaves((args, kwargs)) if isinstance(v, torch.Tensor) and v.is_cuda},
                  key=str)  # fmt: skip
    states = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in cuda]
    try:
        with pyro.poutine.block(), torch.no_grad(), StepDetector():
            model(*args, **kwargs)
    except StepDetector.Found:
        torch.set_rng_state(states[0])
        for d, state in zip(cuda, states[1]):
            torch.cuda.set_rng_state(state, d)
        return True
    return False


def examples_model(xs):
    """The model of the docstring examples: a 2-d random walk observed in noise, ``xs`` of shape
    ``(sequences, time, 2)``."""
    z = xs.new_zeros(xs.size(0), 2)
    with pyro.plate("sequences", xs.size(0)):
        for t in pyro.markov(range(xs.size(1))):
            z = _examples_step(t, z, xs[:, t])


@filtering_step
def _examples_step(t, z_prev, x_t):
    z = pyro.sample(f"z_{t}", dist.Normal(0.9 * z_prev, 1.0).to_event(1))
    pyro.sample(f"x_{t}", dist.Normal(z, 0.5).to_event(1), obs=x_t)
    return z
