"""IterativeGuide: amortized variational filtering for any Pyro program with a marked time step.

At every call of a :func:`~pyro_avf.filtering_step` the guide

1. runs the step with each latent slot at its prior: the *prediction*, iteration 0, initialises
   :math:`q(z_t)` at :math:`p_\\theta(z_t \\mid x_{<t}, z_{<t})` (a diagonal Normal in the unconstrained space);
2. for :math:`k = 0, \\dots, K-1`: draws :math:`z_t \\sim q_{\\lambda_k}`, re-runs the step (hidden from every
   trace), forms the step free energy (AVF Eq. 9)

   .. math::

       \\mathcal{F}_t(\\lambda) = -\\mathbb{E}_{q_\\lambda}\\left[\\log p_\\theta(x_t \\mid x_{<t}, z_{\\le t})\\right]
           + D_{KL}\\left(q_\\lambda(z_t) \\,\\|\\, p_\\theta(z_t \\mid x_{<t}, z_{<t})\\right)

   and updates :math:`\\lambda_{k+1} = f_\\phi(\\lambda_k, \\nabla_\\lambda \\mathcal{F}_t)` (AVF Eq. 13; a learned
   :class:`~pyro_avf.updates.UpdateNetwork` per latent slot, or SGD/Adam for non-amortized filtering EM);
3. lets the model run the step a last time with :math:`z_t \\sim q_{\\lambda_K}` recorded as the guide's sample
   site, and hands the step's return value on to the next step.

A model with latent sites but no marked step is treated as one step (iterative amortized inference for a
static model). Latent sites outside any step get a mean-field Normal.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional

import pyro
import torch
from pyro.poutine.guide import GuideMessenger
from pyro.poutine.markov_messenger import MarkovMessenger
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK, Message
from pyro.poutine.util import site_is_subsample
from torch import nn

from pyro_avf.free_energy import StepContext, Terms
from pyro_avf.posterior import check_continuous_latent, posterior, unconstrained_event_dim, unconstrained_moments
from pyro_avf.step import STEP_TYPE
from pyro_avf.step_run import Lambda, StepRun, check_finite_observation
from pyro_avf.updates import AdamUpdate, SGDUpdate, UpdateNetwork

UPDATES = ("highway", "residual", "learned_sgd", "sgd", "adam")


class StepRecord:
    """Per-iteration diagnostics of one step: per-element free energy, KL and reconstruction (detached)."""

    def __init__(self, t: int, ctx: StepContext):
        self.t, self.ctx = t, ctx
        self.free_energy: List[torch.Tensor] = []
        self.kl: List[torch.Tensor] = []
        self.reconstruction: List[torch.Tensor] = []
        self.lambdas: List[List[Lambda]] = []  # detached λ_k per iteration (k = 0..K) and slot

    def add(self, runs: List[StepRun]) -> None:
        for name in ("free_energy", "kl", "reconstruction"):
            values = [getattr(r.terms, name).detach() for r in runs]
            getattr(self, name).append(values[0] if len(values) == 1 else sum(values) / len(values))


class OnlineRecord:
    """Per-step free energy, KL, reconstruction and observed flag of an online pass in one growing buffer.

    Rows are written into a tensor of shape ``(capacity, *batch, 4)`` that doubles when full, so a long
    sequence costs 16 bytes per step and batch element and no Python object per step.
    """

    FIELDS = ("free_energy", "kl", "reconstruction", "observed")

    def __init__(self):
        self.buffer: Optional[torch.Tensor] = None
        self.count = 0

    def append(self, terms: Terms) -> None:
        fe = terms.free_energy.detach()
        row = torch.stack([fe, terms.kl.detach(), terms.reconstruction.detach(), terms.observed.to(fe.dtype)], -1)
        if self.buffer is None:
            self.buffer = row.new_empty((64,) + row.shape)
        elif row.shape != self.buffer.shape[1:]:
            raise ValueError(
                f"pyro_avf: the step's outer batch shape changed from {tuple(self.buffer.shape[1:-1])} to "
                f"{tuple(row.shape[:-1])}; online filtering needs the same plates around every step."
            )
        if self.count == self.buffer.size(0):
            self.buffer = torch.cat([self.buffer, torch.empty_like(self.buffer)])
        self.buffer[self.count] = row
        self.count += 1

    def last(self) -> Dict[str, torch.Tensor]:
        """The latest step's terms, each of the step's batch shape."""
        return self._split(self.buffer[self.count - 1])

    def stacked(self) -> Dict[str, torch.Tensor]:
        """Every step's terms as ``(batch, time)`` tensors (batch flattened)."""
        return self._split(self.buffer[: self.count].reshape(self.count, -1, 4).transpose(0, 1))

    def _split(self, data: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = {name: data[..., i].clone() for i, name in enumerate(self.FIELDS)}
        out["observed"] = out["observed"].bool()
        return out


class PassRecord:
    """What one guide call leaves for the ELBO: the update networks' surrogate loss and diagnostics.

    ``surrogate`` has value 0 and gradient :math:`\\sum_{t,k<K} \\nabla_\\phi \\lambda_{t,k}^\\top
    \\nabla_\\lambda \\mathcal{F}_t(\\lambda_{t,k})`: the update networks' gradient from the free energies of the
    intermediate iterations, with no gradient to the model.
    """

    def __init__(self):
        self.surrogate = torch.zeros(())
        self.final_surrogate = torch.zeros(())
        self.steps: List[StepRecord] = []  # training passes: one record per step
        self.online = OnlineRecord()  # online passes: the final terms of every step
        self.step_executions = 0


def _detached(tree):
    return torch.utils._pytree.tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, tree)


