"""One DoRA linear layer, side by side: PEFT LoRA, PEFT DoRA, dora_ext DoRA and the plain-PyTorch reference.

Modes: `fwd` (eval, no grad: dora_ext reuses its cached norm, as it does for repeated eval calls; PEFT DoRA is
timed without and with its opt-in DoraCaching), `fwd_bwd` (train, x requires grad, backward of a fixed upstream
gradient: the output stays alive until backward, as when the next op saves it) and `fwd_bwd_res` (the same, the
output consumed by a residual add as o_proj's and down_proj's are, so nothing else keeps it: there the
activation-memory modes differ). dora_ext trains in its default mode ("fast": keeps its output, no recompute)
and, as dora_ext_balanced and dora_ext_min_memory, in the modes that free a dying output and recompute acc in
backward (`with ops.activation_memory(mode):`); the activation_memory column says which.
Reports median / p20 / p80 ms, the ratio to PEFT LoRA measured in the same run, peak memory above the inputs
and, for training, what the forward alone keeps for backward (held_MiB: where the modes differ; one layer's step
peaks in its backward, where a recomputed acc takes the room a kept output would); plus the weight-norm
kernel's bandwidth against a plain copy of W. Results go to benchmarks/results/<device>.csv and .md with device,
torch / peft versions and git sha.

    python benchmarks/bench_dora_linear.py                    # defaults for the device present
    python benchmarks/bench_dora_linear.py --tokens 512 4096 --ranks 16 64 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dora_ext  # noqa: E402
from bench_utils import markdown_table, median_ms, metadata, device_slug, sync, write_results  # noqa: E402
from dora_ext import ops  # noqa: E402
from dora_ext import reference as ref  # noqa: E402
from memory import memory_levels, peak_memory  # noqa: E402
from shapes import LLAMA7B, RANKS, TOKENS  # noqa: E402

PROVIDERS = ["peft_lora", "peft_dora", "peft_dora_cached", "dora_ext", "dora_ext_balanced", "dora_ext_min_memory",
             "reference"]
FWD_ONLY = {"peft_dora_cached"}  # PEFT's cache only works in eval
#: the other activation-memory modes: they differ only where the output dies in the forward (fwd_bwd_res)
RES_ONLY = {"dora_ext_balanced": "balanced", "dora_ext_min_memory": "min_memory"}


def memory_label(provider: str) -> str:
    """The activation-memory mode a provider trains in, for the tables ("" where dora_ext's ops do not run)."""
    return RES_ONLY.get(provider, "fast (default)" if provider == "dora_ext" else "")


def runs(provider: str, mode: str) -> bool:
    """Which providers each mode times: PEFT's cache in eval only, the memory modes behind the residual add only
    (with PEFT LoRA, PEFT DoRA and dora_ext's default next to them)."""
    if mode == "fwd":
        return provider not in RES_ONLY
    if mode == "fwd_bwd":
        return provider not in FWD_ONLY and provider not in RES_ONLY
    return provider in RES_ONLY or provider in ("peft_lora", "peft_dora", "dora_ext")
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class PeftDoraCached(nn.Module):
    """A PEFT DoRA layer run under peft.helpers.DoraCaching, PEFT's opt-in eval cache (norm + dense B·A)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        from peft.helpers import DoraCaching

        with DoraCaching():
            return self.layer(x)


class ReferenceDoRA(nn.Module):
    """dora_ext.reference on a DoRALinear's parameters: what a straightforward PyTorch DoRA costs."""

    def __init__(self, layer: dora_ext.DoRALinear):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        la = self.layer
        return ref.dora_linear(x, la.weight, la.bias, la.lora_A, la.lora_B, la.magnitude, la.scaling)


def build(provider: str, base: nn.Linear, r: int) -> nn.Module:
    lin = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=base.weight.device,
                    dtype=base.weight.dtype)
    lin.weight, lin.bias = base.weight, base.bias  # every provider shares one frozen base weight
    if provider.startswith("peft"):
        import peft

        holder = nn.Module()
        holder.lin = lin
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["lin"], use_dora=provider != "peft_lora")
        layer = peft.get_peft_model(holder, cfg).base_model.model.lin
        return PeftDoraCached(layer) if provider == "peft_dora_cached" else layer
    layer = dora_ext.DoRALinear.from_linear(lin, r=r, alpha=2 * r)
    return ReferenceDoRA(layer) if provider == "reference" else layer


