"""LyCORIS DoRA training on a diffusers UNet, with and without dora_ext.patch_lycoris().

One UNet2DConditionModel built from a config (random init, seed 0, no download), frozen, three ways, each from the
same init and on the same batch:
  * lycoris_dora:          LyCORIS's LoCon with dora_wd=True (`lycoris.create_lycoris(..., algo="locon",
                           dora_wd=True)`), its own forward (rebuilds W + ΔW, normalises and applies it every step)
  * lycoris_dora_patched:  the same network applied under dora_ext.patch_lycoris() (fused formulas; every module
                           checked to run fused), in the default activation-memory mode ("fast": the fused linear
                           op keeps its output for the magnitude gradient)
  * lycoris_dora_patched_min_memory: the same with patch_lycoris(activation_memory="min_memory") (backward
                           recomputes instead; output axis only: the input axis has no fused linear op)
  * lycoris_locon:         LyCORIS's LoCon without DoRA (dora_wd=False), the plain-LoRA reference
Each --wd-on-out axis (output, LyCORIS's default; input) gets its own DoRA rows.

A training step is forward + MSE loss + backward + SGD step + zero_grad, timed round-robin (one step of each per
round: bench_utils.interleaved_ms) so drifts of a shared machine hit them alike; ratios come from the same run.
Peak memory: one step above the level before it (the profiler on CPU, on one thread; the allocator on CUDA:
memory.peak_memory). loss0: each network's loss at its first step (patched and unpatched compute the same function,
so they agree to rounding).

Writes benchmarks/results/lycoris-<device>.csv and .md, with the device and the versions on every row.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import dora_ext  # noqa: E402
from bench_utils import device_slug, interleaved_ms, markdown_table, metadata, write_results  # noqa: E402
from memory import peak_memory  # noqa: E402

PROVIDERS = ("lycoris_dora", "lycoris_dora_patched", "lycoris_dora_patched_min_memory", "lycoris_locon")
#: the patched providers and their activation-memory mode (patch_lycoris(activation_memory=...)): what the fused
#: linear op keeps for backward; it has no fused linear op on the input axis, where only the default runs
PATCHED = {"lycoris_dora_patched": "fast", "lycoris_dora_patched_min_memory": "min_memory"}


def build_unet(args, device):
    import diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=tuple(args.channels), layers_per_block=1, cross_attention_dim=args.context_dim,
        sample_size=args.sample, attention_head_dim=8, norm_num_groups=args.groups,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        in_channels=4, out_channels=4)
    return unet.requires_grad_(False).to(device, getattr(torch, args.dtype))


def build(provider: str, base, args, wd_on_out: bool):
    """A fresh copy of `base` with `provider`'s LyCORIS network applied (same seed for every provider), lora_up
    randomised so DoRA's terms are live; returns (unet, network)."""
    import lycoris

    unet = copy.deepcopy(base)
    torch.manual_seed(1)
    dora = provider != "lycoris_locon"
    network = lycoris.create_lycoris(unet, 1.0, linear_dim=args.r, linear_alpha=args.r / 2, algo="locon",
                                     dora_wd=dora, wd_on_output=wd_on_out)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for lora in network.loras:
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=g) * 0.01)
    network.to(base.device, base.dtype)
    # LyCORIS binds each module's forward at apply_to: under the patch the dispatcher, else its own forward (which
    # the patch, on during the timing, then leaves alone)
    with dora_ext.lycoris_patched() if provider in PATCHED else contextlib.nullcontext():
        network.apply_to()
    network.requires_grad_(True)
    if provider in PATCHED:
        refused = {k: v for k, v in dora_ext.lycoris_fusion(network).items() if v != "fused"}
        if refused:
            raise RuntimeError(f"bench_lycoris: modules that would not run fused: {refused}")
    return unet, network


