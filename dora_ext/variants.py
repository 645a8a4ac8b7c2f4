"""The adapter variants of the DoRA family, one object each, chosen once per adapter (`variant_for`).

A variant owns what differs between the family members: which tensors an adapter has beyond the layer kind's two
factors (EDoRA's r×r R, dynamic rank's gates), which are trainable, their shapes, their initialisation, the fold of
those tensors into the ordinary (A, B) pair the fused kernels take, and the fold that exports the adapter as a
plain PEFT DoRA/LoRA adapter. Layers (layers.py) own where tensors live; variants only receive tensors, so this
module imports nothing of the layers.

  DoRA         Liu et al. 2024 (PEFT's use_dora): A kaiming-uniform (a=√5), B = 0, magnitude = ‖W + s·B·A‖_row
  LoRA         the same without magnitude
  EDoRA        Nasiri & Garraghan 2025: B = U_r, A = Σ_r V_rᵀ from the SVD of W (frozen), a trainable r×r R ~ N(0, σ²)
               between them, the magnitude on top: ΔW = s·B·R·A
  DynamicDoRA  Mao et al. 2024: r₀ rank-1 components behind zero-initialised trainable gates c, ΔW = s·B·diag(c)·A
  DynamicLoRA  the same without magnitude

To add a variant: a subclass here, one entry in _VARIANTS, and its test file.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["Variant", "DoRA", "LoRA", "EDoRA", "DynamicDoRA", "DynamicLoRA", "variant_for", "KINDS",
           "keep_components"]

#: variant kinds a config names (DoRAConfig.variant); dynamic rank is a separate switch on "dora" and "lora"
KINDS = ("dora", "lora", "edora")

Spec = tuple[str, str, bool]  # (layer container attribute, saved-key suffix without the adapter name, trainable)


class Variant:
    """The base of every variant, with DoRA's behaviour; the others override what differs."""

    kind = "dora"
    dynamic = False
    has_magnitude = True
    factors_trainable = True
    reads_weight = False  # whether reset_ reads the base weight (a quantized base is dequantized for it, once)

    def extra_specs(self) -> list[Spec]:
        """The adapter's tensors besides the layer kind's factors and the magnitude."""
        return []

    def specs(self, factor_keys: tuple[tuple[str, str], tuple[str, str]]) -> list[Spec]:
        """Every tensor of an adapter in save order: factors, extras, magnitude."""
        out = [(c, s, self.factors_trainable) for c, s in factor_keys] + self.extra_specs()
        if self.has_magnitude:
            out.append(("lora_magnitude_vector", "lora_magnitude_vector", True))
        return out

    def extra_shapes(self, r: int) -> dict[str, tuple]:
        return {}

    def check(self, r: int, in_features: int, out_features: int, what: str) -> None:
        """Refuse a rank this variant cannot build on a layer of this size."""

    def create_extras(self, r: int, factory: dict) -> dict[str, nn.Parameter]:
        """{container: new (uninitialised) Parameter} for extra_specs."""
        return {}

    def reset_(self, weight2d: Tensor, A: Tensor, B: Tensor, extras: dict[str, Tensor], sigma: float) -> None:
        """Initialise in place (no grad); weight2d is the frozen [out, in] base weight. PEFT's init."""
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.zeros_(B)

    def fold(self, A: Tensor, B: Tensor, extras: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(A, B) as the kernels take them: ΔW = s·B·A. Differentiable (autograd carries gradients to the extras)."""
        return A, B

    def export(self, A: Tensor, B: Tensor, extras: dict[str, Tensor], as_dora: bool) -> tuple[Tensor, Tensor] | None:
        """(A, B) to save as a plain PEFT adapter, or None when the stored tensors are saved as they are."""
        return None


    @classmethod
    def label(cls) -> str:
        return ("dynamic-rank " if cls.dynamic else "") + cls.kind


class DoRA(Variant):
    """DoRA itself: the base class's behaviour."""


class LoRA(Variant):
    kind = "lora"
    has_magnitude = False


class EDoRA(Variant):
    kind = "edora"
    factors_trainable = False  # the SVD factors are frozen; R and the magnitude train

    def extra_specs(self):
        return [("lora_R", "lora_R", True)]

    def extra_shapes(self, r):
        return {"lora_R": (r, r)}

    def check(self, r, in_features, out_features, what):
        if r > min(in_features, out_features):
            raise ValueError(f"{what}: EDoRA needs r <= min(in, out) = {min(in_features, out_features)}, got r={r}")

    def create_extras(self, r, factory):
        return {"lora_R": nn.Parameter(torch.empty(r, r, **factory))}

    reads_weight = True

    def reset_(self, weight2d, A, B, extras, sigma):
        # Truncated SVD of the frozen weight (in fp32, or fp64 for fp64 weights): B = U_r, A = Σ_r V_rᵀ.
        w = weight2d.detach()
        w = w.double() if w.dtype == torch.float64 else w.float()
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        r = A.shape[0]
        B.copy_(U[:, :r])
        A.copy_(S[:r, None] * Vh[:r])
        nn.init.normal_(extras["lora_R"], std=sigma)  # tiny: the model starts (almost) at the base

    def fold(self, A, B, extras):
        return A, B @ extras["lora_R"]  # [out, r]: never B·R·A

    def export(self, A, B, extras, as_dora):
        return self.fold(A, B, extras) if as_dora else None  # PEFT DoRA with B·R folded, for serving with PEFT


class DynamicDoRA(Variant):
    dynamic = True

    def extra_specs(self):
        return [("lora_gate", "lora_gate", True)]

    def extra_shapes(self, r):
        return {"lora_gate": (r,)}

    def create_extras(self, r, factory):
        return {"lora_gate": nn.Parameter(torch.empty(r, **factory))}

    def reset_(self, weight2d, A, B, extras, sigma):
        nn.init.kaiming_uniform_(A)  # Mao et al.: both factors kaiming-uniform (a=0), gates zero, so ΔW = 0
        nn.init.kaiming_uniform_(B)
        nn.init.zeros_(extras["lora_gate"])

    def fold(self, A, B, extras):
        return A, B * extras["lora_gate"].to(B.dtype)  # B·diag(c): pruned components are zero columns

    def export(self, A, B, extras, as_dora):
        """Gates folded into B, pruned (zero-gate) components dropped: an ordinary adapter of the surviving rank."""
        A, B = self.fold(A, B, extras)
        gate = extras["lora_gate"]
        keep = keep_components(gate != 0, A.norm(dim=1) * B.norm(dim=0))
        return A[keep.to(A.device)].contiguous(), B[:, keep.to(B.device)].contiguous()


class DynamicLoRA(DynamicDoRA):
    kind = "lora"
    has_magnitude = False


_VARIANTS: dict[tuple[str, bool], type[Variant]] = {
    ("dora", False): DoRA, ("lora", False): LoRA, ("edora", False): EDoRA,
    ("dora", True): DynamicDoRA, ("lora", True): DynamicLoRA,
}


def variant_for(kind: str, dynamic: bool = False, what: str = "dora_ext") -> Variant:
    """The variant object for a config's (variant, dynamic_rank); the one place that says which combinations exist."""
    if kind not in KINDS:
        raise ValueError(f"{what}: expected variant in {KINDS}, got {kind!r}")
    cls = _VARIANTS.get((kind, bool(dynamic)))
    if cls is None:
        raise ValueError(f"{what}: dynamic_rank works with variant 'dora' or 'lora', not {kind!r} (EDoRA's rank is "
                         "fixed by its SVD)")
    return cls()


def keep_components(live: Tensor, scores: Tensor) -> Tensor:
    """Indices of the rank-1 components to keep: the live ones, or, when none is live, the single best-scoring one
    (a layer keeps at least one component, zero-gated, so its magnitude still applies). One rule for the allocator's
    physical removal and for export."""
    keep = live.nonzero().flatten()
    return keep if keep.numel() else scores.argmax().reshape(1)
