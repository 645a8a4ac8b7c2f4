"""Host time per layer call: one small linear layer (default 64×64, 8 tokens, r=4) whose kernels take next to
nothing, so what is measured is what the host spends on each training forward and forward+backward: Python,
autograd and dispatch. On a GPU that time bounds every layer whose kernels are shorter (small models, short
sequences, QLoRA micro-batches). PEFT LoRA, PEFT DoRA, dora_ext (`inject`) and PEFT's layers with the fused variants
(`from_peft`), measured round-robin in one run.

Each timing is `--calls` calls in a row, then one device sync, divided by the calls: the host's cost per call when
the device keeps up. Next to it, from the profiler over a few calls: the ATen ops the host dispatched per call
(nested ones included: what a custom op runs inside counts too) and, on CUDA, the kernels launched per call:
counts, so the same on every run, that say where host time goes whatever the machine's noise. Results go to
benchmarks/results/host-overhead-<device>.{csv,md} with device and versions.

    python benchmarks/bench_host_overhead.py
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_model import build  # noqa: E402
from bench_utils import device_slug, interleaved_ms, markdown_table, metadata, sync, write_results  # noqa: E402

PROVIDERS = ("peft_lora", "peft_dora", "dora_ext", "peft_dora_fused")
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def counts_per_call(fn, device: torch.device, calls: int = 5) -> tuple[float, float | None]:
    """(ATen ops dispatched, CUDA kernels launched or None off CUDA) per call of fn, from the profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    fn()  # (first-call work is not per call)
    sync(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    events = prof.events()
    aten = sum(e.name.startswith("aten::") for e in events)
    kernels = sum(e.device_type == DeviceType.CUDA for e in events) if cuda else None
    return aten / calls, None if kernels is None else kernels / calls


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--r", type=int, default=4)
    p.add_argument("--calls", type=int, default=200, help="calls per timing")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--out", default=None, help="results path stem (default: benchmarks/results/host-overhead-<device>)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    warnings.filterwarnings("ignore", message=".*kernels-community.*")
    if device.type == "cpu":
        torch.set_num_threads(1)  # the host's own cost, not OpenMP's start-up on 8×64 operands
    x = torch.randn(args.tokens, args.dim, device=device, requires_grad=True)
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(args.dim, args.dim, bias=False)).to(device)
    layers = {prov: build(prov, base, args.r, target_modules=["0"]).train() for prov in PROVIDERS}

    def one_call(layer, mode):
        """One training forward ("fwd") or forward+backward ("fwd_bwd") of `layer` on x."""
        return (lambda: layer(x)) if mode == "fwd" else (lambda: layer(x).sum().backward())

    def repeat(fn):
        def run():
            for _ in range(args.calls):
                fn()
        return run

    rows = []
    for mode in ("fwd", "fwd_bwd"):
        fns = {prov: repeat(one_call(layer, mode)) for prov, layer in layers.items()}
        times = interleaved_ms(fns, device, 2, args.reps)
        lora = times["peft_lora"][0]
        for prov in PROVIDERS:
            p50, p20, p80 = (t * 1e3 / args.calls for t in times[prov])
            aten, kernels = counts_per_call(one_call(layers[prov], mode), device)
            rows.append(dict(mode=mode, provider=prov, us_per_call=round(p50, 1), us_p20=round(p20, 1),
                             us_p80=round(p80, 1), vs_peft_lora=round(times[prov][0] / lora, 3),
                             aten_ops=round(aten, 1), kernels="" if kernels is None else round(kernels, 1)))
            print(rows[-1], flush=True)
    meta = metadata(device)
    stem = args.out or os.path.join(RESULTS_DIR, f"host-overhead-{device_slug(device)}")
    write_results(stem + ".csv", rows, meta)
    with open(stem + ".md", "w") as f:
        f.write(f"# Host time per layer call ({args.dim}×{args.dim}, {args.tokens} tokens, r={args.r}, training "
                "mode)\n\n")
        f.write("`python benchmarks/bench_host_overhead.py" + "".join(f" {a}" for a in (argv or [])) + "`\n\n")
        f.write(", ".join(f"{k}: {v}" for k, v in meta.items()) + "\n\n")
        f.write(f"us_per_call: median over {args.reps} timings of {args.calls} calls each (then one sync). "
                "aten_ops: ATen ops dispatched per call, nested ones included; kernels: CUDA kernels and copies per "
                "call (profiler, 5 calls).\n\n")
        f.write(markdown_table(rows, ["mode", "provider", "us_per_call", "us_p20", "us_p80", "vs_peft_lora",
                                      "aten_ops", "kernels"]) + "\n")
    print(f"wrote {stem}.csv and .md")


if __name__ == "__main__":
    main(sys.argv[1:])