def train_step(unet, network, batch):
    sample, t, context, target = batch
    opt = torch.optim.SGD(network.parameters(), lr=1e-3)

    def step():
        loss = F.mse_loss(unet(sample, t, context).sample, target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def run(args):
    from lycoris.logging import logger

    logger.setLevel(logging.ERROR)  # LyCORIS logs every module it creates
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    base = build_unet(args, device)
    g = torch.Generator().manual_seed(2)
    shape = (args.batch, 4, args.sample, args.sample)
    batch = (torch.randn(shape, generator=g).to(device, dtype), torch.linspace(10, 900, args.batch).long().to(device),
             torch.randn(args.batch, 7, args.context_dim, generator=g).to(device, dtype),
             torch.randn(shape, generator=g).to(device, dtype))
    rows = []
    for wd_on_out in args.axes:
        axis = "out" if wd_on_out else "in"
        steps, first, networks = {}, {}, {}
        for provider in PROVIDERS:
            if provider == "lycoris_locon" and rows and any(r["provider"] == provider for r in rows):
                continue  # (no DoRA: the axis does not apply; measured once, with the first axis)
            if provider == "lycoris_dora_patched_min_memory" and not wd_on_out:
                continue
            unet, networks[provider] = build(provider, base, args, wd_on_out)
            steps[provider] = train_step(unet, networks[provider], batch)
        for provider, step in steps.items():  # (the first step allocates the gradients outside the timing, and
            with dora_ext.lycoris_patched(activation_memory=PATCHED.get(provider, "fast")):  # fixes each mode)
                first[provider] = step().item()
        with dora_ext.lycoris_patched():
            timed = interleaved_ms(steps, device, args.warmup, args.reps)
            peaks = {provider: peak_memory(step, device)[1] for provider, step in steps.items()}
        for provider, network in networks.items():  # the patched network ran fused, every module, every step
            counts = [lora.__dict__.get(dora_ext.lycoris_patching.CALLS_ATTR) for lora in network.loras]
            fused = provider in PATCHED
            if any((c is not None and (c["lycoris"] or not fused)) or (fused and not (c and c["fused"]))
                   for c in counts):
                raise RuntimeError(f"bench_lycoris: {provider} did not run as intended: {counts}")
            modes = {lora.__dict__.get(dora_ext.lycoris_patching.MODE_ATTR) for lora in network.loras}
            if fused and wd_on_out and modes != {PATCHED[provider]}:
                raise RuntimeError(f"bench_lycoris: {provider} ran with activation-memory modes {modes}")
        n_modules = len(networks["lycoris_dora"].loras)
        for provider in steps:
            peak = peaks[provider]
            p50, p20, p80 = timed[provider]
            rows.append(dict(provider=provider, wd_on_out=axis if provider != "lycoris_locon" else "",
                             modules=n_modules, ms=round(p50, 1), ms_p20=round(p20, 1), ms_p80=round(p80, 1),
                             peak_mib=round(peak / 2**20, 1), loss0=f"{first[provider]:.7g}"))
    by = {(r["provider"], r["wd_on_out"]): r for r in rows}
    locon = by[("lycoris_locon", "")]
    for r in rows:
        dora = by.get(("lycoris_dora", r["wd_on_out"]))  # (none for LoCon, which has no axis)
        r["vs_lycoris_dora"] = round(r["ms"] / dora["ms"], 3) if dora else ""
        r["mem_vs_lycoris_dora"] = round(r["peak_mib"] / dora["peak_mib"], 3) if dora and dora["peak_mib"] else ""
        r["vs_lycoris_locon"] = round(r["ms"] / locon["ms"], 3)
        r["mem_vs_lycoris_locon"] = round(r["peak_mib"] / locon["peak_mib"], 3) if locon["peak_mib"] else ""
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--channels", type=int, nargs=2, default=(64, 128), help="block_out_channels")
    p.add_argument("--groups", type=int, default=32, help="norm_num_groups")
    p.add_argument("--context-dim", type=int, default=64, help="cross_attention_dim")
    p.add_argument("--sample", type=int, default=32, help="latent height and width")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--r", type=int, default=8, help="LyCORIS linear_dim (linear_alpha = r / 2)")
    p.add_argument("--axes", default="out,in", help="wd_on_out axes to measure: out, in or both")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--name", default=None, help="file name stem (default lycoris-<device>)")
    args = p.parse_args(argv)
    args.axes = [a.strip() == "out" for a in args.axes.split(",")]
    rows = run(args)
    device = torch.device(args.device)
    import diffusers
    from importlib.metadata import version

    meta = {**metadata(device), "lycoris": version("lycoris-lora"), "diffusers": diffusers.__version__}
    shape = (f"UNet2DConditionModel block_out_channels={tuple(args.channels)} layers_per_block=1 "
             f"cross_attention_dim={args.context_dim} sample={args.sample} batch={args.batch} r={args.r} "
             f"alpha={args.r / 2:g} dtype={args.dtype}")
    for r in rows:
        r["shape"] = shape
    name = args.name or f"lycoris-{device_slug(device)}"
    write_results(os.path.join(args.out, name + ".csv"), rows, meta)
    columns = ["provider", "wd_on_out", "ms", "ms_p20", "ms_p80", "vs_lycoris_dora", "vs_lycoris_locon", "peak_mib",
               "mem_vs_lycoris_dora", "mem_vs_lycoris_locon", "loss0"]
    text = (f"# LyCORIS DoRA training step, patched and not: {meta['device']}\n\n{shape}, {rows[0]['modules']} "
            f"LyCORIS modules. Step: forward + MSE + backward + SGD + zero_grad, median of {args.reps} round-robin "
            f"rounds after {args.warmup} warm-up; peak memory of one step above the level before it.\n\n"
            f"torch {meta['torch']}, lycoris-lora {meta['lycoris']}, diffusers {meta['diffusers']}, dora_ext "
            f"{meta['dora_ext']} (git {meta['git_sha']}), {meta['timestamp']}. Command: "
            f"`python benchmarks/bench_lycoris.py`\n\n{markdown_table(rows, columns)}\n")
    with open(os.path.join(args.out, name + ".md"), "w") as f:
        f.write(text)
    print(text)
    return rows


if __name__ == "__main__":
    main()
