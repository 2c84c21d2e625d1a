r"""One gradient step of a sequence model: its guide, objective, trained parameters and optimiser.

:class:`Trainer` is what :func:`pyro_avf.training.fit` runs every batch, and what a training loop of one's own
(interleaving two methods, fresh noise per batch, ...) can call directly. Its objective for a batch of B
sequences is the free energy per sequence with KL weight β,

.. math::

    \mathcal{L}_\beta = \frac1B \sum_{n=1}^{B} \sum_t \Big( -\mathbb{E}_q\big[\log p_\theta(x_{n,t} \mid \cdot)\big]
        + \beta\, D_{KL}\big(q(z_{n,t}) \,\|\, p_\theta(z_{n,t} \mid \cdot)\big) \Big),

for each inference:

- ``"avf"``: :class:`~pyro_avf.IterativeGuide` with a learned update (``guide_kwargs`` go to it) and
  :class:`~pyro_avf.AmortizedFilteringELBO`; the model and the update networks are trained;
- ``"em"``: the same guide with per-step Adam (``update="adam"``, non-amortized variational filtering EM); only
  the model is trained;
- ``"baseline"``: the model's own filtering guide (``model.guide``, or ``guide=``) with ``elbo`` (default
  :class:`~pyro.infer.TraceMeanField_ELBO`: the analytic KL of each latent site given the sampled past,
  :math:`D_{KL}(q(z_t \mid z_{t-1}, \cdot) \,\|\, p(z_t \mid z_{t-1}, \cdot))`, the estimator AVF's objective
  uses, so both are trained on the same free energy; it falls back to :math:`\log q - \log p` where no KL is
  known); β multiplies the log densities (and KLs) of every latent site in model and guide
  (:class:`ScaleLatents`), giving :math:`-\log p(x|z) + \beta\, D_{KL}(q \,\|\, p)`.

The model (see :class:`SequenceModel`) needs a ``model(xs, mask)``; the trained parameters are those of its
modules and every ``pyro.param`` its program creates.

>>> import pyro, torch
>>> from pyro_avf.step import examples_model
>>> trainer = Trainer(examples_model, guide_kwargs={"num_iterations": 2, "hidden_size": 8}, lr=1e-2)
>>> loss = trainer.step(torch.randn(4, 6, 2))     # Σ_n F_n of the batch, before the step
>>> sorted(trainer.net.parts)
['guide']
"""

from __future__ import annotations

import functools
import types
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

import pyro
import torch
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.elbo import ELBO
from pyro.optim.clipped_adam import ClippedAdam
from pyro.optim.lr_scheduler import PyroLRScheduler
from pyro.optim.optim import PyroOptim
from pyro.poutine.messenger import Messenger
from torch import Tensor, nn

from pyro_avf.elbo import AmortizedFilteringELBO
from pyro_avf.guide import IterativeGuide

__all__ = ["INFERENCES", "Objective", "ScaleLatents", "SequenceModel", "Trainable", "Trainer", "pyro_model"]

INFERENCES = ("avf", "em", "baseline")


class SequenceModel(Protocol):
    """What :class:`Trainer`, :func:`~pyro_avf.training.fit` and :func:`~pyro_avf.evaluation.evaluate` need of
    a model. Only :meth:`model` is required; a plain Pyro function ``f(xs, mask)`` serves as well.

    - ``model(xs, mask)``: the Pyro program of a batch ``xs`` (B, T, ...) with ``mask`` (B, T) bool, False on
      padding (called as ``model(xs)`` for data given as one tensor of equal-length sequences); its time step
      is marked with :func:`~pyro_avf.filtering_step`;
    - ``guide(xs, mask)`` (optional): the model's own filter, trained by ``inference="baseline"``;
    - ``generative`` (optional, an ``nn.Module``): the model's own networks, when the object also holds its
      guide's; ``"avf"`` and ``"em"`` train these, ``"baseline"`` the whole object.

    How to stream it (one step at a time, memory flat in the length) is optional too: see
    :func:`~pyro_avf.evaluation.evaluate`'s ``stream``.
    """

    def model(self, xs: Tensor, mask: Optional[Tensor] = None) -> Any: ...


