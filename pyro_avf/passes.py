r"""What one guide pass leaves behind: per-step results, the update networks' surrogates, online rows.

A :class:`PassRecord` is made by :meth:`~pyro_avf.IterativeGuide.run` for each pass and read afterwards by
:class:`~pyro_avf.AmortizedFilteringELBO`, :mod:`pyro_avf.evaluation` and :class:`~pyro_avf.online.OnlineFilter`.
Its mode fields say how the pass ran; nothing outside the guide sets them.

``surrogate`` has value 0 and gradient :math:`\sum_{t,0<k<K} \nabla_\phi \lambda_{t,k}^\top
\nabla_\lambda \mathcal{F}_t(\lambda_{t,k})`; ``final_surrogate`` the same for k = K, from each step's own final
free energy (AVF's filtering objective: no gradient from later steps reaches φ).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from pyro.poutine.trace_struct import Trace

from pyro_avf.free_energy import Terms
from pyro_avf.inference import StepResult, StepRun


class OnlineRecord:
    """Per-step free energy, KL, reconstruction and observed flag of an online pass in one growing buffer.

    Rows are written into a tensor of shape ``(capacity, *batch, 4)`` that doubles when full, so a long
    sequence costs 4 numbers per step and batch element and no Python object per step.
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
        if self.buffer is None:
            empty = torch.zeros(0, 0)
            return {"free_energy": empty, "kl": empty, "reconstruction": empty, "observed": empty.bool()}
        return self._split(self.buffer[: self.count].reshape(self.count, -1, 4).transpose(0, 1))

    def _split(self, data: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = {name: data[..., i].clone() for i, name in enumerate(self.FIELDS)}
        out["observed"] = out["observed"].bool()
        return out


@dataclass
class PassRecord:
    """The record of one guide pass (see the module docstring)."""

    kl_weight: float = 1.0
    local_gradients: bool = False
    is_online: bool = False
    train: bool = False
    t: int = 0  # index of the next step
    steps: List[StepResult] = field(default_factory=list)  # training passes: one result per step
    online: OnlineRecord = field(default_factory=OnlineRecord)  # online passes: final terms per step
    last_run: Optional[StepRun] = None  # online passes: the final run of the latest step
    surrogate: Optional[torch.Tensor] = None
    final_surrogate: Optional[torch.Tensor] = None
    step_executions: int = 0
    outer_traces: List[Trace] = field(default_factory=list)  # traces outside the guide (outer_guides)
    shares_outer_plates: bool = False  # the model's plates came from a trace outside the guide (AutoGuideList)

    def add(self, result: StepResult) -> None:
        """Take in the inference result of one step."""
        self.step_executions += result.executions
        if result.surrogate is not None:
            self.surrogate = result.surrogate if self.surrogate is None else self.surrogate + result.surrogate
        if not self.is_online:  # online passes keep no per-step Python objects
            self.steps.append(result)

    def finish_online(self, run: StepRun) -> None:
        """Take in the scored final run of an online step and move on to the next step."""
        self.last_run = run
        self.online.append(run.terms)
        self.step_executions += 1
        self.t += 1
