"""The two pieces of state every DoRA layer owns besides its parameters, shared by DoRALinear, the multi-adapter
layers (layers.py) and the PEFT variants (peft_variants.py): the eval-time norm cache (opt-in: `norm_caching`) and
the merge ledger."""

from __future__ import annotations

import contextvars
import sys
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from . import functional, ops, tensor_parallel, torch_private

__all__ = ["NormCache", "MergeLedger", "norm_caching", "caching_enabled", "cached_norm", "adapter_norm"]

# None: follow PEFT's DoraCaching (peft.tuners.lora.dora.ENABLE_DORA_CACHING, off unless PEFT's switch is on);
# True / False: dora_ext.norm_caching said so in this thread (or asyncio task). A ContextVar, not a module global,
# so a with-block in one thread leaves the others as they were.
_SWITCH: contextvars.ContextVar[bool | None] = contextvars.ContextVar("dora_ext_norm_caching", default=None)


class norm_caching:
    """Turn dora_ext's eval-time norm cache on (or off) for the layers of both routes: dora_ext's own layers and
    DoRALinear, and PEFT layers made fused by `from_peft` / `patch_peft`. Off by default, as PEFT's DoraCaching.

        with dora_ext.norm_caching():        # cached within the block, restored at its exit
            ids = model.generate(**batch)
        dora_ext.norm_caching(True)           # from now on, in this thread
        dora_ext.norm_caching(None)           # back to the default: follow peft.helpers.DoraCaching

    Like torch.set_grad_enabled, the call itself sets the switch; as a with-block it restores the previous value at
    exit. The switch is a context variable: it holds for the thread (or asyncio task) that set it, other threads
    keep theirs (a new thread starts with the default). PEFT's process-wide `peft.helpers.DoraCaching` turns it on
    too unless `norm_caching(False)` says otherwise in this thread.

    With caching on, a layer in eval mode keeps one [out] fp32 norm per adapter until W, A, B or the scaling change
    (their version counters, storage, dtype, device): optimizer steps, load_state_dict, merges, in-place edits and
    .to() recompute it; writes through `.data` (EMA `copy_to`, some loaders) do not: call `layer.clear_cache()`, run
    a forward with caching off, or switch the model to train mode after those. Training never caches. With caching
    off every forward computes the norm (fused: one pass over W) and drops anything kept before, so a default model
    is never stale.
    """

    def __init__(self, enabled: bool | None = True):
        if enabled is not None and not isinstance(enabled, bool):
            raise TypeError(f"dora_ext.norm_caching: expected enabled=True, False or None (follow PEFT's "
                            f"DoraCaching), got {enabled!r}")
        self.enabled = enabled
        self._token = _SWITCH.set(enabled)

    def __enter__(self) -> "norm_caching":
        if self._token is None:  # the same object entered again
            self._token = _SWITCH.set(self.enabled)
        return self

    def __exit__(self, *exc) -> None:
        token, self._token = self._token, None
        _SWITCH.reset(token)

    def __repr__(self) -> str:
        return f"dora_ext.norm_caching(enabled={self.enabled})"


def caching_enabled(scoped: bool = False) -> bool:
    """Whether an eval forward may use the norm cache now: dora_ext.norm_caching's switch in this context if set;
    else True for a layer inside a serving block (scoped: dora_ext.mixed_adapters); else PEFT's DoraCaching."""
    switch = _SWITCH.get()
    if switch is not None:
        return switch
    if scoped:
        return True
    dora = sys.modules.get("peft.tuners.lora.dora")  # not imported: PEFT's switch cannot be on
    return bool(getattr(dora, "ENABLE_DORA_CACHING", False))


