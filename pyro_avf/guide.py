r"""IterativeGuide: amortized variational filtering for any Pyro program with a marked time step.

At every call of a :func:`~pyro_avf.filtering_step` the guide hands the step to its
:class:`~pyro_avf.inference.StepInference` (the prior prediction, then K updates
:math:`\lambda_{k+1} = f_\phi(\lambda_k, \nabla_\lambda \mathcal{F}_t)`), then lets the model run the step a last
time with :math:`z_t \sim q_{\lambda_K}` installed through Pyro's ``get_posterior`` hook, and hands the step's
return value on to the next step.

A model with latent sites but no marked step is treated as one step (iterative amortized inference for a
static model). Latent sites outside any step get a mean-field Normal.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Optional

import pyro
import torch
from pyro.poutine.guide import GuideMessenger
from pyro.poutine.runtime import Message
from pyro.poutine.util import site_is_subsample
from torch import nn

from pyro_avf.global_sites import MeanFieldSites
from pyro_avf.inference import (
    FinalRun,
    Lambda,
    StepInference,
    check_finite_observation,
    fresh_leaves,
    frozen_parameters,
    online_final_run,
)
from pyro_avf.outer_guides import check_outer_latents_seen, outer_traces, share_outer_plate, take_outer_latent
from pyro_avf.outer_stack import frames_above, new_message, place_surrogate, process_outside, step_context
from pyro_avf.passes import PassRecord
from pyro_avf.pickling import PicklableGuide
from pyro_avf.posterior import check_continuous_latent, check_family
from pyro_avf.step import STEP_TYPE, check_not_in_markov_loop, has_filtering_step
from pyro_avf.updates import UpdateNetworks, update_rule

JIT_REFUSAL = (
    "pyro_avf: IterativeGuide does not support JIT tracing (JitTrace_ELBO, JitTraceMeanField_ELBO, ...): every "
    "step runs an inner optimisation whose number of re-runs and whose gradients with respect to the posterior "
    "parameters are computed during the pass, which torch.jit.trace would freeze into constants. Use "
    "pyro_avf.AmortizedFilteringELBO (one pass, no model replay) or Trace_ELBO."
)


class IterativeGuide(PicklableGuide, GuideMessenger, nn.Module):
    r"""Amortized variational filtering guide for a Pyro model with a :func:`~pyro_avf.filtering_step`.

    :param callable model: the Pyro model.
    :param int num_iterations: K, the number of inference iterations per step (0: the posterior is the prior).
    :param update: ``"learned_sgd"`` (a learned natural-gradient step in a trust region, the default),
        ``"highway"`` (gated learned update, the AVF paper's), ``"residual"`` (gated residual, starts at the
        prior), ``"sgd"`` /
        ``"adam"`` for non-amortized filtering EM, or a rule object (see :mod:`pyro_avf.updates`).
    :param encoding: ``"gradient"``, ``"error"`` (prediction errors; Gaussian models), or an
        :class:`~pyro_avf.encoders.Encoding`.
    :param bool encode_observation: also feed the step's observations to the update network.
    :param str networks: ``"joint"`` (one update network over all latent slots of a step) or ``"per_slot"``.
    :param int hidden_size: units per hidden layer of the update networks.
    :param float lr: step size of ``"sgd"`` / ``"adam"``; initial step of ``"learned_sgd"``.
    :param float lr_decay: γ in :math:`\eta_k = \eta/(1+k)^\gamma` for ``"sgd"`` / ``"adam"``.
    :param int num_samples: Monte-Carlo samples per inference-gradient estimate (re-runs of the step per
        iteration). Default: 2, one antithetic pair, with gradient encoding; 1 (the AVF paper's single sample,
        1.2-1.4x faster per training step in ``benchmarks/speed.py``) with error encoding, whose network reads
        the prediction errors of one draw (with a pair, the error-encoded Gaussian VAE of
        ``tutorials/04_static_vae.ipynb`` diverged: 490 nats/image at the prior, 3,934 after 3 iterations,
        against 149 and -666 with one sample).
    :param bool antithetic: draw the samples in antithetic pairs :math:`z = T(\mu \pm L\varepsilon)` (default).
        For a likelihood quadratic in z (linear-Gaussian) the pair's gradient with respect to μ is exact; on
        the LG-SSM of ``benchmarks/inference_quality.py`` the default guide's gap to the best diagonal step
        posterior after 600 SVI steps is 0.011 nats/step with the pair against 0.164 with one sample and 0.12
        with two independent samples.
    :param str posterior: the family of the step posteriors: ``"diagonal"`` (default) :math:`\mathcal{N}(\mu,
        \operatorname{diag}\sigma^2)` per site, or ``"full"``: a full-covariance
        :math:`\mathcal{N}(\mu, L L^\top)` for every vector-Normal site of a step (``Normal(...).to_event(1)``,
        D > 1), refined by the same update (it sees the Cholesky factor's strictly-lower entries and their
        gradients too), with the analytic KL to the diagonal prior kept. Other sites (scalar, LogNormal, ...)
        keep the diagonal family. ``"joint"``: one Gaussian over all the vector-Normal sites of a step, as
        :math:`q(z_1)\,q(z_2 \mid z_1) \cdots` in the order the step samples them (each site's mean is coupled
        linearly to the earlier sites' noise, see :mod:`pyro_avf.posterior`), for several coupled latents per
        step. Latent sites outside any step stay mean-field.
    :param float init_scale: initial scale of the mean-field posterior of latent sites outside any step.
    :param str name: prefix of the guide's names in Pyro's param store (``{name}_update_slot0$$$...``,
        ``{name}_global.{site}.loc``); give guides that live side by side different names.

    The defaults (``learned_sgd``, a bounded learned natural-gradient step, with the observation encoded, and
    an antithetic pair per iteration) were chosen with ``benchmarks/inference_quality.py``: with the README's
    optimiser, after 600 training steps on a linear-Gaussian SSM 0.011 nats/step from the best diagonal step
    posterior (one sample: 0.164; per-step Adam with 200 iterations and the pair: 0.031), on a two-level
    coupled chain 0.036 from the best factorised one, and on a predator-prey model with a poor prior
    prediction 0.18 from converged per-step Adam after 300 steps (one sample), where the highway update stayed
    at 19.6. ``update="highway"`` is the AVF paper's update.

    The guide works with every Pyro workflow an AutoGuide does: ``SVI`` with
    :class:`~pyro_avf.AmortizedFilteringELBO`, ``Trace_ELBO`` or ``TraceMeanField_ELBO``; ``Predictive``; calls
    under ``torch.no_grad()`` (inference still differentiates with respect to λ internally; no graph is left);
    data on any device and in any float dtype. JIT-traced ELBOs are refused with the reason.

    Saving and restoring, each on a fresh guide without a warm-up call:

    - ``pyro.get_param_store().save(path)``, later ``pyro.get_param_store().load(path)`` and a new guide: the
      update networks are registered under ``avf_update_slot...`` and take the stored values when built;
    - ``fresh.load_state_dict(guide.state_dict())``: the state dict carries the networks' sizes;
    - ``torch.save(guide, path)`` and ``torch.load(path, weights_only=False)`` (your own file only).

    Example (``model`` as in :func:`~pyro_avf.filtering_step`)::

        >>> import pyro
        >>> from pyro_avf import AmortizedFilteringELBO
        >>> from pyro_avf.step import examples_model as model
        >>> guide = IterativeGuide(model, num_iterations=5, hidden_size=8)
        >>> svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss=AmortizedFilteringELBO())
        >>> loss = svi.step(torch.randn(4, 6, 2))
        >>> with torch.no_grad():
        ...     sorted(guide(torch.randn(4, 3, 2)))  # the latent sites, like an AutoGuide
        ['z_0', 'z_1', 'z_2']
    """

    def __init__(
        self,
        model: Callable,
        num_iterations: int = 5,
        *,
        update="learned_sgd",
        encoding="gradient",
        encode_observation: bool = True,
        networks: str = "joint",
        hidden_size: int = 256,
        lr: float = 0.1,
        lr_decay: float = 0.0,
        num_samples: Optional[int] = None,
        antithetic: bool = True,
        posterior: str = "diagonal",
        init_scale: float = 0.1,
        name: str = "avf",
    ):
        nn.Module.__init__(self)
        GuideMessenger.__init__(self, model)
        if not isinstance(num_iterations, int) or isinstance(num_iterations, bool) or num_iterations < 0:
            raise ValueError(f"num_iterations must be a non-negative integer, got {num_iterations!r}")
        if num_samples is None:
            num_samples = 1 if getattr(encoding, "signal", encoding) == "error" else 2
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        self.update_rule = update_rule(update, encoding, encode_observation, networks, hidden_size, lr, lr_decay)
        nets = getattr(self.update_rule, "nets", None)
        self.update_nets = UpdateNetworks() if nets is None else nets
        self.update_nets.prefix = f"{name}_update_"
        self.posterior_family = check_family(posterior)
        self.inference = StepInference(num_iterations, self.update_rule, num_samples, self.posterior_family,
                                       antithetic=antithetic)
        self.num_iterations, self.num_samples, self.init_scale = num_iterations, num_samples, init_scale
        self.update = getattr(self.update_rule, "form", update)
        self.encoding, self.encode_observation = encoding, encode_observation
        self.hidden_size, self.lr, self.name = hidden_size, lr, name
        self.global_sites = MeanFieldSites(f"{name}_global", init_scale)
        self.last_pass: Optional[PassRecord] = None  # the record of the latest call (read it, don't set it)
        self._pass: Optional[PassRecord] = None  # the call in progress
        self._active: Optional[FinalRun] = None
        self._has_step = False  # found once, true for good; a call that finds none checks again next time
        self._local_return: Optional[bool] = None  # see _return_is_local
        self._lambda: Optional[Lambda] = None  # λ of the posterior that get_posterior made last
        self._surrogate_site: Optional[Message] = None  # see get_traces

    @property
    def amortized(self) -> bool:
        return bool(getattr(self.update_rule, "amortized", False))

    @property
    def online(self) -> bool:
        """Whether an online pass (see :meth:`run`) is in progress."""
        return self._pass is not None and self._pass.is_online

    def state_defaults(self, state: Dict[str, object]) -> Dict[str, object]:
        """What a guide pickled by an earlier version lacks (see :mod:`pyro_avf.pickling`)."""
        return {"global_sites": MeanFieldSites(f"{state.get('name', 'avf')}_global", state.get("init_scale", 0.1))}

    def get_traces(self):
        r"""``(model_trace, guide_trace)`` of the latest call, as :class:`~pyro.poutine.guide.GuideMessenger`'s,
        and, after a training pass, the update networks' surrogate of the intermediate iterations
        :math:`S` as one factor of the model trace, ``{name}_update_surrogate`` with log factor :math:`-S`, of
        value 0 and loss gradient
        :math:`\nabla_\phi S = \sum_{t, 0<k<K} \nabla_\phi \lambda_{t,k}^\top \nabla_\lambda
        \mathcal{F}_t(\lambda_{t,k})`: with Pyro's ELBOs (``Trace_ELBO``, ...) the update networks learn from
        every iteration's free energy, as with :class:`~pyro_avf.AmortizedFilteringELBO`, not from the last
        one's alone. The guide trace keeps the latent sites only.

        When a trace handler outside the guide records the pass instead (an ``AutoGuideList``, whose ELBO replays
        the model against that trace), the same surrogate reaches it as an auxiliary guide factor of log factor
        :math:`+S` (``pyro.factor(..., has_rsample=True)``), which adds :math:`S` to the loss in the same way."""
        model_trace, guide_trace = super().get_traces()
        if self._surrogate_site is not None:
            model_trace.add_node(self._surrogate_site["name"], **self._surrogate_site)
        return model_trace, guide_trace

    # ----- running the model -----

    def __call__(self, *args, **kwargs) -> Dict[str, torch.Tensor]:  # type: ignore[override]
        """Run the model under the guide; return the value of every latent sample site."""
        self.run(args, kwargs)
        _, guide_trace = self.get_traces()
        return {name: site["value"] for name, site in guide_trace.nodes.items() if site["type"] == "sample"}

    def run(self, args=(), kwargs=None, *, fn: Optional[Callable] = None, kl_weight: float = 1.0,
            local_gradients: bool = False, online: bool = False, first_step: int = 0) -> PassRecord:  # fmt: skip
        r"""One pass of ``fn`` (default: the model) under the guide; returns its :class:`PassRecord`.

        :param float kl_weight: β of the step free energies that inference minimises.
        :param bool local_gradients: train the update networks on each step's own final free energy only
            (what :class:`~pyro_avf.AmortizedFilteringELBO` asks for) instead of through later steps.
        :param bool online: filtering mode: every parameter frozen, each step's final run scored here with no
            trace or graph kept (constant memory per step), β = 1.
        :param int first_step: the time index of the first step (online filtering of a stream).
        """
        if torch.jit.is_tracing():
            raise NotImplementedError(JIT_REFUSAL)
        kwargs = kwargs or {}
        train = self.amortized and torch.is_grad_enabled() and not online
        record = PassRecord(kl_weight=1.0 if online else kl_weight, local_gradients=local_gradients,
                            is_online=online, train=train, t=first_step)  # fmt: skip
        self._pass, self.last_pass, self._active, self._surrogate_site = record, record, None, None
        self.args_kwargs, guide_factor, surrogate_name = (args, kwargs), None, f"{self.name}_update_surrogate"
        try:
            with frozen_parameters() if online else contextlib.nullcontext(), self:
                if not online:  # inside: the param sites reach the traces other ELBOs read
                    self.update_nets.register()  # (online: OnlineFilter.init registers once per stream)
                record.outer_traces = outer_traces(self)  # the stack below the guide is fixed for the pass
                if fn is not None:
                    fn(*args, **kwargs)
                elif self._has_step or has_filtering_step(self.model, *args, **kwargs):
                    self._has_step = True
                    self.model(*args, **kwargs)
                else:
                    self._run_static(args, kwargs)
                if record.shares_outer_plates:
                    check_outer_latents_seen(record.outer_traces, self.trace)
                if record.surrogate is not None and not local_gradients:
                    self._surrogate_site, guide_factor = place_surrogate(self, surrogate_name, record.surrogate,
                                                                         bool(record.outer_traces))  # fmt: skip
            if guide_factor is not None:
                pyro.factor(surrogate_name, guide_factor, has_rsample=True)
        finally:
            del self.args_kwargs
            record.outer_traces = []  # the record outlives the pass (last_pass); the outer traces need not
            self._pass, self._active = None, None
        return record

    def _run_static(self, args, kwargs) -> None:
        msg = new_message("model", self.model, type=STEP_TYPE, args=args, kwargs=kwargs)
        self._pyro_filtering_step(msg)
        if not msg["done"]:  # online mode has already scored the final run
            self.model(*args, **kwargs)
        self._pyro_post_filtering_step(msg)

    # ----- effect handlers -----

    def _pyro_filtering_step(self, msg: Message) -> None:
        if self._active is not None:
            raise RuntimeError("pyro_avf: a filtering step was called inside another filtering step.")
        rec = self._pass
        ctx = step_context(self, msg, whole_model=msg["fn"] is self.model)
        result = self.inference(msg["fn"], msg["args"], msg["kwargs"], ctx, rec.t, kl_weight=rec.kl_weight,
                                train=rec.train, keep=not rec.is_online)  # fmt: skip
        rec.add(result)
        if rec.is_online:  # the final run is scored here: no trace, no graph leaves the step
            run, msg["value"] = online_final_run(msg, ctx, result, self.posterior_family)
            rec.finish_online(run)
            msg["done"] = True
            return
        lambdas, graph = result.final, None
        if rec.local_gradients and rec.train and lambdas is not None and not self._local_return:
            graph, lambdas = lambdas, fresh_leaves(lambdas)
        self._active = FinalRun(result, lambdas, graph, self.posterior_family)
        rec.step_executions += 1

    def _pyro_post_filtering_step(self, msg: Message) -> None:
        active, self._active = self._active, None
        if active is not None:
            msg["value"], self._local_return = active.finish(self.trace, msg["value"], self._pass, self._local_return)
            self._pass.t += 1

    def _pyro_sample(self, msg: Message) -> None:
        if site_is_subsample(msg):
            self._pass.shares_outer_plates |= share_outer_plate(self._pass.outer_traces, msg)  # an AutoGuideList
            return
        if not msg["is_observed"]:
            take_outer_latent(self._pass.outer_traces, msg, in_step=self._active is not None)
        name, active = msg["name"], self._active
        if msg["is_observed"]:
            if active is None or not self.num_iterations:  # otherwise the inference re-runs checked it
                check_finite_observation(name, msg["value"])
            if active is not None:
                active.note(msg, self._pass.t)
            # the model's trace (get_traces) keeps it with the plates, scale and mask of the handlers outside
            # the guide (a vectorized particle plate, poutine.scale(guide, ...)); their traces, such as the guide
            # trace of pyro.infer.Importance or RenyiELBO, see latent sites only, as with an AutoGuide
            process_outside(self, msg)
            msg["stop"] = True
            return
        prior = msg["fn"]
        prior_only = active is not None and active.result.prior_only  # a step that observes nothing: q = p
        if not prior_only:
            check_continuous_latent(name, prior)
        if active is None:
            check_not_in_markov_loop(name, frames_above(self))
        q = self.get_posterior(name, prior)
        msg["infer"]["prior"] = prior
        msg["infer"]["avf_lambda"] = self._lambda
        if active is not None:
            active.note(msg, self._pass.t)
            if not prior_only:
                self.inference.check_slot(len(active.latent_names) - 1, name, self._lambda[0], prior)
        if len(q.batch_shape) <= len(prior.batch_shape) and q.batch_shape != prior.batch_shape:
            q = q.expand(prior.batch_shape)  # plates outside the guide (particles) broadcast later
        msg["fn"] = q

    def get_posterior(self, name: str, prior):
        """The step's posterior :math:`q_{\\lambda_K}` of a latent site in a step, else the mean-field Normal
        (in the unconstrained space) of a latent site outside any step."""
        if self._active is not None:
            q, self._lambda = self._active.next_posterior(name, prior, self.trace)
            return q
        q, self._lambda = self.global_sites(name, prior)
        return q
