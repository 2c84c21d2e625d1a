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
from pyro.poutine.runtime import Message, am_i_wrapped, apply_stack

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
