r"""Sharing a pass with other guides: the sites that traces outside :class:`~pyro_avf.IterativeGuide` hold.

An :class:`~pyro.infer.autoguide.AutoGuideList` creates the model's plates, then runs its parts in order, all
under one trace. ``IterativeGuide`` runs the model itself, so it meets those plates again and, given the whole
model, the latent sites an earlier part has drawn. Both are taken from the outer trace: a plate takes the
recorded subsample indices (and is not recorded twice), a drawn latent is data for the steps, as under
``poutine.condition``:

.. math:: q(z_{1:T}, \theta) = q_{\text{other}}(\theta)\, \prod_t q_{\lambda_t}(z_t \mid \theta).

Example: a MAP estimate of a global noise scale beside the filtering guide of the steps::

    >>> import pyro, pyro.distributions as dist, torch
    >>> from pyro import poutine
    >>> from pyro.infer.autoguide import AutoDelta, AutoGuideList
    >>> from pyro_avf import IterativeGuide, filtering_step
    >>> @filtering_step
    ... def step(t, z_prev, x_t, noise):
    ...     z = pyro.sample(f"z_{t}", dist.Normal(0.9 * z_prev, 0.5).to_event(1))
    ...     pyro.sample(f"x_{t}", dist.Normal(z, noise).to_event(1), obs=x_t)
    ...     return z
    >>> def model(xs):
    ...     noise = pyro.sample("noise", dist.LogNormal(-1.0, 0.5))
    ...     with pyro.plate("sequences", xs.size(0)):
    ...         z = xs.new_zeros(xs.size(0), xs.size(2))
    ...         for t in pyro.markov(range(xs.size(1))):
    ...             z = step(t, z, xs[:, t], noise)
    >>> guide = AutoGuideList(model)
    >>> guide.append(AutoDelta(poutine.block(model, expose=["noise"])))
    >>> guide.append(IterativeGuide(model, num_iterations=2, hidden_size=8))   # the whole model
    >>> sorted(guide(torch.randn(4, 3, 2)))
    ['noise', 'z_0', 'z_1', 'z_2']
"""

from __future__ import annotations

from typing import Dict, List, Optional

from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import Message
from pyro.poutine.trace_messenger import TraceMessenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample

from pyro_avf.outer_stack import frames_below


def outer_traces(handler: Messenger) -> List[Trace]:
    """The traces of the trace handlers below ``handler`` on the stack (outside it) that record sample sites,
    innermost first (not ``SVI``'s ``poutine.trace(param_only=True)``)."""
    frames = frames_below(handler)
    return [frame.trace for frame in frames if isinstance(frame, TraceMessenger) and not frame.param_only]


def is_drawn_latent(site: Dict) -> bool:
    """A latent sample site that a guide drew (not observed, not a plate's subsample site)."""
    return site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)


def outer_site(traces: List[Trace], name: str) -> Optional[Dict]:
    """The site ``name`` that one of the outer ``traces`` already holds, else ``None``."""
    return next((trace.nodes[name] for trace in traces if name in trace.nodes), None)


def share_outer_plate(traces: List[Trace], msg: Message) -> bool:
    """Give a plate's subsample site the indices an outer trace recorded for the same plate; True if it did."""
    site = outer_site(traces, msg["name"])
    size = msg["fn"].subsample_size or msg["fn"].size
    if site is None or not site_is_subsample(site) or site["fn"].size != msg["fn"].size:
        return False
    if site["value"].numel() != size:
        return False
    msg["value"], msg["done"], msg["stop"] = site["value"], True, True
    return True


def take_outer_latent(traces: List[Trace], msg: Message, in_step: bool) -> None:
    """Make a latent site that another guide has drawn data here (its value, ``is_observed``)."""
    site = outer_site(traces, msg["name"])
    if site is None or not is_drawn_latent(site):
        return
    if in_step:
        raise NotImplementedError(
            f"pyro_avf: latent site '{msg['name']}' inside a filtering step is already guided by another guide "
            "(a part of an AutoGuideList?); IterativeGuide infers every latent site of a step itself."
        )
    msg["value"], msg["is_observed"] = site["value"], True


def check_outer_latents_seen(traces: List[Trace], trace: Trace) -> None:
    """Refuse a pass that shared an outer guide's plates but never met the latent sites that guide drew."""
    drawn = {
        name
        for outer in traces
        for name, site in outer.nodes.items()
        if is_drawn_latent(site) and not site["infer"].get("is_auxiliary")
    }
    unseen = sorted(drawn - set(trace.nodes))
    if unseen:
        raise ValueError(
            f"pyro_avf: latent sites {unseen} were drawn by another part of the guide but never reached "
            "IterativeGuide (hidden by poutine.block?), so its steps would be inferred with the model's own prior "
            "draws of them instead. Give IterativeGuide the whole model: the sites another part has drawn are "
            "taken as given."
        )
