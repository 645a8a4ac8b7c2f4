"""What the fused ops (dora_linear, dora_rescale) keep from forward to backward for the magnitude gradient
Σ_t δ ⊙ acc / n, and where that choice comes from.

Where the output can serve (no bias, no dropout: out = g ⊙ acc; a zero in m makes backward recompute acc) an op
holds its own output, which costs nothing while a later op of the forward saves it too (SiLU, the gate product,
attention's v); the modes differ for an output that dies during the forward (a residual add, rotary or a copy
consumed it). Every mode gives the same gradients (exact: a recompute repeats the forward's own products).

    "fast" (default): keep the output, never recompute: LoRA's step time; one [T, out] more than LoRA where the
        output dies in the forward (Llama-style stack, CPU fp32: 1.20× PEFT LoRA's peak memory at 0.99× its time).
    "balanced": free a dying output where the recompute is cheap (in_features ≤ out_features: q/k/v/o, gate/up)
        and recompute acc in backward with one [T, in]×[in, out] GEMM; keep it elsewhere (down_proj).
        1.04× LoRA's peak memory at 1.10× its step time.
    "min_memory": free every dying output, and where the output cannot serve (dora_linear with a bias or dropout)
        keep nothing [T, out] either: acc is recomputed. LoRA's peak memory (1.00×) at 1.18× its step time.
    "acc": keep the pre-scale sum acc [T, out] itself, one per layer, never the output: the most memory. Its
        magnitude gradient skips the output's rounding (at most one rounding of a bf16/fp16 output less); it is
        the form the others are checked against.

Elsewhere (a bias or dropout, outside "min_memory"; a layer whose acc cannot be rebuilt) acc is kept. Under
saved-tensor hooks (non-reentrant activation checkpointing, offloading) the output is saved through them in every
mode but "acc", whatever the mode: checkpointing then drops it like any activation. An output modified in place is
detected (version counter) and acc recomputed, in every mode.

The choice belongs to the model: DoRAConfig(activation_memory=...) for dora_ext's own layers, the
`activation_memory=` argument of dora_ext.from_peft / patch_peft on the PEFT route, and of the ops themselves per
call. None there means the context's mode: `with activation_memory(mode):` sets it for the block, in this thread or
asyncio task only (a contextvars.ContextVar); "fast" outside any block. The mode is read once per op call, in the
forward; backward only reads what the forward decided.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref

import torch
from torch import Tensor

from . import torch_private

__all__ = ["ACTIVATION_MODES", "DEFAULT_MODE", "activation_memory", "set_activation_memory", "current_mode",
           "check_mode", "enter_call", "exit_call", "keep_for_magnitude", "magnitude_operand"]

ACTIVATION_MODES = ("fast", "balanced", "min_memory", "acc")
DEFAULT_MODE = "fast"
#: earlier names, refused with the new one in the message
_RENAMED = {"output": "fast", "low": "min_memory"}

#: The mode of calls that do not name one: per thread and per asyncio task, never process-wide.
_MODE: contextvars.ContextVar[str] = contextvars.ContextVar("dora_ext_activation_memory", default=DEFAULT_MODE)


def check_mode(mode, where: str, *, allow_none: bool = False):
    """`mode` if it is one of ACTIVATION_MODES (or None where allowed), else a ValueError naming `where`."""
    if mode in ACTIVATION_MODES or (allow_none and mode is None):
        return mode
    renamed = f" ({mode!r} is now called {_RENAMED[mode]!r})" if isinstance(mode, str) and mode in _RENAMED else ""
    none = " or None (the context's mode)" if allow_none else ""
    raise ValueError(f"{where}: expected activation_memory one of {ACTIVATION_MODES}{none}, got {mode!r}{renamed}")


def current_mode() -> str:
    """The mode of op calls that do not name one, here (this thread / task): the innermost activation_memory block's,
    else "fast"."""
    return _MODE.get()


def set_activation_memory(mode: str) -> str:
    """Set the mode of op calls that do not name one for the rest of the current context (this thread or asyncio
    task; other threads keep theirs); returns the previous one. Prefer the model's own choice (DoRAConfig,
    from_peft, patch_peft) or a with-block (activation_memory)."""
    previous = _MODE.get()
    _MODE.set(check_mode(mode, "dora_ext.ops.set_activation_memory"))
    return previous


@contextlib.contextmanager
def activation_memory(mode: str):
    """Within the block, op calls that do not name a mode (and models whose mode is None) use `mode`; only in this
    thread or asyncio task."""
    token = _MODE.set(check_mode(mode, "dora_ext.ops.activation_memory"))
    try:
        yield
    finally:
        _MODE.reset(token)


def enter_call(mode: str | None, where: str):
    """For one op call that names its mode: make it the context's until exit_call(token) (setup_context, which sees
    only the op's tensors, reads it there). None: nothing to do (the context's mode applies). Under torch.compile
    the mode is not read (a traced op keeps acc), so nothing is set there either."""
    if mode is None or torch.compiler.is_compiling():
        return None
    return _MODE.set(check_mode(mode, where))


def exit_call(token) -> None:
    if token is not None:
        _MODE.reset(token)


class _KeptOutput:
    """The op's output held for backward as a detached alias (same storage and version counter, no reference to the
    graph, so no cycle). Where the mode allows, a finalizer on the output drops the alias when the output dies
    outside a backward pass: then no later op of the forward saved it (a residual add, rotary, a copy consumed it)
    and holding it would be the layer's own [T, out]; backward recomputes acc instead. An output that dies inside
    backward (its consumer's saved tensors being released) stays held: backward is about to read it."""

    __slots__ = ("alias", "version", "__weakref__")

    def __init__(self, out: Tensor, free_when_dead: bool):
        self.alias, self.version = out.detach(), torch_private.version(out)
        if free_when_dead:  # (not at interpreter exit: nothing to free for a backward that never comes)
            weakref.finalize(out, _KeptOutput._output_died, weakref.ref(self)).atexit = False

    @staticmethod
    def _output_died(ref) -> None:
        kept = ref()
        if kept is not None and not _in_backward():
            kept.alias = None

    def get(self) -> Tensor | None:
        """The alias if still held and unmodified, else None."""
        out = self.alias
        return out if out is not None and torch_private.version(out) == self.version else None


def _saved_tensors_hooked() -> bool:
    """Whether saved-tensor hooks are active (activation checkpointing without reentrancy, the default of
    transformers' gradient_checkpointing_enable; offloading with save_on_cpu): what backward reads must then go
    through them (ctx.save_for_backward), not be held on ctx behind their back, or checkpointing keeps every
    layer's output for the whole step."""
    return torch_private.saved_tensors_hooked()


class _ZeroFlag:
    """Whether the magnitude has a zero entry, computed in the forward without waiting for the device and read in
    backward (a row with m = 0 has out = 0, which carries no acc: acc is then recomputed). bool() in the forward
    would stop the host once per layer until the device caught up, emptying its queue; in backward the answer has
    long been there. CUDA: the count goes to pinned host memory by a non-blocking copy behind an event."""

    __slots__ = ("nonzero", "numel", "event")

    def __init__(self, magnitude: Tensor):
        # The count of non-zero entries, compared on the host in get(): count_nonzero is one op (on the CPU ~1 µs
        # against 4.5 µs for (m == 0).any()); NaN counts as non-zero and -0.0 as zero, as for m == 0.
        nonzero = torch.count_nonzero(magnitude.detach())
        self.numel, self.event = magnitude.numel(), None
        if nonzero.device.type == "cuda":
            host = torch.empty((), dtype=nonzero.dtype, pin_memory=True)
            host.copy_(nonzero, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
            nonzero = host
        self.nonzero = nonzero

    def get(self) -> bool:
        """Whether the magnitude has a zero entry."""
        if self.event is not None:
            self.event.synchronize()
        return int(self.nonzero) < self.numel


class _NothingKept:
    """A layer's "min_memory" stand-in for a kept output it cannot use (bias, dropout): backward recomputes acc."""

    @staticmethod
    def get() -> None:
        return None


def _in_backward() -> bool:
    """Whether this thread is running a backward pass (the autograd engine's current graph task)."""
    return torch_private.in_backward()


def _free_when_dead(in_features: int, out_features: int) -> bool:
    """Whether the current mode frees a layer's kept output once nothing else holds it (then backward recomputes
    acc with one [T, in]×[in, out] GEMM): "min_memory" always; "balanced" where in_features ≤ out_features (that
    GEMM costs at most 2·out FLOPs per freed element)."""
    mode = _MODE.get()
    return mode == "min_memory" or (mode == "balanced" and in_features <= out_features)


def keep_for_magnitude(ctx, needed: bool, out: Tensor, acc: Tensor, in_features: int, magnitude: Tensor, *,
                       serves: bool, recomputable: bool, closure: bool = False) -> Tensor | None:
    """Decide what backward gets for the magnitude gradient (the module docstring), if `needed`; returns what the
    op saves in acc's slot. serves: out = g ⊙ acc (no bias, no dropout) where m ≠ 0, which backward learns from
    _ZeroFlag (a row with m = 0 has out = 0: acc is then recomputed); recomputable: backward can rebuild acc;
    closure: it would rebuild it through a Python closure holding x, which saved-tensor hooks cannot see.

    The output serves when the mode allows it, and always under saved-tensor hooks: non-reentrant checkpointing
    re-runs the forward in backward, outside the caller's activation_memory block, and the re-run must save the same
    tensors, so there the choice never reads the mode. Under hooks the output goes into acc's slot (the hooks drop
    or move it like any activation; its version is recorded, so an alias handed back modified in place is not
    used); elsewhere it is held on ctx (_KeptOutput). In "min_memory" a layer whose output cannot serve keeps
    nothing [T, out] either where acc can be rebuilt. ctx.kept_output: backward calls magnitude_operand."""
    ctx.kept_output, ctx.kept, ctx.out_version, ctx.zero_magnitude = False, None, None, None
    if not needed:
        return None
    hooked = _saved_tensors_hooked()
    recomputable = recomputable and not (closure and hooked)
    mode = None if hooked else _MODE.get()  # (under hooks the mode is never read: see above)
    if serves and recomputable and (hooked or mode != "acc"):
        ctx.kept_output, ctx.zero_magnitude = True, _ZeroFlag(magnitude)
        if hooked:
            ctx.out_version = torch_private.version(out)
            return out.detach()
        ctx.kept = _KeptOutput(out, _free_when_dead(in_features, out.shape[-1]))
        return None
    if recomputable and mode == "min_memory":
        ctx.kept_output, ctx.kept = True, _NothingKept
        return None
    return acc


def magnitude_operand(ctx, saved: Tensor | None, x: Tensor | None, weight: Tensor | None, lora_A: Tensor | None,
                      lora_B: Tensor, lora_u: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, bool]:
    """(the [T, out] operand of the magnitude gradient, whether it is the output): the kept output (held on ctx,
    or `saved` through saved-tensor hooks) if it is still there and unmodified and m has no zero, else
    acc = x Wᵀ + s·(x Aᵀ) Bᵀ recomputed in `dtype` as the forward computed it (x Wᵀ by ctx.base_fn where the base
    layer has no dense weight)."""
    out = ctx.kept.get() if ctx.kept is not None else (
        saved if saved is not None and torch_private.version(saved) == ctx.out_version else None)
    if out is not None and not (ctx.zero_magnitude is not None and ctx.zero_magnitude.get()):
        return out.reshape(-1, out.shape[-1]), True
    x2 = None if x is None else x.reshape(-1, x.shape[-1]).to(dtype)
    if weight is None:
        with torch.no_grad():
            base = ctx.base_fn()
        base = base.reshape(-1, base.shape[-1]).to(dtype)
    else:
        base = x2 @ weight.to(dtype).T
    u = lora_u if lora_u is not None else x2 @ lora_A.to(dtype).T
    return torch.addmm(base, u.to(dtype), lora_B.to(dtype).T, alpha=ctx.scaling), False
