r"""Inference at one time step: K iterations of re-running the step and updating its posterior.

:class:`StepInference` takes one call of a :func:`~pyro_avf.filtering_step` (its function, arguments and the
context of the handlers around it) and returns a :class:`StepResult`:

1. iteration 0 runs the step with every latent slot drawn from its prior (the *prediction*) and sets
   :math:`\lambda_0` to the prior's parameters in the unconstrained space;
2. for :math:`k = 0, \dots, K-1`: draw :math:`z_t \sim q_{\lambda_k}`, re-run the step (:class:`StepRun`,
   hidden from every trace), score the step free energy (AVF Eq. 9)

   .. math::

       \mathcal{F}_t(\lambda) = -\mathbb{E}_{q_\lambda}\left[\log p_\theta(x_t \mid x_{<t}, z_{\le t})\right]
           + \beta\, D_{KL}\left(q_\lambda(z_t) \,\|\, p_\theta(z_t \mid x_{<t}, z_{<t})\right),

   and update :math:`\lambda_{k+1} = f(\lambda_k, \nabla_\lambda \mathcal{F}_t)` with the guide's update rule;
3. return :math:`\lambda_K` and, for a learned rule in training, the surrogate

   .. math::

       s_t = \sum_{0<k<K} \lambda_{t,k}(\phi)^\top \mathrm{sg}\left[\nabla_\lambda \mathcal{F}_t(\lambda_{t,k})\right]
           - \mathrm{sg}[\cdot],

   whose value is 0 and whose gradient trains the update networks φ on every intermediate iteration.

The re-runs need gradients with respect to λ only: the step's inputs are detached and every parameter that
is not trained by the surrogate is frozen (:func:`frozen_parameters`), whatever the caller's grad mode.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple

import pyro
import torch
from pyro.poutine.broadcast_messenger import BroadcastMessenger
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to
from torch.utils._pytree import tree_map

from pyro_avf.encoders import flatten_to
from pyro_avf.free_energy import StepContext, Terms, check_plate_shape, combine_masks, score_site
from pyro_avf.posterior import (
    JointDraws,
    check_continuous_latent,
    check_family,
    normal_parameters,
    prior_lambda,
    reparameterized_draw,
    site_posterior,
    unconstrained_event_dim,
    unwrap,
)

Lambda = Tuple[torch.Tensor, ...]  # (loc, log_scale), or (loc, log_scale, lower) for a full-covariance slot


def detached(tree):
    """``tree`` with every tensor detached."""
    if isinstance(tree, list) and all(type(lam) is tuple for lam in tree):  # λ of a step: the hot path
        return [tuple(p.detach() for p in lam) for lam in tree]
    return tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, tree)


@contextlib.contextmanager
def frozen_parameters(keep: Iterable[torch.Tensor] = ()) -> Iterator[None]:
    """Set ``requires_grad=False`` on every parameter in Pyro's param store except those in ``keep``, and
    restore them on exit (also on error). ``pyro.module`` warnings about the frozen parameters are silenced.

    Example::

        >>> with frozen_parameters():
        ...     pass
    """
    kept = {id(p) for p in keep}
    frozen = [p for p in pyro.get_param_store()._params.values() if p.requires_grad and id(p) not in kept]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not registered in the param store because requires_grad")
            yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def check_finite_observation(name: str, value) -> None:
    """Refuse NaN or infinite observed data with a clear error."""
    if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
        bad = (~torch.isfinite(value)).sum().item()
        raise ValueError(
            f"pyro_avf: observed site '{name}' contains {bad} NaN or infinite value(s); clean the data or "
            "replace missing entries with finite values and mask them out with poutine.mask."
        )


def apply_context(msg, ctx: StepContext) -> None:
    """Give ``msg`` the plates, scale and mask of the handlers around the step, then broadcast it."""
    msg["cond_indep_stack"] = tuple(ctx.frames) + tuple(msg["cond_indep_stack"])
    msg["scale"] = ctx.scale * msg["scale"]
    msg["mask"] = combine_masks(ctx.mask, msg["mask"])
    if not _has_plate_shape(msg["fn"], msg["cond_indep_stack"]):
        BroadcastMessenger._pyro_sample(msg)


def condition_as_outside(msg, conditions) -> None:
    """Give ``msg`` the observed value that the ``poutine.condition`` handlers between the guide and the step
    give it in the model's own run (where they see each site before the guide, while a re-run's
    :class:`StepRun` sees it first): ``poutine.condition(model, data={"x_3": x})`` conditions the re-runs
    too."""
    for frame in reversed(conditions):  # innermost first, as Pyro applies them
        probe = {"name": msg["name"], "value": msg["value"], "is_observed": False}
        frame._pyro_sample(probe)
        if probe["is_observed"]:
            msg["value"], msg["is_observed"] = probe["value"], True
            return


def _has_plate_shape(fn, frames) -> bool:
    """Whether ``fn`` already has every plate's size at the plate's dim (broadcasting would not change it)."""
    shape = getattr(fn, "batch_shape", None)
    if shape is None:
        return False
    return all(f.dim is None or f.size == -1 or (len(shape) >= -f.dim and shape[f.dim] == f.size) for f in frames)


def slot_lambda(lambdas: Optional[List[Lambda]], i: int, name: str, prior, leaf: bool = False,
                family: str = "diagonal", preceding: int = 0) -> Lambda:  # fmt: skip
    """λ of latent slot ``i``: ``lambdas[i]``, or the prior's λ in the unconstrained space
    (:func:`~pyro_avf.posterior.prior_lambda` of the posterior ``family``, after joint slots of total
    dimension ``preceding``) when ``lambdas`` is None (iteration 0, or K = 0), as leaves that require grad if
    ``leaf``."""
    if lambdas is None:
        lam = prior_lambda(prior, family, preceding)
        return tuple(p.requires_grad_() for p in lam) if leaf else lam
    if i < len(lambdas):
        return lambdas[i]
    raise RuntimeError(
        f"pyro_avf: latent site '{name}' is latent slot {i} of a step whose inference found {len(lambdas)}; a "
        "filtering step must sample the same latent sites every time it runs."
    )


class LatentRecord(NamedTuple):
    name: str
    prior: object
    lam: Lambda
    value: torch.Tensor
    mask: object = None  # the site's mask (poutine.mask and the step's context), None when unmasked
    conditional: Optional[Lambda] = None  # λ of q(z | earlier draws of the step): lam, except for joint slots

    @property
    def posterior_lambda(self) -> Lambda:
        """λ of the distribution this site was drawn from (given the step's earlier draws)."""
        return self.lam if self.conditional is None else self.conditional


class ObservedRecord(NamedTuple):
    name: str
    fn: object
    value: torch.Tensor


class StepRun(Messenger):
    """Run a step once with latent slot ``i`` drawn from ``q(lambdas[i])``, scoring every site into
    :attr:`terms` and stopping it here, so that no trace outside sees the re-run.

    With ``lambdas=None`` every slot starts at its prior (the prediction, iteration 0) and the initial
    parameters are available as :attr:`initial_lambdas` (detached leaves that require grad); ``family`` is the
    posterior family of those slots (``"diagonal"``, ``"full"`` or ``"joint"``).
    """

    def __init__(self, ctx: StepContext, lambdas: Optional[List[Lambda]], kl_weight: float = 1.0,
                 family: str = "diagonal", check: bool = True, antithetic: Optional[list] = None,
                 keep_noise: bool = False, prior_only: bool = False):  # fmt: skip
        super().__init__()
        self.ctx, self.family, self.check, self.prior_only = ctx, family, check, prior_only
        self.refused: Optional[Exception] = None  # why a latent site cannot have a learned posterior
        self.prior_sites: Dict[str, object] = {}  # latent sites drawn from their prior (q = p, KL = 0)
        self.lambdas = lambdas
        self.antithetic = antithetic  # the noise of an earlier run's slots, drawn here negated
        self.noise: Optional[list] = [] if keep_noise or antithetic is not None else None
        self.draws = JointDraws(family)
        self.latents: List[LatentRecord] = []
        self.observations: List[ObservedRecord] = []
        self.terms = Terms(ctx.batch_shape, kl_weight)

    @property
    def initial_lambdas(self) -> List[Lambda]:
        return [rec.lam for rec in self.latents]

    def _process_message(self, msg) -> None:
        if msg["type"] != "sample":
            return
        if self.ctx.conditions and not msg["is_observed"]:
            condition_as_outside(msg, self.ctx.conditions)
        apply_context(msg, self.ctx)
        msg["stop"] = True
        if site_is_subsample(msg):
            return
        name, fn = msg["name"], msg["fn"]
        if self.check:
            check_plate_shape(msg)
        if msg["is_observed"]:
            if self.check:
                check_finite_observation(name, msg["value"])
            score_site(self.terms, msg)
            self.observations.append(ObservedRecord(name, fn, msg["value"]))
            return
        if self.prior_only:
            self._draw_from_prior(msg)
            return
        if self.check:
            try:
                check_continuous_latent(name, fn)
            except NotImplementedError as err:  # raised unless the step observes nothing (q = p there)
                self.refused = self.refused or err
                self._draw_from_prior(msg)
                return
        lam = slot_lambda(self.lambdas, len(self.latents), name, fn, leaf=True, family=self.family,
                          preceding=self.draws.preceding)  # fmt: skip
        cond = self.draws.condition(lam, fn)
        q = site_posterior(cond, fn)
        if self.noise is None:
            z = q.rsample()
        else:  # explicit noise: ε kept for an antithetic partner, or −ε of the partner's
            i = len(self.latents)
            eps = -self.antithetic[i] if self.antithetic is not None else torch.randn_like(_noise_like(cond))
            self.noise.append(eps)
            z = reparameterized_draw(cond, fn, eps)
        self.draws.add(z)
        msg["value"], msg["done"] = z, True
        self.latents.append(LatentRecord(name, fn, lam, z, msg["mask"], None if cond is lam else cond))
        score_site(self.terms, msg, prior=fn, q=q, q_params=cond)

    def raise_refusal(self) -> None:
        """Raise why a latent site of this run cannot have a posterior, if one cannot and the step observes
        something (a step that observes nothing takes its prior)."""
        if self.refused is not None and self.observations:
            raise self.refused

    def _draw_from_prior(self, msg) -> None:
        """Draw a latent site from its prior: q = p, which adds exactly 0 to the step free energy."""
        fn = msg["fn"]
        msg["value"], msg["done"] = fn.rsample() if fn.has_rsample else fn.sample(), True
        self.prior_sites[msg["name"]] = fn

    def latent_errors(self, i: int) -> torch.Tensor:
        r""":math:`\varepsilon_z = (u - \mu_p)/\sigma_p` of slot ``i`` in the unconstrained space."""
        rec = self.latents[i]
        params = normal_parameters(rec.prior)
        if params is None:
            raise ValueError(
                f"pyro_avf: error encoding needs Normal (or LogNormal) priors; site '{rec.name}' has "
                f"{type(unwrap(rec.prior)[0]).__name__}. Use encoding='gradient'."
            )
        u = biject_to(rec.prior.support).inv(rec.value)
        return (u - params[0]) / params[1]

    def observation_errors(self, batch_shape: torch.Size, like: Optional[torch.Tensor] = None) -> torch.Tensor:
        r""":math:`\varepsilon_x = (x - \mu_x)/\sigma_x` of every Normal observation, flattened and joined."""
        parts = []
        for rec in self.observations:
            params = normal_parameters(rec.fn)
            if params is None:
                raise ValueError(
                    f"pyro_avf: error encoding needs Normal observations; site '{rec.name}' has "
                    f"{type(unwrap(rec.fn)[0]).__name__}. Use encoding='gradient'."
                )
            parts.append(flatten_to((rec.value - params[0]) / params[1], batch_shape, rec.name, shared=True))
        if parts:
            return torch.cat(parts, -1)
        return torch.zeros(batch_shape + (0,)) if like is None else like.new_zeros(batch_shape + (0,))

    def observed_values(self, batch_shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
        """Every observed value of the step, flattened per batch element and joined (dtype and device of
        ``like``)."""
        parts = [
            flatten_to(_full(rec.value, rec.fn).to(like), batch_shape, rec.name, shared=True)
            for rec in self.observations
        ]
        return torch.cat(parts, -1) if parts else like.new_zeros(batch_shape + (0,))


def online_final_run(msg, ctx: StepContext, result: "StepResult", family: str = "diagonal") -> Tuple[StepRun, object]:
    """Online filtering: the final run of the step of ``msg`` with the posteriors :math:`q_{\\lambda_K}` of
    ``result``, scored with no trace or graph kept (constant memory per step). Returns the run and the step's
    value, detached. The inference re-runs have checked the sites, unless there were none."""
    with torch.no_grad():
        run = StepRun(ctx, result.final, 1.0, family, check=not result.executions, prior_only=result.prior_only)
        with run:
            value = msg["fn"](*msg["args"], **msg["kwargs"])
        run.raise_refusal()
    return run, detached(value)


@dataclass
class StepResult:
    """What inference at one step returns.

    ``final``: :math:`\\lambda_K` per slot (a function of φ when the update networks train; None when K = 0
    or the step has no latent site). ``lambdas``, ``free_energy``, ``kl``, ``reconstruction``: detached,
    per iteration k = 0..K-1 (``lambdas`` also holds λ_K), empty when not recorded. ``surrogate``: the update
    networks' surrogate of the intermediate iterations (None if none). ``final_terms``: the terms of the
    final run, filled in by the guide.
    """

    t: int
    ctx: StepContext
    final: Optional[List[Lambda]] = None
    lambdas: List[List[Lambda]] = field(default_factory=list)
    free_energy: List[torch.Tensor] = field(default_factory=list)
    kl: List[torch.Tensor] = field(default_factory=list)
    reconstruction: List[torch.Tensor] = field(default_factory=list)
    surrogate: Optional[torch.Tensor] = None
    executions: int = 0
    final_terms: Optional[Terms] = None
    prior_only: bool = False  # the step observes nothing: every latent site's posterior is its prior

    def record(self, runs: List[StepRun], lambdas: List[Lambda]) -> None:
        """Keep iteration k's λ and the terms of its first run (the one whose draw the initial λ₀ of a slot
        under another slot was taken from: at k = 0 every slot's KL is then exactly 0, the prior prediction)."""
        for name in ("free_energy", "kl", "reconstruction"):
            getattr(self, name).append(getattr(runs[0].terms, name).detach())
        self.lambdas.append(detached(lambdas))


def add_surrogate(total: Optional[torch.Tensor], params: List[torch.Tensor], grads) -> Optional[torch.Tensor]:
    r"""``total`` plus :math:`\sum_p p^\top \mathrm{sg}[g_p] - \mathrm{sg}[\cdot]` (value unchanged, gradient
    :math:`\sum_p (\partial p / \partial \phi)^\top g_p`)."""
    for p, g in zip(params, grads):
        if g is not None:
            term = (g.detach() * p).sum()
            total = term - term.detach() if total is None else total + term - term.detach()
    return total


class StepInference:
    r"""K inference iterations of one step (see the module docstring).

    :param int num_iterations: K.
    :param update: the update rule (see :mod:`pyro_avf.updates`).
    :param int num_samples: Monte-Carlo samples per gradient estimate.
    :param str family: the step posteriors' family, ``"diagonal"``, ``"full"`` or ``"joint"`` (see
        :mod:`pyro_avf.posterior`).
    :param bool antithetic: draw the samples in antithetic pairs, :math:`z = T(\mu + L\varepsilon)` and
        :math:`z' = T(\mu - L\varepsilon)`: for a likelihood quadratic in z (linear-Gaussian) the pair's
        gradient with respect to μ is exact.
    """

    def __init__(self, num_iterations: int, update, num_samples: int = 1, family: str = "diagonal",
                 antithetic: bool = False):  # fmt: skip
        self.num_iterations, self.update, self.num_samples = num_iterations, update, num_samples
        self.antithetic = antithetic
        self.family = check_family(family)
        self.slots: Dict[int, tuple] = {}  # slot index -> (first site name, unconstrained event shape)

    def check_slot(self, i: int, name: str, loc: torch.Tensor, prior) -> None:
        """Refuse a latent slot whose shape differs from the one it had at earlier steps."""
        event = loc.shape[loc.dim() - unconstrained_event_dim(prior) :]
        known = self.slots.setdefault(i, (name, event))
        if known[1] != event:
            raise ValueError(
                f"pyro_avf: latent slot {i} of the filtering step changed shape: site '{known[0]}' had event "
                f"shape {tuple(known[1])}, site '{name}' has {tuple(event)}. Latent sites are matched across "
                "steps by their order within the step, so each slot must keep its shape."
            )

    def __call__(self, fn, args, kwargs, ctx: StepContext, t: int, *, kl_weight: float = 1.0,
                 train: bool = False, keep: bool = True) -> StepResult:  # fmt: skip
        """Infer the posterior of the step ``fn(*args, **kwargs)`` at time ``t``.

        :param bool train: build the surrogate and return λ_K as a function of the update networks.
        :param bool keep: record the per-iteration diagnostics.
        """
        result = StepResult(t, ctx)
        if not self.num_iterations:
            return result
        args, kwargs = detached((args, kwargs))  # no graph towards θ or the past
        keep_params = self._trained_parameters() if train else []
        # the final run validates the step's distributions; the re-runs skip Pyro's argument checks
        with frozen_parameters(keep_params), pyro.validation_enabled(False), torch.enable_grad():
            self._iterate(result, fn, args, kwargs, ctx, kl_weight, train, keep)
        return result

    def _trained_parameters(self) -> List[torch.Tensor]:
        """The update networks' parameters, as listed when they were last registered with the param store."""
        nets = self.update.nets
        return nets.registered if nets.registered is not None else list(nets.parameters())

    def _run(self, result: StepResult, fn, args, kwargs, ctx, lambdas, kl_weight,
             partner: Optional[StepRun] = None, keep_noise: bool = False) -> StepRun:  # fmt: skip
        # the first run of a step checks its data and latent sites; the re-runs see the same sites
        run = StepRun(ctx, lambdas, kl_weight, self.family, check=result.executions == 0,
                      antithetic=None if partner is None else partner.noise, keep_noise=keep_noise)  # fmt: skip
        with explained(lambda e: f"filtering step '{getattr(fn, '__qualname__', fn)}' failed at step {result.t} "
                       f"while inferring its posterior: {e}\n(the step's tensor arguments have shapes "
                       f"{_shapes((args, kwargs))})"), run:  # fmt: skip
            fn(*args, **kwargs)
        result.executions += 1
        return run

    def _iterate(self, result, fn, args, kwargs, ctx, kl_weight, train, keep) -> None:
        leaves: Optional[List[Lambda]] = None
        current: Optional[List[Lambda]] = None
        state = None
        pairs_drawn = self.antithetic and self.num_samples > 1
        for k in range(self.num_iterations):
            runs = [self._run(result, fn, args, kwargs, ctx, leaves, kl_weight, keep_noise=pairs_drawn)]
            if leaves is None and not runs[0].observations:
                # nothing observed (a forecast): the prior is the exact optimum of F_t = KL(q || p)
                result.prior_only = True
                return
            runs[0].raise_refusal()
            if leaves is None:
                leaves = current = runs[0].initial_lambdas
                for i, rec in enumerate(runs[0].latents):
                    self.check_slot(i, rec.name, rec.lam[0], rec.prior)
                state = self.update.start(leaves)
            for j in range(1, self.num_samples):  # with antithetic pairs, every odd run mirrors the one before
                partner = runs[j - 1] if pairs_drawn and j % 2 else None
                runs.append(self._run(result, fn, args, kwargs, ctx, leaves, kl_weight, partner, pairs_drawn))
            if keep:  # online filtering keeps only the final numbers: constant memory per step
                result.record(runs, leaves)
            flat = [p for lam in leaves for p in lam]
            if not flat:
                return
            # the update sees the gradient of the per-element free energy; φ learns from the scaled loss
            loss = sum(r.terms.free_energy.sum() for r in runs) / len(runs)
            train_phi = k > 0 and train
            scaled = train_phi and any(r.terms.scaled for r in runs)
            grads = _grads(loss, flat, retain_graph=scaled)
            pairs = _regroup(grads, leaves)
            if train_phi:
                phi_grads = _grads(sum(r.terms.loss for r in runs) / len(runs), flat) if scaled else grads
                result.surrogate = add_surrogate(result.surrogate, [p for lam in current for p in lam], phi_grads)
            with torch.set_grad_enabled(train):
                current = self.update(state, k, leaves, pairs, runs[0])
            leaves = fresh_leaves(current)
        if keep and leaves is not None:
            result.lambdas.append(detached(leaves))
        result.final = current if train else detached(current)


@contextlib.contextmanager
def explained(why: Callable[[Exception], str], errors=(RuntimeError,)):
    """Re-raise an error of the user's code (one of ``errors``) as a ``RuntimeError("pyro_avf: " + why(e))``
    that says what the library was doing; pyro_avf's own errors pass unchanged."""
    try:
        yield
    except errors as e:
        if str(e).startswith("pyro_avf"):
            raise
        raise RuntimeError("pyro_avf: " + why(e)) from e


def fresh_leaves(lambdas: List[Lambda]) -> List[Lambda]:
    """Detached copies of every slot's λ that require grad (the next iteration's leaves)."""
    return [tuple(p.detach().requires_grad_() for p in lam) for lam in lambdas]


def _regroup(flat: List[torch.Tensor], like: List[Lambda]) -> List[Lambda]:
    """Cut the flat list ``flat`` into tuples of the lengths of the slots' λ in ``like``."""
    out, start = [], 0
    for lam in like:
        out.append(tuple(flat[start : start + len(lam)]))
        start += len(lam)
    return out


def _grads(loss: torch.Tensor, params: List[torch.Tensor], retain_graph: bool = False) -> List[torch.Tensor]:
    if not loss.requires_grad:  # every site masked (e.g. Predictive's poutine.mask(mask=False))
        return [torch.zeros_like(p) for p in params]
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=retain_graph)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _full(value: torch.Tensor, fn) -> torch.Tensor:
    """``value`` broadcast to its distribution's batch and event shape (data need not repeat outer plates
    such as vectorised particles)."""
    shape = fn.batch_shape + fn.event_shape
    return value if value.shape == shape else value.expand(torch.broadcast_shapes(value.shape, shape))


def _noise_like(lam: Lambda) -> torch.Tensor:
    """A tensor of the shape of the standard-normal noise of a draw from λ (loc and scale broadcast)."""
    loc, log_scale = lam[0], lam[1]
    return loc if loc.shape == log_scale.shape else loc.expand(torch.broadcast_shapes(loc.shape, log_scale.shape))


def _shapes(tree) -> list:
    return [tuple(v.shape) for v in torch.utils._pytree.tree_leaves(tree) if isinstance(v, torch.Tensor)]


class FinalRun:
    r"""The last run of a step, inside the model's own execution: the posteriors :math:`q_{\lambda_K}` it
    samples from, slot by slot, and what is done once it has run (:meth:`finish`).

    ``graph`` holds :math:`\lambda_K` as functions of φ when the run samples from detached copies
    ``lambdas`` (the update networks then learn from this step's own final free energy through a surrogate).
    """

    def __init__(self, result: StepResult, lambdas: Optional[List[Lambda]], graph: Optional[List[Lambda]],
                 family: str = "diagonal"):  # fmt: skip
        self.result, self.lambdas, self.graph, self.family = result, lambdas, graph, family
        self.draws = JointDraws(family)
        self.latent_names: List[str] = []
        self.site_names: List[str] = []
        self.num_observed = 0

    def next_posterior(self, name: str, prior, trace=None):
        """The posterior of the next latent site of the step and its λ (the prior's, when K = 0); for a joint
        slot, given the earlier slots' draws, read from ``trace`` (the model's trace of the run)."""
        if self.result.prior_only:
            self.latent_names.append(name)
            return prior, None
        if self.draws.pending is not None:  # the previous site was a joint one: its draw is in the trace now
            self.draws.add(trace.nodes[self.latent_names[-1]]["value"])
        lam = slot_lambda(self.lambdas, len(self.latent_names), name, prior, family=self.family,
                          preceding=self.draws.preceding)  # fmt: skip
        cond = self.draws.condition(lam, prior)
        self.latent_names.append(name)
        return site_posterior(cond, prior), cond

    def note(self, msg, t: int) -> None:
        """Take the site of ``msg`` (observed or latent) as one of step ``t``'s sites."""
        self.site_names.append(msg["name"])
        self.num_observed += msg["is_observed"]
        msg["infer"]["avf_step"] = t

    def finish(self, trace, value, record, local_return: Optional[bool]) -> Tuple[object, Optional[bool]]:
        r"""Check the run, score it and add the update networks' final surrogate to ``record`` (a
        :class:`~pyro_avf.passes.PassRecord`). Returns the step's value to hand on (this step's latent samples
        detached where φ must not learn from later steps) and whether steps return their latents themselves
        (``local_return``, found at the first step that needs it, see :meth:`return_is_local`)."""
        t = record.t
        if self.lambdas is not None and len(self.latent_names) != len(self.lambdas):
            raise RuntimeError(
                f"pyro_avf: step {t} sampled {len(self.latent_names)} latent sites in its final run but "
                f"{len(self.lambdas)} while inferring them; a filtering step must sample the same latent sites every "
                "time it runs. A handler between the guide and the step that turns a latent site into data "
                "(poutine.do, poutine.replay) also causes this; poutine.condition is supported."
            )
        if self.latent_names and not self.num_observed:
            warnings.warn(
                f"pyro_avf: filtering step {t} has latent sites {self.latent_names} but observes nothing, so its "
                "posterior is the prior (a forecast). If it should observe data, pass obs= or poutine.condition.",
                stacklevel=4,
            )
        if not self.result.executions:  # no inference run checked the step's sites (K = 0)
            for name in self.site_names:
                check_plate_shape(trace.nodes[name])
        detach = record.train and self.lambdas is not None and self.graph is None
        if record.local_gradients:  # AmortizedFilteringELBO reads the terms of every step's final run
            terms = Terms(self.result.ctx.batch_shape, record.kl_weight)
            for name in self.site_names:
                site = trace.nodes[name]
                score_site(terms, site, site["infer"].get("prior"), site["fn"], site["infer"].get("avf_lambda"))
            self.result.final_terms = terms
            if self.graph is not None:
                leaves = [p for lam in self.lambdas for p in lam]
                grads = torch.autograd.grad(terms.loss, leaves, retain_graph=True, allow_unused=True)
                graph = [p for lam in self.graph for p in lam]
                record.final_surrogate = add_surrogate(record.final_surrogate, graph, grads)
                if local_return is None:
                    local_return = self.return_is_local(trace, value)
        if detach:  # later steps see z_t as data: φ learns from this step's own free energy
            latents = {id(trace.nodes[name]["value"]) for name in self.latent_names}
            value = tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) and id(v) in latents else v, value)
        return value, local_return

    def return_is_local(self, trace, value) -> bool:
        """Whether later steps can only depend on this step's latents through returned latent samples
        themselves (true when the step returns z_t, as every reference model does; false when it returns a
        state computed from z_t, e.g. an RNN state updated inside the step), found on the autograd graph. When
        true, the final run samples from λ_K itself and the returned z_t are detached: the same gradients in one
        backward pass; otherwise every step pays one extra ``autograd.grad`` for the surrogate."""
        latents = {id(trace.nodes[name]["value"]) for name in self.latent_names}
        leaves = {id(p) for lam in self.lambdas for p in lam}
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
