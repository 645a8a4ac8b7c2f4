"""dora_ext's fused DoRA arithmetic inside LyCORIS's own LoCon modules, reversibly: `patch_lycoris()` /
`unpatch_lycoris()` (or `with lycoris_patched():`), the LyCORIS counterpart of peft_patching.patch_peft.

LyCORIS 4.1 (lycoris/modules/locon.py LoConModule.forward, lycoris/functional/general.py _weight_decompose) runs a
LoCon module with weight decomposition (dora_wd=True) by rebuilding the weight every forward:

    ΔW = scalar · diag(d) · up · down        d: rank dropout's mask per output row in training, else 1
    V  = W + s·ΔW                            s = alpha / r (alpha / √r with rs_lora)
    G  = μ·(m / (‖V‖ + ε) − 1) + 1           per output row (wd_on_out) or input column; m = dora_scale,
                                             ε = finfo(dora_scale.dtype).eps, μ = the module's multiplier
    y  = base(x) + op(x, V·G − W)            op: F.linear / F.conv*d, base(x) = op(x, W) + b

with autograd through all of it, the norm included. Patched, the same y runs in low rank, with nothing [out, in]
built: G by functional.decomposed_gain (the fused norm, with the gradient LyCORIS's autograd gives it), then
    output axis: y = G ⊙ (x Wᵀ + s·(x downᵀ) upᵀ) + b   linear: ops.dora_linear (functional.linear); conv: conv_one
    input axis:  y = W(G ⊙ x) + s·up·down(G ⊙ x) + b    functional.linear_in / conv_in
where the fused forms take a gain as magnitude G over a norm of ones (g = m / n is then G exactly). Losses and
gradients (lora_up, lora_down, dora_scale, a use_scalar scalar, x, the base bias) are LyCORIS's to rounding,
random draws included: module dropout and rank dropout draw the same numbers in the same order.

A module runs LyCORIS's own forward, unchanged, where the patch cannot reproduce it exactly: no weight
decomposition, bypass mode (LyCORIS's bypass forward has no DoRA term), Tucker (lora_mid), a base that is not
exactly nn.Linear / nn.Conv1d/2d/3d, grouped or dilated convolutions, a padding mode other than zeros, a trainable
base weight, another forward between this module and its base layer, extra forward arguments, devices or dtypes
that do not match. `lycoris_fusion(network)` says which path each module takes and why; each module counts its
calls per path (`dora_ext_calls`).

LyCORIS binds a module's forward when the network is applied (`network.apply_to()` sets `layer.forward =
lora.forward`), so patch before applying, or name the applied networks: `patch_lycoris(network)`.
"""

from __future__ import annotations

import contextlib
import threading
import types

import torch
from torch import Tensor, nn

from . import functional
from .activation_policy import DEFAULT_MODE, check_mode

__all__ = ["LYCORIS_TESTED", "CALLS_ATTR", "MODE_ATTR", "patch_lycoris", "unpatch_lycoris", "lycoris_patched",
           "lycoris_fusion"]

#: LyCORIS versions whose LoConModule forward this module reproduces (>= first, < second)
LYCORIS_TESTED = ("4.1.3", "4.2.0")

#: the attribute (a dict) where each LoCon module counts its forwards per path: {"fused": n, "lycoris": n}
CALLS_ATTR = "dora_ext_calls"
#: the attribute holding a module's activation-memory mode: patch_lycoris's at its first fused forward, then kept
MODE_ATTR = "dora_ext_activation_memory"

_BASES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # exactly these classes: a subclass may change forward

_LOCK = threading.RLock()
_patch_on = False
_mode: str | None = DEFAULT_MODE  # patch_lycoris's activation-memory mode for the fused linear op
_lycoris_forward = None  # LoConModule's own forward (set at the first patch, kept: bound dispatchers outlive it)


def _locon_class() -> type:
    """LyCORIS's LoConModule, after checking the installed LyCORIS is a tested one."""
    try:  # LyCORIS is optional: importing dora_ext never needs it
        from lycoris.modules.locon import LoConModule
    except ImportError as exc:
        raise ImportError("dora_ext.patch_lycoris: needs LyCORIS installed (pip install 'lycoris-lora==4.1.3')") \
            from exc
    from importlib.metadata import version

    from packaging.version import Version

    low, high, got = *LYCORIS_TESTED, version("lycoris-lora")
    if not Version(low) <= Version(got) < Version(high):
        raise RuntimeError(f"dora_ext.patch_lycoris: reproduces LyCORIS's LoCon DoRA forward as of lycoris-lora "
                           f">= {low}, < {high}; got lycoris-lora {got}")
    return LoConModule


