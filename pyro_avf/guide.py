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
import math
import warnings
from typing import Callable, Dict, List, Optional

import pyro
import torch
from pyro.poutine.guide import GuideMessenger
from pyro.poutine.markov_messenger import MarkovMessenger
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK, Message
from pyro.poutine.util import site_is_subsample
from torch import nn

from pyro_avf.encoders import Encoding
from pyro_avf.free_energy import StepContext, Terms, score_site
from pyro_avf.inference import (
    Lambda,
    StepInference,
    StepResult,
    StepRun,
    add_surrogate,
    check_finite_observation,
    detached,
    frozen_parameters,
)
from pyro_avf.passes import PassRecord
from pyro_avf.posterior import check_continuous_latent, posterior, unconstrained_moments
from pyro_avf.step import STEP_TYPE
from pyro_avf.updates import AdamUpdate, LearnedUpdate, SGDUpdate, UpdateNetworks

UPDATES = ("highway", "residual", "learned_sgd", "sgd", "adam")
JIT_REFUSAL = (
    "pyro_avf: IterativeGuide does not support JIT tracing (JitTrace_ELBO, JitTraceMeanField_ELBO, ...): every "
    "step runs an inner optimisation whose number of re-runs and whose gradients with respect to the posterior "
    "parameters are computed during the pass, which torch.jit.trace would freeze into constants. Use "
    "pyro_avf.AmortizedFilteringELBO (one pass, no model replay) or Trace_ELBO."
)


def make_update(update, encoding, encode_observation: bool, networks: str, hidden_size: int, lr: float,
                lr_decay: float):  # fmt: skip
    """The update rule for the guide's options: a rule object as it is, or one named by a string."""
    if not isinstance(update, str):
        if not (callable(update) and callable(getattr(update, "start", None))):
            raise TypeError(f"update must be one of {UPDATES} or a rule with start() and __call__, got {update!r}")
        return update
    if update not in UPDATES:
        raise ValueError(f"update must be one of {UPDATES}, got {update!r}")
    if update == "sgd":
        return SGDUpdate(lr, lr_decay)
    if update == "adam":
        return AdamUpdate(lr, lr_decay)
    if isinstance(encoding, str):
        encoding = Encoding(encoding, encode_observation)
    return LearnedUpdate(update, encoding, networks, hidden_size, lr)


class _FinalRun:
    """The posteriors handed to the final run of a step, slot by slot, and what the run sampled."""

    def __init__(self, result: StepResult, lambdas: Optional[List[Lambda]], graph: Optional[List[Lambda]]):
        self.result, self.lambdas, self.graph = result, lambdas, graph  # graph: λ_K as functions of φ
        self.latent_names: List[str] = []
        self.site_names: List[str] = []
        self.num_observed = 0

    def next_posterior(self, name: str, prior):
        i = len(self.latent_names)
        if self.lambdas is None:
            loc, scale = unconstrained_moments(prior)
            lam = (loc, scale.log())
        elif i < len(self.lambdas):
            lam = self.lambdas[i]
        else:
            raise RuntimeError(
                f"pyro_avf: latent site '{name}' appeared in the final run of a step but not while inferring "
                "it; a filtering step must sample the same latent sites every time it runs."
            )
        self.latent_names.append(name)
        return posterior(lam[0], lam[1], prior), lam


class _StepDetector(Messenger):
    """Finds out whether a model has a marked step (stopping at the first one)."""

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


