r"""How an :class:`~pyro_avf.IterativeGuide` goes through ``torch.save`` / ``pickle`` and comes back.

Three things stand in the way of pickling a guide as it is, and :class:`PicklableGuide` removes each:

- Pyro's param store tags each parameter it hands out with a weak reference to itself (``p.unconstrained``,
  re-made on every access), which cannot be pickled: it is dropped, as ``ParamStoreDict.get_state`` does;
- the state of a pass in progress (:data:`TRANSIENT`) belongs to that pass: it is saved as None;
- a guide pickled by an earlier version lacks attributes added since: :meth:`PicklableGuide.state_defaults`
  gives them their defaults on load.

Example::

    >>> import io, torch
    >>> from pyro_avf import IterativeGuide
    >>> from pyro_avf.step import examples_model as model
    >>> buffer = io.BytesIO()
    >>> torch.save(IterativeGuide(model, 1, hidden_size=8), buffer)
    >>> _ = buffer.seek(0)
    >>> torch.load(buffer, weights_only=False).num_iterations  # your own file only: this unpickles
    1
"""

from __future__ import annotations

from typing import Dict

TRANSIENT = ("last_pass", "_pass", "_active", "_surrogate_site")  # a pass's state: not pickled


class PicklableGuide:
    """Mixin of :class:`~pyro_avf.IterativeGuide`: ``__getstate__`` / ``__setstate__`` (see the module)."""

    def state_defaults(self, state: Dict[str, object]) -> Dict[str, object]:
        """Attributes added since the earliest pickled guides, with their defaults (override to add)."""
        return {}

    def __getstate__(self) -> Dict[str, object]:
        for p in self.parameters():
            p.__dict__.pop("unconstrained", None)
        state = super().__getstate__()  # GuideMessenger drops the trace
        for transient in TRANSIENT:
            state[transient] = None
        return state

    def __setstate__(self, state: Dict[str, object]) -> None:
        for key, value in self.state_defaults(state).items():
            state.setdefault(key, value)
        for transient in TRANSIENT:
            state.setdefault(transient, None)
        super().__setstate__(state)
