"""A layer's mixed-adapter batch: sample i of the batch runs through adapter names[i] ("__base__": the base layer).

Per linear layer the base product runs once for all tokens and each adapter's low-rank part only on its own tokens,
with every token's gain applied in one fused epilogue (`ops.dora_mixed`). dora_ext's own linear layers
(layers/linear.py) and PEFT's converted linear layers (peft_patching.py) both call `mixed_output`; the model-level
block that hands every layer its names is dora_ext.serving.mixed_adapters.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import ops

__all__ = ["BASE", "token_index", "check_names", "mixed_output", "linear_mixed"]

#: the name of "no adapter" in a mixed batch (PEFT's)
BASE = "__base__"


def token_index(names: Sequence[str], adapters: Sequence[str], x: Tensor) -> Tensor:
    """[T] int64: for every token of x [batch, ..., features], the position of its sample's adapter in `adapters`,
    or len(adapters) for a name this layer does not hold (the base)."""
    position = {name: k for k, name in enumerate(adapters)}
    per_sample = torch.tensor([position.get(n, len(adapters)) for n in names], dtype=torch.int64)
    tokens_per_sample = x[0].numel() // x.shape[-1] if x.shape[0] else 0
    return per_sample.repeat_interleave(tokens_per_sample).to(x.device)


def check_names(names: Sequence[str], batch: int, where: str) -> None:
    if len(names) != batch:
        hint = ""
        if names and batch % len(names) == 0:
            hint = (" (generate() with num_beams or num_return_sequences repeats each prompt's row: call generate on "
                    "the model given to mixed_adapters, which repeats the names alike)")
        raise ValueError(f"{where}: expected one adapter name per sample, got {len(names)} names for a batch of "
                         f"{batch}{hint}")


def mixed_output(x: Tensor, result: Tensor, bias: Tensor | None, names: Sequence[str], known,
                 adapter_of) -> Tensor:
    """A linear layer's mixed-batch output from its base output `result` (x's base product, bias included):
    `known` holds the layer's adapter names (a layer an adapter does not target passes its samples through), and
    adapter_of(name) gives (lora_A, lora_B, scaling, magnitude or None for plain LoRA, norm or None)."""
    held = [n for n in dict.fromkeys(names) if n in known]
    if not held:
        return result
    with torch.no_grad():
        return ops.dora_mixed(result, x, [adapter_of(n) for n in held], token_index(names, held, x),
                              bias=None if bias is None else bias.to(result.dtype))


def linear_mixed(x: Tensor, result: Tensor, bias: Tensor | None, names: Sequence[str], layer) -> Tensor:
    """The mixed forward of a linear-kind layer (dora_ext's Linear, QuantizedLinear): `result` is its base output."""
    def adapter_of(name):
        A, B = layer.factors(name)
        m = layer.lora_magnitude_vector[name].weight if layer.has_magnitude(name) else None
        norm = layer.current_norm(name, (A, B)) if m is not None else None  # the eval cache
        return A, B, layer.scaling[name], m, norm

    return mixed_output(x, result, bias, names, layer.r, adapter_of)