def held_fn(module: nn.Module, mode: str, x: torch.Tensor, memory: str = "fast"):
    """The training forward alone (its result kept, the layer's output gone where the mode's consumer drops it):
    what memory_levels reports as held is what the forward keeps for backward."""
    def forward():
        with ops.activation_memory(memory):
            return module(x) + 1.0 if mode == "fwd_bwd_res" else module(x)

    return forward


def step_fn(module: nn.Module, mode: str, x: torch.Tensor, grad: torch.Tensor, memory: str = "fast"):
    """(reset, step): reset drops the previous step's gradients, so that frees of old gradients never fall
    inside the step whose peak memory is measured."""
    params = [p for p in module.parameters() if p.requires_grad]
    if mode == "fwd":
        module.eval()

        def step():
            with torch.no_grad():
                return module(x)

        return (lambda: None), step
    module.train()
    x.requires_grad_(True)

    def reset():
        x.grad = None
        for p in params:
            p.grad = None

    def step():
        with ops.activation_memory(memory):
            if mode == "fwd_bwd_res":
                (module(x) + 1.0).backward(grad)  # the residual add keeps nothing of the layer's output
            else:
                module(x).backward(grad)

    return reset, step


def norm_bandwidth(base: nn.Linear, r: int, device, warmup: int, reps: int) -> dict:
    W = base.weight
    layer_dtype = torch.float32
    A = torch.randn(r, W.shape[1], device=device, dtype=layer_dtype) / W.shape[1] ** 0.5
    B = torch.randn(W.shape[0], r, device=device, dtype=layer_dtype)
    bytes_w = W.numel() * W.element_size()
    t_norm, _, _ = median_ms(lambda: ops.weight_norm(W, A, B, 2.0), device, warmup, reps)
    dst = torch.empty_like(W)  # preallocated: W.clone() would also time page faults of a fresh allocation on CPU
    t_copy, _, _ = median_ms(lambda: dst.copy_(W), device, warmup, reps)
    norm_gbps, copy_gbps = bytes_w / t_norm / 1e6, 2 * bytes_w / t_copy / 1e6
    return {"norm_ms": round(t_norm, 4), "norm_GBps": round(norm_gbps, 1), "copy_GBps": round(copy_gbps, 1),
            "pct_of_copy": round(100 * norm_gbps / copy_gbps, 1)}


def run(args) -> tuple[list[dict], list[dict]]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shapes = [s for s in LLAMA7B if not args.shapes or any(k in s[0] for k in args.shapes)]
    if args.tiny:
        shapes = [("tiny 64->48", 64, 48)]
    rows, norm_rows = [], []
    for name, in_f, out_f in shapes:
        torch.manual_seed(0)
        base = nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype).requires_grad_(False)
        for r in args.ranks:
            norm_rows.append({"shape": name, "r": r, "dtype": args.dtype,
                              **norm_bandwidth(base, r, device, args.warmup, args.reps)})
            modules = {p: build(p, base, r) for p in args.providers}
            for T in args.tokens:
                x = torch.randn(T, in_f, device=device, dtype=dtype)
                grad = torch.randn(T, out_f, device=device, dtype=dtype)
                for mode in args.modes:
                    measured = {}
                    for provider, module in modules.items():
                        if not runs(provider, mode):
                            continue
                        reset, step = step_fn(module, mode, x.detach().clone(), grad,
                                              RES_ONLY.get(provider, "fast"))
                        p50, p20, p80 = median_ms(lambda: (reset(), step()), device, args.warmup, args.reps)
                        reset()
                        _, peak = peak_memory(step, device)
                        held = "" if mode == "fwd" else memory_levels(
                            held_fn(module, mode, x.detach().requires_grad_(), RES_ONLY.get(provider, "fast")),
                            device)[2]
                        sync(device)
                        measured[provider] = (p50, p20, p80, peak, held)
                        print(f"  {name} T={T} r={r} {mode:7s} {provider:10s} {p50:9.3f} ms  peak {peak / 2**20:8.1f} MiB",
                              flush=True)
                    lora = measured.get("peft_lora", (None,))[0]
                    for provider, (p50, p20, p80, peak, held) in measured.items():
                        rows.append({"shape": name, "tokens": T, "r": r, "dtype": args.dtype, "mode": mode,
                                     "provider": provider, "activation_memory": memory_label(provider),
                                     "p50_ms": round(p50, 3), "p20_ms": round(p20, 3),
                                     "p80_ms": round(p80, 3),
                                     "vs_peft_lora": round(p50 / lora, 3) if lora else "",
                                     "peak_MiB": round(peak / 2**20, 1),
                                     "held_MiB": "" if held == "" else round(held / 2**20, 1)})
            del modules
    return rows, norm_rows


