"""Reading kohya-style DoRA state dicts into the neutral form (neutral.py), checked against the target model.

Two layouts share kohya's naming (module_names.py):

* "lycoris": LyCORIS's LoCon/LoRA with dora_wd=True (lycoris/modules/locon.py: weight_list "lora_up.weight",
  "lora_down.weight", "lora_mid.weight", "alpha", "dora_scale"), kohya sd-scripts files made with the
  lycoris.kohya network, and OneTrainer's DoRA files (its "legacy_diffusers" output keeps the ".alpha" and
  ".dora_scale" suffixes: modules/util/convert/lora/convert_lora_util.py in Nerogar/OneTrainer). s = alpha / r,
  where LyCORIS already stores alpha·√r for rs_lora (LoConModule registers alpha·r/r_factor), and alpha 0 or absent
  means alpha = r (LoConModule: "if alpha == 0 or None, alpha is rank"). The dora_scale's shape says the axis:
  [out, 1, 1…] the output axis (wd_on_out=True, PEFT's), [1, in, 1…] the input axis (wd_on_out=False; OneTrainer's
  default, decompose_output_axis=False).
* "ai-toolkit": ostris/ai-toolkit's DoRA (toolkit/models/DoRA.py: lora_down, lora_up, magnitude [out], linear layers
  only, no alpha saved). Its forward adds s·B·A·x outside the gain and takes the norm of W + B·A, so it is DoRA with
  scaling 1 (exactly PEFT's at alpha = rank), which is how its files are read.

Everything else is refused by name: Tucker's lora_mid, other LyCORIS algorithms (LoHa, LoKr, OFT, full, norms),
modules without a magnitude, keys no module of the model has, and target modules where LyCORIS's adapter and
dora_ext's would differ (convolutions with groups or dilation, padding modes other than zeros).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layers import DoRALayer
from ..saving import KEY_PREFIX
from .module_names import NameTable
from .neutral import AXES, IN, OUT, ModuleAdapter

__all__ = ["FORMATS", "detect_format", "read_kohya_state"]

#: "lycoris" (LyCORIS, kohya sd-scripts, OneTrainer), "ai-toolkit", "peft" (an adapter directory)
FORMATS = ("lycoris", "ai-toolkit", "peft")

_DOWN, _UP, _MID, _ALPHA, _SCALE, _MAGNITUDE = ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha",
                                                "dora_scale", "magnitude")
_SUFFIXES = (_DOWN, _UP, _MID, _ALPHA, _SCALE, _MAGNITUDE)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def detect_format(state: dict[str, Tensor], what: str = "dora_ext.detect_format") -> str:
    """The format of a DoRA state dict, from its keys: "peft" (PEFT's `base_model.model.` keys), "lycoris"
    (`.dora_scale`), "ai-toolkit" (`.magnitude`); raises for none or both of the magnitude names."""
    if any(k.startswith(KEY_PREFIX) for k in state):
        return "peft"
    scale = any(k.endswith("." + _SCALE) for k in state)
    magnitude = any(k.endswith("." + _MAGNITUDE) for k in state)
    if scale and magnitude:
        raise ValueError(f"{what}: the state dict holds both `.dora_scale` (LyCORIS/kohya/OneTrainer) and "
                         "`.magnitude` (ai-toolkit) keys; expected one format")
    if not (scale or magnitude):
        raise ValueError(f"{what}: no DoRA magnitude key in the state dict (`.dora_scale`: LyCORIS, kohya, "
                         "OneTrainer; `.magnitude`: ai-toolkit); a plain LoRA/LoCon file has none")
    return "lycoris" if scale else "ai-toolkit"


def _group(state: dict[str, Tensor], what: str) -> dict[str, dict[str, Tensor]]:
    """{file module name: {suffix: tensor}}; refuses keys of unknown suffix and Tucker's lora_mid by name."""
    groups: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for key, t in state.items():
        suffix = next((s for s in _SUFFIXES if key.endswith("." + s)), None)
        if suffix is None:
            unknown.append(key)
            continue
        groups.setdefault(key[:-len(suffix) - 1], {})[suffix] = t
    if unknown:
        raise ValueError(f"{what}: {len(unknown)} key(s) this reader does not know: {unknown[:5]}; it reads DoRA "
                         "LoCon/LoRA modules (lora_down, lora_up, alpha, dora_scale or magnitude), not other "
                         "LyCORIS algorithms (LoHa, LoKr, OFT, full, norms)")
    tucker = sorted(f"{name}.{_MID}" for name, g in groups.items() if _MID in g)
    if tucker:
        raise ValueError(f"{what}: {tucker[:5]} are Tucker cores (LyCORIS use_tucker): the adapter is not B·A, "
                         "which no DoRA layer of dora_ext or PEFT represents; not supported")
    return groups


def _target(root: nn.Module, path: str, fmt: str, what: str) -> nn.Module:
    """The base module at `path`, refused where LyCORIS's adapter and dora_ext's would not compute the same."""
    mod = root.get_submodule(path)
    base = mod.base_layer if isinstance(mod, DoRALayer) else mod
    if isinstance(base, nn.Linear):
        return base
    if isinstance(base, _CONVS) and fmt == "lycoris":
        # LyCORIS merges the adapter into the kernel (dilation applies to it, groups split lora_down's input);
        # dora_ext and PEFT run lora_A as its own conv without dilation, over all input channels
        odd = {k: v for k, v in (("groups", base.groups), ("dilation", base.dilation),
                                 ("padding_mode", base.padding_mode))
               if v not in (1, (1,) * len(base.kernel_size), "zeros")}
        if odd:
            raise ValueError(f"{what}: module {path!r} is a {type(base).__name__} with {odd}, where LyCORIS's "
                             "adapter and a DoRA conv layer compute different things; not supported")
        return base
    kinds = "nn.Linear and nn.Conv1d/2d/3d" if fmt == "lycoris" else "nn.Linear (ai-toolkit's DoRA is linear-only)"
    raise ValueError(f"{what}: module {path!r} is a {type(base).__name__}; {fmt} DoRA modules are read for {kinds}")


def _shapes(base: nn.Module, r: int) -> tuple[tuple, tuple, int, int]:
    """(lora_down shape, lora_up shape, out, in) of a rank-r adapter on `base` (a Linear or a Conv)."""
    if isinstance(base, nn.Linear):
        return (r, base.in_features), (base.out_features, r), base.out_features, base.in_features
    ones = (1,) * len(base.kernel_size)
    return (r, base.in_channels, *base.kernel_size), (base.out_channels, r, *ones), base.out_channels, \
        base.in_channels


def _axis(key: str, shape: tuple, out_shape: tuple, in_shape: tuple | None, norm_axis: str | None, what: str) -> str:
    """The magnitude's axis from its shape (in_shape None: the format has no input axis); `norm_axis` decides when
    both fit (in = out = 1) and must agree otherwise."""
    fits = [axis for axis, s in ((OUT, out_shape), (IN, in_shape)) if shape == s]
    if not fits:
        expected = f"{out_shape} (output axis)" + ("" if in_shape is None else f" or {in_shape} (input axis)")
        raise ValueError(f"{what}: {key} has shape {shape}; the module expects {expected}")
    if len(fits) == 2:
        if norm_axis is None:
            raise ValueError(f"{what}: {key} has shape {shape}, which fits both the output and the input axis (the "
                             f"module has in = out = 1); pass norm_axis='out' or 'in'")
        return norm_axis
    if norm_axis is not None and fits[0] != norm_axis:
        raise ValueError(f"{what}: {key} has shape {shape}, the {fits[0]!r} axis, but norm_axis={norm_axis!r} was "
                         "given")
    return fits[0]


def _check_tensor(key: str, t: Tensor, what: str) -> None:
    if not t.is_floating_point():
        raise ValueError(f"{what}: {key} has dtype {t.dtype}, expected a floating-point tensor")
    if not torch.isfinite(t).all():
        raise ValueError(f"{what}: {key} holds NaN or inf values")


def read_kohya_state(state: dict[str, Tensor], model: nn.Module, *, prefixes: dict[str, str] | None = None,
                     norm_axis: str | None = None, what: str = "dora_ext.read_adapter_file"
                     ) -> dict[str, ModuleAdapter]:
    """{module path: ModuleAdapter} of a LyCORIS / kohya / OneTrainer / ai-toolkit DoRA state dict, every name
    resolved in `model` (module_names.NameTable, `prefixes`) and every shape checked against its module."""
    if norm_axis is not None and norm_axis not in AXES:
        raise ValueError(f"{what}: expected norm_axis in {AXES} or None, got {norm_axis!r}")
    fmt = detect_format(state, what)
    if fmt == "peft":
        raise ValueError(f"{what}: PEFT keys ({KEY_PREFIX}...): a PEFT adapter's alpha lives in its "
                         "adapter_config.json; pass the adapter directory")
    groups = _group(state, what)
    magnitude_key = _SCALE if fmt == "lycoris" else _MAGNITUDE
    for name, g in groups.items():
        missing = [s for s in (_DOWN, _UP, magnitude_key) if s not in g]
        if missing:
            raise ValueError(f"{what}: module {name!r} has no {missing} (a DoRA module has lora_down, lora_up and "
                             f"{magnitude_key}; plain LoRA modules are not read here)")
        if fmt == "ai-toolkit" and _ALPHA in g:
            raise ValueError(f"{what}: {name}.alpha next to a `.magnitude`: ai-toolkit's DoRA files carry no alpha; "
                             "this is no format this reader knows")
    paths = NameTable(model, prefixes, what).resolve(list(groups))
    out = {}
    for name, g in groups.items():
        path = paths[name]
        for suffix, t in g.items():
            _check_tensor(f"{name}.{suffix}", t, what)
        base = _target(model, path, fmt, what)
        down, up, mag = g[_DOWN], g[_UP], g[magnitude_key]
        r = down.shape[0] if down.dim() else 0
        down_shape, up_shape, n_out, n_in = _shapes(base, r)
        for suffix, t, shape in ((_DOWN, down, down_shape), (_UP, up, up_shape)):
            if r < 1 or tuple(t.shape) != shape:
                raise ValueError(f"{what}: {name}.{suffix} has shape {tuple(t.shape)}, the module {path!r} expects "
                                 f"{shape}")
        if fmt == "lycoris":
            ones = (1,) * (down.dim() - 2)
            axis = _axis(f"{name}.{_SCALE}", tuple(mag.shape), (n_out, 1, *ones), (1, n_in, *ones), norm_axis, what)
        else:  # ai-toolkit: m = ‖W + B·A‖ over dim 1, one per output row (toolkit/models/DoRA.py _get_weight_norm)
            axis = _axis(f"{name}.{_MAGNITUDE}", tuple(mag.shape), (n_out,), None, norm_axis, what)
        alpha = float(g[_ALPHA].reshape(-1)[0]) if _ALPHA in g and g[_ALPHA].numel() == 1 else None
        if _ALPHA in g and alpha is None:
            raise ValueError(f"{what}: {name}.alpha has shape {tuple(g[_ALPHA].shape)}, expected a scalar")
        out[path] = ModuleAdapter(down, up, alpha if alpha else float(r), mag.reshape(-1), axis)
    return out
