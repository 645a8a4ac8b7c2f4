"""Multi-adapter DoRA layers with PEFT 0.21's module layout, so state_dict keys, saved keys and from_peft sharing
line up one to one with peft.tuners.lora.{Linear, Conv2d, Embedding} (peft/tuners/lora/layer.py: LoraLayer, Linear, Conv2d, Embedding):

    <layer>.base_layer.*                              the frozen wrapped layer
    <layer>.lora_A.<adapter>.weight                   [r, in]  (conv: [r, C_in, k…])
    <layer>.lora_B.<adapter>.weight                   [out, r] (conv: [C_out, r/groups, 1…])
    <layer>.lora_embedding_A.<adapter> / _B.<adapter> [r, vocab] / [dim, r]   (Embedding instead of lora_A/B)
    <layer>.lora_magnitude_vector.<adapter>.weight    [out] (conv: [1, C_out, 1…])

The math lives in dora_ext.functional and dora_ext.ops; a layer holds state (adapters, active set, merges, the
eval-time norm cache) and picks tensors.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional, ops
from .config import check_alpha, check_dropout, check_rank
from .layer_state import MergeLedger, NormCache
from .variants import DoRA, DynamicDoRA, DynamicLoRA, EDoRA, LoRA, Variant

__all__ = ["DoRALayer", "Linear", "Conv", "Embedding", "Magnitude", "conv1d_type", "layer_class_for"]


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
        weight = base_layer.weight
        if not weight.is_floating_point():
            raise TypeError(f"dora_ext.{type(self).__name__}: expected a floating-point base weight, got "
                            f"{weight.dtype}")
        base_layer.requires_grad_(False)
        self.base_layer = base_layer
        self.lora_magnitude_vector = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()  # nn.Dropout(p) for p > 0, nn.Identity otherwise (as PEFT)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.variants: dict[str, Variant] = {}  # adapter -> its variant object (dora_ext.variants)
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self._ledger = MergeLedger()  # merged adapter -> what unmerging needs (layer_state.py)
        self._norm_cache = NormCache()  # eval only

    # ----------------------------------------------------------------------------------- per-type hooks
    def weight_2d(self, weight: Tensor | None = None) -> Tensor:
        """The [out, in] view of the base weight (or of `weight`) the norm and merge run on."""
        raise NotImplementedError

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        """(A [r, in], B [out, r]) of adapter `name` as 2-D views."""
        raise NotImplementedError

    def _create_factors(self, name: str, r: int, factory: dict) -> None:
        raise NotImplementedError

    def _factor_tensors(self, name: str) -> tuple[Tensor, Tensor]:
        """The stored (A, B) parameters of adapter `name`, as the variant initialises them."""
        raise NotImplementedError

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
    def adapter_shapes(cls, base: nn.Module, r: int, variant: Variant) -> dict[str, tuple]:
        """Shapes by saved-key suffix for a rank-r adapter on `base` (used to validate checkpoints up front)."""
        a, b, m = cls.factor_shapes(base, r)
        (_, a_key), (_, b_key) = cls.saved_keys[:2]
        shapes = {a_key: a, b_key: b, "lora_magnitude_vector": m, **variant.extra_shapes(r)}
        return {suffix: shapes[suffix] for _, suffix, _ in variant.specs(cls.saved_keys[:2])}

    def tensor_specs(self, name: str) -> list[tuple[str, str, bool]]:
        """(container attribute, saved-key suffix, trainable) for each tensor of adapter `name`, in save order."""
        return self.variants[name].specs(self.saved_keys[:2])

    def _init_adapter(self, name: str, sigma: float) -> None:
        """The variant's init of adapter `name` (a layer kind with its own init overrides this)."""
        self.variants[name].reset_(self.weight_2d(), *self._factor_tensors(name), self.extras(name), sigma)

    def extras(self, name: str) -> dict[str, Tensor]:
        """The variant's own tensors of adapter `name` ({container: tensor}: EDoRA's R, the gates)."""
        return {c: self._tensor(c, name) for c, _, _ in self.variants[name].extra_specs()}

    def norm_inputs(self, name: str) -> list[Tensor]:
        """The raw tensors the norm of adapter `name` depends on (besides W): the eval-cache key."""
        return [self._tensor(c, name) for c, _, _ in self.tensor_specs(name) if c != "lora_magnitude_vector"]

    def _magnitude_shape(self) -> tuple:
        return (self.weight_2d().shape[0],)

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
                    sigma: float = 1e-5) -> None:
        """A fresh adapter of `variant` (default DoRA; dora_ext.variants says what each one creates and how it is
        initialised, e.g. DoRA: PEFT's init, output unchanged); it becomes active only if no adapter is active yet,
        as in PEFT. s = alpha/r (alpha/√r with rsLoRA), fixed while dynamic-rank components are pruned."""
        what = f"dora_ext.{type(self).__name__}.add_adapter"
        variant = DoRA() if variant is None else variant
        if not isinstance(name, str) or not name or name in self.r:
            raise ValueError(f"{what}: expected a new adapter name, got {name!r} (present: {self.adapter_names})")
        check_rank(r, what)
        check_alpha(alpha, what)
        check_dropout(dropout, what)
        if not self.supports(variant):
            raise ValueError(f"{what}: {type(self).__name__} layers support variants "
                             f"{[c.label() for c in self.supported_variants]}, got {variant.label()}")
        if self.merged:
            raise RuntimeError(f"{what}: unmerge() first; the base weight holds merged adapters")
        variant.check(r, self.in_features, self.out_features, what)
        weight = self.weight
        if adapter_dtype is None:
            adapter_dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        factory = {"device": weight.device, "dtype": adapter_dtype}
        self.variants[name] = variant
        self._create_factors(name, r, factory)
        for container, tensor in variant.create_extras(r, factory).items():
            getattr(self, container)[name] = tensor
        self.r[name], self.lora_alpha[name], self.use_rslora[name] = r, alpha, use_rslora
        self.scaling[name] = alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        with torch.no_grad():
            self._init_adapter(name, sigma)
            if self.has_magnitude(name):
                norm = self.weight_norm(name).to(adapter_dtype).reshape(self._magnitude_shape())
                self.lora_magnitude_vector[name] = Magnitude(nn.Parameter(norm))
        self.set_adapter(self.active_adapters or [name])

    def set_adapter(self, names: str | list[str]) -> None:
        """Make `names` the active adapters; their parameters become trainable, the others frozen (PEFT)."""
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.r]
        if unknown:
            raise ValueError(f"dora_ext.{type(self).__name__}.set_adapter: unknown adapter(s) {unknown}, "
                             f"present: {self.adapter_names}")
        self.active_adapters = names
        for name in self.adapter_names:
            for (_, _, trainable), p in zip(self.tensor_specs(name), self.params_of(name)):
                p.requires_grad_(trainable and name in names)

    def delete_adapter(self, name: str) -> None:
        if name not in self.r:
            raise ValueError(f"dora_ext.{type(self).__name__}.delete_adapter: unknown adapter {name!r}, "
                             f"present: {self.adapter_names}")
        if name in self.merged_adapters:
            raise RuntimeError(f"dora_ext.{type(self).__name__}.delete_adapter: adapter {name!r} is merged; "
                               "unmerge() first")
        for container, _, _ in self.tensor_specs(name):
            del getattr(self, container)[name]
        del self.lora_dropout[name]
        for d in (self.r, self.lora_alpha, self.scaling, self.use_rslora, self.variants):
            del d[name]
        self._norm_cache.pop(name)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def _active(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.r]

    def _dropout_p(self, name: str) -> float:
        return float(getattr(self.lora_dropout[name], "p", 0.0))

    # -------------------------------------------------------------------------------------------- the norm
    def weight_norm(self, name: str, weight: Tensor | None = None,
                    factors: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """‖W + s·B·A‖ per output row/channel, float32 (float64 for float64 inputs); W is the unmerged base weight
        (or `weight`); `factors`: self.factors(name) when the caller has them already. Never materialises the
        [out, in] sum."""
        A, B = self.factors(name) if factors is None else factors
        return ops.weight_norm(self.weight_2d(weight), A, B, self.scaling[name])

    def _current_norm(self, name: str, factors: tuple[Tensor, Tensor]) -> Tensor:
        """The norm for a forward; in eval kept until W, A, B or the scaling change (layer_state.NormCache)."""
        return self._norm_cache.norm(name, (self.weight, *self.norm_inputs(name)), self.scaling[name], self.training,
                                     lambda: self.weight_norm(name, factors=factors))

    def clear_cache(self) -> None:
        """Drop the eval-time norm cache (needed only after writing parameters through `.data`)."""
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
        norm = self._current_norm(name, (A, B)) if m is not None else None  # plain LoRA: no norm, no gain
        return functional.Adapter(*self._forward_factors(name, A, B), m, self.scaling[name], self._dropout_p(name),
                                  norm)

    # --------------------------------------------------------------------------------------------- merging
    def _check_mergeable(self) -> None:
        pass

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters (default: the active ones) into the base weight in place: W ← g ⊙ (W + s·B·A), each g from
        the *unmerged* base weight (PEFT 0.21). safe_merge: merge a copy first and refuse non-finite results."""
        self._check_mergeable()
        names = [a for a in (self._active() if adapter_names is None else adapter_names)
                 if a not in self.merged_adapters]
        unknown = [a for a in names if a not in self.r]
        if unknown:
            raise ValueError(f"dora_ext.{type(self).__name__}.merge: unknown adapter(s) {unknown}")
        if not names:
            return
        base = self._unmerged_weight()
        norms = {a: self.weight_norm(a, base) for a in names}
        if safe_merge:
            trial = self.weight.detach().clone()
            for a in names:
                self._ledger.merge_(a, self.weight_2d(trial), *self.factors(a), self._magnitude_of(a), norms[a],
                                    self.scaling[a], record=False)
            if not torch.isfinite(trial).all():
                raise ValueError(f"dora_ext.{type(self).__name__}.merge: NaN/inf in the merged weight of adapters "
                                 f"{names}; the layer was left unmerged")
        for a in names:
            self._ledger.merge_(a, self.weight_2d(), *self.factors(a), self._magnitude_of(a), norms[a],
                                self.scaling[a])
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge() (all merged adapters, last first) with the norms kept at merge time."""
        while self.merged_adapters:
            a = self.merged_adapters.pop()
            self._ledger.unmerge_(a, self.weight_2d(), *self.factors(a), self._magnitude_of(a), self.scaling[a])

    def _magnitude_of(self, a: str) -> Tensor | None:
        """The magnitude the merge uses; None for plain LoRA (a gain of exactly 1)."""
        return self.lora_magnitude_vector[a].weight if self.has_magnitude(a) else None

    def _unmerged_weight(self) -> Tensor:
        """The base weight without merged adapters (a copy when some are merged), for the norms of new merges."""
        if not self.merged_adapters:
            return self.weight
        weight = self.weight.detach().clone()
        for a in reversed(self.merged_adapters):
            self._ledger.unmerge_(a, self.weight_2d(weight), *self.factors(a), self._magnitude_of(a),
                                  self.scaling[a], forget=False)
        return weight

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """The base layer's output when adapters are disabled (unmerging first, as PEFT), merged or none is active;
        else the DoRA forward of the active adapters."""
        if self.disable_adapters and self.merged:
            self.unmerge()
        active = self._active()
        if self.disable_adapters or self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        return self._adapted_forward(x, active, *args, **kwargs)

    def _adapted_forward(self, x: Tensor, active: list[str], *args, **kwargs) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"adapters={self.r}, active={self.active_adapters}, merged={self.merged_adapters}"


# ------------------------------------------------------------------------------------------------------ Linear
class Linear(DoRALayer):
    """DoRA on a frozen nn.Linear, or on a transformers Conv1D (weight stored [in, out]: fan_in_fan_out); also the
    family variants: plain LoRA, EDoRA (lora_R between frozen SVD factors) and dynamic rank (lora_gate).

    The variants reach the kernels as an ordinary (A, B) pair: EDoRA's B·R and the gated B·diag(c) are [out, r]
    products folded before the op (autograd carries the gradients to R and c), so the norm, the fused forward and
    backward, and merging never build the [out, in] ΔW and need no kernels of their own.
    """

    supported_variants = (DoRA, LoRA, EDoRA, DynamicDoRA, DynamicLoRA)

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False):
        conv1d = conv1d_type()
        is_conv1d = conv1d is not None and isinstance(base_layer, conv1d)
        if not (isinstance(base_layer, nn.Linear) or is_conv1d):
            raise TypeError(f"dora_ext.Linear: expected an nn.Linear or transformers Conv1D, got "
                            f"{type(base_layer).__name__}")
        super().__init__(base_layer)
        # PEFT overrides a wrong flag with a warning; the layer type decides.
        self.fan_in_fan_out = is_conv1d
        self.out_features, self.in_features = self.weight_2d().shape
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_R = nn.ParameterDict()  # EDoRA: the trainable r×r matrix
        self.lora_gate = nn.ParameterDict()  # dynamic rank: one gate per rank-1 component

    @classmethod
    def factor_shapes(cls, base, r):
        w = base.weight
        conv1d = conv1d_type()
        out, inp = (w.shape[1], w.shape[0]) if conv1d is not None and isinstance(base, conv1d) else w.shape
        return (r, inp), (out, r), (out,)

    def weight_2d(self, weight=None):
        weight = self.weight if weight is None else weight
        return weight.T if self.fan_in_fan_out else weight

    def _factor_tensors(self, name):
        return self.lora_A[name].weight, self.lora_B[name].weight

    def factors(self, name):
        return self.variants[name].fold(*self._factor_tensors(name), self.extras(name))

    def _create_factors(self, name, r, factory):
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, **factory)

    @torch.no_grad()
    def keep_components(self, name: str, keep: Tensor, swap: Callable[[nn.Parameter, int, Tensor], nn.Parameter]):
        """Keep only the rank-1 components `keep` of dynamic-rank adapter `name`: lora_A rows, lora_B columns and
        gates are replaced by `swap(param, dim, keep)` (the allocator's: a new Parameter, optimizer state sliced
        alike). The scaling s = alpha/r₀ stays as trained."""
        A, B = self._factor_tensors(name)
        self.lora_A[name].weight = swap(A, 0, keep)
        self.lora_B[name].weight = swap(B, 1, keep)
        self.lora_gate[name] = swap(self.lora_gate[name], 0, keep)
        self.lora_A[name].out_features = self.lora_B[name].in_features = keep.numel()
        self.r[name] = int(keep.numel())
        self.clear_cache()

    def _adapted_forward(self, x: Tensor, active: list[str], *args, **kwargs) -> Tensor:
        return functional.linear(x, self.weight_2d(), self.base_layer.bias, [self._adapter(a) for a in active],
                                 self.training)