def summarize(rows: list[dict]) -> list[str]:
    """The issue's targets, evaluated on this run's numbers."""
    lines = []
    by_key = {(r["shape"], r["tokens"], r["r"], r["mode"], r["provider"]): r for r in rows}
    for (shape, T, rank, mode, provider), row in by_key.items():
        lora = by_key.get((shape, T, rank, mode, "peft_lora"))
        if not provider.startswith("dora_ext") or not lora:
            continue
        name = f"{provider} ({row['activation_memory']})" if row["activation_memory"] else provider
        text = f"{mode:7s} {shape} T={T} r={rank}: {name} / PEFT LoRA = {row['p50_ms'] / lora['p50_ms']:.3f}"
        for other, label in (("peft_dora", "PEFT DoRA"), ("peft_dora_cached", "PEFT DoRA+DoraCaching")):
            if (shape, T, rank, mode, other) in by_key:
                text += f", {label} / {provider} = {by_key[(shape, T, rank, mode, other)]['p50_ms'] / row['p50_ms']:.2f}x"
        text += f", peak {row['peak_MiB']} MiB vs LoRA {lora['peak_MiB']} MiB"
        if row["held_MiB"] != "":
            text += f", kept for backward {row['held_MiB']} MiB vs LoRA {lora['held_MiB']} MiB"
        lines.append(text)
    return lines


def main(argv=None):
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS if cuda else [512])
    parser.add_argument("--ranks", type=int, nargs="+", default=RANKS)
    parser.add_argument("--shapes", nargs="*", help="substrings of shape names to keep (default: all)")
    parser.add_argument("--providers", nargs="+", default=PROVIDERS, choices=PROVIDERS)
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd_bwd", "fwd_bwd_res"],
                        choices=["fwd", "fwd_bwd", "fwd_bwd_res"])
    parser.add_argument("--warmup", type=int, default=5 if cuda else 1)
    parser.add_argument("--reps", type=int, default=20 if cuda else 5)  # 3 left ±5% noise on 2 cores
    parser.add_argument("--tiny", action="store_true", help="one tiny shape (smoke test)")
    parser.add_argument("--out", default=RESULTS_DIR, help="directory for <device>.csv / .md")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    meta = metadata(device)
    print(f"dora_ext benchmark on {meta['device']}, torch {meta['torch']}, peft {meta['peft']}, sha {meta['git_sha']}")
    rows, norm_rows = run(args)
    slug = device_slug(device) + ("-tiny" if args.tiny else "")
    write_results(os.path.join(args.out, f"{slug}.csv"), rows, meta)
    write_results(os.path.join(args.out, f"{slug}-weight-norm.csv"), norm_rows, meta)
    columns = ["shape", "tokens", "r", "dtype", "mode", "provider", "activation_memory", "p50_ms", "vs_peft_lora",
               "peak_MiB", "held_MiB"]
    report = [f"# dora_ext single-layer benchmark: {meta['device']}", "",
              ", ".join(f"{k}: {v}" for k, v in meta.items()), "",
              f"Command: `python benchmarks/bench_dora_linear.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
              "", markdown_table(rows, columns), "", "## Weight norm vs copy bandwidth", "",
              markdown_table(norm_rows, list(norm_rows[0].keys())), "", "## dora_ext against PEFT (fwd: eval, dora_ext's norm cache warm; fwd_bwd: training)", ""]
    report += [f"- {line}" for line in summarize(rows)]
    with open(os.path.join(args.out, f"{slug}.md"), "w") as f:
        f.write("\n".join(report) + "\n")
    print("\n".join(report))
    return rows


if __name__ == "__main__":
    main()
