"""Streaming filtering: one observation in, the current posterior and a k-step-ahead predictive out.

:class:`OnlineFilter` has the shape of Pyro's :class:`~pyro.infer.SMCFilter`: the model is an object with
two methods,

- ``init(state, *args, **kwargs)``: fill the dict ``state`` with the initial state of the model;
- ``step(state, *args, **kwargs)``: advance the model by one time step by calling a
  :func:`~pyro_avf.filtering_step` function exactly once (under the plates it needs), and store what the
  next step needs back into ``state``. Called with the observation ``None`` it must *simulate* the step
  (``pyro.sample(..., obs=None)`` does so): that is how predictions are made.

Every tensor in ``state`` and in the step's tensor arguments leads with the batch dimension (one row per
stream), and ``step`` stores new values into ``state`` rather than changing its tensors in place (the filter
keeps the previous state to simulate futures from).
At each :meth:`OnlineFilter.step` the trained :class:`~pyro_avf.IterativeGuide` infers
:math:`q(z_t)` from the prior prediction with its K iterations, exactly as the online evaluation of
:func:`pyro_avf.evaluation.filtering_free_energy` does (same random draws for the same seed), and the state
moves on with :math:`z_t \\sim q_{\\lambda_K}(z_t)`. Memory is constant per step: the filter keeps the current
state and the previous step's inputs, and no autograd graph leaves a step.

The k-step-ahead predictive of an observation site is the mixture over :math:`P` simulated futures

.. math::

    p(x_{t+k} \\mid x_{\\le t}) \\approx \\frac{1}{P} \\sum_{p=1}^{P}
        p_\\theta\\big(x_{t+k} \\mid z^{(p)}_{\\le t+k}, x^{(p)}_{t+1:t+k-1}, x_{\\le t}\\big),
    \\qquad z^{(p)}_t \\sim q_{\\lambda_K}(z_t), \\quad z^{(p)}_{t+j}, x^{(p)}_{t+j} \\sim p_\\theta,

returned as a :class:`~pyro.distributions.MixtureSameFamily` with batch shape ``(batch,)``.

Example::

    class Stream:
        def __init__(self, ssm):
            self.ssm = ssm

        def init(self, state, batch_size):
            state["t"], state["z"] = 0, torch.zeros(batch_size, self.ssm.latent_dim)

        def step(self, state, x_t):
            state["t"] += 1
            with pyro.plate("sequences", state["z"].size(0)):
                state["z"] = self.ssm.step(state["t"], state["z"], x_t)

    f = OnlineFilter(Stream(ssm), guide, predict_steps=1)
    f.init(batch_size=1)
    for x_t in sensor:                       # x_t: (1, obs_dim)
        out = f.step(x_t)
        out.posterior["z_1"].mean, out.predictive  # q(z_t) and p(x_{t+1} | x_{<=t})
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, NamedTuple, Optional

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.utils._pytree import tree_map

from pyro_avf.guide import IterativeGuide
from pyro_avf.inference import Lambda, detached
from pyro_avf.posterior import posterior


class FilterStep(NamedTuple):
    """What :meth:`OnlineFilter.step` returns for step ``t`` (1-based count of observations so far).

    ``posterior``: latent site name → :math:`q_{\\lambda_K}(z_t)`; ``free_energy``, ``kl``,
    ``reconstruction``: this step's terms per stream, shape ``(batch,)``; ``predictive``: observation site
    name → k-step-ahead predictive (``None`` when the filter was built with ``predict_steps=0``);
    ``observed``: per stream, whether the step observed anything unmasked.
    """

    t: int
    posterior: Dict[str, dist.Distribution]
    free_energy: torch.Tensor
    kl: torch.Tensor
    reconstruction: torch.Tensor
    predictive: Optional[Dict[str, dist.Distribution]]
    observed: Optional[torch.Tensor] = None


class _DrawLatents(Messenger):
    """Draw the latent sites of one step from given posteriors ``q(λ_i)``, in their order in the step."""

    def __init__(self, lambdas: List[Lambda]):
        super().__init__()
        self.lambdas = lambdas
        self.count = 0

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"] or site_is_subsample(msg) or self.count >= len(self.lambdas):
            return
        loc, log_scale = self.lambdas[self.count]
        msg["fn"] = posterior(loc, log_scale, msg["fn"])
        self.count += 1


def repeat_streams(tree: Any, times: int) -> Any:
    """Repeat every tensor of ``tree`` ``times`` times along its leading (batch) dimension, row by row:
    row ``b`` becomes rows ``b·times … b·times + times − 1``."""
    return tree_map(lambda v: v.repeat_interleave(times, 0) if isinstance(v, torch.Tensor) else v, tree)


def split_streams(fn: dist.Distribution, batch: int, times: int) -> dist.Distribution:
    """Reshape the leading batch dimension ``batch·times`` of ``fn`` into ``(batch, times)``.

    Supports :class:`~torch.distributions.Independent` wrappers around element-wise distributions
    (Normal, Bernoulli, LogNormal, Gamma, ... : every parameter has the distribution's batch shape).
    """
    if isinstance(fn, torch.distributions.Independent):
        return dist.Independent(split_streams(fn.base_dist, batch, times), fn.reinterpreted_batch_ndims)
    if fn.event_shape != torch.Size():
        raise ValueError(
            f"pyro_avf: cannot form a predictive mixture of {type(fn).__name__} (event shape "
            f"{tuple(fn.event_shape)}); predictions support element-wise observation distributions."
        )
    params = {name: getattr(fn, name) for name in fn.arg_constraints if name in fn.__dict__}
    if "logits" in params:  # probs and logits are alternatives; a cached one may sit beside the other
        params.pop("probs", None)
    shape = fn.batch_shape
    grouped = {
        name: v.expand(shape).reshape((batch, times) + shape[1:]) for name, v in params.items() if v is not None
    }
    return type(fn)(**grouped, validate_args=False)


def predictive_mixture(fn: dist.Distribution, batch: int, times: int) -> dist.MixtureSameFamily:
    """The equally weighted mixture over the ``times`` simulated futures of each stream."""
    grouped = split_streams(fn, batch, times)
    ndims = len(fn.batch_shape) - 1  # batch dims after the stream dimension become the mixture's event
    component = dist.Independent(grouped, ndims) if ndims else grouped
    weights = dist.Categorical(logits=grouped.mean.new_zeros(batch, times))  # the data's dtype and device
    return dist.MixtureSameFamily(weights, component)


class OnlineFilter:
    """Amortized variational filtering of streams, one observation at a time.

    :param model: an object with ``init(state, ...)`` and ``step(state, ...)`` (see the module docstring).
    :param IterativeGuide guide: a (trained) guide; its update networks are used as they are, not trained.
    :param int predict_steps: k of the k-step-ahead predictive returned by every :meth:`step` (0: none).
    :param int num_samples: P, the simulated futures per stream that form a predictive mixture.

    Example::

        f = OnlineFilter(Stream(ssm), guide, predict_steps=3, num_samples=200)
        f.init(batch_size=4)
        out = f.step(x_t)                # out.posterior: q(z_t); out.predictive: p(x_{t+3} | x_{<=t})
        f.predict(10)                    # any other horizon
    """

    def __init__(self, model: Any, guide: IterativeGuide, *, predict_steps: int = 0, num_samples: int = 100):
        if not isinstance(guide, IterativeGuide):
            raise TypeError(f"guide must be a pyro_avf.IterativeGuide, got {type(guide).__name__}")
        for method in ("init", "step"):
            if not callable(getattr(model, method, None)):
                raise TypeError(
                    f"model must have methods init(state, ...) and step(state, ...) like pyro.infer.SMCFilter's "
                    f"models; {type(model).__name__} has no {method}()"
                )
        if not isinstance(predict_steps, int) or predict_steps < 0:
            raise ValueError(f"predict_steps must be a non-negative integer, got {predict_steps!r}")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        self.model, self.guide = model, guide
        self.predict_steps, self.num_samples = predict_steps, num_samples
        self.state: Optional[Dict[str, Any]] = None
        self.t = 0
        self._last: Optional[tuple] = None  # (state before the step, args, kwargs, λ_K)

    def init(self, *args, **kwargs) -> None:
        """Start new streams: ``model.init(state, *args, **kwargs)`` fills an empty state."""
        self.state, self.t, self._last = {}, 0, None
        with torch.no_grad():
            self.model.init(self.state, *args, **kwargs)

    def step(self, *args, **kwargs) -> FilterStep:
        """Filter one time step: ``model.step(state, *args, **kwargs)`` under the guide."""
        if self.state is None:
            raise RuntimeError("OnlineFilter.step() called before init()")
        before = dict(self.state)
        record = self.guide.run(args, kwargs, fn=lambda *a, **k: self.model.step(self.state, *a, **k), online=True,
                                first_step=self.t)  # fmt: skip
        calls = record.online.count
        if calls != 1:
            raise RuntimeError(
                f"pyro_avf: model.step() must call a @pyro_avf.filtering_step function exactly once, it called "
                f"{calls}."
            )
        self.state = detached(self.state)
        run = record.last_run
        lambdas = [rec.lam for rec in run.latents]
        self._last = (before, args, kwargs, lambdas)
        self.t += 1
        terms = record.online.last()
        return FilterStep(
            t=self.t,
            posterior={rec.name: posterior(rec.lam[0], rec.lam[1], rec.prior) for rec in run.latents},
            free_energy=terms["free_energy"],
            kl=terms["kl"],
            reconstruction=terms["reconstruction"],
            predictive=self.predict(self.predict_steps) if self.predict_steps else None,
            observed=terms["observed"],
        )

    def predict(self, k: int, num_samples: Optional[int] = None) -> Dict[str, dist.Distribution]:
        """k-step-ahead predictive of every observation site of the last filtered step (keyed by the
        predicted site's name), a mixture over ``num_samples`` simulated futures per stream.

        Drawn with a forked random number generator: predicting does not change later filtering results.
        """
        if self._last is None:
            raise RuntimeError("OnlineFilter.predict() needs at least one step() after init()")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        before, args, kwargs, lambdas = self._last
        times = num_samples or self.num_samples
        state = repeat_streams(before, times)
        args, kwargs = repeat_streams((args, kwargs), times)
        batch = next(v.size(0) for v in before.values() if isinstance(v, torch.Tensor))
        with torch.random.fork_rng(devices=[]), torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not registered in the param store because requires_grad")
            with _DrawLatents(repeat_streams(lambdas, times)):  # z_t ~ q(z_t), x_t as observed
                filtered = poutine.trace(self.model.step).get_trace(state, *args, **kwargs)
            for _ in range(k):
                simulated = poutine.trace(self.model.step).get_trace(state, None)
        pattern = [s["is_observed"] for s in _sample_sites(filtered)]
        sites = _sample_sites(simulated)
        if len(sites) != len(pattern):
            raise RuntimeError(
                f"pyro_avf: a simulated step (observation None) sampled {len(sites)} sites, but the filtered step "
                f"had {len(pattern)}; model.step(state, None) must sample the observations it would otherwise "
                "observe, and nothing else."
            )
        predicted = [s for s, was_observed in zip(sites, pattern) if was_observed]
        return {s["name"]: predictive_mixture(s["fn"], batch, times) for s in predicted}


def _sample_sites(trace) -> List[dict]:
    return [s for s in trace.nodes.values() if s["type"] == "sample" and not site_is_subsample(s)]
