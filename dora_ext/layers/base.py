"""The shared base of dora_ext's layers: adapter bookkeeping (add/set/delete, the variants, trainable flags), the
eval-time norm cache, merging with its ledger, and the forward's dispatch. Each base-layer kind (linear.py,
conv.py, embedding.py, quantized_linear.py) says how its tensors map to [out, in] and runs its own forward.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from .. import functional, mixed_batch, tensor_parallel
from ..activation_policy import DEFAULT_MODE, check_mode
from ..config import check_alpha, check_dropout, check_norm_axis, check_rank
from ..layer_state import MergeLedger, NormCache
from ..variants import DoRA, Variant

__all__ = ["DoRALayer", "Magnitude", "conv1d_type"]


def conv1d_type():
    """transformers' Conv1D (GPT-2 style [in, out] weight), or None when transformers is not installed."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional
        return None
    return Conv1D


class Magnitude(nn.Module):
    """PEFT's lora_magnitude_vector[<adapter>] entry: a module holding one Parameter called `weight` (a module, not a
    ParameterDict entry, so FSDP auto-wrap can handle it; huggingface/peft#1806)."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight


class DoRALayer(nn.Module):
    """Shared state and bookkeeping of the DoRA layers; subclasses say how their tensors map to [out, in]."""

    #: (container attribute, saved-key suffix with the adapter name removed) of this layer type's tensors
    saved_keys: tuple[tuple[str, str], ...] = (("lora_A", "lora_A.weight"), ("lora_B", "lora_B.weight"),
                                               ("lora_magnitude_vector", "lora_magnitude_vector"))

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self._check_base(base_layer)
        base_layer.requires_grad_(False)
        self.base_layer = base_layer
        self.lora_magnitude_vector = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()  # nn.Dropout(p) for p > 0, nn.Identity otherwise (as PEFT)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.variants: dict[str, Variant] = {}  # adapter -> its variant object (dora_ext.variants)
        # adapter -> what the fused ops keep for its magnitude gradient (dora_ext.activation_policy; None: the
        # context's mode), a runtime choice like the adapter dtype: DoRAConfig.activation_memory
        self.activation_memory: dict[str, str | None] = {}
        # adapter -> where its norm is taken: "out" (per output row, PEFT) or "in" (per input column, LyCORIS's
        # wd_on_out=False); an "in" adapter is the only active and the only merged adapter of its layer
        self.norm_axis: dict[str, str] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self._ledger = MergeLedger()  # merged adapter -> what unmerging needs (layer_state.py)
        self._norm_cache = NormCache()  # eval only, opt-in (layer_state.norm_caching)
        self._warned_merged_training = False
        self.mixed_names: list[str] | None = None  # one adapter name per sample (dora_ext.mixed_adapters), or None

    # ----------------------------------------------------------------------------------- per-type hooks
    def _check_base(self, base_layer: nn.Module) -> None:
        weight = base_layer.weight
        if not weight.is_floating_point():
            raise TypeError(f"dora_ext.{type(self).__name__}: expected a floating-point base weight, got "
                            f"{weight.dtype}")

    def _default_adapter_dtype(self) -> torch.dtype:
        """Adapters of a half-precision base are float32 (PEFT's autocast_adapter_dtype), else the weight's dtype."""
        dtype = self.weight.dtype
        return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def _norm_base(self) -> Tensor | nn.Module:
        """What the fused norm reads of the base (functional.weight_norm): the [out, in] view of the weight."""
        return self.weight_2d()

    def weight_2d(self, weight: Tensor | None = None) -> Tensor:
        """The [out, in] view of the base weight (or of `weight`) the norm and merge run on."""
        raise NotImplementedError

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        """(A [r, in], B [out, r]) of adapter `name` as 2-D views."""
        raise NotImplementedError

    def _create_factors(self, name: str, r: int, factory: dict) -> None:
        raise NotImplementedError

    def factor_tensors(self, name: str) -> tuple[Tensor, Tensor]:
        """The stored (A, B) parameters of adapter `name`, as the variant initialises them."""
        raise NotImplementedError

    def tp_layout(self, what: str, variant: Variant | None = None) -> tensor_parallel.Layout | None:
        """The tensor-parallel layout of the base weight (dora_ext.tensor_parallel), None when it is not a DTensor.
        Only the linear kind runs sharded; any other kind, or a variant with its own trainable tensors (EDoRA's R,
        the dynamic-rank gates), on a sharded weight is refused by name rather than normed over a slice."""
        if not tensor_parallel.is_sharded(self.weight):
            return None
        if not self.tensor_parallel_variants or (variant is not None and
                                                 type(variant) not in self.tensor_parallel_variants):
            kind = variant.label() if variant is not None else type(self).__name__
            raise ValueError(f"{what}: the base weight is sharded by tensor parallelism (placements "
                             f"{tuple(self.weight.placements)}); dora_ext runs DoRA and LoRA on sharded nn.Linear "
                             f"layers only, not {kind} on a {type(self.base_layer).__name__}")
        return tensor_parallel.layout_of(self.weight_2d(), what)

    def _shard_factors(self, name: str, layout: tensor_parallel.Layout) -> None:
        """Replace adapter `name`'s whole (A, B) by DTensors split like the base weight (tensor_parallel)."""
        raise NotImplementedError

    #: variant classes a kind runs on a tensor-parallel (DTensor) base weight; none unless the kind says
    tensor_parallel_variants: tuple[type[Variant], ...] = ()

    #: whether this kind runs input-axis adapters (norm_axis "in"); the kinds that do say how their tensors map
    #: to input columns (input_axis_operands)
    input_axis_supported = False

    def input_axis_operands(self, name: str, weight: Tensor | None = None,
                            factors: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(W, A, B) as functional.input_axis_blocks takes them: the [out, in] view and the 2-D factors (a
        convolution: its [out, C_in, k…] weight and [r, C_in, k…] lora_A)."""
        A, B = self.factors(name) if factors is None else factors
        return self.weight_2d(weight), A, B

    def _check_input_axis(self, what: str) -> None:
        """Refuse an input-axis adapter on a layer that cannot run it (a kind may refuse more)."""
        if not self.input_axis_supported:
            raise ValueError(f"{what}: norm_axis='in' runs on nn.Linear, transformers Conv1D and nn.Conv1d/2d/3d "
                             f"layers, not on a {type(self.base_layer).__name__}")
        if tensor_parallel.is_sharded(self.weight):
            raise ValueError(f"{what}: norm_axis='in' does not run on a weight sharded by tensor parallelism")

    #: variant classes this layer type implements (DoRA only, unless a kind says more)
    supported_variants: tuple[type[Variant], ...] = (DoRA,)

    @classmethod
    def supports(cls, variant: Variant) -> bool:
        return type(variant) in cls.supported_variants

    @classmethod
    def factor_shapes(cls, base: nn.Module, r: int) -> tuple[tuple, tuple, tuple]:
        """(A, B, magnitude) shapes of a rank-r adapter on `base`."""
        raise NotImplementedError

    @classmethod
    def magnitude_shape(cls, base: nn.Module, axis: str = "out") -> tuple:
        """The magnitude's shape on `base`: the kind's per-output-row shape (factor_shapes), or for norm_axis "in" one
        entry per input column ([in]: it broadcasts over x's last dim, as the gain it makes multiplies x)."""
        a, _, m = cls.factor_shapes(base, 1)
        return m if axis == "out" else (a[1],)

    @classmethod
    def adapter_shapes(cls, base: nn.Module, r: int, variant: Variant, norm_axis: str = "out") -> dict[str, tuple]:
        """Shapes by saved-key suffix for a rank-r adapter on `base` whose norm is on `norm_axis` (used to validate
        checkpoints up front)."""
        a, b, _ = cls.factor_shapes(base, r)
        m = cls.magnitude_shape(base, norm_axis)
        (_, a_key), (_, b_key) = cls.saved_keys[:2]
        shapes = {a_key: a, b_key: b, "lora_magnitude_vector": m, **variant.extra_shapes(r)}
        return {suffix: shapes[suffix] for _, suffix, _ in variant.specs(cls.saved_keys[:2])}

    def tensor_specs(self, name: str) -> list[tuple[str, str, bool]]:
        """(container attribute, saved-key suffix, trainable) for each tensor of adapter `name`, in save order."""
        return self.variants[name].specs(self.saved_keys[:2])

    def _init_adapter(self, name: str, sigma: float) -> None:
        """The variant's init of adapter `name` (a layer kind with its own init overrides this)."""
        self.variants[name].reset_(self.weight_2d(), *self.factor_tensors(name), self.extras(name), sigma)

    def extras(self, name: str) -> dict[str, Tensor]:
        """The variant's own tensors of adapter `name` ({container: tensor}: EDoRA's R, the gates)."""
        return {c: self._tensor(c, name) for c, _, _ in self.variants[name].extra_specs()}

    def norm_inputs(self, name: str) -> list[Tensor]:
        """The raw tensors the norm of adapter `name` depends on (besides W): the eval-cache key."""
        return [self._tensor(c, name) for c, _, _ in self.tensor_specs(name) if c != "lora_magnitude_vector"]

    # ----------------------------------------------------------------------------------------------- state
    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    def params_of(self, name: str) -> list[nn.Parameter]:
        """Every tensor of adapter `name` (frozen ones too, e.g. EDoRA's A and B), in tensor_specs order."""
        return [self._tensor(container, name) for container, _, _ in self.tensor_specs(name)]

    def has_magnitude(self, name: str) -> bool:
        return self.variants[name].has_magnitude

    def _tensor(self, container: str, name: str) -> nn.Parameter:
        entry = getattr(self, container)[name]
        # a module holding `weight` (lora_A, lora_B, magnitude) or a bare tensor (ParameterDict entries; FSDP with
        # use_orig_params hands those out as plain tensors, not Parameters)
        return entry.weight if isinstance(entry, nn.Module) else entry

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                    adapter_dtype: torch.dtype | None = None, variant: Variant | None = None,
                    sigma: float = 1e-5, activation_memory: str | None = DEFAULT_MODE, norm_axis: str = "out") -> None:
        """A fresh adapter of `variant` (default DoRA; dora_ext.variants says what each one creates and how it is
        initialised, e.g. DoRA: PEFT's init, output unchanged); it becomes active only if no adapter is active yet,
        as in PEFT. s = alpha/r (alpha/√r with rsLoRA), fixed while dynamic-rank components are pruned.
        activation_memory: what its fused forward keeps for backward (dora_ext.activation_policy), or None for the
        context's mode; the attribute `activation_memory[name]` may be changed later. norm_axis: "out" (PEFT's
        DoRA, one gain per output row) or "in" (LyCORIS's wd_on_out=False, one per input column; DoRA only, no
        dropout, linear and conv kinds: config.check_norm_axis)."""
        what = f"dora_ext.{type(self).__name__}.add_adapter"
        variant = DoRA() if variant is None else variant
        if not isinstance(name, str) or not name or name in self.r:
            raise ValueError(f"{what}: expected a new adapter name, got {name!r} (present: {self.adapter_names})")
        check_rank(r, what)
        check_alpha(alpha, what)
        check_dropout(dropout, what)
        check_mode(activation_memory, what, allow_none=True)
        check_norm_axis(norm_axis, variant, dropout, what)
        if norm_axis == "in":
            self._check_input_axis(what)
        if not self.supports(variant):
            raise ValueError(f"{what}: {type(self).__name__} layers support variants "
                             f"{[c.label() for c in self.supported_variants]}, got {variant.label()}")
        if self.merged:
            raise RuntimeError(f"{what}: unmerge() first; the base weight holds merged adapters")
        variant.check(r, self.in_features, self.out_features, what)
        layout = self.tp_layout(what, variant)
        if adapter_dtype is None:
            adapter_dtype = self._default_adapter_dtype()
        factory = {"device": self.weight.device, "dtype": adapter_dtype}
        active = list(self.active_adapters)
        try:  # a failure half-way (a bad dtype, out of memory) must leave no trace of the adapter
            self.variants[name] = variant
            self.norm_axis[name] = norm_axis
            self._create_factors(name, r, factory)
            for container, tensor in variant.create_extras(r, factory).items():
                getattr(self, container)[name] = tensor
            self.r[name], self.lora_alpha[name], self.use_rslora[name] = r, alpha, use_rslora
            self.activation_memory[name] = activation_memory
            self.scaling[name] = alpha / (math.sqrt(r) if use_rslora else r)
            self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
            with torch.no_grad():
                self._init_adapter(name, sigma)
                if layout is not None:  # tensor parallel: the adapter split like the base weight
                    self._shard_factors(name, layout)
                if self.has_magnitude(name):
                    shape = self.magnitude_shape(self.base_layer, norm_axis)
                    m = functional.init_magnitude(self.weight_norm(name), shape, adapter_dtype)
                    self.lora_magnitude_vector[name] = Magnitude(nn.Parameter(m))
            self.set_adapter(self.active_adapters or [name])
        except BaseException:
            self.forget_adapter(name, active)
            raise

    def forget_adapter(self, name: str, active: list[str]) -> None:
        """Remove every trace of adapter `name` (also a half-created one) and make `active` the active adapters,
        without PEFT's delete semantics: what a model-level call that fails uses to undo its own add."""
        for container in vars(self)["_modules"].values():
            if isinstance(container, (nn.ModuleDict, nn.ParameterDict)) and name in container:
                del container[name]
        for d in (self.r, self.lora_alpha, self.scaling, self.use_rslora, self.variants, self.activation_memory,
                  self.norm_axis):
            d.pop(name, None)
        self._norm_cache.pop(name)
        self.set_adapter([a for a in active if a in self.r])

    def set_adapter(self, names: str | list[str], inference_mode: bool = False) -> None:
        """Make `names` the active adapters; their parameters become trainable (frozen with inference_mode), the
        others frozen (PEFT)."""
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.r]
        if unknown:
            raise ValueError(f"dora_ext.{type(self).__name__}.set_adapter: unknown adapter(s) {unknown}, "
                             f"present: {self.adapter_names}")
        self.check_alone(names, f"dora_ext.{type(self).__name__}.set_adapter")
        self.active_adapters = names
        for name in self.adapter_names:
            for (_, _, trainable), p in zip(self.tensor_specs(name), self.params_of(name)):
                p.requires_grad_(trainable and name in names and not inference_mode)

    def check_alone(self, names: list[str], what: str) -> None:
        """Refuse `names` as a set of adapters active (or merged) together when one of them is input-axis: its
        gain scales the layer's input, so it composes with no other adapter's update (neither PEFT's output-side
        composition nor a merge on top of another merge is defined for it)."""
        held = [n for n in names if n in self.r]
        if len(held) > 1 and any(self.norm_axis[n] == "in" for n in held):
            raise ValueError(f"{what}: adapters {held} cannot act together: an input-axis adapter (norm_axis='in': "
                             f"{[n for n in held if self.norm_axis[n] == 'in']}) must be the only active and the "
                             "only merged adapter of its layer")

    def delete_adapter(self, name: str) -> None:
        if name not in self.r:
            raise ValueError(f"dora_ext.{type(self).__name__}.delete_adapter: unknown adapter {name!r}, "
                             f"present: {self.adapter_names}")
        if name in self.merged_adapters:
            raise RuntimeError(f"dora_ext.{type(self).__name__}.delete_adapter: adapter {name!r} is merged; "
                               "unmerge() first")
        was_active = name in self.active_adapters
        remaining_active = [a for a in self.active_adapters if a != name]
        self.forget_adapter(name, remaining_active)
        if was_active and not remaining_active and self.r:
            # PEFT's rule (BaseTunerLayer.delete_adapter): the first remaining adapter, by name, becomes active
            new = sorted(self.r)[0]
            warnings.warn(f"Adapter {name} was active which is now deleted. Setting active adapter to {new}.")
            self.set_adapter(new)

    def _active(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.r]

    def dropout_p(self, name: str) -> float:
        return float(getattr(self.lora_dropout[name], "p", 0.0))

    # -------------------------------------------------------------------------------------------- the norm
    def weight_norm(self, name: str, weight: Tensor | None = None,
                    factors: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """‖W + s·B·A‖ per output row/channel, float32 (float64 for float64 inputs); W is the unmerged base weight
        (or `weight`); `factors`: self.factors(name) when the caller has them already. Never materialises the
        [out, in] sum."""
        if self.norm_axis[name] == "in":  # per input column
            return functional.input_norm(*self.input_axis_operands(name, weight, factors), self.scaling[name])
        A, B = self.factors(name) if factors is None else factors
        return functional.weight_norm(self._norm_base() if weight is None else self.weight_2d(weight), A, B,
                                      self.scaling[name])

    def current_norm(self, name: str, factors: tuple[Tensor, Tensor]) -> Tensor:
        """The norm for a forward: with caching on (dora_ext.norm_caching, PEFT's DoraCaching, or inside a
        mixed_adapters block) and in eval, kept until W, A, B or the scaling change; else computed (NormCache)."""
        compute = (lambda: self.weight_norm(name, factors=factors)) if self.norm_axis[name] == "in" else None
        return self._norm_cache.norm(name, self._norm_base(), *factors, self.scaling[name], self.training,
                                     inputs=lambda: self.norm_inputs(name), compute=compute)

    def clear_cache(self) -> None:
        """Drop the eval-time norm cache (needed only with caching on, after writing parameters through `.data`)."""
        self._norm_cache.clear()

    def serve_mixed(self, names: list[str] | None) -> None:
        """Enter a mixed-adapter block with one adapter name per sample (dora_ext.mixed_adapters), or leave it
        (None). Inside, the layer keeps its eval norms (a scoped NormCache) unless norm_caching says otherwise;
        leaving drops them, so nothing kept for the block outlives it."""
        self.mixed_names = names
        self._norm_cache.scoped = names is not None
        if names is None:
            self._norm_cache.clear()

    def train(self, mode: bool = True):
        self._norm_cache.clear()  # as PEFT: switching modes starts from a fresh norm
        return super().train(mode)

    def _forward_factors(self, name: str, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
        """The factors as the forward applies them (the 2-D ones, except for convolutions)."""
        return A, B

    def _adapter(self, name: str) -> functional.Adapter:
        A, B = self.factors(name)  # built once: for EDoRA / dynamic rank they are [out, r] products
        m = self.lora_magnitude_vector[name].weight if self.has_magnitude(name) else None
        norm = self.current_norm(name, (A, B)) if m is not None else None  # plain LoRA: no norm, no gain
        return functional.Adapter(*self._forward_factors(name, A, B), m, self.scaling[name], self.dropout_p(name),
                                  norm, self.activation_memory.get(name, DEFAULT_MODE),
                                  norm_axis=self.norm_axis[name])

    # --------------------------------------------------------------------------------------------- merging
    def _check_mergeable(self) -> None:
        pass

    def _merge_target(self) -> Tensor:
        """The weight merging edits in place: the base weight itself (a quantized kind: a dense dequantized copy)."""
        return self.weight

    def _commit_merge(self, weight: Tensor) -> None:
        """Called with _merge_target()'s tensor once merging or unmerging edited it (a quantized kind requantizes)."""

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> list[str]:
        """Fold adapters (default: the active ones) into the base weight in place: W ← g ⊙ (W + s·B·A), each g from
        the *unmerged* base weight (PEFT 0.21). safe_merge: merge a copy first and refuse non-finite results.
        Returns the adapters it merged (already merged ones are skipped with PEFT's warnings)."""
        self._check_mergeable()
        names = self.to_merge(adapter_names)
        self.check_alone(self.merged_adapters + names, f"dora_ext.{type(self).__name__}.merge")
        if self.merged:  # PEFT's check_adapters_to_merge, with its warnings
            if names:
                warnings.warn(f"Already following adapters were merged {','.join(self.merged_adapters)}. "
                              f"You are now additionally merging {','.join(names)}.")
            else:
                warnings.warn("All adapters are already merged, nothing to do.")
        if not names:
            return []
        if safe_merge:
            self.check_merge(names)
        weight = self._merge_target()
        base = self._unmerged_weight(weight)
        norms = {a: self.weight_norm(a, base) for a in names}
        for a in names:
            self._ledger.merge_(a, *self._merge_operands(a, weight), self._magnitude_of(a), norms[a], self.scaling[a])
        self._commit_merge(weight)
        self.merged_adapters.extend(names)
        return names

    def to_merge(self, adapter_names: list[str] | None) -> list[str]:
        """The adapters merge(adapter_names) would merge (the active ones by default; not those merged already)."""
        if isinstance(adapter_names, str):
            raise TypeError(f"dora_ext.{type(self).__name__}.merge: expected a list of adapter names, got "
                            f"{adapter_names!r}")
        names = list(self._active() if adapter_names is None else adapter_names)
        unknown = [a for a in names if a not in self.r]
        if unknown:
            raise ValueError(f"dora_ext.{type(self).__name__}.merge: unknown adapter(s) {unknown}")
        return [a for a in names if a not in self.merged_adapters]

    @torch.no_grad()
    def check_merge(self, names: list[str], safe_merge: bool = True) -> None:
        """Raise, changing nothing, if merging `names` is refused: a kind that cannot merge, or (safe_merge) NaN/inf
        in the merged weight, computed on a copy."""
        self._check_mergeable()
        self.check_alone(self.merged_adapters + names, f"dora_ext.{type(self).__name__}.merge")
        if not names or not safe_merge:
            return
        weight = self._merge_target()
        base = self._unmerged_weight(weight)
        trial = weight.detach().clone()
        for a in names:
            self._ledger.merge_(a, *self._merge_operands(a, trial), self._magnitude_of(a), self.weight_norm(a, base),
                                self.scaling[a], record=False)
        if not torch.isfinite(trial).all():
            raise ValueError(f"dora_ext.{type(self).__name__}.merge: NaN/inf in the merged weight of adapters "
                             f"{names}; the layer was left unmerged")

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge() (all merged adapters, last first) with the norms kept at merge time."""
        self.unmerge_last(len(self.merged_adapters))

    @torch.no_grad()
    def unmerge_last(self, count: int) -> None:
        """Undo the last `count` merges (what a failed model-level merge uses to undo its own)."""
        if not count:
            return
        weight = self._merge_target()
        for _ in range(count):
            a = self.merged_adapters.pop()
            self._ledger.unmerge_(a, *self._merge_operands(a, weight), self._magnitude_of(a), self.scaling[a])
        self._commit_merge(weight)

    def _merge_operands(self, name: str, weight: Tensor) -> tuple:
        """(W, A, B) of adapter `name` for the ledger's row ops on `weight`: its [out, in] view and the factors, or
        for an input-axis adapter the views whose rows are W's input columns (functional.input_axis_blocks)."""
        if self.norm_axis[name] == "in":
            return functional.input_axis_blocks(*self.input_axis_operands(name, weight))
        return (self.weight_2d(weight), *self.factors(name))

    def _magnitude_of(self, a: str) -> Tensor | None:
        """The magnitude the merge uses; None for plain LoRA (a gain of exactly 1)."""
        return self.lora_magnitude_vector[a].weight if self.has_magnitude(a) else None

    def _unmerged_weight(self, weight: Tensor) -> Tensor:
        """`weight` without merged adapters (a copy when some are merged), for the norms of new merges."""
        if not self.merged_adapters:
            return weight
        weight = weight.detach().clone()
        for a in reversed(self.merged_adapters):
            self._ledger.unmerge_(a, *self._merge_operands(a, weight), self._magnitude_of(a), self.scaling[a],
                                  forget=False)
        return weight

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """The base layer's output when adapters are disabled (unmerging first, as PEFT), merged or none is active;
        else the DoRA forward of the active adapters."""
        if self.disable_adapters and self.merged:
            self.unmerge()
        if self.mixed_names is not None and not self.disable_adapters:
            return self._mixed_forward(x, self.mixed_names, *args, **kwargs)
        active = self._active()
        if (self.merged and self.training and torch.is_grad_enabled() and not self._warned_merged_training
                and any(p.requires_grad for a in self.merged_adapters for p in self.params_of(a))):
            self._warned_merged_training = True
            warnings.warn(f"dora_ext.{type(self).__name__}: a training forward through merged adapters "
                          f"{self.merged_adapters}: the base weight holds them, so they get no gradients; "
                          "unmerge first to train them")
        if self.disable_adapters or self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        return self._adapted_forward(x, active, *args, **kwargs)

    def _adapted_forward(self, x: Tensor, active: list[str], *args, **kwargs) -> Tensor:
        raise NotImplementedError

    def _mixed_forward(self, x: Tensor, names: list[str], *args, **kwargs) -> Tensor:
        """Sample i through adapter names[i] (mixed_batch.py); this generic form runs each adapter's samples as one
        sub-batch (the linear kinds fuse it: one base product, one epilogue)."""
        mixed_batch.check_names(names, x.shape[0], f"dora_ext.{type(self).__name__}")
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(name if name in self.r else mixed_batch.BASE, []).append(i)
        out = None
        for name, rows in groups.items():
            xs = x[rows]
            y = self.base_layer(xs, *args, **kwargs) if name == mixed_batch.BASE else self._adapted_forward(
                xs, [name], *args, **kwargs)
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out[rows] = y
        return out

    def extra_repr(self) -> str:
        return f"adapters={self.r}, active={self.active_adapters}, merged={self.merged_adapters}"


