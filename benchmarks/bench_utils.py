"""Timing, environment metadata and result files for the benchmarks."""

from __future__ import annotations

import csv
import datetime
import os
import platform
import re
import statistics
import subprocess
import time
from typing import Callable

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
        name = model or name
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    base = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{torch.get_num_threads()}threads"
    return re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")


def git_sha() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def metadata(device: torch.device) -> dict:
    import dora_ext

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = "absent"
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "peft": peft_version,
        "dora_ext": dora_ext.__version__,
        "git_sha": git_sha(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> tuple[float, float, float]:
    """(p50, p20, p80) wall time in ms of fn(); CUDA timings use events on the current stream."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return statistics.median(times), q[0], q[3]


def interleaved_ms(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int,
                   reps: int) -> dict[str, tuple[float, float, float]]:
    """median_ms for several functions measured round-robin (one call of each per round), so slow drifts of a
    shared machine (clocks, neighbours) hit every function alike instead of whichever ran last."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(median_ms(fn, device, 0, 1)[0])
    out = {}
    for name, ts in times.items():
        ts.sort()
        q = statistics.quantiles(ts, n=5) if len(ts) >= 2 else [ts[0]] * 4
        out[name] = (statistics.median(ts), q[0], q[3])
    return out


def write_results(path: str, rows: list[dict], meta: dict) -> None:
    """A CSV: one row per measurement, with the run's metadata repeated on every row."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fields = list(rows[0].keys()) + list(meta.keys())
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **meta})


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row[c]) for c in columns) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the Llama-style model benchmarks
#: CUDA: a ~0.9B-parameter-class layer shape at 8k tokens; CPU: small enough for minutes on 2 cores.
LLAMA_DEFAULTS = {"cuda": dict(dtype="bfloat16", hidden=2048, intermediate=5632, layers=4, heads=16, seq=1024, batch=8),
                  "cpu": dict(dtype="float32", hidden=1024, intermediate=2816, layers=2, heads=8, seq=256, batch=2)}


def add_llama_args(p) -> None:
    """The model-shape arguments of the Llama-style benchmarks (None: LLAMA_DEFAULTS for the device)."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="base dtype (default: bfloat16 on CUDA, float32 on CPU)")
    for name in ("hidden", "intermediate", "layers", "heads", "seq", "batch"):
        p.add_argument(f"--{name}", type=int, default=None)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))


def fill_llama_defaults(args, **extra) -> None:
    """Fill unset arguments from LLAMA_DEFAULTS (and `extra`: {"cuda": {...}, "cpu": {...}})."""
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    for k, v in {**LLAMA_DEFAULTS[kind], **extra.get(kind, {})}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def build_llama(args, device) -> torch.nn.Module:
    """A LlamaForCausalLM from the shape arguments, random init (seed 0), in args.dtype on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      max_position_embeddings=args.seq)
    return LlamaForCausalLM(cfg).to(device=device, dtype=getattr(torch, args.dtype))


def llama_shape(args) -> str:
    return (f"hidden={args.hidden} intermediate={args.intermediate} layers={args.layers} seq={args.seq} "
            f"batch={args.batch} r={args.r} dtype={args.dtype}")


def publish(rows: list[dict], args, device, slug: str, title: str, note: str, command: str,
            columns: list[str]) -> str:
    """Write <out>/<slug>-<device>.csv and .md (device, versions and git sha on every row and in the header);
    returns the markdown."""
    meta = metadata(device)
    shape = llama_shape(args)
    for r in rows:
        r["shape"] = shape
    name = f"{slug}-{device_slug(device)}"
    write_results(os.path.join(args.out, name + ".csv"), rows, meta)
    text = (f"# {title}: {meta['device']}\n\n{shape}{note}\n\n"
            f"torch {meta['torch']}, peft {meta['peft']}, dora_ext {meta['dora_ext']} (git {meta['git_sha']}), "
            f"{meta['timestamp']}. Command: `{command}`\n\n{markdown_table(rows, columns)}\n")
    with open(os.path.join(args.out, name + ".md"), "w") as f:
        f.write(text)
    return text