# -------------------------------------------------------------------------------------------------------- Conv
_CONV_FN = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


class Conv(DoRALayer):
    """DoRA on a frozen nn.Conv1d/2d/3d: one norm and gain per output channel over (C_in/groups, k…).

    groups > 1 follows PEFT: r must be divisible by groups, the norm uses PEFT's reshape of B.view(-1, r) @
    A.view(r, -1) to W's shape (computed densely, in float32), and merging raises NotImplementedError.
    """

    def __init__(self, base_layer: nn.Module):
        if type(base_layer) not in _CONV_FN:
            raise TypeError(f"dora_ext.Conv: expected an nn.Conv1d/2d/3d, got {type(base_layer).__name__}")
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        b = base_layer
        self.spec = functional.ConvSpec(_CONV_FN[type(b)], b.stride, b.padding, b.dilation, b.groups)

    @classmethod
    def factor_shapes(cls, base, r):
        ones = (1,) * (base.weight.dim() - 2)
        return (r, base.in_channels, *base.kernel_size), (base.out_channels, r // base.groups, *ones), \
            (1, base.out_channels, *ones)

    def _magnitude_shape(self):
        return (1, self.out_features) + (1,) * (self.weight.dim() - 2)

    def weight_2d(self, weight=None):
        weight = self.weight if weight is None else weight
        return weight.view(weight.shape[0], -1)  # a view, so merge_ writes through it

    def factors(self, name):
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        return A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1)

    def _create_factors(self, name, r, factory):
        b, conv = self.base_layer, type(self.base_layer)
        if r % b.groups:
            raise ValueError(f"dora_ext.Conv.add_adapter: expected a rank divisible by groups={b.groups}, got r={r}")
        ones = (1,) * (self.weight.dim() - 2)
        self.lora_A[name] = conv(self.in_features, r, b.kernel_size, b.stride, b.padding, bias=False, **factory)
        self.lora_B[name] = conv(r, self.out_features, ones, ones, groups=b.groups, bias=False, **factory)

    def _factor_tensors(self, name):
        return self.lora_A[name].weight, self.lora_B[name].weight

    def weight_norm(self, name, weight=None, factors=None):
        if self.spec.groups == 1:
            return super().weight_norm(name, weight, factors)
        weight = self.weight if weight is None else weight
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        r = A.shape[0]
        dtype = ops.accum_dtype(weight, A)
        with torch.no_grad():  # PEFT's (grouped) ΔW, dense: merging such layers is not supported anyway
            delta = (B.reshape(-1, r).to(dtype) @ A.reshape(r, -1).to(dtype)).reshape(weight.shape)
            return torch.linalg.vector_norm(weight.to(dtype) + self.scaling[name] * delta, dim=tuple(
                range(1, weight.dim())))

    def _check_mergeable(self):
        if self.spec.groups > 1:
            raise NotImplementedError("dora_ext.Conv.merge: merging is not supported for convolutions with "
                                      f"groups > 1 (got groups={self.spec.groups}), as in PEFT")

    def _forward_factors(self, name, A, B):
        return self.lora_A[name].weight, self.lora_B[name].weight  # the conv kernels themselves

    def _adapted_forward(self, x: Tensor, active: list[str], *args, **kwargs) -> Tensor:
        adapters = [self._adapter(a) for a in active]
        return functional.conv(x, self.base_layer(x), self.weight, self.base_layer.bias, self.spec, adapters,
                               self.training)


