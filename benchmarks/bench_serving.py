"""Serving K adapters in one mixed batch (inference, cached norms), side by side in one run.

  layer: one 4096×4096 linear with K DoRA adapters of rank r, T tokens spread evenly over the K adapters:
         the mixed batch (dora_ext.mixed_adapters: one base GEMM, K gathered low-rank pairs, one epilogue) against
         the same batch through one adapter (the single-adapter eval forward, norm cached), i.e. the price of mixing.
  model: the Llama-style stack with K DoRA adapters on every linear layer, a batch of K·b samples, one adapter per
         b samples: the mixed batch (PEFT's layers after from_peft, adapter_names=) against what a PEFT DoRA user
         can do today (K passes: set_adapter + the forward of each sub-batch), dora_ext's K passes, and the floor
         (the whole batch through one adapter).

Writes benchmarks/results/serving-<device>.{csv,md} with device, versions and git sha.

    python benchmarks/bench_serving.py                 # K = 8, r = 16, T = 2048 (layer); defaults per device
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dora_ext  # noqa: E402
from bench_utils import add_llama_args, build_llama, fill_llama_defaults, interleaved_ms, publish  # noqa: E402


def _perturb(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(1e-3 * torch.randn(p.shape, generator=gen).to(p.dtype))


def layer_rows(args, device, dtype) -> list[dict]:
    torch.manual_seed(0)
    holder = nn.Module()
    holder.lin = nn.Linear(args.layer_dim, args.layer_dim, bias=False, device=device, dtype=dtype)
    names = [f"a{k}" for k in range(args.k)]
    for k, name in enumerate(names):
        cfg = dora_ext.DoRAConfig(r=args.layer_r, alpha=2 * args.layer_r, target_modules=["lin"])
        (dora_ext.inject if k == 0 else dora_ext.add_adapter)(holder, cfg, name)
    _perturb(holder)
    holder.eval()
    x = torch.randn(args.layer_tokens, args.layer_dim, device=device, dtype=dtype)
    per_token = [names[i * args.k // args.layer_tokens] for i in range(args.layer_tokens)]  # K even groups
    dora_ext.set_adapter(holder, names[0])

    def single():
        with torch.no_grad():
            holder.lin(x)

    def mixed():
        with torch.no_grad(), dora_ext.mixed_adapters(holder, per_token):
            holder.lin(x)

    times = interleaved_ms({"one adapter": single, f"mixed, K={args.k}": mixed}, device, args.warmup, args.reps)
    base = times["one adapter"][0]
    return [dict(mode="layer", provider=name, ms=round(t[0], 2), ms_p20=round(t[1], 2), ms_p80=round(t[2], 2),
                 ratio=round(t[0] / base, 3),
                 what=f"{args.layer_dim}x{args.layer_dim}, T={args.layer_tokens}, r={args.layer_r}")
            for name, t in times.items()]


def model_rows(args, device) -> list[dict]:
    import peft

    base = build_llama(args, device)
    names = [f"a{k}" for k in range(args.k)]
    ids = torch.randint(0, args.vocab, (args.k * args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    per_sample = [names[i // args.batch] for i in range(len(ids))]

    peft_model = None
    for name in names:
        cfg = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear", use_dora=True)
        if peft_model is None:
            peft_model = peft.get_peft_model(base, cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, cfg)
    _perturb(peft_model)
    peft_model.eval()
    import copy

    fused = dora_ext.from_peft(copy.deepcopy(peft_model)).eval()

    def peft_k_passes():  # what PEFT DoRA users do today: one pass per adapter over its sub-batch
        with torch.no_grad():
            for k, name in enumerate(names):
                peft_model.set_adapter(name)
                peft_model(input_ids=ids[k * args.batch:(k + 1) * args.batch])

    def fused_mixed():
        with torch.no_grad():
            fused(input_ids=ids, adapter_names=per_sample)

    def fused_k_passes():
        with torch.no_grad():
            for k, name in enumerate(names):
                fused.set_adapter(name)
                fused(input_ids=ids[k * args.batch:(k + 1) * args.batch])

    def fused_one_adapter():  # the floor: the whole batch through one adapter
        with torch.no_grad():
            fused.set_adapter(names[0])
            fused(input_ids=ids)

    times = interleaved_ms({"PEFT DoRA, K passes (set_adapter)": peft_k_passes,
                            "dora_ext (from_peft), K passes": fused_k_passes,
                            "dora_ext (from_peft), one mixed batch (adapter_names)": fused_mixed,
                            "dora_ext (from_peft), the whole batch through one adapter": fused_one_adapter},
                           device, args.warmup, args.reps)
    base_ms = times["PEFT DoRA, K passes (set_adapter)"][0]
    return [dict(mode="model", provider=name, ms=round(t[0], 2), ms_p20=round(t[1], 2), ms_p80=round(t[2], 2),
                 ratio=round(t[0] / base_ms, 3), what=f"K={args.k} adapters x {args.batch} samples x {args.seq}")
            for name, t in times.items()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_llama_args(p)
    p.add_argument("--k", type=int, default=8, help="adapters in one batch")
    p.add_argument("--layer-dim", type=int, default=4096)
    p.add_argument("--layer-tokens", type=int, default=2048)
    p.add_argument("--layer-r", type=int, default=16)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    args = p.parse_args(argv)
    fill_llama_defaults(args, cuda=dict(warmup=3, reps=10, batch=2), cpu=dict(warmup=1, reps=7, batch=1, seq=128))
    device = torch.device(args.device)
    rows = layer_rows(args, device, getattr(torch, args.dtype)) + model_rows(args, device)
    print(publish(rows, args, device, "serving", "Serving K adapters in one batch",
                  "\n\nratio: layer rows against one adapter on the same batch; model rows against PEFT DoRA's K "
                  "passes.", "python benchmarks/bench_serving.py", ["mode", "provider", "what", "ms", "ms_p20",
                                                                     "ms_p80", "ratio"]))


if __name__ == "__main__":
    main()
