"""Tensor-parallel DoRA against tensor-parallel LoRA, 2 gloo processes on the CPU (one thread each): a Llama-style
stack built from a config, torch's parallelize_module (q/k/v/gate/up column-parallel, o/down row-parallel),
dora_ext.inject with DoRA or with plain LoRA (variant="lora": the same sharded adapters without the magnitude).

Per training step (forward + backward + SGD step) it reports:
  * the collectives each model issues, counted below the Python API (a TorchDispatchMode sees every c10d and
    functional collective, DTensor's included): count and bytes per kind, and DoRA's beyond LoRA's per row-parallel
    layer. The target: one [out] fp32 all-reduce per row-parallel layer in the forward (the norm); backward none
    beyond LoRA's but the magnitude's gradient (replicated: all-reduced like lora_B's).
  * the step time of both, measured round-robin in the same processes (ratios from one run).
  * what PEFT's own DoRA does on the same sharded model (its error, as it happens), for the README.

Usage: python benchmarks/bench_tp.py [--hidden 512 --intermediate 1376 --layers 2 --seq 128 --batch 2 --r 16]
Writes benchmarks/results/tp-cpu-2procs.{csv,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import interleaved_ms, markdown_table, metadata, write_results  # noqa: E402

COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROWWISE = ("o_proj", "down_proj")


class Collectives(TorchDispatchMode):
    """Counts collectives (c10d ops, as dist.all_reduce issues them, and DTensor's functional ones) and the bytes
    of their tensor arguments."""

    def __init__(self):
        super().__init__()
        self.count, self.bytes = Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ns = func.namespace
        if ns in ("c10d", "_c10d_functional", "_c10d_functional_autograd"):
            name = func._schema.name.split("::")[-1].rstrip("_")
            if name not in ("wait_tensor", "barrier"):
                tensors = [t for a in args for t in (a if isinstance(a, (list, tuple)) else [a])
                           if isinstance(t, torch.Tensor)]
                self.count[name] += 1
                self.bytes[name] += sum(t.numel() * t.element_size() for t in tensors[:1] or tensors)
        return func(*args, **(kwargs or {}))


def build(args, variant: str, mesh):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    from transformers import LlamaConfig, LlamaForCausalLM

    import dora_ext

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=args.seq)
    model = LlamaForCausalLM(config)
    plan = {}
    for i in range(args.layers):
        for n in COLWISE:
            plan[f"model.layers.{i}.{'self_attn' if n in ('q_proj', 'k_proj', 'v_proj') else 'mlp'}.{n}"] = \
                ColwiseParallel()
        plan[f"model.layers.{i}.self_attn.o_proj"] = RowwiseParallel()
        plan[f"model.layers.{i}.mlp.down_proj"] = RowwiseParallel()
    parallelize_module(model, mesh, plan)
    if variant == "peft_dora":
        import peft

        return peft.get_peft_model(model, peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, use_dora=True,
                                                          target_modules=list(COLWISE + ROWWISE)))
    dora_ext.inject(model, dora_ext.DoRAConfig(r=args.r, alpha=2 * args.r, variant=variant,
                                               target_modules=list(COLWISE + ROWWISE)))
    return model.train()


def worker(rank: int, args, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2,))
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (args.batch, args.seq), generator=gen)
    models = {v: build(args, v, mesh) for v in ("lora", "dora")}
    opts = {v: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-3) for v, m in models.items()}

    def step(v):
        def run():
            models[v](input_ids=ids, labels=ids).loss.backward()
            opts[v].step()
            opts[v].zero_grad()
        return run

    counts = {}
    for v in models:
        with Collectives() as c:
            step(v)()
        counts[v] = (dict(c.count), dict(c.bytes))
    times = interleaved_ms({v: step(v) for v in models}, torch.device("cpu"), args.warmup, args.reps)
    peft_dora = "ran"
    try:
        build(args, "peft_dora", mesh)(input_ids=ids).logits.sum().backward()
    except Exception as exc:  # what PEFT's own DoRA does on a sharded model: recorded, not hidden
        peft_dora = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    if rank == 0:
        Path(out).write_text(json.dumps({"counts": counts, "times": times, "peft_dora": peft_dora}))
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("hidden", 512), ("intermediate", 1376), ("layers", 2), ("seq", 128), ("batch", 2),
                          ("r", 16), ("warmup", 2), ("reps", 9)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        torch.multiprocessing.spawn(worker, args=(args, port, str(result)), nprocs=2, join=True)
        got = json.loads(result.read_text())
    rows_layers = args.layers * len(ROWWISE)
    rows = []
    kinds = sorted(set(got["counts"]["lora"][0]) | set(got["counts"]["dora"][0]))
    for kind in kinds:
        (lc, lb), (dc, db) = ((got["counts"][v][0].get(kind, 0), got["counts"][v][1].get(kind, 0))
                              for v in ("lora", "dora"))
        rows.append({"what": f"collective {kind}", "tp_lora": f"{lc} ({lb} B)", "tp_dora": f"{dc} ({db} B)",
                     "dora_extra": f"{dc - lc} ({db - lb} B)",
                     "per_row_parallel_layer": f"{(dc - lc) / rows_layers:g} ({(db - lb) / rows_layers:g} B)"})
    (l50, l20, l80), (d50, d20, d80) = got["times"]["lora"], got["times"]["dora"]
    rows.append({"what": "step ms (p50 [p20, p80])", "tp_lora": f"{l50:.1f} [{l20:.1f}, {l80:.1f}]",
                 "tp_dora": f"{d50:.1f} [{d20:.1f}, {d80:.1f}]", "dora_extra": f"{d50 / l50:.3f}x", "per_row_parallel_layer": ""})
    meta = metadata(torch.device("cpu"))
    meta["device"] = re.sub(r"\(\d+ threads\)", "(2 gloo processes, 1 thread each)", meta["device"])
    write_results(os.path.join(args.out, "tp-cpu-2procs.csv"), rows, meta)
    shape = (f"hidden={args.hidden} intermediate={args.intermediate} layers={args.layers} seq={args.seq} "
             f"batch={args.batch} r={args.r} float32; {rows_layers} row-parallel and "
             f"{args.layers * len(COLWISE)} column-parallel layers")
    md = [f"# Tensor-parallel DoRA vs LoRA: {meta['device']}", "", shape, "",
          f"torch {meta['torch']}, peft {meta['peft']}, dora_ext {meta['dora_ext']} (git {meta['git_sha']}), "
          f"{meta['timestamp']}. Command: `python benchmarks/bench_tp.py`", "",
          markdown_table(rows, ["what", "tp_lora", "tp_dora", "dora_extra", "per_row_parallel_layer"]), "",
          f"PEFT's own DoRA on the same sharded model: {got['peft_dora']}", ""]
    Path(args.out, "tp-cpu-2procs.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
