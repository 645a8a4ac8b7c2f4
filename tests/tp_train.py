"""Tensor-parallel DoRA runs for tests/test_tensor_parallel.py: the small Llama (built from a config) with DoRA on every
linear layer, single process (the float32 run, and the float64 oracle), or 2 processes (gloo, CPU) with torch's
parallelize_module: q/k/v/gate/up column-parallel, o/down row-parallel, lm_head left whole.

For each case (dropout 0 and 0.1, projections with and without bias, float32 and bfloat16) one training step: the
loss, the whole gradient of every trainable tensor, the tensors after one SGD step, and the eval logits; plus the
magnitude right after init and the adapter as save_adapter writes it (gathered from the shards). Both runs seed
alike, so the adapter init (distributed from rank 0) and every dropout mask are the same draws in both.

Usage: tp_train.py MODE OUT PORT, MODE in single, single64, tp.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "demo"))  # offline_models.py
import dora_ext  # noqa: E402
from offline_models import llama_batch, tiny_llama  # noqa: E402

LR = 0.5
CASES = [dict(dropout=p, bias=b, dtype=d) for d in ("float32", "bfloat16") for b in (False, True) for p in (0.0, 0.1)]
COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROWWISE = ("o_proj", "down_proj")


def case_name(case: dict) -> str:
    return f"{case['dtype']}-bias{int(case['bias'])}-p{case['dropout']}"


def base_llama(bias: bool):
    """The small Llama (float32), with a bias in every projection if asked: the same weights in every process."""
    from transformers import LlamaForCausalLM

    config = tiny_llama().config
    config.attention_bias = config.mlp_bias = bias
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def shard(model, mesh) -> None:
    """torch's parallelize_module over the projections: q/k/v/gate/up column-parallel, o/down row-parallel."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {}
    for i in range(len(model.model.layers)):
        for name in COLWISE:
            part = "self_attn" if name in ("q_proj", "k_proj", "v_proj") else "mlp"
            plan[f"model.layers.{i}.{part}.{name}"] = ColwiseParallel()
        plan[f"model.layers.{i}.self_attn.o_proj"] = RowwiseParallel()
        plan[f"model.layers.{i}.mlp.down_proj"] = RowwiseParallel()
    parallelize_module(model, mesh, plan)


def build(case: dict, dtype: torch.dtype, mesh=None):
    """The small Llama in `dtype` (with biased projections if asked), TP-sharded over `mesh` if given, then DoRA on
    every linear layer but lm_head. float64 (the oracle): built and injected in float32, then converted, so its
    adapter init is the float32 runs' draws."""
    if dtype == torch.float64:
        return build(case, torch.float32).double()
    model = base_llama(case["bias"]).to(dtype)
    if mesh is not None:
        shard(model, mesh)
    torch.manual_seed(0)  # the adapter init: rank 0's draws, distributed; the same draws in one process
    dora_ext.inject(model, dora_ext.DoRAConfig(r=4, alpha=8, dropout=case["dropout"],
                                               target_modules=list(COLWISE + ROWWISE)))
    return model


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def run_case(case: dict, mode: str, out: Path, rank: int, mesh) -> None:
    dtype = torch.float64 if mode == "single64" else getattr(torch, case["dtype"])
    model = build(case, dtype, mesh)
    result = {"magnitude_init": {}, "base": {}}
    for name, layer in dora_ext.dora_layers(model).items():
        result["magnitude_init"][name] = _full(layer.lora_magnitude_vector["default"].weight)
        A, B = layer.factors("default")
        result["base"][f"{name}.weight"] = _full(layer.weight)
        result["base"][f"{name}.lora_A"], result["base"][f"{name}.lora_B"] = _full(A), _full(B)
    batch = llama_batch(batch=4)
    model.train()
    torch.manual_seed(1)  # the dropout masks
    loss = model(**batch).loss
    loss.backward()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = {n: _full(p.grad) for n, p in params.items()}
    with torch.no_grad():
        for p in params.values():
            p.add_(p.grad, alpha=-LR)
    stepped = {n: _full(p) for n, p in params.items()}
    model.eval()
    with torch.no_grad():
        logits = _full(model(input_ids=batch["input_ids"]).logits)
    dora_ext.save_adapter(model, out / case_name(case) / "adapter")  # every rank: shards are gathered
    if mesh is not None:  # and back: the saved files into a fresh sharded model
        fresh = base_llama(case["bias"]).to(dtype)
        shard(fresh, mesh)
        dora_ext.load_adapter(fresh, out / case_name(case) / "adapter")
        with torch.no_grad():
            reloaded = _full(fresh(input_ids=batch["input_ids"]).logits)
    if rank == 0:
        d = out / case_name(case)
        flat = {"loss": loss.detach().reshape(1).double(), "logits": logits}
        if mesh is not None:
            flat["reloaded_logits"] = reloaded
        flat.update({f"grad.{n}": g for n, g in grads.items()})
        flat.update({f"step.{n}": t for n, t in stepped.items()})
        flat.update({f"m0.{n}": t for n, t in result["magnitude_init"].items()})
        flat.update({f"base.{n}": t for n, t in result["base"].items()})
        safetensors.torch.save_file({k: v.contiguous() for k, v in flat.items()}, str(d / "result.safetensors"))


def main(rank: int, world: int, mode: str, out_dir: str, port: int) -> None:
    torch.set_num_threads(1)
    mesh = None
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
    out = Path(out_dir)
    cases = CASES if mode != "single64" else [c for c in CASES if c["dtype"] == "float32"]
    for case in cases:
        run_case(case, mode, out, rank, mesh)
    if rank == 0:
        (out / "done.json").write_text(json.dumps([case_name(c) for c in cases]))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    mode, out_dir, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "tp":
        torch.multiprocessing.spawn(main, args=(2, mode, out_dir, port), nprocs=2, join=True)
    else:
        main(0, 1, mode, out_dir, port)
