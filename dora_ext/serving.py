"""Serving many adapters of one base model in one batch: each sample names its adapter (or "__base__").

Sample i's output equals the model run with only adapter_names[i] active (its eval-time norm cache included); DoRA,
plain LoRA, EDoRA and dynamic-rank adapters of any rank mix in one batch, and a layer an adapter does not target
passes that sample through the base. A layer's own arithmetic for it is dora_ext.mixed_batch; this module is the
model-level block that hands every layer its names.

  * PeftModels converted by `dora_ext.from_peft`: PEFT's own keyword, `model(**batch, adapter_names=[...])` and
    `model.generate(..., adapter_names=[...])` (PEFT itself refuses it for DoRA: huggingface/peft#2089).
  * Models built by `dora_ext.inject` / `load_adapter` (plain models, whose forward takes no extra keyword):
    `with dora_ext.mixed_adapters(model, names): model(**batch)` (or `model.generate(...)`, beam search included:
    each name covers its prompt's beams, as PEFT's `adapter_names` route repeats it num_beams times). The block
    caches each layer's norms (one [out] vector per adapter) for its duration and drops them at its exit, so a
    generation pays for the norms once; for PEFT's keyword, `with dora_ext.norm_caching(): model.generate(...)`
    scopes the cache to one call the same way.

Refused, as PEFT does: training mode, merged adapters, a name no layer knows (the message lists the known ones), a
list whose length is not the batch size.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

from torch import Tensor, nn

from .mixed_batch import BASE
from .model_state import dora_layers

__all__ = ["mixed_adapters"]


@contextlib.contextmanager
def mixed_adapters(model: nn.Module, adapter_names: Sequence[str]):
    """Within the block, every forward of `model` (a dora_ext model) runs sample i through adapter_names[i]
    ("__base__": the base model); model.generate() works inside it (one name per prompt: the rows generate()
    makes of a prompt for num_beams / num_return_sequences all run its adapter).

    The weights are taken as fixed for the block: each layer keeps its norms (one [out] fp32 vector per adapter,
    keyed on the tensors' versions) until the block exits, whatever dora_ext.norm_caching says by default
    (`norm_caching(False)` inside the block still turns it off). Writes through `.data` inside the block are not
    seen: make them outside it."""
    what = "dora_ext.mixed_adapters"
    layers = dora_layers(model)
    if not layers:
        raise ValueError(f"{what}: the model has no dora_ext layers")
    if any(layer.training for layer in layers.values()):
        raise ValueError(f"{what}: mixed-adapter batches are for inference; call model.eval() first")
    if any(layer.merged for layer in layers.values()):
        raise ValueError(f"{what}: some adapters are merged into the base weights; unmerge them first")
    names = list(adapter_names)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"{what}: expected a list of adapter names (str), got {adapter_names!r}")
    known = sorted({a for layer in layers.values() for a in layer.adapter_names})
    unknown = sorted(set(names) - set(known) - {BASE})
    if unknown:
        raise ValueError(f"{what}: unknown adapter(s) {unknown}; known: {known} (and {BASE!r} for the base model)")
    for layer in layers.values():
        layer.serve_mixed(names)
    restore = _names_per_row_in_generate(model, names, layers.values())
    try:
        yield model
    finally:
        restore()
        for layer in layers.values():
            layer.serve_mixed(None)


def _names_per_row_in_generate(model: nn.Module, names: list[str], layers):
    """For the block, wrap model.generate so that its forwards give each prompt's k rows its name: transformers'
    generate repeats each prompt's row k = max(num_beams, num_return_sequences) times, consecutively
    (_expand_inputs_for_generation: repeat_interleave), as PEFT's adapter_names route repeats each name num_beams
    times (peft/tuners/lora/model.py _enable_peft_forward_hooks). Only inside generate: a plain forward with a batch
    that does not match the names stays an error. An encoder of an encoder-decoder model sees the prompts
    themselves and keeps one name per row. Returns the function that restores model.generate."""
    generate = getattr(model, "generate", None)
    if not callable(generate) or not names:
        return lambda: None
    own = model.__dict__.get("generate")  # an instance attribute the caller set: put back at exit
    per_factor: dict[int, list[str]] = {}

    def per_row(layer, args):
        x = args[0] if args else None
        batch = x.shape[0] if isinstance(x, Tensor) and x.dim() else len(names)
        k = batch // len(names)
        if k > 1 and batch % len(names) == 0:
            layer.mixed_names = per_factor.setdefault(k, [n for n in names for _ in range(k)])
        else:
            layer.mixed_names = names

    def generate_per_row(*args, **kwargs):
        hooks = [layer.register_forward_pre_hook(per_row) for layer in layers]
        try:
            return generate(*args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
            for layer in layers:
                layer.mixed_names = names

    model.generate = generate_per_row

    def restore():
        if own is None:
            model.__dict__.pop("generate", None)
        else:
            model.generate = own

    return restore
