"""The two pieces of state every DoRA layer owns besides its parameters, shared by DoRALinear, the multi-adapter
layers (layers.py) and the PEFT variants (peft_variants.py): the eval-time norm cache and the merge ledger."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from . import ops

__all__ = ["NormCache", "MergeLedger"]


class NormCache:
    """Eval-time weight norms, one [out] fp32 vector per adapter, recomputed when the key changes.

    The key holds each tensor's version counter, storage pointer, dtype and device plus the scaling, so optimizer
    steps, load_state_dict, merges, in-place edits and .to() all invalidate it. Writes through `.data` bypass version
    counters: layers offer clear_cache() for those. Not used in training, while compiling, or for inference-mode
    tensors (no version counters). PEFT's DoraCaching also keeps a dense [out, in] B·A; this keeps one [out] vector.
    """

    def __init__(self):
        self._slots: dict[str, tuple[tuple, Tensor]] = {}

    def norm(self, slot: str, key_tensors: Callable[[], Sequence[Tensor]], scaling: float, training: bool,
             compute: Callable[[], Tensor]) -> Tensor:
        """The norm of adapter `slot`: cached in eval, computed (by `compute`) otherwise. key_tensors() returns the
        tensors the norm depends on; it is called only in eval, so a training forward pays nothing for the key."""
        if training or torch.compiler.is_compiling():
            return compute()
        tensors = key_tensors()
        if any(t.is_inference() for t in tensors):
            return compute()
        key = tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in tensors) + (scaling,)
        hit = self._slots.get(slot)
        if hit is None or hit[0] != key:
            hit = self._slots[slot] = (key, compute())
        return hit[1]

    def pop(self, slot: str) -> None:
        self._slots.pop(slot, None)

    def __len__(self) -> int:  # how many norms are held
        return len(self._slots)

    def clear(self) -> None:
        self._slots.clear()


class MergeLedger:
    """What unmerging needs of each merged adapter: the norm of the unmerged weight (the gain g = m/n cannot be
    recovered from the merged one) and the rows a zero gain wiped, kept so unmerge restores them exactly."""

    def __init__(self):
        self._records: dict[str, tuple[Tensor, Tensor, Tensor]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._records

    @torch.no_grad()
    def merge_(self, name: str, w2d: Tensor, A: Tensor, B: Tensor, magnitude: Tensor | None, norm: Tensor,
               scaling: float, record: bool = True) -> None:
        """w2d ← g ⊙ (w2d + s·B·A) in place (magnitude None: plain LoRA, g = 1); with record, remembers what
        unmerge_ needs."""
        magnitude = norm if magnitude is None else magnitude.reshape(-1)
        zero = (magnitude == 0).nonzero().flatten()
        if record:
            self._records[name] = (norm, zero, w2d[zero].clone())  # g = 0 wipes a row for good: keep those rows
        ops.merge_(w2d, A, B, magnitude, norm, scaling)

    @torch.no_grad()
    def unmerge_(self, name: str, w2d: Tensor, A: Tensor, B: Tensor, magnitude: Tensor | None, scaling: float,
                 forget: bool = True) -> None:
        """Undo merge_ of adapter `name` in place with the norm kept at merge time; forget=False keeps the record
        (to rebuild an unmerged copy of the weight)."""
        norm, zero, saved = self._records.pop(name) if forget else self._records[name]
        magnitude = norm if magnitude is None else magnitude.reshape(-1)
        if zero.numel():
            magnitude = magnitude.clone()
            magnitude[zero] = 1.0  # any non-zero gain: those rows are restored from the saved copy below
        ops.unmerge_(w2d, A, B, magnitude, norm, scaling)
        if zero.numel():
            w2d[zero] = saved

    def clear(self) -> None:
        self._records.clear()
