"""Model-level benchmark: a Llama-style stack (random init, built from a config) with adapters on every linear layer
of the decoder ("all-linear"), trained with PEFT LoRA, PEFT DoRA, dora_ext's own layers (`dora_ext.inject`) and
PEFT's layers running dora_ext's fused variants (`dora_ext.from_peft`, the PEFT-variant route), plus unmerged
inference.

  train: forward + loss + backward + AdamW step + zero_grad, median of --reps steps after --warmup, the providers
         timed round-robin (one step each per round) so drifts of a shared machine hit them alike;
         peak memory of one step above the level before it (allocator on CUDA, profiler on CPU).
  eval:  forward under no_grad in eval mode, each DoRA provider without and with its opt-in eval cache (`_cached`):
         PEFT DoRA with peft.helpers.DoraCaching (norm + dense B·A per layer), dora_ext with dora_ext.norm_caching
         and the fused PEFT layers with PEFT's DoraCaching, which they honour (one [out] fp32 norm per layer, warm).

  --quantized 4bit|8bit: the same stack loaded through transformers with a BitsAndBytesConfig (nf4 with double
         quantization in the compute dtype, or LLM.int8): PEFT QLoRA (as peft_lora), PEFT QDoRA (peft_dora),
         dora_ext's QDoRA layers and PEFT's bitsandbytes layers with the fused variants.

Writes benchmarks/results/model-<device>.csv and .md (model-<4bit|8bit>-<device> when quantized), with the device
and versions on every row.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dora_ext  # noqa: E402
from bench_utils import add_llama_args, build_llama, fill_llama_defaults, interleaved_ms, publish  # noqa: E402
from memory import peak_memory  # noqa: E402

#: dora_ext: dora_ext's layers in the default activation-memory mode ("fast": keep every layer's output, no
#: recompute); dora_ext_balanced and dora_ext_min_memory in the others (DoRAConfig.activation_memory: free the
#: outputs that die in the forward where the recompute is cheap / everywhere, and recompute acc in backward)
PROVIDERS = ("peft_lora", "peft_dora", "dora_ext", "dora_ext_balanced", "dora_ext_min_memory", "peft_dora_fused")
MODES = {"dora_ext_balanced": "balanced", "dora_ext_min_memory": "min_memory"}  # per provider (default "fast")


def memory_label(provider: str) -> str:
    """The activation-memory mode a provider trains in, for the tables ("" for PEFT's own layers)."""
    if provider in MODES:
        return MODES[provider]
    return "fast (default)" if provider.startswith("dora_ext") or provider == "peft_dora_fused" else ""


def build(provider: str, base, r: int, target_modules="all-linear"):
    """A fresh copy of `base` (a model, or a loader) with `provider`'s adapters on `target_modules`."""
    import peft

    model = copy.deepcopy(base) if isinstance(base, torch.nn.Module) else base()
    if provider.startswith("dora_ext"):
        return dora_ext.inject(model, dora_ext.DoRAConfig(r=r, alpha=2 * r, target_modules=target_modules,
                                                          activation_memory=MODES.get(provider, "fast")))
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules, use_dora=provider != "peft_lora")
    model = peft.get_peft_model(model, cfg)
    return dora_ext.from_peft(model) if provider == "peft_dora_fused" else model


def train_step(model, batch):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _peft_dora_caching():
    from peft.helpers import DoraCaching

    return DoraCaching


#: provider -> the opt-in eval cache its `<provider>_cached` eval row runs under (a context-manager factory)
EVAL_CACHES = {"peft_dora": _peft_dora_caching, "dora_ext": lambda: dora_ext.norm_caching,
               "peft_dora_fused": _peft_dora_caching}


def _eval_fn(model, ids, ctx):
    def fwd():
        with torch.no_grad(), ctx():
            model(input_ids=ids)

    return fwd