# ---------------------------------------------------------------------------------------------- which path
def _is_own_forward(fn, layer: nn.Module) -> bool:
    """fn is `layer`'s own class forward, bound to it: nothing (another wrapper, a hook) sits in between."""
    return getattr(fn, "__self__", None) is layer and getattr(fn, "__func__", None) is type(layer).forward


def _module_refusal(lora: nn.Module) -> str | None:
    """Why this LoCon module cannot run fused (its configuration), or None."""
    if not lora.wd:
        return "no weight decomposition (dora_wd=False)"
    if lora.bypass_mode:
        return "bypass_mode (LyCORIS's bypass forward adds plain LoRA, no DoRA term)"
    if lora.tucker:
        return "Tucker decomposition (lora_mid)"
    layer = lora.org_module[0]
    if type(layer) not in _BASES:
        return f"base layer {type(layer).__qualname__} (fused: exactly nn.Linear, nn.Conv1d/2d/3d)"
    if type(layer) is not nn.Linear:  # a convolution
        if layer.groups != 1:
            return f"grouped convolution (groups={layer.groups})"
        if any(d != 1 for d in layer.dilation):
            return f"dilated convolution (dilation={layer.dilation})"
        if layer.padding_mode != "zeros":  # LyCORIS's ΔW conv pads with zeros, the base layer its own way
            return f"padding_mode={layer.padding_mode!r}"
    if layer.weight.requires_grad:
        return "trainable base weight (LyCORIS gives it the base output's gradient; the fused ops keep W frozen)"
    if not _is_own_forward(lora.org_forward, layer):
        return "another forward between this module and its base layer (stacked wrappers)"
    return None


def _call_refusal(lora: nn.Module, x, args, kwargs) -> str | None:
    """Why this call cannot run fused (its arguments), or None."""
    if args or kwargs:
        return "extra forward arguments"
    if not isinstance(x, Tensor) or not x.is_floating_point():
        return "input is not a floating-point tensor"
    weight = lora.org_module[0].weight
    tensors = (weight, lora.lora_up.weight, lora.lora_down.weight, lora.dora_scale)
    if any(t.device != x.device for t in tensors):
        return "tensors on different devices"
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        return f"input dtype {x.dtype} differs from the weight's {weight.dtype} (outside autocast)"
    return None


def lycoris_fusion(model: nn.Module) -> dict[str, str]:
    """{lora_name: "fused", or why LyCORIS's own forward runs} for every LyCORIS LoCon module in `model` (a
    LycorisNetwork, or any module holding them), as patch_lycoris would run them now (a call can still fall back
    for its arguments: see each module's `dora_ext_calls`). Needs LyCORIS."""
    locon = _locon_class()
    return {m.lora_name: _module_refusal(m) or "fused" for m in model.modules() if isinstance(m, locon)}


def _count(lora: nn.Module, path: str) -> None:
    calls = lora.__dict__.setdefault(CALLS_ATTR, {"fused": 0, "lycoris": 0})
    calls[path] += 1


# ------------------------------------------------------------------------------------------ the forward
def _forward(self, x, *args, **kwargs):
    """LoConModule.forward while patched, and the forward every module applied meanwhile keeps bound: fused where
    nothing refuses, LyCORIS's own forward otherwise (always, once unpatched)."""
    if _patch_on and _module_refusal(self) is None and _call_refusal(self, x, args, kwargs) is None:
        if self.module_dropout and self.training:  # LyCORIS's draw, first, as its forward makes it
            if torch.rand(1) < self.module_dropout:
                _count(self, "fused")
                return self.org_forward(x)
        _count(self, "fused")
        return _fused_forward(self, x)
    _count(self, "lycoris")
    return _lycoris_forward(self, x, *args, **kwargs)


def _effective_up(lora: nn.Module, x: Tensor) -> Tensor:
    """scalar · diag(d) · up, LyCORIS's make_weight folded into the up factor: rank dropout's mask d (one draw of
    torch.rand(out) on x's device, in training, kept with probability 1 − p, rescaled to mean 1 with
    rank_dropout_scale) scales ΔW's output rows, i.e. up's rows."""
    up = lora.lora_up.weight
    if lora.training and lora.rank_dropout:
        dtype = torch.promote_types(up.dtype, lora.lora_down.weight.dtype)  # ΔW's, which LyCORIS's mask takes
        drop = (torch.rand(up.shape[0], device=x.device) > lora.rank_dropout).to(dtype)
        if lora.rank_dropout_scale:
            drop /= drop.mean()
        up = up * drop.view(-1, *[1] * (up.dim() - 1))
    return up * lora.scalar.to(up.device)


