"""The one door to PEFT's private internals: every PEFT name dora_ext uses that PEFT does not promise to keep (its
LoraVariant API is "prone to change"), fetched here and nowhere else, so a PEFT upgrade that removes one fails in
one place, naming it (tests/test_private_apis.py checks every entry of PRIVATE against the installed PEFT).

The PEFT route (peft_variants.py, peft_patching.py) is pinned to the PEFT versions it was tested with
(`PEFT_TESTED`) and refuses others before touching a model.
"""

from __future__ import annotations

__all__ = ["PEFT_TESTED", "PRIVATE", "peft_modules", "check_private"]

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
}


def peft_modules():
    """(peft.tuners.lora.layer, peft.tuners.lora.variants), after checking the installed PEFT is a tested one."""
    try:
        import peft
        from peft.tuners.lora import layer as lora_layer
        from peft.tuners.lora import variants as lora_variants
    except ImportError as exc:
        raise ImportError("dora_ext: the PEFT integration needs peft installed (pip install 'peft==0.21.0')") from exc
    from packaging.version import Version

    low, high = PEFT_TESTED
    if not Version(low) <= Version(peft.__version__) < Version(high):
        raise RuntimeError(f"dora_ext: the PEFT integration uses PEFT's private LoraVariant API and is tested with "
                           f"peft >= {low}, < {high}; got peft {peft.__version__}")
    return lora_layer, lora_variants


def check_private() -> list[str]:
    """The entries of PRIVATE the installed PEFT lacks ("module:attribute"), empty when all are there."""
    import importlib

    missing = []
    for entry in PRIVATE:
        module_name, attr = entry.split(":")
        try:
            obj = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError):
            missing.append(entry)
    return missing
