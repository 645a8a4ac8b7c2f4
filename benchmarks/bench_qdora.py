"""QDoRA, one bitsandbytes 4-bit (nf4) linear layer, side by side in one run: PEFT QLoRA, PEFT QDoRA and dora_ext
(its own layer over the same Linear4bit, the norm read from the packed weight, in the default activation-memory
mode, "fast"), forward + backward of a fixed upstream gradient in training mode (PEFT QDoRA dequantizes W and
builds the dense B·A every step).

Reports the median ms (providers measured round-robin), the ratio to PEFT QLoRA, and peak memory above the inputs
(peak_memory: one thread on CPU). Results go to benchmarks/results/qdora-<device>.{csv,md} with device, versions
and git sha.

    python benchmarks/bench_qdora.py                          # Llama-7B shapes, T = 256, r = 16 and 64 (CPU)
    python benchmarks/bench_qdora.py --tokens 4096 --dtype bfloat16 --device cuda
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dora_ext  # noqa: E402
from bench_utils import device_slug, interleaved_ms, markdown_table, metadata, write_results  # noqa: E402
from memory import peak_memory  # noqa: E402
from shapes import LLAMA7B, RANKS  # noqa: E402

PROVIDERS = ["peft_qlora", "peft_qdora", "dora_ext"]
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def quantized_linear(in_f: int, out_f: int, dtype: torch.dtype, device) -> nn.Module:
    import bitsandbytes as bnb

    lin = nn.Linear(in_f, out_f, bias=False)
    q = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=dtype, quant_type="nf4")
    q.load_state_dict(lin.state_dict())
    return q.to(device)


def build(provider: str, base: nn.Module, r: int) -> nn.Module:
    holder = nn.Module()
    holder.lin = base
    if provider == "dora_ext":
        return dora_ext.inject(holder, dora_ext.DoRAConfig(r=r, alpha=2 * r, target_modules=["lin"],
                                                           activation_memory="fast")).lin
    import peft

    holder.is_loaded_in_4bit = True  # what transformers sets: PEFT then wraps with its bitsandbytes layers
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["lin"], use_dora=provider == "peft_qdora")
    return peft.get_peft_model(holder, cfg).base_model.model.lin


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="compute dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="default: 256 on CPU, 4096 on CUDA")
    p.add_argument("--ranks", type=int, nargs="+", default=RANKS)
    p.add_argument("--tiny", action="store_true", help="one 128x64 layer (a smoke test of the script)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default=None, help="results path stem (default: benchmarks/results/qdora-<device>)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    tokens = args.tokens or ([4096] if device.type == "cuda" else [256])
    warnings.filterwarnings("ignore", message=".*kernels-community.*")
    rows = []
    for name, in_f, out_f in ([("tiny 128->64", 128, 64)] if args.tiny else LLAMA7B):
        for T in tokens:
            for r in args.ranks:
                torch.manual_seed(0)
                x = torch.randn(T, in_f, device=device, dtype=dtype, requires_grad=True)
                grad = torch.randn(T, out_f, device=device, dtype=dtype)
                layers = {prov: build(prov, quantized_linear(in_f, out_f, dtype, device), r) for prov in PROVIDERS}
                for layer in layers.values():
                    layer.train()
                    with torch.no_grad():  # move B off zero so every DoRA term is live
                        for n, prm in layer.named_parameters():
                            if "lora_B" in n:
                                prm.normal_(0, 1e-3)

                def reset(layer):  # zero_grad(set_to_none=True), for x too
                    x.grad = None
                    for prm in layer.parameters():
                        prm.grad = None

                def forward_backward(layer):
                    layer(x).backward(grad)

                def step(layer):
                    def run():
                        reset(layer)
                        forward_backward(layer)
                    return run

                fns = {prov: step(layer) for prov, layer in layers.items()}
                times = interleaved_ms(fns, device, args.warmup, args.reps)
                for prov in PROVIDERS:
                    # Forward + backward after a reset, as a training step after zero_grad: the old gradients' frees
                    # stay outside the probe, whose CPU profiler cannot size a block allocated before it started
                    # (its free would count 0, and the old x.grad, 10.8 MiB at 11008 in-features, count twice).
                    layer = layers[prov]
                    reset(layer)
                    _, peak = peak_memory(lambda: forward_backward(layer), device)
                    rows.append(dict(shape=name, tokens=T, r=r, provider=prov,
                                     activation_memory="fast (default)" if prov == "dora_ext" else "",
                                     ms=round(times[prov][0], 2),
                                     p20=round(times[prov][1], 2), p80=round(times[prov][2], 2),
                                     peak_mib=round(peak / 2**20, 1)))
                base_ms = times["peft_qlora"][0]
                base_mem = next(rw["peak_mib"] for rw in rows[-3:] if rw["provider"] == "peft_qlora")
                for rw in rows[-3:]:
                    rw["vs_qlora"] = round(rw["ms"] / base_ms, 3)
                    rw["mem_vs_qlora_mib"] = round(rw["peak_mib"] - base_mem, 1)
                    rw["activation_mib"] = round(T * out_f * 4 / 2**20, 1)  # one [T, out] fp32 activation
                    print(rw, flush=True)
                del layers
    meta = metadata(device)
    import bitsandbytes

    meta["bitsandbytes"] = bitsandbytes.__version__
    meta["compute_dtype"] = str(dtype).replace("torch.", "")
    stem = args.out or os.path.join(RESULTS_DIR, f"qdora-{device_slug(device)}")
    write_results(stem + ".csv", rows, meta)
    cols = ["shape", "tokens", "r", "provider", "activation_memory", "ms", "vs_qlora", "peak_mib", "mem_vs_qlora_mib",
            "activation_mib"]
    with open(stem + ".md", "w") as f:
        f.write(f"# QDoRA single layer (nf4, {meta['compute_dtype']} compute), forward + backward\n\n")
        f.write("`python benchmarks/bench_qdora.py" + "".join(f" {a}" for a in (argv or [])) + "`\n\n")
        f.write(", ".join(f"{k}: {v}" for k, v in meta.items()) + "\n\n")
        f.write("vs_qlora: time relative to PEFT QLoRA in the same run; mem_vs_qlora_mib: peak memory above PEFT "
                "QLoRA's; activation_mib: one [T, out] float32 activation (the target allows one).\n\n")
        f.write(markdown_table(rows, cols) + "\n")
    print(f"wrote {stem}.csv and .md")


if __name__ == "__main__":
    main(sys.argv[1:])