class _ActiveStep:
    """The posteriors handed to the final run of a step, slot by slot."""

    def __init__(self, lambdas: Optional[List[Lambda]], ctx: StepContext, graph: Optional[List[Lambda]] = None):
        self.lambdas = lambdas
        self.ctx = ctx
        self.graph = graph  # λ_K as functions of φ, when the final run samples from detached copies
        self.num_latent = 0
        self.num_observed = 0
        self.latent_names: List[str] = []
        self.site_names: List[str] = []

    def next_posterior(self, name: str, prior):
        if self.lambdas is None:
            loc, scale = unconstrained_moments(prior)
            lam = (loc, scale.log())
        elif self.num_latent < len(self.lambdas):
            lam = self.lambdas[self.num_latent]
        else:
            raise RuntimeError(
                f"pyro_avf: latent site '{name}' appeared in the final run of a step but not while inferring "
                "it; a filtering step must sample the same latent sites every time it runs."
            )
        self.num_latent += 1
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
    """Amortized variational filtering guide for a Pyro model with a :func:`~pyro_avf.filtering_step`.

    :param callable model: the Pyro model.
    :param int num_iterations: K, the number of inference iterations per step (0: the posterior is the prior).
    :param str update: ``"highway"`` (gated learned update, the AVF paper's), ``"residual"`` (gated residual,
        starts at the prior), ``"learned_sgd"``
        (:math:`\\lambda - \\eta\\odot\\nabla + \\Delta`), or ``"sgd"`` / ``"adam"`` for non-amortized filtering EM.
    :param str encoding: ``"gradient"`` or ``"error"`` (prediction errors; Gaussian models).
    :param bool encode_observation: also feed the step's observations to the update network.
    :param int hidden_size: units per hidden layer of the update networks.
    :param float lr: step size of ``"sgd"`` / ``"adam"``; initial step of ``"learned_sgd"``.
    :param float lr_decay: γ in :math:`\\eta_k = \\eta/(1+k)^\\gamma` for ``"sgd"`` / ``"adam"``.
    :param int num_samples: Monte-Carlo samples per inference-gradient estimate.
    :param float init_scale: initial scale of the mean-field posterior of latent sites outside any step.

    Example::

        guide = IterativeGuide(model, num_iterations=5)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss=AmortizedFilteringELBO())
        svi.step(xs)
    """

    def __init__(
        self,
        model,
        num_iterations: int = 5,
        *,
        update: str = "highway",
        encoding: str = "gradient",
        encode_observation: bool = False,
        hidden_size: int = 256,
        lr: float = 0.1,
        lr_decay: float = 0.0,
        num_samples: int = 1,
        init_scale: float = 0.1,
    ):
        nn.Module.__init__(self)
        GuideMessenger.__init__(self, model)
        if not isinstance(num_iterations, int) or num_iterations < 0:
            raise ValueError(f"num_iterations must be a non-negative integer, got {num_iterations!r}")
        if update not in UPDATES:
            raise ValueError(f"update must be one of {UPDATES}, got {update!r}")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        if encoding not in ("gradient", "error"):
            raise ValueError(f"encoding must be 'gradient' or 'error', got {encoding!r}")
        self.num_iterations = num_iterations
        self.update = update
        self.encoding = encoding
        self.encode_observation = encode_observation
        self.hidden_size = hidden_size
        self.lr = lr
        self.num_samples = num_samples
        self.init_scale = init_scale
        self.update_nets = nn.ModuleDict()
        self.optimizer = {"sgd": SGDUpdate, "adam": AdamUpdate}.get(update, lambda lr, decay: None)(lr, lr_decay)
        self.kl_weight = 1.0
        self.online = False
        self.local_update_gradients = False
        self.last_pass: Optional[PassRecord] = None
        self.last_online_run: Optional[StepRun] = None  # the final run of the latest step in online mode
        self._slots: Dict[int, tuple] = {}
        self._static: Optional[bool] = None
        self._local_return: Optional[bool] = None  # see _return_is_local
        self._active: Optional[_ActiveStep] = None
        self._t = 0

    @property
    def amortized(self) -> bool:
        return self.optimizer is None

    # ----- running the model -----

    def __call__(self, *args, **kwargs) -> Dict[str, torch.Tensor]:  # type: ignore[override]
        """Run the model under the guide; return the value of every sample site (latent and observed)."""
        self.last_pass = PassRecord()
        self._t, self._active = 0, None
        for key, net in self.update_nets.items():
            pyro.module(f"avf_update_{key}", net)
        if self._static is None:
            self._static = not self._has_step(args, kwargs)
        self.args_kwargs = args, kwargs
        try:
            with self:
                if self._static:
                    self._run_static(args, kwargs)
                else:
                    self.model(*args, **kwargs)
        finally:
            del self.args_kwargs
            self._active = None
        model_trace, _ = self.get_traces()
        return {name: site["value"] for name, site in model_trace.nodes.items() if site["type"] == "sample"}

    def _has_step(self, args, kwargs) -> bool:
        try:
            with pyro.poutine.block(), torch.no_grad(), _StepDetector():
                self.model(*args, **kwargs)
        except _StepDetector.Found:
            return True
        return False

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
        whole_model = msg["fn"] is self.model
        return StepContext(tuple(probe["cond_indep_stack"]), probe["scale"], probe["mask"], whole_model)

    # ----- effect handlers -----

    def _pyro_filtering_step(self, msg: Message) -> None:
        if self._active is not None:
            raise RuntimeError("pyro_avf: a filtering step was called inside another filtering step.")
        ctx = self._context(msg)
        lambdas = self._infer_step(msg["fn"], msg["args"], msg["kwargs"], ctx)
        if self.online:
            self._finish_online(msg, ctx, lambdas)
            return
        graph = None
        if self.local_update_gradients and self.amortized and lambdas is not None and not self._local_return:
            graph = lambdas
            lambdas = [(loc.detach().requires_grad_(), ls.detach().requires_grad_()) for loc, ls in lambdas]
        self._active = _ActiveStep(lambdas, ctx, graph)
        self.last_pass.step_executions += 1

    def _finish_online(self, msg: Message, ctx: StepContext, lambdas: Optional[List[Lambda]]) -> None:
        """Online filtering: the final run is scored here, nothing is traced and no graph leaves the step."""
        if lambdas is not None:
            lambdas = [(loc.detach(), log_scale.detach()) for loc, log_scale in lambdas]
        with torch.no_grad():
            run = StepRun(ctx, lambdas, self.kl_weight)
            with run:
                value = msg["fn"](*msg["args"], **msg["kwargs"])
        self.last_pass.step_executions += 1
        self.last_online_run = run
        self.last_pass.online.append(run.terms)
        msg["value"] = torch.utils._pytree.tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, value)
        msg["done"] = True

    def _pyro_post_filtering_step(self, msg: Message) -> None:
        active, self._active = self._active, None
        if active is None:
            self._t += 1
            return
        if active.lambdas is not None and active.num_latent != len(active.lambdas):
            raise RuntimeError(
                f"pyro_avf: step {self._t} sampled {active.num_latent} latent sites in its final run but "
                f"{len(active.lambdas)} while inferring them; a filtering step must be repeatable."
            )
        if active.num_latent and not active.num_observed:
            warnings.warn(
                f"pyro_avf: filtering step {self._t} has latent sites {active.latent_names} but observes "
                "nothing, so its posterior can only be the prior.",
                stacklevel=2,
            )
        if self.local_update_gradients:
            terms = self._score_final_run(active)
            self.last_pass.steps[-1].final_terms = terms
            if active.graph is not None:
                self._add_final_surrogate(active, terms)
                if self._local_return is None:
                    self._local_return = self._return_is_local(msg["value"], active)
            elif self.amortized and active.lambdas is not None:
                msg["value"] = self._detach_latents(msg["value"], active)
        self._t += 1

    def _latent_values(self, active: _ActiveStep) -> List[torch.Tensor]:
        return [self.trace.nodes[name]["value"] for name in active.latent_names]

    def _detach_latents(self, value, active: _ActiveStep):
        """The step's return value with this step's latent samples detached: later steps see z_t as data, so
        the final free energy's gradient reaches φ through λ_K from this step only (no extra backward)."""
        latents = {id(z) for z in self._latent_values(active)}
        return torch.utils._pytree.tree_map(
            lambda v: v.detach() if isinstance(v, torch.Tensor) and id(v) in latents else v, value
        )

    def _return_is_local(self, value, active: _ActiveStep) -> bool:
        """Whether later steps can only depend on this step's latents through returned latent samples
        themselves (true when the step returns z_t, as SRNN, DMM and the LG-SSM do; false when it returns a
        state computed from z_t, as VRNN does). When true, later steps take the single-backward path of
        :meth:`_detach_latents`; otherwise every step pays one extra ``autograd.grad``
        (:meth:`_add_final_surrogate`). Decided once, at the first step, from the autograd graph."""
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

    def _add_final_surrogate(self, active: _ActiveStep, terms: Terms) -> None:
        """Train φ on this step's own final free energy only: :math:`\\nabla_\\lambda \\mathcal{F}_t(\\lambda_K)`
        at the detached copy the final run sampled from, paired with λ_K as a function of φ."""
        leaves = [p for lam in active.lambdas for p in lam]
        grads = torch.autograd.grad(terms.loss, leaves, retain_graph=True, allow_unused=True)
        for p, g in zip([p for lam in active.graph for p in lam], grads):
            if g is not None:
                term = (g * p).sum()
                self.last_pass.final_surrogate = self.last_pass.final_surrogate + term - term.detach()

    def _score_final_run(self, active: _ActiveStep) -> Terms:
        """The step free energy terms of the final run, read from the guide's trace."""
        terms = Terms(active.ctx.batch_shape, self.kl_weight)
        for name in active.site_names:
            site = self.trace.nodes[name]
            if site["is_observed"]:
                terms.add_observation(site["fn"], site["value"], site["mask"], site["scale"])
            else:
                terms.add_latent(site["fn"], site["infer"]["prior"], site["value"], site["mask"], site["scale"],
                                 site["infer"]["avf_lambda"])  # fmt: skip
        return terms

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
                msg["infer"]["avf_step"] = self._t
            return
        prior = msg["fn"]
        check_continuous_latent(name, prior)
        if active is not None:
            q, lam = active.next_posterior(name, prior)
            active.site_names.append(name)
            self._check_slot(active.num_latent - 1, name, lam[0], prior)
            msg["infer"]["avf_step"] = self._t
        else:
            check_not_in_markov_loop(name, _PYRO_STACK[_PYRO_STACK.index(self) + 1 :])
            q, lam = self._global_posterior(name, prior)
        msg["infer"]["prior"] = prior
        msg["infer"]["avf_lambda"] = lam
        if len(q.batch_shape) <= len(prior.batch_shape) and q.batch_shape != prior.batch_shape:
            q = q.expand(prior.batch_shape)  # plates outside the guide (particles) broadcast later
        msg["fn"] = q

    def get_posterior(self, name: str, prior):
        """Mean-field Normal posterior (in the unconstrained space) of a latent site outside any step."""
        return self._global_posterior(name, prior)[0]

    def _global_posterior(self, name: str, prior):
        loc = pyro.param(f"avf_global.{name}.loc", lambda: unconstrained_moments(prior)[0])
        log_scale = pyro.param(f"avf_global.{name}.log_scale", lambda: torch.full_like(loc, math.log(self.init_scale)))
        expected = prior.batch_shape + loc.shape[len(prior.batch_shape) :]
        if loc.shape != expected or loc.shape[: len(prior.batch_shape)] != prior.batch_shape:
            raise ValueError(
                f"pyro_avf: global latent site '{name}' changed shape from {tuple(loc.shape)}; latent sites "
                "outside a filtering step keep one posterior per element, so their batch shape must not change."
            )
        return posterior(loc, log_scale, prior), (loc, log_scale)

    def _check_slot(self, i: int, name: str, loc: torch.Tensor, prior) -> None:
        event = loc.shape[loc.dim() - unconstrained_event_dim(prior) :]
        known = self._slots.setdefault(i, (name, event))
        if known[1] != event:
            raise ValueError(
                f"pyro_avf: latent slot {i} of the filtering step changed shape: site '{known[0]}' had event "
                f"shape {tuple(known[1])}, site '{name}' has {tuple(event)}. Latent sites are matched across "
                "steps by their order within the step, so each slot must keep its shape."
            )

    # ----- inference at one step -----

    def _run(self, fn, args, kwargs, ctx: StepContext, lambdas) -> StepRun:
        """One inference re-run (inputs detached and model parameters frozen by :meth:`_infer_step`)."""
        run = StepRun(ctx, lambdas, self.kl_weight)
        with run:
            fn(*args, **kwargs)
        self.last_pass.step_executions += 1
        return run

    def _infer_step(self, fn, args, kwargs, ctx: StepContext) -> Optional[List[Lambda]]:
        """K inference iterations at one step; returns λ_K per slot (None when K = 0)."""
        record = StepRecord(self._t, ctx)
        if not self.online:  # online passes keep no per-step Python objects (see OnlineRecord)
            self.last_pass.steps.append(record)
        if not self.num_iterations:
            return None
        # the re-runs only need gradients with respect to λ: detach the step's inputs and freeze the model's
        # parameters, so no graph is built towards θ or the past
        args, kwargs = _detached((args, kwargs))
        nets = {id(p) for p in self.update_nets.parameters()}
        frozen = [p for p in pyro.get_param_store()._params.values() if p.requires_grad and id(p) not in nets]
        for p in frozen:
            p.requires_grad_(False)
        try:
            # the final run validates the step's distributions; the re-runs skip Pyro's argument checks
            with warnings.catch_warnings(), pyro.validation_enabled(False):
                # pyro.module inside a step would warn about the frozen parameters
                warnings.filterwarnings("ignore", message=".*not registered in the param store because requires_grad")
                return self._iterate(record, fn, args, kwargs, ctx)
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def _iterate(self, record: StepRecord, fn, args, kwargs, ctx: StepContext) -> Optional[List[Lambda]]:
        leaves: Optional[List[Lambda]] = None
        current: Optional[List[Lambda]] = None
        opt_states: List[dict] = []
        for k in range(self.num_iterations):
            runs = [self._run(fn, args, kwargs, ctx, leaves)]
            if leaves is None:
                leaves = current = runs[0].initial_lambdas
                for i, rec in enumerate(runs[0].latents):
                    self._check_slot(i, rec.name, rec.lam[0], rec.prior)
                opt_states = [self.optimizer.start() if self.optimizer else {} for _ in leaves]
            runs += [self._run(fn, args, kwargs, ctx, leaves) for _ in range(self.num_samples - 1)]
            if not self.online:  # online filtering keeps only the final numbers: constant memory per step
                record.add(runs)
                record.lambdas.append([(loc.detach(), ls.detach()) for loc, ls in leaves])
            flat = [p for lam in leaves for p in lam]
            if not flat:
                return None
            # the update sees the gradient of the per-element free energy; φ learns from the scaled loss
            loss = sum(r.terms.free_energy.sum() for r in runs) / len(runs)
            train_phi = k > 0 and self.amortized and not self.online
            scaled = train_phi and any(r.terms.scaled for r in runs)
            grads = torch.autograd.grad(loss, flat, allow_unused=True, retain_graph=scaled)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(flat, grads)]
            pairs = [(grads[2 * i], grads[2 * i + 1]) for i in range(len(leaves))]
            if train_phi:
                if scaled:
                    scaled_loss = sum(r.terms.loss for r in runs) / len(runs)
                    phi_grads = torch.autograd.grad(scaled_loss, flat, allow_unused=True)
                    phi_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(flat, phi_grads)]
                    self._add_surrogate(current, [(phi_grads[2 * i], phi_grads[2 * i + 1]) for i in range(len(leaves))])
                else:
                    self._add_surrogate(current, pairs)
            with torch.set_grad_enabled(not self.online):
                current = [self._update(i, k, leaves[i], pairs[i], runs[0], opt_states[i]) for i in range(len(leaves))]
            leaves = [(loc.detach().requires_grad_(), ls.detach().requires_grad_()) for loc, ls in current]
        if leaves is not None and not self.online:
            record.lambdas.append([(loc.detach(), ls.detach()) for loc, ls in leaves])
        return current

    def _add_surrogate(self, current: List[Lambda], grads: List[Lambda]) -> None:
        for lam, g in zip(current, grads):
            for p, gp in zip(lam, g):
                term = (gp.detach() * p).sum()
                self.last_pass.surrogate = self.last_pass.surrogate + term - term.detach()

    def _update(self, i: int, k: int, lam: Lambda, grads: Lambda, run: StepRun, opt_state: dict) -> Lambda:
        if not self.amortized:
            return self.optimizer(opt_state, k, lam, grads)
        shape = lam[0].shape
        prior = run.latents[i].prior
        batch = shape[: len(shape) - unconstrained_event_dim(prior)]

        def flat(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(batch + (-1,))

        errors = obs = None
        if self.encoding == "error":
            errors = (flat(run.latent_errors(i)), run.observation_errors(batch))
        if self.encode_observation:
            obs = run.observed_values(batch)
        net = self._network(i, flat(lam[0]).size(-1), errors, obs)
        loc, log_scale = net(
            (flat(lam[0]), flat(lam[1])), grads=(flat(grads[0]), flat(grads[1])), errors=errors, obs=obs
        )
        return loc.reshape(shape), log_scale.reshape(shape)

    def _network(self, i: int, dim: int, errors, obs) -> UpdateNetwork:
        key = f"slot{i}"
        error_dim = 0 if errors is None else errors[1].size(-1)
        obs_dim = 0 if obs is None else obs.size(-1)
        if key not in self.update_nets:
            net = UpdateNetwork(dim, self.update, self.encoding, error_dim, obs_dim, self.hidden_size, self.lr)
            self.update_nets[key] = net
            pyro.module(f"avf_update_{key}", net)
        net = self.update_nets[key]
        if (net.dim, net.error_dim, net.obs_dim) != (dim, error_dim, obs_dim):
            raise ValueError(
                f"pyro_avf: latent slot {i} needs an update network for sizes (latent {dim}, errors {error_dim}, "
                f"observation {obs_dim}) but has one for ({net.dim}, {net.error_dim}, {net.obs_dim})."
            )
        return net
