"""nn.Module swap-ins. DoRALinear is a single-adapter view of dora_ext.layers.Linear: every formula and every piece
of state (init, forward, norm cache, merge ledger) lives in that layer; this module only names things."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .config import check_alpha, check_dropout, check_rank
from .layers import Linear

__all__ = ["DoRALinear"]

#: the name of DoRALinear's one adapter inside its layers.Linear (PEFT's default adapter name)
ADAPTER = "default"

#: state-dict keys of the flat layout (base_layer, lora_A, lora_B and magnitude held by DoRALinear itself, as in
#: checkpoints from dora_ext releases with that layout) -> the inner layer's PEFT-layout keys, so those still load
FLAT_KEYS = {
    "base_layer.weight": "layer.base_layer.weight",
    "base_layer.bias": "layer.base_layer.bias",
    "lora_A": f"layer.lora_A.{ADAPTER}.weight",
    "lora_B": f"layer.lora_B.{ADAPTER}.weight",
    "magnitude": f"layer.lora_magnitude_vector.{ADAPTER}.weight",
}


def _load_flat_keys(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: rename flat-layout keys under `prefix` to the inner layer's (a key whose new name is
    present too is left alone, and strict loading reports it as unexpected)."""
    for flat, nested in FLAT_KEYS.items():
        if prefix + flat in state_dict and prefix + nested not in state_dict:
            state_dict[prefix + nested] = state_dict.pop(prefix + flat)


class DoRALinear(nn.Module):
    """DoRA on a frozen nn.Linear: y = m ⊙ (W + s·B·A) x / ‖W + s·B·A‖_row + b, the norm detached (PEFT 0.21).

    A view of one dora_ext.layers.Linear (`self.layer`) holding a single adapter named "default": the forward,
    init, norm cache, merge and unmerge are that layer's. The wrapped layer is `base_layer` (its weight is shared,
    not copied). Trainable: `lora_A` [r, in] (kaiming-uniform, a=√5), `lora_B` [out, r] (zeros), `magnitude` [out]
    (= ‖W + s·B·A‖_row at init): read-only attributes that are the inner layer's Parameters themselves. Adapter
    parameters are float32 for float16/bfloat16 bases (PEFT's autocast_adapter_dtype=True) unless `adapter_dtype`
    says otherwise. The output has x's dtype.

    state_dict keys are the inner layer's, PEFT's layout: `layer.base_layer.weight`, `layer.base_layer.bias`,
    `layer.lora_A.default.weight`, `layer.lora_B.default.weight`, `layer.lora_magnitude_vector.default.weight`.
    load_state_dict also takes the flat keys (`base_layer.weight`, `base_layer.bias`, `lora_A`, `lora_B`,
    `magnitude`; FLAT_KEYS) of checkpoints from dora_ext releases whose DoRALinear held its tensors itself.
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
        if not base_layer.weight.is_floating_point():
            raise TypeError(f"DoRALinear: expected a floating-point base weight, got {base_layer.weight.dtype}")
        self.layer = Linear(base_layer)
        # activation_memory=None: the context's mode (dora_ext.activation_memory), as for any call naming none
        self.layer.add_adapter(ADAPTER, r, float(r if alpha is None else alpha), dropout, use_rslora, adapter_dtype,
                               activation_memory=None)
        self.register_load_state_dict_pre_hook(_load_flat_keys)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float | None = None, dropout: float = 0.0,
                    use_rslora: bool = False, adapter_dtype: torch.dtype | None = None) -> "DoRALinear":
        """Wrap `linear` (frozen, weight shared) with a fresh DoRA adapter; scaling = alpha/r (alpha/√r with rsLoRA)."""
        return cls(linear, r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, adapter_dtype=adapter_dtype)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """PEFT's default init: A kaiming-uniform(a=√5), B = 0, magnitude = ‖W + s·B·A‖_row (so y = base at init);
        the DoRA variant's init (dora_ext.variants.DoRA), in place, so optimizers keep these Parameters."""
        if self.merged:
            raise RuntimeError("DoRALinear.reset_parameters: unmerge() first; the base weight holds a merged adapter")
        layer = self.layer
        # sigma is EDoRA's R init; DoRA's init draws nothing from it
        layer.variants[ADAPTER].reset_(layer.weight_2d(), self.lora_A, self.lora_B, layer.extras(ADAPTER), sigma=0.0)
        self.magnitude.copy_(self.weight_norm())

    # ---------------------------------------------------------------- the documented attributes, read-only views
    @property
    def base_layer(self) -> nn.Linear:
        return self.layer.base_layer

    @property
    def weight(self) -> Tensor:
        return self.layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.layer.base_layer.bias

    @property
    def lora_A(self) -> nn.Parameter:
        return self.layer.lora_A[ADAPTER].weight

    @property
    def lora_B(self) -> nn.Parameter:
        return self.layer.lora_B[ADAPTER].weight

    @property
    def magnitude(self) -> nn.Parameter:
        return self.layer.lora_magnitude_vector[ADAPTER].weight

    @property
    def in_features(self) -> int:
        return self.layer.in_features

    @property
    def out_features(self) -> int:
        return self.layer.out_features

    @property
    def r(self) -> int:
        return self.layer.r[ADAPTER]

    @property
    def alpha(self) -> float:
        return float(self.layer.lora_alpha[ADAPTER])

    @property
    def use_rslora(self) -> bool:
        return self.layer.use_rslora[ADAPTER]

    @property
    def scaling(self) -> float:
        return self.layer.scaling[ADAPTER]

    @scaling.setter
    def scaling(self, value: float) -> None:
        # writable, as PEFT's layer.scaling[name] is; the norm cache keys on it, so the next norm follows it
        self.layer.scaling[ADAPTER] = value

    @property
    def dropout_p(self) -> float:
        return self.layer.dropout_p(ADAPTER)

    @property
    def merged(self) -> bool:
        return self.layer.merged

    # ------------------------------------------------------------------------------------ delegated behaviour
    def weight_norm(self) -> Tensor:
        """‖W + s·B·A‖ per output row (float32), from the current (unmerged) weight."""
        return self.layer.weight_norm(ADAPTER)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)

    def clear_cache(self) -> None:
        """Drop the eval-time norm cache (needed only with caching on, after writing parameters through `.data`)."""
        self.layer.clear_cache()

    def merge(self) -> None:
        """Fold the adapter into the base weight in place: W ← g ⊙ (W + s·B·A). No-op when already merged (with
        PEFT's warning)."""
        self.layer.merge()

    def unmerge(self) -> None:
        """Undo merge() with the norm cached at merge time (exact up to rounding). No-op when not merged."""
        self.layer.unmerge()

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A new plain nn.Linear holding the merged weight (this layer is left as it is): merge() run on a copy."""
        trial = copy.deepcopy(self.layer)
        if not trial.merged:
            trial.merge()
        base = trial.base_layer
        plain = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None, device="meta")
        plain.weight = nn.Parameter(base.weight.detach(), requires_grad=False)
        if base.bias is not None:
            plain.bias = nn.Parameter(base.bias.detach(), requires_grad=False)
        return plain

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}, dropout={self.dropout_p:g}, merged={self.merged}")
