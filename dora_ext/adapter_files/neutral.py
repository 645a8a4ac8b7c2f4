"""The neutral form every adapter file format is read into and written from: per module, one ModuleAdapter.

A DoRA module is W' = norm-rescale(W + s·B·A) with s = alpha / r. The formats differ in names and layouts only:

    LyCORIS / kohya / OneTrainer   lora_down [r, in] (conv [r, C_in, k…]), lora_up [out, r] (conv [out, r, 1…]),
                                   alpha (a scalar, s = alpha / r), dora_scale: output axis [out, 1] (conv
                                   [out, 1, 1…]), input axis [1, in] (conv [1, C_in, 1…])
    ai-toolkit                     lora_down, lora_up, magnitude [out]; no alpha (its DoRA is exact at s = 1)
    PEFT / diffusers               lora_A, lora_B, lora_magnitude_vector [out] (conv [1, out, 1…]); alpha in
                                   adapter_config.json

so the neutral form keeps A and B in the kernel shapes all of them share (Linear [r, in] / [out, r], conv
[r, C_in, k…] / [out, r, 1…]), the file's alpha (s = alpha / r, which keeps alpha bit for bit through a round trip:
alpha / r · r need not give alpha back), and the magnitude flat with its axis: "out" (one gain per output row: PEFT's
and dora_ext's DoRA) or "in" (one gain per input column: LyCORIS wd_on_out=False, OneTrainer's default).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["ModuleAdapter", "AXES", "OUT", "IN", "lycoris_scale", "peft_magnitude", "layer_magnitude"]

OUT, IN = "out", "in"
AXES = (OUT, IN)


@dataclass(frozen=True, eq=False)  # tensors: no elementwise __eq__
class ModuleAdapter:
    """One module's DoRA adapter: lora_A [r, in] (conv [r, C_in, k…]), lora_B [out, r] (conv [out, r, 1…]),
    alpha (scaling = alpha / r), magnitude 1-D ([out] on the output axis, [in] / [C_in] on the input axis)."""
    lora_A: Tensor
    lora_B: Tensor
    alpha: float
    magnitude: Tensor
    axis: str

    def __post_init__(self):
        what = "dora_ext.ModuleAdapter"
        A, B, m = self.lora_A, self.lora_B, self.magnitude
        if self.axis not in AXES:
            raise ValueError(f"{what}: expected axis in {AXES}, got {self.axis!r}")
        if A.dim() < 2 or B.dim() != A.dim() or B.shape[1] != A.shape[0] or any(d != 1 for d in B.shape[2:]):
            raise ValueError(f"{what}: expected lora_A [r, in, k…] and lora_B [out, r, 1…], got {tuple(A.shape)} and "
                             f"{tuple(B.shape)}")
        size = B.shape[0] if self.axis == OUT else A.shape[1]
        if tuple(m.shape) != (size,):
            raise ValueError(f"{what}: expected a magnitude of shape ({size},) on the {self.axis!r} axis, got "
                             f"{tuple(m.shape)}")

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def lycoris_scale(adapter: ModuleAdapter) -> Tensor:
    """The magnitude as LyCORIS's dora_scale: [out, 1, 1…] (output axis) or [1, in, 1…] (input axis), the weight's
    number of dims (LoConModule builds it so it broadcasts against W)."""
    m, ones = adapter.magnitude, (1,) * (adapter.lora_A.dim() - 2)
    return m.reshape(-1, 1, *ones) if adapter.axis == OUT else m.reshape(1, -1, *ones)


def peft_magnitude(adapter: ModuleAdapter) -> Tensor:
    """The magnitude as PEFT (and dora_ext's layers) hold it: [out] for a linear, [1, out, 1…] for a conv."""
    if adapter.axis != OUT:
        raise ValueError("dora_ext.peft_magnitude: PEFT's DoRA magnitude is on the output axis; an input-axis "
                         "magnitude has no PEFT form")
    m = adapter.magnitude
    return m if adapter.lora_A.dim() == 2 else m.reshape(1, -1, *(1,) * (adapter.lora_A.dim() - 2))


def layer_magnitude(adapter: ModuleAdapter) -> Tensor:
    """The magnitude as dora_ext's layers hold it (DoRALayer.magnitude_shape): on the output axis PEFT's
    (peft_magnitude), on the input axis [in] for a linear and [1, C_in, 1…] for a conv (LyCORIS's dora_scale)."""
    if adapter.axis == OUT:
        return peft_magnitude(adapter)
    return adapter.magnitude if adapter.lora_A.dim() == 2 else lycoris_scale(adapter)