def cached_norm(slots: dict, slot: str, key_tensors: Callable[[], Sequence[Tensor]], scaling: float, training: bool,
                compute: Callable[[], Tensor], scoped: bool = False) -> Tensor:
    """The norm of `slot` from `slots` (a dict the layer owns) when caching is on and the layer is in eval, else
    compute(). key_tensors() returns the tensors the norm depends on; it is called only when caching, so other
    forwards pay nothing for the key. A forward that does not cache empties `slots`, as PEFT's cache_decorator does,
    so turning caching back on never finds a norm kept from before."""
    if torch.compiler.is_compiling():  # a compiled graph does not consult Python-side caches
        return compute()
    if training or not caching_enabled(scoped):
        if slots:
            slots.clear()
        return compute()
    # a tensor-parallel DTensor: its rank-local shard (the wrapper has no storage of its own to key on)
    tensors = [t.to_local() if tensor_parallel.is_sharded(t) else t for t in key_tensors()]
    if any(t.is_inference() for t in tensors):  # inference tensors have no version counter to key on
        return compute()
    key = tuple((torch_private.version(t), t.data_ptr(), t.dtype, t.device) for t in tensors) + (scaling,)
    hit = slots.get(slot)
    # a norm made under inference_mode cannot serve an autograd-recording forward outside it
    if hit is None or hit[0] != key or (hit[1].is_inference() and not torch.is_inference_mode_enabled()):
        hit = slots[slot] = (key, compute())
    return hit[1]


def adapter_norm(slots: dict, slot: str, base: Tensor | nn.Module, lora_A: Tensor, lora_B: Tensor, scaling: float,
                 training: bool, *, inputs: Callable[[], Sequence[Tensor]] | None = None,
                 compute: Callable[[], Tensor] | None = None, scoped: bool = False) -> Tensor:
    """The norm of one adapter for a forward, in both front-ends: functional.weight_norm(base, lora_A, lora_B,
    scaling) (or compute(), for a norm of the layer's own kind), kept in `slots` under `slot` as cached_norm says,
    keyed on the base's tensors (functional.norm_key) and inputs(), the adapter tensors the factors are made of
    (default: lora_A and lora_B themselves; EDoRA's and the gated factors are products of others)."""
    def key() -> tuple[Tensor, ...]:
        return (*functional.norm_key(base), *((lora_A, lora_B) if inputs is None else inputs()))

    if compute is None:
        def compute() -> Tensor:
            return functional.weight_norm(base, lora_A, lora_B, scaling)

    return cached_norm(slots, slot, key, scaling, training, compute, scoped)


class NormCache:
    """Eval-time weight norms, one [out] fp32 vector per adapter, used only while caching is on (`norm_caching`,
    PEFT's DoraCaching, or a serving block: `scoped`) and recomputed when the key changes.

    The key holds each tensor's version counter, storage pointer, dtype and device plus the scaling, so optimizer
    steps, load_state_dict, merges, in-place edits and .to() all invalidate it. Writes through `.data` bypass version
    counters: layers offer clear_cache() for those. Not used in training, while compiling, or for inference-mode
    tensors (no version counters). PEFT's DoraCaching also keeps a dense [out, in] B·A; this keeps one [out] vector.
    """

    def __init__(self):
        self._slots: dict[str, tuple[tuple, Tensor]] = {}
        self.scoped = False  # set by dora_ext.mixed_adapters for its block: cache there unless switched off

    def norm(self, slot: str, base: Tensor | nn.Module, lora_A: Tensor, lora_B: Tensor, scaling: float,
             training: bool, inputs: Callable[[], Sequence[Tensor]] | None = None,
             compute: Callable[[], Tensor] | None = None) -> Tensor:
        """The norm of adapter `slot`: cached in eval while caching is on, computed otherwise (adapter_norm)."""
        return adapter_norm(self._slots, slot, base, lora_A, lora_B, scaling, training, inputs=inputs,
                            compute=compute, scoped=self.scoped)

    def pop(self, slot: str) -> None:
        self._slots.pop(slot, None)

    def __len__(self) -> int:  # how many norms are held
        return len(self._slots)

    def clear(self) -> None:
        self._slots.clear()


#: the weight operand of a merge: one [rows, cols] view, or a tuple of them sharing the rows' gains
Rows = Tensor | tuple[Tensor, ...]


