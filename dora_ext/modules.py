"""nn.Module swap-ins. Modules hold parameters and state and call dora_ext.ops; no kernel logic lives here."""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from . import functional, ops
from .config import check_alpha, check_dropout, check_rank
from .layer_state import MergeLedger, NormCache

__all__ = ["DoRALinear"]


class DoRALinear(nn.Module):
    """DoRA on a frozen nn.Linear: y = m ⊙ (W + s·B·A) x / ‖W + s·B·A‖_row + b, the norm detached (PEFT 0.21).

    The wrapped layer is kept as `base_layer` (its weight is shared, not copied). Trainable: `lora_A` [r, in]
    (kaiming-uniform, a=√5), `lora_B` [out, r] (zeros), `magnitude` [out] (= ‖W + s·B·A‖_row at init).
    Adapter parameters are float32 for float16/bfloat16 bases (PEFT's autocast_adapter_dtype=True) unless
    `adapter_dtype` says otherwise. The output has x's dtype.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"DoRALinear: expected an nn.Linear to wrap, got {type(base_layer).__name__}")
        check_rank(r, "DoRALinear")
        if alpha is not None:  # None means alpha = r
            check_alpha(alpha, "DoRALinear")
        check_dropout(dropout, "DoRALinear")
        weight = base_layer.weight
        if not weight.is_floating_point():
            raise TypeError(f"DoRALinear: expected a floating-point base weight, got {weight.dtype}")
        base_layer.requires_grad_(False)
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r = r
        self.alpha = float(r if alpha is None else alpha)
        self.use_rslora = use_rslora
        self.scaling = self.alpha / (math.sqrt(r) if use_rslora else r)
        self.dropout_p = float(dropout)
        if adapter_dtype is None:
            adapter_dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        factory = {"device": weight.device, "dtype": adapter_dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.magnitude = nn.Parameter(torch.empty(self.out_features, **factory))
        self.merged = False
        self._warned_merged_training = False
        self._ledger = MergeLedger()  # what unmerge() needs (layer_state.py, shared with the multi-adapter layers)
        self._norm_cache = NormCache()  # eval only, opt-in (layer_state.norm_caching)
        self.reset_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float | None = None, dropout: float = 0.0,
                    use_rslora: bool = False, adapter_dtype: torch.dtype | None = None) -> "DoRALinear":
        """Wrap `linear` (frozen, weight shared) with a fresh DoRA adapter; scaling = alpha/r (alpha/√r with rsLoRA)."""
        return cls(linear, r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, adapter_dtype=adapter_dtype)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """PEFT's default init: A kaiming-uniform(a=√5), B = 0, magnitude = ‖W + s·B·A‖_row (so y = base at init)."""
        if self.merged:
            raise RuntimeError("DoRALinear.reset_parameters: unmerge() first; the base weight holds a merged adapter")
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        self.magnitude.copy_(self.weight_norm())

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def weight_norm(self) -> Tensor:
        """‖W + s·B·A‖ per output row (float32), from the current (unmerged) weight."""
        return ops.weight_norm(self.weight, self.lora_A, self.lora_B, self.scaling)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            if self.training and torch.is_grad_enabled() and not self._warned_merged_training and any(
                    p.requires_grad for p in (self.lora_A, self.lora_B, self.magnitude)):
                self._warned_merged_training = True
                warnings.warn("dora_ext.DoRALinear: a training forward through a merged adapter: the base weight "
                              "holds it, so lora_A, lora_B and magnitude get no gradients; unmerge() first to train")
            return self.base_layer(x)
        adapter = functional.Adapter(self.lora_A, self.lora_B, self.magnitude, self.scaling, self.dropout_p,
                                     self._eval_weight_norm())
        return functional.linear(x, self.weight, self.bias, [adapter], self.training)

    def _eval_weight_norm(self) -> Tensor | None:
        """With caching on (dora_ext.norm_caching or PEFT's DoraCaching) and in eval, the norm of the current W, A, B
        and scaling, kept (one [out] fp32 vector) until one of them changes (layer_state.NormCache): unmerged eval
        then costs what LoRA costs plus one column-scale epilogue. Otherwise None: the op computes it, fused."""
        if not self._norm_cache.enabled(self.training):
            return None
        return self._norm_cache.norm("norm", lambda: (self.weight, self.lora_A, self.lora_B), self.scaling, False,
                                     self.weight_norm)

    def clear_cache(self) -> None:
        """Drop the eval-time norm cache (needed only with caching on, after writing parameters through `.data`)."""
        self._norm_cache.clear()

    def train(self, mode: bool = True) -> "DoRALinear":
        self._norm_cache.clear()  # as PEFT: switching modes starts from a fresh norm
        return super().train(mode)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight in place: W ← g ⊙ (W + s·B·A). No-op when already merged (with
        PEFT's warning)."""
        if self.merged:
            warnings.warn("All adapters are already merged, nothing to do.")
            return
        self._ledger.merge_("default", self.weight, self.lora_A, self.lora_B, self.magnitude, self.weight_norm(),
                            self.scaling)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge() with the norm cached at merge time (exact up to rounding). No-op when not merged."""
        if not self.merged:
            return
        self._ledger.unmerge_("default", self.weight, self.lora_A, self.lora_B, self.magnitude, self.scaling)
        self.merged = False

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A new plain nn.Linear holding the merged weight (this layer is left as it is)."""
        base = self.base_layer
        plain = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                          device=self.weight.device, dtype=self.weight.dtype)
        plain.weight.copy_(self.weight)
        if not self.merged:
            ops.merge_(plain.weight, self.lora_A, self.lora_B, self.magnitude, self.weight_norm(), self.scaling)
        if base.bias is not None:
            plain.bias.copy_(base.bias)
        plain.requires_grad_(False)
        return plain

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}, dropout={self.dropout_p:g}, merged={self.merged}")