def quantized_loader(model, bits: str, dtype, directory: str):
    """A function that loads `model` (saved once to `directory`) through transformers with a BitsAndBytesConfig: a
    fresh quantized copy per provider (bitsandbytes' int8 parameters cannot be deep-copied)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model.save_pretrained(directory)
    config = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=dtype) if bits == "4bit" else BitsAndBytesConfig(load_in_8bit=True))
    device_map = "cpu" if model.device.type == "cpu" else {"": model.device.index or 0}

    def load():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModelForCausalLM.from_pretrained(directory, quantization_config=config, device_map=device_map,
                                                        dtype=dtype)

    return load


def run(args):
    device = torch.device(args.device)
    base = build_llama(args, device)
    if args.quantized:
        tmp = tempfile.TemporaryDirectory()
        base = quantized_loader(base, args.quantized, getattr(torch, args.dtype), tmp.name)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)
    batch = {"input_ids": ids, "labels": ids}
    models = {provider: build(provider, base, args.r) for provider in PROVIDERS}
    rows = []
    steps = {}
    for provider, model in models.items():
        model.train()
        if args.checkpointing:
            model.gradient_checkpointing_enable()  # transformers' default: non-reentrant torch.utils.checkpoint
        steps[provider] = train_step(model, batch)
        steps[provider]()  # allocate optimizer state outside the measurement
    timed = interleaved_ms(steps, device, args.warmup, args.reps)
    for provider, step in steps.items():
        _, peak = peak_memory(step, device)
        p50, p20, p80 = timed[provider]
        rows.append(dict(mode="train", provider=provider, activation_memory=memory_label(provider), ms=round(p50, 2),
                         ms_p20=round(p20, 2), ms_p80=round(p80, 2), peak_mib=round(peak / 2**20, 1)))
    del steps
    evals = {}
    for provider, model in models.items():
        if provider in MODES:  # the same eval forward as dora_ext (the mode only affects training)
            continue
        model.eval()
        evals[provider] = _eval_fn(model, ids, contextlib.nullcontext)
        caching = EVAL_CACHES.get(provider)
        if caching is not None:
            # its own copy: the cache lives in the layers and every uncached call clears it (PEFT's and ours)
            evals[provider + "_cached"] = _eval_fn(copy.deepcopy(model), ids, caching())
    for name, (p50, p20, p80) in interleaved_ms(evals, device, args.warmup, args.reps).items():
        rows.append(dict(mode="eval", provider=name, activation_memory="", ms=round(p50, 2), ms_p20=round(p20, 2),
                         ms_p80=round(p80, 2), peak_mib=""))
    lora = {r["mode"]: r["ms"] for r in rows if r["provider"] == "peft_lora"}
    for r in rows:
        r["vs_peft_lora"] = round(r["ms"] / lora[r["mode"]], 3)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_llama_args(p)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--quantized", choices=("4bit", "8bit"), default=None,
                   help="load the stack with bitsandbytes (QLoRA / QDoRA providers)")
    p.add_argument("--checkpointing", action="store_true",
                   help="train with gradient checkpointing (gradient_checkpointing_enable, non-reentrant)")
    args = p.parse_args(argv)
    fill_llama_defaults(args, cuda=dict(warmup=3, reps=10), cpu=dict(warmup=2, reps=15))
    rows = run(args)
    slug, title = ("model", "Model-level benchmark") if not args.quantized else (
        f"model-{args.quantized}", f"Model-level benchmark, bitsandbytes {args.quantized} base (QLoRA / QDoRA)")
    if args.checkpointing:
        slug, title = slug + "-ckpt", title + ", gradient checkpointing"
    command = "python benchmarks/bench_model.py" + (f" --quantized {args.quantized}" if args.quantized else "") + (
        " --checkpointing" if args.checkpointing else "")
    print(publish(rows, args, torch.device(args.device), slug, title, "", command,
                  ["mode", "provider", "activation_memory", "ms", "ms_p20", "ms_p80", "vs_peft_lora", "peak_mib"]))


if __name__ == "__main__":
    main()