def _blocks(w2d: Rows, A: Rows, B: Rows) -> list[tuple[Tensor, Tensor, Tensor]]:
    return [(w2d, A, B)] if isinstance(w2d, Tensor) else list(zip(w2d, A, B))


class MergeLedger:
    """What unmerging needs of each merged adapter: the norm of the unmerged weight (the gain g = m/n cannot be
    recovered from the merged one) and the rows a zero gain wiped, kept so unmerge restores them exactly.

    The one merge of both front-ends: dora_ext's own layers (layers/base.py) and PEFT's layers with the fused
    variants (peft_variants.py) both merge and unmerge through it, in place, without a dense [out, in] ΔW."""

    def __init__(self):
        self._records: dict[str, tuple[Tensor, Tensor, list[Tensor]]] = {}  # norm, zero-gain rows, their values

    def __contains__(self, name: str) -> bool:
        return name in self._records

    @torch.no_grad()
    def merge_(self, name: str, w2d: Rows, A: Rows, B: Rows, magnitude: Tensor | None, norm: Tensor,
               scaling: float, record: bool = True) -> None:
        """w2d ← g ⊙ (w2d + s·B·A) in place (magnitude None: plain LoRA, g = 1); with record, remembers what
        unmerge_ needs. w2d, A, B: one row-op triple, or tuples of them whose rows share one gain (an input-axis
        adapter's kernel taps: functional.input_axis_blocks)."""
        if tensor_parallel.is_sharded(w2d):  # tensor parallel: the local slice, with the full rows' gains
            w2d, A, B, magnitude, norm = tensor_parallel.merge_args(w2d, A, B, magnitude, norm, "dora_ext merge")
        blocks = _blocks(w2d, A, B)
        magnitude = norm if magnitude is None else magnitude.reshape(-1)
        zero = (magnitude == 0).nonzero().flatten()
        if record:  # g = 0 wipes a row for good: keep those rows
            self._records[name] = (norm, zero, [w[zero].clone() for w, _, _ in blocks])
        for w, a, b in blocks:
            ops.merge_(w, a, b, magnitude, norm, scaling)

    @torch.no_grad()
    def unmerge_(self, name: str, w2d: Rows, A: Rows, B: Rows, magnitude: Tensor | None, scaling: float,
                 forget: bool = True) -> None:
        """Undo merge_ of adapter `name` in place with the norm kept at merge time; forget=False keeps the record
        (to rebuild an unmerged copy of the weight). w2d, A, B: as merge_ had them."""
        if tensor_parallel.is_sharded(w2d):  # the norm and rows kept at merge time are local already
            w2d, A, B, magnitude, _ = tensor_parallel.merge_args(w2d, A, B, magnitude, None, "dora_ext unmerge")
        blocks = _blocks(w2d, A, B)
        norm, zero, saved = self._records.pop(name) if forget else self._records[name]
        # a model moved (.to) between merge and unmerge: the record follows the weight
        norm, zero = norm.to(blocks[0][0].device), zero.to(blocks[0][0].device)
        magnitude = norm if magnitude is None else magnitude.reshape(-1)
        if zero.numel():
            magnitude = magnitude.clone()
            magnitude[zero] = 1.0  # any non-zero gain: those rows are restored from the saved copy below
        for i, (w, a, b) in enumerate(blocks):
            ops.unmerge_(w, a, b, magnitude, norm, scaling)
            if zero.numel():
                w[zero] = saved[i].to(w.device)

    def adopt(self, name: str, norm: Tensor) -> None:
        """Take over a merge made without this ledger, of which only the unmerged norm is known (PEFT's own DoRA
        merge keeps just that): unmerge_ then inverts it with that norm and restores no rows."""
        norm = norm.detach().reshape(-1)
        self._records[name] = (norm, norm.new_empty(0, dtype=torch.long), [])

    def clear(self) -> None:
        self._records.clear()
