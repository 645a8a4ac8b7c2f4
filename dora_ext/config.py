"""DoRAConfig: PEFT 0.21 LoraConfig(use_dora=True) knobs, PEFT's target matching, and adapter_config.json I/O."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from torch import nn

import torch

from .activation_policy import check_mode
from .variants import DoRA, KINDS, Variant, variant_for

__all__ = ["DoRAConfig", "ALL_LINEAR", "VARIANTS", "EDORA_PEFT_TYPE", "NORM_AXES", "check_norm_axis"]

#: where a DoRA adapter takes its norm of W + s·B·A: "out", one norm and gain per output row (PEFT's DoRA, the
#: paper's); "in", one per input column (a convolution: per input channel), LyCORIS's `wd_on_out=False`
NORM_AXES = ("out", "in")

#: "dora" (Liu et al. 2024, PEFT's use_dora), "lora" (plain LoRA; with dynamic_rank), "edora" (Nasiri & Garraghan)
VARIANTS = KINDS

#: target_modules shorthand (PEFT's INCLUDE_LINEAR_LAYERS_SHORTHAND): every Linear/Conv1D but the output head.
ALL_LINEAR = "all-linear"

#: peft_type of dora_ext's EDoRA files. PEFT looks it up in its own table and fails with `KeyError: <this value>`,
#: so the value itself tells a PEFT user what to do ("DORA_EXT", the older value, is still read).
EDORA_PEFT_TYPE = ("DORA_EXT (an EDoRA adapter of dora_ext, which PEFT cannot load: load it with "
                   "dora_ext.load_adapter, or export a PEFT DoRA copy with dora_ext.save_adapter(..., as_dora=True))")
_EDORA_PEFT_TYPES = (EDORA_PEFT_TYPE, "DORA_EXT")

#: init_lora_weights values whose adapters are fully described by their saved tensors. The others rewrite the base
#: weight (pissa, olora, corda, lora_ga), replace it (loftq), derive it from data (eva) or are another variant
#: (mica): loading their files onto the original base model would be silently wrong, so they are refused by name.
PLAIN_INITS = (True, False, "gaussian", "orthogonal")

#: adapter_dtype given as a string (as configs written by hand or in YAML do)
_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
                "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float64": torch.float64, "fp64": torch.float64, "double": torch.float64}

# adapter_config.json fields this project writes or accepts. Anything else PEFT may write that changes the adapter's
# math (a different init that rewrites W, layer replication, extra trainable modules…) is refused on load.
_PEFT_NEUTRAL_DEFAULTS = {
    "bias": "none",
    "lora_bias": False,
    "modules_to_save": None,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "megatron_config": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
    "velora_config": None,
    "arrow_config": None,
}


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"DoRAConfig: {msg}")


@dataclass
class DoRAConfig:
    """The knobs of PEFT's LoraConfig(use_dora=True) that define a DoRA adapter (same names, defaults, matching).

    target_modules: a list (exact module names or name suffixes after a "."), a str (a regex that must match a
    whole module name), or "all-linear". exclude_modules: the same rules, checked first. layers_to_transform (an
    int or a list of ints; a list target_modules only) keeps the suffix-matched modules of those layer indices:
    the index after `layers_pattern` (a str or list of str) in the name, or after the first "<name>." segment
    when there is no pattern (PEFT's check_target_module_exists). rank_pattern /
    alpha_pattern: {regex: value}, matched against the end of a module name, first match wins. fan_in_fan_out:
    the base weight is stored [in, out] (transformers Conv1D sets it automatically, as PEFT does).
    adapter_dtype: dtype of new adapter parameters; None = float32 for fp16/bf16 bases (PEFT's default
    autocast_adapter_dtype=True), else the base dtype. It is not saved.
    activation_memory: what the fused forward keeps for backward, a runtime choice that is not saved either:
    "fast" (LoRA's step time; one [T, out] per layer more than LoRA where the output dies in the forward),
    "balanced", "min_memory" (LoRA's memory, a recompute in backward) or "acc"; None: the context's mode
    (`with dora_ext.ops.activation_memory(mode):`). All give the same gradients (dora_ext.activation_policy).
    norm_axis: "out" (PEFT's DoRA: one norm and gain per output row) or "in" (LyCORIS's wd_on_out=False: one per
    input column, a convolution's per input channel; W_eff = (W + s·B·A)·diag(m / ‖W + s·B·A‖_col)). "in" needs
    variant "dora" without dynamic rank and dropout 0 (LyCORIS ignores dropout on its DoRA path), targets nn.Linear,
    transformers Conv1D and nn.Conv1d/2d/3d with groups=1, and is not a PEFT adapter: save_adapter refuses it.

    The family (Linear/Conv1D targets only, except plain "dora"): variant="edora" (frozen SVD factors, trainable
    r×r R initialised N(0, edora_sigma²), and the magnitude); variant="lora" (no magnitude); dynamic_rank=True
    (with "dora" or "lora"): each layer starts from r₀ = ⌈1.5·r⌉ gated rank-1 components, pruned by a
    DynamicRankAllocator to an average rank r; scaling alpha/r₀ stays fixed while components are pruned.
    """

    r: int = 8
    alpha: float | None = None  # None: lora_alpha if given, else 8 (PEFT's default)
    dropout: float | None = None  # None: lora_dropout if given, else 0.0
    use_rslora: bool = False
    target_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    adapter_dtype: object = None
    variant: str = "dora"
    dynamic_rank: bool = False
    edora_sigma: float = 1e-5
    activation_memory: str | None = "fast"
    norm_axis: str = "out"
    # PEFT's LoraConfig names, accepted so a PEFT user's keyword arguments work unchanged
    lora_alpha: dataclasses.InitVar[float | None] = None
    lora_dropout: dataclasses.InitVar[float | None] = None

    def __post_init__(self, lora_alpha=None, lora_dropout=None):
        self.alpha = _alias(self.alpha, lora_alpha, "alpha", "lora_alpha", 8)
        self.dropout = _alias(self.dropout, lora_dropout, "dropout", "lora_dropout", 0.0)
        self.adapter_dtype = _adapter_dtype(self.adapter_dtype)
        self.variant_object()  # raises for a kind or combination that does not exist (dora_ext.variants)
        _check(isinstance(self.edora_sigma, (int, float)) and math.isfinite(self.edora_sigma) and
               self.edora_sigma >= 0, f"expected a finite edora_sigma >= 0, got {self.edora_sigma!r}")
        check_mode(self.activation_memory, "DoRAConfig", allow_none=True)
        check_rank(self.r, "DoRAConfig", "r")
        check_alpha(self.alpha, "DoRAConfig")
        check_dropout(self.dropout, "DoRAConfig")
        check_norm_axis(self.norm_axis, self.variant_object(), self.dropout, "DoRAConfig")
        _check(self.target_modules is not None, "expected target_modules (module names, suffixes, a regex or "
               f"{ALL_LINEAR!r}), got None")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                setattr(self, name, sorted(value))
            value = getattr(self, name)
            _check(value is None or isinstance(value, str) or
                   (isinstance(value, list) and all(isinstance(v, str) for v in value)),
                   f"expected {name} as a str or a list of str, got {value!r}")
        self._check_layers()
        for key, rank in self.rank_pattern.items():
            check_rank(rank, "DoRAConfig", f"rank_pattern[{key!r}]")
        for key, alpha in self.alpha_pattern.items():
            check_alpha(alpha, "DoRAConfig", f"alpha_pattern[{key!r}]")

    def _check_layers(self) -> None:
        """LoraConfig's rules for layers_to_transform / layers_pattern (peft/tuners/lora/config.py __post_init__)."""
        layers, pattern = self.layers_to_transform, self.layers_pattern
        _check(layers is None or (isinstance(layers, int) and not isinstance(layers, bool)) or
               (isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)),
               f"expected layers_to_transform as an int or a list of int, got {layers!r}")
        _check(pattern is None or isinstance(pattern, str) or
               (isinstance(pattern, list) and all(isinstance(p, str) for p in pattern)),
               f"expected layers_pattern as a str or a list of str, got {pattern!r}")
        if isinstance(self.target_modules, str):
            _check(layers is None and pattern is None, "layers_to_transform and layers_pattern need target_modules "
                   f"as a list (a str is a regex or {ALL_LINEAR!r}), got target_modules={self.target_modules!r}")
        _check(not pattern or layers is not None, f"layers_pattern={pattern!r} needs layers_to_transform")

    # ------------------------------------------------------------------------------------------- target matching
    def is_excluded(self, key: str) -> bool:
        return _matches(self.exclude_modules, key) if self.exclude_modules else False

    def is_target(self, key: str) -> bool:
        """PEFT's check_target_module_exists (tuners_utils.py) for the fields DoRAConfig has: an exact name in the
        list is a target whatever its layer; a suffix match must also be in layers_to_transform."""
        if self.is_excluded(key) or not _matches(self.target_modules, key):
            return False
        if isinstance(self.target_modules, str) or key in self.target_modules:
            return True
        return self._in_layers(key)

    def _in_layers(self, key: str) -> bool:
        layers = self.layers_to_transform
        if layers is None or layers == []:
            return True
        if not self.layers_pattern:  # the first numbered segment: `a.layers.3.x` -> 3, never a nested expert index
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            patterns = [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern
            match = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key))), None)
        if match is None:
            return False
        index = int(match.group("idx"))
        return index == layers if isinstance(layers, int) else index in layers

    def rank_for(self, key: str) -> int:
        return self.rank_pattern.get(_pattern_key(self.rank_pattern, key), self.r)

    def alpha_for(self, key: str) -> float:
        return self.alpha_pattern.get(_pattern_key(self.alpha_pattern, key), self.alpha)

    def variant_object(self) -> Variant:
        """The variant object every adapter of this config gets (dora_ext.variants)."""
        return variant_for(self.variant, self.dynamic_rank, "dora_ext.DoRAConfig")

    def layer_rank_for(self, key: str) -> int:
        """The rank a layer is built with: rank_for, or r₀ = ⌈1.5·r⌉ components under dynamic rank (Mao et al.)."""
        r = self.rank_for(key)
        return math.ceil(1.5 * r) if self.dynamic_rank else r

    def resolve_all_linear(self, model: nn.Module, linear_types: tuple) -> "DoRAConfig":
        """A copy whose "all-linear" became a list matching every Linear/Conv1D module but the output head, as PEFT's
        _maybe_include_all_linear_layers: a name suffix where every module of that suffix is one of them (a short
        list, as PEFT's _find_minimal_target_modules writes), else the full names (the head, or a non-linear module,
        may share the suffix)."""
        if not (isinstance(self.target_modules, str) and self.target_modules.lower() == ALL_LINEAR):
            return self
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        # Layers adapted already (dora_ext's or PEFT's: a base_layer next to lora_* containers) count by their own
        # name, never by the linears inside them (base_layer, lora_A.<adapter>), so adding an adapter to an adapted
        # model targets the same layers.
        wrappers = {name for name, mod in model.named_modules()
                    if name and hasattr(mod, "base_layer") and hasattr(mod, "lora_magnitude_vector")}
        targets = set()
        for name, mod in model.named_modules():
            if not name or not isinstance(mod, linear_types) or mod is head:
                continue
            parts = name.split(".")
            owner = next((".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in wrappers), None)
            if owner is None:
                targets.add(name)
            elif name == owner + ".base_layer":
                targets.add(owner)
        by_suffix: dict[str, set[str]] = {}
        for name in targets:
            by_suffix.setdefault(name.rsplit(".", 1)[-1], set()).add(name)
        names = set()
        for suffix, members in by_suffix.items():
            holders = {n for n, _ in model.named_modules() if n == suffix or n.endswith("." + suffix)}
            names.update([suffix] if holders == members else members)
        return dataclasses.replace(self, target_modules=sorted(names))

    # ----------------------------------------------------------------------------------------- PEFT config files
    def to_peft_dict(self, base_model_name_or_path: str | None = None) -> dict:
        """The adapter_config.json PEFT's LoraConfig.from_pretrained reads: peft_type LORA with use_dora true (DoRA)
        or false (LoRA). EDoRA has no PEFT equivalent: its peft_type is "DORA_EXT", which PEFT refuses by name
        instead of silently dropping R (export it with save_adapter(..., as_dora=True) for PEFT)."""
        if self.norm_axis != "out":
            raise ValueError(f"DoRAConfig.to_peft_dict: norm_axis={self.norm_axis!r} has no PEFT adapter_config.json "
                             "(PEFT's DoRA norm is per output row; a PEFT loader would apply it wrongly)")
        extra = {}
        if self.variant == "edora":
            extra = {"dora_ext_variant": "edora", "edora_sigma": self.edora_sigma}
        return {
            "peft_type": EDORA_PEFT_TYPE if self.variant == "edora" else "LORA",
            **extra,
            "task_type": None,
            "base_model_name_or_path": base_model_name_or_path,
            "inference_mode": True,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": float(self.dropout),
            "use_rslora": self.use_rslora,
            "use_dora": self.variant != "lora",
            "target_modules": self.target_modules,
            "exclude_modules": self.exclude_modules,
            "layers_to_transform": self.layers_to_transform,
            "layers_pattern": self.layers_pattern,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "fan_in_fan_out": self.fan_in_fan_out,
            "init_lora_weights": True,
            **_PEFT_NEUTRAL_DEFAULTS,
        }

    @classmethod
    def from_lora_config(cls, config) -> "DoRAConfig":
        """The DoRAConfig of a PEFT LoraConfig (use_dora=True: DoRA; use_dora=False: plain LoRA), refusing what
        dora_ext does not implement by name, as for a saved adapter_config.json."""
        d = {k: (v.value if hasattr(v, "value") else v) for k, v in config.to_dict().items()}  # enums -> str
        return cls.from_peft_dict(d, f"{type(config).__name__}")

    @classmethod
    def from_peft_dict(cls, d: dict, source: str = "adapter config") -> "DoRAConfig":
        """Parse a PEFT adapter_config.json dict; anything that is not a plain DoRA adapter is refused by name."""
        if not isinstance(d, dict):
            raise ValueError(f"DoRAConfig: expected a JSON object in {source}, got {type(d).__name__}")
        peft_type = d.get("peft_type")
        if peft_type == "LORA":
            variant = "dora" if d.get("use_dora") else "lora"
        elif peft_type in _EDORA_PEFT_TYPES and d.get("dora_ext_variant") in VARIANTS:
            variant = d["dora_ext_variant"]
        else:
            raise ValueError(f"DoRAConfig: {source} has peft_type={peft_type!r}; dora_ext reads PEFT LoRA/DoRA "
                             "adapters (peft_type 'LORA') and its own EDoRA adapters (peft_type 'DORA_EXT')")
        for key, neutral in _PEFT_NEUTRAL_DEFAULTS.items():
            if d.get(key, neutral) not in (neutral, [], {}):
                raise ValueError(f"DoRAConfig: {source} sets {key}={d[key]!r}, which dora_ext does not support "
                                 f"(expected {neutral!r})")
        init = d.get("init_lora_weights", True)
        if not any(init is v or (isinstance(v, str) and init == v) for v in PLAIN_INITS):
            raise ValueError(f"DoRAConfig: {source} sets init_lora_weights={init!r}, which dora_ext does not support: "
                             "that init rewrites, replaces or derives the base weight (or is another variant), so "
                             f"the saved tensors alone do not describe the adapter; supported: {list(PLAIN_INITS)}. "
                             "Load it with PEFT's PeftModel.from_pretrained (and dora_ext.from_peft to run it fused)")
        if d.get("target_modules") is None:
            raise ValueError(f"DoRAConfig: {source} has no target_modules")
        target = d["target_modules"]
        return cls(r=d.get("r", 8), alpha=d.get("lora_alpha", 8), dropout=d.get("lora_dropout", 0.0) or 0.0,
                   use_rslora=bool(d.get("use_rslora", False)),
                   target_modules=sorted(target) if isinstance(target, (list, set)) else target,
                   exclude_modules=d.get("exclude_modules"), layers_to_transform=d.get("layers_to_transform"),
                   layers_pattern=d.get("layers_pattern"), rank_pattern=dict(d.get("rank_pattern") or {}),
                   alpha_pattern=dict(d.get("alpha_pattern") or {}),
                   fan_in_fan_out=bool(d.get("fan_in_fan_out", False)), variant=variant,
                   edora_sigma=d.get("edora_sigma", 1e-5))


# Argument checks shared by DoRAConfig, the layers and DoRALinear; `where` names the API in the message.
def check_rank(r, where: str, what: str = "rank r") -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{where}: expected an integer {what} >= 1, got {r!r}")


def check_alpha(alpha, where: str, what: str = "alpha") -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"{where}: expected a finite {what}, got {alpha!r}")


def check_dropout(dropout, where: str) -> None:
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        raise ValueError(f"{where}: expected dropout in [0, 1), got {dropout!r}")


def check_norm_axis(axis, variant: Variant, dropout: float, where: str) -> None:
    """norm_axis is one of NORM_AXES; "in" exists for DoRA only (EDoRA's, dynamic rank's and LoRA's math is per
    output row or has no norm) and without dropout: LyCORIS, whose adapters these are, ignores dropout on its DoRA
    path, and dora_ext refuses rather than ignore a setting silently."""
    if axis not in NORM_AXES:
        raise ValueError(f"{where}: expected norm_axis in {NORM_AXES}, got {axis!r}")
    if axis == "in" and type(variant) is not DoRA:
        raise ValueError(f"{where}: norm_axis='in' (one gain per input column, LyCORIS's wd_on_out=False) exists "
                         f"for variant 'dora' only, got {variant.label()}")
    if axis == "in" and dropout:
        raise ValueError(f"{where}: norm_axis='in' needs dropout=0 (LyCORIS ignores dropout on its DoRA path, so "
                         f"there is no placement to follow), got dropout={dropout!r}")


def _alias(value, peft_value, name: str, peft_name: str, default):
    """One of DoRAConfig's field and its LoraConfig name (alpha / lora_alpha), refusing two different values."""
    if peft_value is None:
        return default if value is None else value
    _check(value is None or value == peft_value, f"got {name}={value!r} and {peft_name}={peft_value!r}; give one")
    return peft_value


def _adapter_dtype(value):
    """adapter_dtype as a floating torch.dtype (or None); strings such as "bf16" or "torch.bfloat16" are read."""
    if isinstance(value, str):
        key = value.lower().removeprefix("torch.")
        _check(key in _DTYPE_NAMES, f"expected adapter_dtype as a floating torch.dtype or one of "
               f"{sorted(_DTYPE_NAMES)}, got {value!r}")
        value = _DTYPE_NAMES[key]
    _check(value is None or (isinstance(value, torch.dtype) and value.is_floating_point),
           f"expected adapter_dtype as a floating torch.dtype or one of {sorted(_DTYPE_NAMES)}, got {value!r}")
    return value


def _matches(spec, key: str) -> bool:
    """PEFT's rule: a str is a regex that must match the whole name; a list matches exact names or '.'-suffixes."""
    if isinstance(spec, str):
        return re.fullmatch(spec, key) is not None
    return key in spec or any(key.endswith("." + k) for k in spec)


def _pattern_key(patterns: dict, key: str) -> str | None:
    """PEFT's get_pattern_key: the first pattern that matches the end of the name (after a '.')."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return None