# --------------------------------------------------------------------------------------------------- Embedding
class Embedding(DoRALayer):
    """DoRA on a frozen nn.Embedding: the norm runs over the vocabulary, one gain per embedding dim (PEFT)."""

    saved_keys = (("lora_embedding_A", "lora_embedding_A"), ("lora_embedding_B", "lora_embedding_B"),
                  ("lora_magnitude_vector", "lora_magnitude_vector"))

    def __init__(self, base_layer: nn.Module):
        if not isinstance(base_layer, nn.Embedding):
            raise TypeError(f"dora_ext.Embedding: expected an nn.Embedding, got {type(base_layer).__name__}")
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim

    @classmethod
    def factor_shapes(cls, base, r):
        return (r, base.num_embeddings), (base.embedding_dim, r), (base.embedding_dim,)

    def weight_2d(self, weight=None):
        return (self.weight if weight is None else weight).T  # [dim, vocab]

    def factors(self, name):
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def _create_factors(self, name, r, factory):
        self.lora_embedding_A[name] = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_embedding_B[name] = nn.Parameter(torch.empty(self.out_features, r, **factory))

    def _factor_tensors(self, name):
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def _init_adapter(self, name, sigma):
        nn.init.zeros_(self.lora_embedding_A[name])  # PEFT's embedding init: A = 0, B ~ N(0, 1)
        nn.init.normal_(self.lora_embedding_B[name])

    def _embed(self, ids: Tensor, table: Tensor) -> Tensor:
        b = self.base_layer
        return F.embedding(ids, table, b.padding_idx, b.max_norm, b.norm_type, b.scale_grad_by_freq, b.sparse)

    def _adapted_forward(self, x: Tensor, active: list[str], *args, **kwargs) -> Tensor:
        embed_scale = getattr(self.base_layer, "embed_scale", None)
        embed_scale = embed_scale if isinstance(embed_scale, Tensor) or embed_scale is None else torch.tensor(
            embed_scale)
        return functional.embedding(x, self.base_layer(x, *args, **kwargs), self._embed, embed_scale,
                                    [self._adapter(a) for a in active])


def layer_class_for(module: nn.Module) -> type[DoRALayer] | None:
    """The DoRA layer class that wraps `module`, or None for unsupported types."""
    conv1d = conv1d_type()
    if isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d)):
        return Linear
    if type(module) in _CONV_FN:
        return Conv
    if isinstance(module, nn.Embedding):
        return Embedding
    return None