def _fused_forward(lora: nn.Module, x: Tensor) -> Tensor:
    """LoConModule.forward (weight decomposition, not bypass) in low rank: the module docstring's formulas."""
    layer = lora.org_module[0]
    weight, bias = layer.weight, layer.bias
    down, up = lora.lora_down.weight, _effective_up(lora, x)
    scaling = float(lora.scale)
    axis = "out" if lora.wd_on_out else "in"
    gain = functional.decomposed_gain(weight, down, up, scaling, lora.dora_scale, axis=axis,
                                      multiplier=lora.multiplier, eps=torch.finfo(lora.dora_scale.dtype).eps)
    unit = torch.ones_like(gain)  # the fused forms compute g = m / n: m = G over n = 1 is G exactly
    if axis == "out":
        mode = lora.__dict__.setdefault(MODE_ATTR, _mode)
        adapter = functional.Adapter(down, up, gain, scaling, 0.0, norm=unit, activation_memory=mode)
        if lora.module_type == "linear":
            return functional.linear(x, weight, bias, [adapter], lora.training)
        return functional.conv(x, lora.org_forward(x), weight, bias, functional.conv_spec(layer), [adapter],
                               lora.training)
    # input axis: the gain scales the input, in the adapter's dtype as dora_ext's own input-axis layers hold it
    adapter = functional.Adapter(down, up, gain.to(down.dtype), scaling, 0.0, norm=unit.to(down.dtype),
                                 norm_axis="in")
    if lora.module_type == "linear":
        return functional.linear_in(x, weight, bias, adapter)
    return functional.conv_in(x, lora.org_forward, adapter, functional.conv_spec(layer))


# ------------------------------------------------------------------------------------------ patch / unpatch
def _rebind(network: nn.Module, locon: type) -> None:
    """Point forwards LyCORIS bound before the patch (apply_to: `layer.forward = lora.forward`; a stacked wrapper's
    `org_forward`) at the dispatcher, so applied modules in `network` follow the patch too."""
    def rebound(fn):
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, locon) and getattr(fn, "__func__", None) is _lycoris_forward:
            return types.MethodType(_forward, owner)
        return fn

    for lora in [m for m in network.modules() if isinstance(m, locon)]:
        layer = lora.org_module[0]
        if "forward" in layer.__dict__:
            layer.forward = rebound(layer.__dict__["forward"])
        lora.org_forward = rebound(lora.org_forward)


def patch_lycoris(*networks: nn.Module, activation_memory: str | None = DEFAULT_MODE) -> None:
    """From now on LyCORIS's LoCon modules with weight decomposition (dora_wd=True) run dora_ext's fused
    arithmetic where they can (the module docstring; `lycoris_fusion` tells), LyCORIS's own forward elsewhere.
    Affects the modules applied (`network.apply_to()`) from now on, and those already applied in `networks`.
    activation_memory: what the fused linear op keeps for backward (dora_ext.activation_policy; None: the
    context's mode), for the modules that first run fused from now on (a module keeps the mode it first ran with,
    in its `dora_ext_activation_memory`). Idempotent; undo with unpatch_lycoris()."""
    global _lycoris_forward, _patch_on, _mode
    mode = check_mode(activation_memory, "dora_ext.patch_lycoris", allow_none=True)
    locon = _locon_class()
    with _LOCK:
        own = locon.__dict__["forward"]
        if own is not _forward:
            _lycoris_forward = own
            locon.forward = _forward
        _mode, _patch_on = mode, True
        for network in networks:
            _rebind(network, locon)


def unpatch_lycoris() -> None:
    """Undo patch_lycoris(): LoConModule's own forward again, for new and already applied modules alike (those
    applied while patched keep the dispatcher bound, which then always calls LyCORIS's forward)."""
    global _patch_on
    with _LOCK:
        _patch_on = False
        if _lycoris_forward is not None:
            locon = _locon_class()
            if locon.__dict__["forward"] is _forward:
                locon.forward = _lycoris_forward


@contextlib.contextmanager
def lycoris_patched(*networks: nn.Module, activation_memory: str | None = DEFAULT_MODE):
    """patch_lycoris(*networks, activation_memory=...) for the duration of a with-block (restores the previous
    state, patched or not, and the previous mode)."""
    global _mode
    was, mode = _patch_on, _mode
    patch_lycoris(*networks, activation_memory=activation_memory)
    try:
        yield
    finally:
        _mode = mode
        if not was:
            unpatch_lycoris()