def pyro_model(model: Any) -> Callable:
    """The Pyro program of ``model``: its ``model`` method, or ``model`` itself when it is a function."""
    fn = getattr(model, "model", None)
    if callable(fn):
        return fn
    if isinstance(model, (types.FunctionType, types.MethodType, functools.partial)):
        return model
    raise TypeError(
        f"pyro_avf: {type(model).__name__} is not a sequence model: it needs a method model(xs, mask), the Pyro "
        "program of a batch of sequences (and optionally guide(xs, mask), its own filter for inference="
        "'baseline'); a Pyro function model(xs, mask) can be passed itself"
    )


class ScaleLatents(Messenger):
    """Multiply the scale of every latent (unobserved) sample site by β: KL annealing for the baseline's ELBO."""

    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta

    def _pyro_sample(self, msg) -> None:
        if not msg["is_observed"]:
            msg["scale"] = self.beta * msg["scale"]


class Objective:
    """The summed free energy of a batch, :math:`\\sum_n \\mathcal{F}_n`, with KL weight :attr:`kl_weight`."""

    def __init__(self, model: Callable, guide: Callable, elbo: ELBO):
        self.model, self.guide, self.elbo = model, guide, elbo
        self.kl_weight = 1.0

    def __call__(self, xs: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        args = (xs,) if mask is None else (xs, mask)
        if isinstance(self.elbo, AmortizedFilteringELBO):
            self.elbo.kl_weight = self.kl_weight
            return self.elbo.differentiable_loss(self.model, self.guide, *args)
        with ScaleLatents(self.kl_weight):
            return self.elbo.differentiable_loss(self.model, self.guide, *args)


class Trainable(nn.Module):
    """The trained modules in one container (what DDP wraps and a checkpoint saves); ``forward`` is the loss."""

    def __init__(self, parts: Dict[str, nn.Module], objective: Objective):
        super().__init__()
        self.parts = nn.ModuleDict(parts)
        self.objective = objective

    def forward(self, xs: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return self.objective(xs, mask)


class Trainer:
    """A model, its guide and optimiser; :meth:`step` is one gradient step on :math:`\\mathcal{L}_\\beta`.

    :param model: a :class:`SequenceModel` (or a Pyro function ``model(xs, mask)``).
    :param str inference: ``"avf"``, ``"em"`` or ``"baseline"`` (see the module docstring).
    :param guide: a Pyro guide to train instead of ``model.guide`` (``"baseline"`` only).
    :param elbo: the loss (default: ``AmortizedFilteringELBO()`` for ``"avf"``/``"em"``, ``TraceMeanField_ELBO()``).
    :param dict guide_kwargs: keyword arguments of :class:`~pyro_avf.IterativeGuide` (``"avf"``, ``"em"``).
    :param optimizer: a ``pyro.optim`` optimiser, e.g. ``pyro.optim.ClippedAdam({"lr": 1e-3, "clip_norm":
        10.0})`` or ``pyro.optim.Adam({"lr": 1e-3}, clip_args={"clip_norm": 5.0})`` (each parameter tensor's
        gradient clipped to that norm, as Pyro does), or a ``pyro.optim`` scheduler, e.g.
        ``pyro.optim.ExponentialLR({"optimizer": torch.optim.Adam, "optim_args": {"lr": 1e-3}, "gamma":
        0.99})``, stepped by :meth:`end_epoch`. One torch optimiser is made over all parameters from it.
        Default: :class:`~pyro.optim.clipped_adam.ClippedAdam` with ``lr`` and element-wise ``clip_norm``
        (``torch.optim.Adam`` when ``clip_norm`` is None).
    :param lr_schedule: ``epoch -> factor`` of the initial learning rate (``torch.optim.lr_scheduler.LambdaLR``),
        e.g. ``lambda epoch: 0.999 ** epoch``.
    """

    def __init__(
        self,
        model: Any,
        *,
        inference: str = "avf",
        guide: Optional[Callable] = None,
        elbo: Optional[ELBO] = None,
        guide_kwargs: Optional[Dict[str, Any]] = None,
        optimizer: Optional[PyroOptim] = None,
        lr: float = 1e-3,
        clip_norm: Optional[float] = 10.0,
        lr_schedule: Optional[Callable[[int], float]] = None,
    ):
        if inference not in INFERENCES:
            raise ValueError(f"inference must be one of {INFERENCES}, got {inference!r}")
        if optimizer is not None and not isinstance(optimizer, PyroOptim):
            raise TypeError(f"optimizer must be a pyro.optim optimiser or scheduler, got {type(optimizer).__name__}")
        if optimizer is not None and (callable(optimizer.pt_optim_args) or callable(optimizer.pt_clip_args)):
            raise ValueError("optimizer: per-parameter optim_args or clip_args (callables) are not supported")
        if isinstance(optimizer, PyroLRScheduler) and lr_schedule is not None:
            raise ValueError("pass either a pyro.optim scheduler as optimizer or lr_schedule, not both")
        self.model, self.inference = model, inference
        self.model_fn = pyro_model(model)
        self.guide, elbo, parts = self._inference(inference, guide, elbo, dict(guide_kwargs or {}))
        self.net = Trainable(parts, Objective(self.model_fn, self.guide, elbo))
        self.module: nn.Module = self.net  # what computes the loss: the container, or its DDP wrapper
        self._optimizer_args = (optimizer, lr, clip_norm, lr_schedule)
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None
        self.clip_args: Dict[str, float] = {}
        self.store_params: Dict[str, Tensor] = {}  # pyro.param sites outside the modules, by name

    def _inference(self, inference: str, guide, elbo, guide_kwargs) -> Tuple[Callable, ELBO, Dict[str, nn.Module]]:
        model_module = self._model_module(inference)
        parts = {} if model_module is None else {"model": model_module}
        if inference == "baseline":
            own = getattr(self.model, "guide", None)
            guide = own if guide is None else guide
            if not callable(guide):
                raise ValueError(
                    f"inference='baseline' trains the model's own filter, but {type(self.model).__name__} has no "
                    "guide(xs, mask); pass guide=... or use inference='avf'"
                )
            if isinstance(guide, nn.Module) and guide is not model_module:
                parts["guide"] = guide
            return guide, TraceMeanField_ELBO() if elbo is None else elbo, parts
        if guide is not None:
            raise ValueError(f"guide= is for inference='baseline'; inference={inference!r} builds an IterativeGuide "
                             "from guide_kwargs")  # fmt: skip
        if inference == "em":
            guide_kwargs.setdefault("update", "adam")
        guide = IterativeGuide(self.model_fn, **guide_kwargs)
        if inference == "em" and (guide.amortized or guide.num_iterations < 1):
            raise ValueError("inference='em' is non-amortized filtering: it needs update='adam' or 'sgd' and "
                             "num_iterations >= 1 (K = 0 leaves the posterior at the prior)")  # fmt: skip
        parts["guide"] = guide
        return guide, AmortizedFilteringELBO() if elbo is None else elbo, parts

    def _model_module(self, inference: str) -> Optional[nn.Module]:
        generative = getattr(self.model, "generative", None)
        if inference != "baseline" and isinstance(generative, nn.Module):
            return generative
        return self.model if isinstance(self.model, nn.Module) else None

    # ----- the KL weight and the learning rate -----

    @property
    def kl_weight(self) -> float:
        """β of the objective."""
        return self.net.objective.kl_weight

    @kl_weight.setter
    def kl_weight(self, beta: float) -> None:
        self.net.objective.kl_weight = float(beta)

    @property
    def lr(self) -> float:
        """The learning rate of the next step (of the first parameter group)."""
        if self.optimizer is not None:
            return self.optimizer.param_groups[0]["lr"]
        optimizer, lr = self._optimizer_args[:2]
        return lr if optimizer is None else optimizer.pt_optim_args.get("lr", float("nan"))

    def parameters(self) -> List[Tensor]:
        """Every trained tensor (after :meth:`build`): the modules' parameters, then the param-store ones."""
        return [*self.net.parameters(), *self.store_params.values()]

    # ----- training -----

    def build(self, xs: Tensor, mask: Optional[Tensor] = None) -> None:
        """Create what is built lazily (the update networks, ``pyro.param`` sites) with one pass over a batch
        (under a forked random number generator: the user's random stream does not move), then the optimiser.
        :meth:`step` calls it on its first batch."""
        if self.optimizer is not None:
            return
        with torch.random.fork_rng(), poutine.trace(param_only=True) as capture:
            self.net(xs, mask)
        owned = {id(p) for p in self.net.parameters()}
        store = pyro.get_param_store()
        for site in capture.trace.nodes.values():
            p = site["value"].unconstrained()
            if id(p) not in owned and p.requires_grad:
                self.store_params[store.param_name(p)] = p
        self.store_params = dict(sorted(self.store_params.items()))
        if not self.parameters():
            raise ValueError(f"pyro_avf: nothing to train: {type(self.model).__name__} with inference="
                             f"{self.inference!r} has no parameters (no nn.Module parameter, no pyro.param)")
        optimizer, lr, clip_norm, lr_schedule = self._optimizer_args
        if optimizer is None:
            self.optimizer = (ClippedAdam(self.parameters(), lr=lr, clip_norm=clip_norm) if clip_norm else
                              torch.optim.Adam(self.parameters(), lr=lr))  # fmt: skip
        else:
            self.optimizer = optimizer.pt_optim_constructor(self.parameters(), **optimizer.pt_optim_args)
            self.clip_args = dict(optimizer.pt_clip_args)
            if isinstance(optimizer, PyroLRScheduler):
                self.scheduler = optimizer.pt_scheduler_constructor(self.optimizer, **optimizer.kwargs)
        if lr_schedule is not None:
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_schedule)

    def data_parallel(self) -> None:
        """Compute the loss through :class:`~torch.nn.parallel.DistributedDataParallel` (after :meth:`build`, in
        every process of a gloo process group), which averages the modules' gradients over the processes."""
        if self.store_params:
            raise ValueError(
                "pyro_avf: data-parallel training averages the gradients of nn.Module parameters only; hold "
                f"{sorted(self.store_params)} in an nn.Module (registered with pyro.module)"
            )
        self.module = nn.parallel.DistributedDataParallel(self.net)

    def step(self, xs: Tensor, mask: Optional[Tensor] = None) -> float:
        """One optimiser step on :math:`\\mathcal{L}_\\beta = \\frac1B \\sum_n \\mathcal{F}_n` of the batch
        ``xs`` (B, T, ...) with ``mask`` (B, T) bool (or None: every step real); returns :math:`\\sum_n
        \\mathcal{F}_n` (β-weighted) before the step."""
        self.build(xs, mask)
        loss = self.module(xs, mask)
        (loss / xs.size(0)).backward()
        for p in self.parameters() if self.clip_args else ():
            if p.grad is not None and "clip_norm" in self.clip_args:
                nn.utils.clip_grad_norm_(p, self.clip_args["clip_norm"])
            if p.grad is not None and "clip_value" in self.clip_args:
                nn.utils.clip_grad_value_(p, self.clip_args["clip_value"])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def scale_lr(self, factor: float) -> None:
        """Multiply the learning rate by ``factor`` from the next step on (the schedule's base too)."""
        for group in self.optimizer.param_groups:
            group["lr"] *= factor
        if self.scheduler is not None and hasattr(self.scheduler, "base_lrs"):
            self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]

    def floor_lr(self, min_lr: float) -> None:
        """Raise every parameter group's learning rate to at least ``min_lr`` (for the next step on)."""
        for group in self.optimizer.param_groups if self.optimizer is not None else []:
            group["lr"] = max(group["lr"], min_lr)

    def end_epoch(self) -> None:
        """Step the learning-rate schedule (once per epoch)."""
        if self.scheduler is not None:
            self.scheduler.step()

    # ----- state -----

    def snapshot(self) -> Dict[str, Dict[str, Tensor]]:
        """A copy of the trained parameters: ``{"net": state dict, "params": param-store tensors}``."""
        return {"net": {k: v.detach().clone() for k, v in self.net.state_dict().items()},
                "params": {k: v.detach().clone() for k, v in self.store_params.items()}}  # fmt: skip

    def restore(self, snapshot: Dict[str, Dict[str, Tensor]]) -> None:
        """Load parameters of :meth:`snapshot` (raises ``RuntimeError``/``KeyError`` naming what differs)."""
        self.net.load_state_dict(snapshot["net"])
        saved = snapshot.get("params", {})
        if set(saved) != set(self.store_params):
            raise KeyError(f"param-store parameters differ: saved {sorted(saved)}, here {sorted(self.store_params)}")
        with torch.no_grad():
            for name, p in self.store_params.items():
                p.copy_(saved[name])

    def state_dict(self) -> Dict[str, Any]:
        """Parameters, optimiser and scheduler states (after :meth:`build`), for a checkpoint."""
        return {**self.snapshot(), "optimizer": self.optimizer.state_dict(),
                "scheduler": None if self.scheduler is None else self.scheduler.state_dict()}  # fmt: skip

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (after :meth:`build`)."""
        self.restore(state)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