class IterativeGuide(GuideMessenger, nn.Module):
    r"""Amortized variational filtering guide for a Pyro model with a :func:`~pyro_avf.filtering_step`.

    :param callable model: the Pyro model.
    :param int num_iterations: K, the number of inference iterations per step (0: the posterior is the prior).
    :param update: ``"highway"`` (gated learned update, the AVF paper's), ``"residual"`` (gated residual,
        starts at the prior), ``"learned_sgd"`` (:math:`\lambda - \eta\odot\nabla + \Delta`), ``"sgd"`` /
        ``"adam"`` for non-amortized filtering EM, or a rule object (see :mod:`pyro_avf.updates`).
    :param encoding: ``"gradient"``, ``"error"`` (prediction errors; Gaussian models), or an
        :class:`~pyro_avf.encoders.Encoding`.
    :param bool encode_observation: also feed the step's observations to the update network.
    :param str networks: ``"joint"`` (one update network over all latent slots of a step) or ``"per_slot"``.
    :param int hidden_size: units per hidden layer of the update networks.
    :param float lr: step size of ``"sgd"`` / ``"adam"``; initial step of ``"learned_sgd"``.
    :param float lr_decay: γ in :math:`\eta_k = \eta/(1+k)^\gamma` for ``"sgd"`` / ``"adam"``.
    :param int num_samples: Monte-Carlo samples per inference-gradient estimate.
    :param float init_scale: initial scale of the mean-field posterior of latent sites outside any step.
    :param str name: prefix of the guide's names in Pyro's param store (``{name}_update_slot0$$$...``,
        ``{name}_global.{site}.loc``); give guides that live side by side different names.

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
        update="highway",
        encoding="gradient",
        encode_observation: bool = False,
        networks: str = "joint",
        hidden_size: int = 256,
        lr: float = 0.1,
        lr_decay: float = 0.0,
        num_samples: int = 1,
        init_scale: float = 0.1,
        name: str = "avf",
    ):
        nn.Module.__init__(self)
        GuideMessenger.__init__(self, model)
        if not isinstance(num_iterations, int) or isinstance(num_iterations, bool) or num_iterations < 0:
            raise ValueError(f"num_iterations must be a non-negative integer, got {num_iterations!r}")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        self.update_rule = make_update(update, encoding, encode_observation, networks, hidden_size, lr, lr_decay)
        nets = getattr(self.update_rule, "nets", None)
        self.update_nets = UpdateNetworks() if nets is None else nets
        self.update_nets.prefix = f"{name}_update_"
        self.inference = StepInference(num_iterations, self.update_rule, num_samples)
        self.num_iterations, self.num_samples, self.init_scale = num_iterations, num_samples, init_scale
        self.update, self.encoding, self.encode_observation = update, encoding, encode_observation
        self.hidden_size, self.lr, self.name = hidden_size, lr, name
        self.last_pass: Optional[PassRecord] = None  # the record of the latest call (read it, don't set it)
        self._pass: Optional[PassRecord] = None  # the call in progress
        self._active: Optional[_FinalRun] = None
        self._has_step = False  # found once, true for good; a call that finds none checks again next time
        self._local_return: Optional[bool] = None  # see _return_is_local
        self._lambda: Optional[Lambda] = None  # λ of the posterior that get_posterior made last

    @property
    def amortized(self) -> bool:
        return bool(getattr(self.update_rule, "amortized", False))

    @property
    def online(self) -> bool:
        """Whether an online pass (see :meth:`run`) is in progress."""
        return self._pass is not None and self._pass.is_online

    def __getstate__(self) -> Dict[str, object]:
        state = super().__getstate__()  # GuideMessenger drops the trace
        for transient in ("last_pass", "_pass", "_active"):
            state[transient] = None
        return state

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
        self._pass, self.last_pass, self._active = record, record, None
        self.args_kwargs = args, kwargs
        try:
            with frozen_parameters() if online else contextlib.nullcontext(), self:
                self.update_nets.register()  # inside: the param sites reach the traces other ELBOs read
                if fn is not None:
                    fn(*args, **kwargs)
                elif self._has_step or self._find_step(args, kwargs):
                    self.model(*args, **kwargs)
                else:
                    self._run_static(args, kwargs)
        finally:
            del self.args_kwargs
            self._pass, self._active = None, None
        return record

    def _find_step(self, args, kwargs) -> bool:
        try:
            with pyro.poutine.block(), torch.no_grad(), _StepDetector():
                self.model(*args, **kwargs)
        except _StepDetector.Found:
            self._has_step = True
        return self._has_step

    def _run_static(self, args, kwargs) -> None:
        msg = Message(type=STEP_TYPE, name="model", fn=self.model, is_observed=False, args=args, kwargs=kwargs,
                      value=None, scale=1.0, mask=None, cond_indep_stack=(), done=False, stop=False,
                      continuation=None, infer={})  # fmt: skip
        self._pyro_filtering_step(msg)
        if not msg["done"]:  # online mode has already scored the final run
            self.model(*args, **kwargs)
        self._pyro_post_filtering_step(msg)

    def _context(self, msg: Message) -> StepContext:
        """The plates, scale and mask that the handlers around a step add to its sites."""
        probe = Message(**{**msg, "cond_indep_stack": tuple(msg["cond_indep_stack"]), "stop": False})
        below = _PYRO_STACK[: _PYRO_STACK.index(self)] if self in _PYRO_STACK else []
        for frame in reversed(below):
            frame._process_message(probe)
            if probe["stop"]:
                break
        return StepContext(tuple(probe["cond_indep_stack"]), probe["scale"], probe["mask"], msg["fn"] is self.model)

    # ----- effect handlers -----

    def _pyro_filtering_step(self, msg: Message) -> None:
        if self._active is not None:
            raise RuntimeError("pyro_avf: a filtering step was called inside another filtering step.")
        rec = self._pass
        ctx = self._context(msg)
        result = self.inference(msg["fn"], msg["args"], msg["kwargs"], ctx, rec.t, kl_weight=rec.kl_weight,
                                train=rec.train, keep=not rec.is_online)  # fmt: skip
        rec.add(result)
        if rec.is_online:
            self._finish_online(msg, ctx, result)
            return
        lambdas, graph = result.final, None
        if rec.local_gradients and rec.train and lambdas is not None and not self._local_return:
            graph, lambdas = lambdas, [(loc.detach().requires_grad_(), ls.detach().requires_grad_()) for loc, ls in
                                       lambdas]  # fmt: skip
        self._active = _FinalRun(result, lambdas, graph)
        rec.step_executions += 1

    def _finish_online(self, msg: Message, ctx: StepContext, result: StepResult) -> None:
        """Online filtering: the final run is scored here, nothing is traced and no graph leaves the step."""
        with torch.no_grad():
            run = StepRun(ctx, result.final, 1.0)
            with run:
                value = msg["fn"](*msg["args"], **msg["kwargs"])
        self._pass.step_executions += 1
        self._pass.finish_online(run)
        self._pass.t += 1
        msg["value"], msg["done"] = detached(value), True

    def _pyro_post_filtering_step(self, msg: Message) -> None:
        active, self._active = self._active, None
        rec = self._pass
        if active is None:
            return
        t = rec.t
        rec.t += 1
        if active.lambdas is not None and len(active.latent_names) != len(active.lambdas):
            raise RuntimeError(
                f"pyro_avf: step {t} sampled {len(active.latent_names)} latent sites in its final run but "
                f"{len(active.lambdas)} while inferring them; a filtering step must be repeatable."
            )
        if active.latent_names and not active.num_observed:
            warnings.warn(
                f"pyro_avf: filtering step {t} has latent sites {active.latent_names} but observes "
                "nothing, so its posterior can only be the prior.",
                stacklevel=2,
            )
        if not rec.local_gradients:  # another ELBO (Trace_ELBO, ...) differentiates the traces itself
            if rec.train and active.lambdas is not None:
                msg["value"] = self._detach_latents(msg["value"], active)  # φ: each step's own free energy
            return
        terms = Terms(active.result.ctx.batch_shape, rec.kl_weight)
        for name in active.site_names:
            site = self.trace.nodes[name]
            score_site(terms, site, site["infer"].get("prior"), site["fn"], site["infer"].get("avf_lambda"))
        active.result.final_terms = terms
        if active.graph is not None:  # train φ on this step's own final free energy
            leaves = [p for lam in active.lambdas for p in lam]
            grads = torch.autograd.grad(terms.loss, leaves, retain_graph=True, allow_unused=True)
            rec.final_surrogate = add_surrogate(rec.final_surrogate, [p for lam in active.graph for p in lam], grads)
            if self._local_return is None:
                self._local_return = self._return_is_local(msg["value"], active)
        elif rec.train and active.lambdas is not None:
            msg["value"] = self._detach_latents(msg["value"], active)

    def _latent_values(self, active: _FinalRun) -> List[torch.Tensor]:
        return [self.trace.nodes[name]["value"] for name in active.latent_names]

    def _detach_latents(self, value, active: _FinalRun):
        """The step's return value with this step's latent samples detached: later steps see z_t as data, so
        the final free energy's gradient reaches φ through λ_K from this step only (no extra backward)."""
        latents = {id(z) for z in self._latent_values(active)}
        return torch.utils._pytree.tree_map(
            lambda v: v.detach() if isinstance(v, torch.Tensor) and id(v) in latents else v, value
        )

    def _return_is_local(self, value, active: _FinalRun) -> bool:
        """Whether later steps can only depend on this step's latents through returned latent samples
        themselves (true when the step returns z_t, as SRNN, DMM and the LG-SSM do; false when it returns a
        state computed from z_t, as VRNN does). When true, later steps take the single-backward path of
        :meth:`_detach_latents`; otherwise every step pays one extra ``autograd.grad``. Decided once, at the
        first step, from the autograd graph."""
        latents = {id(z) for z in self._latent_values(active)}
        leaves = {id(p) for lam in active.lambdas for p in lam}
        others = [
            v
            for v in torch.utils._pytree.tree_leaves(value)
            if isinstance(v, torch.Tensor) and v.requires_grad and id(v) not in latents
        ]
        seen, frontier = set(), [v.grad_fn for v in others if v.grad_fn is not None]
        while frontier:
            node = frontier.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if id(getattr(node, "variable", None)) in leaves:
                return False
            frontier.extend(next_node for next_node, _ in node.next_functions)
        return True

    def _pyro_sample(self, msg: Message) -> None:
        if site_is_subsample(msg):
            return
        name, active = msg["name"], self._active
        if msg["is_observed"]:
            if active is None or not self.num_iterations:  # otherwise the inference re-runs checked it
                check_finite_observation(name, msg["value"])
            if active is not None:
                active.num_observed += 1
                active.site_names.append(name)
                msg["infer"]["avf_step"] = self._pass.t
            return
        prior = msg["fn"]
        check_continuous_latent(name, prior)
        if active is None:
            check_not_in_markov_loop(name, _PYRO_STACK[_PYRO_STACK.index(self) + 1 :])
        q = self.get_posterior(name, prior)
        msg["infer"]["prior"] = prior
        msg["infer"]["avf_lambda"] = self._lambda
        if active is not None:
            active.site_names.append(name)
            msg["infer"]["avf_step"] = self._pass.t
            self.inference.check_slot(len(active.latent_names) - 1, name, self._lambda[0], prior)
        if len(q.batch_shape) <= len(prior.batch_shape) and q.batch_shape != prior.batch_shape:
            q = q.expand(prior.batch_shape)  # plates outside the guide (particles) broadcast later
        msg["fn"] = q

    def get_posterior(self, name: str, prior):
        """The step's posterior :math:`q_{\\lambda_K}` of a latent site in a step, else the mean-field Normal
        (in the unconstrained space) of a latent site outside any step."""
        if self._active is not None:
            q, self._lambda = self._active.next_posterior(name, prior)
            return q
        prefix = f"{self.name}_global.{name}"
        loc = pyro.param(f"{prefix}.loc", lambda: unconstrained_moments(prior)[0])
        log_scale = pyro.param(f"{prefix}.log_scale", lambda: torch.full_like(loc, math.log(self.init_scale)))
        expected = prior.batch_shape + loc.shape[len(prior.batch_shape) :]
        if loc.shape != expected or loc.shape[: len(prior.batch_shape)] != prior.batch_shape:
            raise ValueError(
                f"pyro_avf: global latent site '{name}' changed shape from {tuple(loc.shape)}; latent sites "
                "outside a filtering step keep one posterior per element, so their batch shape must not change."
            )
        self._lambda = (loc, log_scale)
        return posterior(loc, log_scale, prior)
