"""The one door to PEFT's private internals: every PEFT name dora_ext uses that PEFT does not promise to keep (its
LoraVariant API is "prone to change"), fetched here and nowhere else, so a PEFT upgrade that removes one fails in
one place, naming it (tests/test_private_apis.py checks every entry of PRIVATE against the installed PEFT).

The PEFT route (peft_variants.py, peft_patching.py) is pinned to the PEFT versions it was tested with
(`PEFT_TESTED`) and refuses others before touching a model.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

__all__ = ["PEFT_TESTED", "PRIVATE", "peft_modules", "variant_kwarg_keys", "check_private"]

#: PEFT versions whose LoraVariant API the PEFT route was written against and tested with (>= first, < second).
PEFT_TESTED = ("0.21.0", "0.22.0")

#: Every private PEFT name the package touches: "module:attribute" (a dotted attribute reaches into a class) -> why.
PRIVATE: dict[str, str] = {
    "peft.tuners.lora.variants:DoraLinearVariant": "subclassed: the fused Linear / Conv1D / bitsandbytes variant",
    "peft.tuners.lora.variants:DoraEmbeddingVariant": "subclassed: the fused Embedding variant",
    "peft.tuners.lora.variants:_DoraConvNdVariant": "subclassed: the fused Conv1d/2d/3d variant",
    "peft.tuners.lora.variants:DoraConv1dVariant": "PEFT's init per conv kind",
    "peft.tuners.lora.variants:DoraConv2dVariant": "PEFT's init per conv kind",
    "peft.tuners.lora.variants:DoraConv3dVariant": "PEFT's init per conv kind",
    "peft.tuners.lora.layer:LoraLayer.resolve_lora_variant": "hooked: PEFT's layers get the fused variants",
    "peft.tuners.lora.layer:LoraLayer._check_forward_args": "overridden: mixed batches with DoRA adapters",
    "peft.tuners.lora.layer:LoraLayer._mixed_batch_forward": "overridden: mixed batches with DoRA adapters",
    "peft.tuners.lora.model:LoraModel._create_new_module": "wrapped: layers created after from_peft are fused",
    "peft.tuners.lora.layer:Embedding._embed": "the embedding lookup with the base layer's options",
    "peft.tuners.lora.layer:Embedding._get_embed_scale": "the base layer's embed_scale (huggingface/peft#2839)",
    "peft.tuners.lora.layer:VARIANT_KWARG_KEYS": "a layer's forward keywords for its variants, not for its base layer",
    "peft.tuners.lora.bnb:VARIANT_KWARG_KEYS": "the same, for the bitsandbytes layers (bnb.py's own list)",
    "peft.tuners.lora.layer:LoraVariant.merge_safe": "overridden: the fused merge (peft_variants._FusedMerge)",
    "peft.tuners.lora.layer:LoraVariant.merge_unsafe": "overridden: the fused merge (peft_variants._FusedMerge)",
    "peft.tuners.lora.layer:LoraVariant.unmerge": "overridden: the fused unmerge (peft_variants._FusedMerge)",
    "peft.tuners.lora.layer:LoraLayer._unmerged_base_weight": "the weight without merged adapters, for a merge's norm",
    "peft.tuners.lora.layer:LoraLayer._cache_pop": "unmerging an adapter PEFT's DoRA merged: its '<name>-weight_norm'",
}

#: modules of PRIVATE that import an optional package: check_private checks them only where it is installed
OPTIONAL = {"peft.tuners.lora.bnb": "bitsandbytes"}


def peft_modules():
    """(peft.tuners.lora.layer, peft.tuners.lora.variants), after checking the installed PEFT is a tested one."""
    try:  # peft is optional: importing dora_ext never needs it
        import peft
        from peft.tuners.lora import layer as lora_layer
        from peft.tuners.lora import variants as lora_variants
    except ImportError as exc:
        raise ImportError("dora_ext: the PEFT integration needs peft installed (pip install 'peft==0.21.2')") from exc
    from packaging.version import Version  # a dependency of peft's, so only needed with it

    low, high = PEFT_TESTED
    if not Version(low) <= Version(peft.__version__) < Version(high):
        raise RuntimeError(f"dora_ext: the PEFT integration uses PEFT's private LoraVariant API and is tested with "
                           f"peft >= {low}, < {high}; got peft {peft.__version__}")
    return lora_layer, lora_variants


def variant_kwarg_keys(layer) -> tuple[str, ...]:
    """PEFT's VARIANT_KWARG_KEYS for a LoRA layer: the keywords its forward takes for the variants and keeps from
    the base layer (peft/tuners/lora/layer.py; bnb.py keeps its own list for the bitsandbytes layers). Read from
    the module of the layer's PEFT class, so the list is PEFT's own, not a copy."""
    for cls in type(layer).__mro__:
        if cls.__module__.startswith("peft.tuners.lora."):
            keys = getattr(sys.modules.get(cls.__module__), "VARIANT_KWARG_KEYS", None)
            if keys is not None:
                return tuple(keys)
    raise RuntimeError(f"dora_ext: no VARIANT_KWARG_KEYS in the PEFT modules of {type(layer).__qualname__} "
                       f"(PEFT private API, dora_ext/peft_private.py PRIVATE); peft_private.check_private() lists "
                       f"what this PEFT lacks")


def check_private() -> list[str]:
    """The entries of PRIVATE the installed PEFT lacks ("module:attribute"), empty when all are there (an entry of
    an OPTIONAL module is checked where its package is installed)."""
    missing = []
    for entry in PRIVATE:
        module_name, attr = entry.split(":")
        if module_name in OPTIONAL and importlib.util.find_spec(OPTIONAL[module_name]) is None:
            continue
        try:
            obj = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError):
            missing.append(entry)
    return missing
