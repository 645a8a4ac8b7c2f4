"""Tensor-parallel DoRA runs for tests/test_tensor_parallel.py: the small Llama (built from a config) with DoRA on every
linear layer, single process (the float32 run, and the float64 oracle), or 2 processes (gloo, CPU) with torch's
parallelize_module: q/k/v/gate/up column-parallel, o/down row-parallel, lm_head left whole.

For each case (dropout 0 and 0.1, projections with and without bias, float32 and bfloat16) one training step: the
loss, the whole gradient of every trainable tensor, the tensors after one SGD step, and the eval logits, from B and
the magnitude moved off their init (perturb); plus the magnitude right after init and the adapter as save_adapter writes it (gathered from the shards). Both runs seed
alike, so the adapter init (distributed from rank 0) and every dropout mask are the same draws in both.

Usage: tp_train.py MODE OUT PORT, MODE in single, single64, tp, tp_fsdp2 (4 processes: FSDP2 × TP on a 2-D mesh,
one case).
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
#: float32, biases, dropout: also gradient checkpointing, merge/unmerge, the eval norm cache, two active adapters
#: and torch.compile (extras())
EXTRAS = dict(dropout=0.1, bias=True, dtype="float32", extras=True)
CASES.append(EXTRAS)
#: the case also run under TP × FSDP2 (4 processes, 2-D mesh)
FSDP_CASE = CASES[2]
COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROWWISE = ("o_proj", "down_proj")


def case_name(case: dict) -> str:
    return f"{case['dtype']}-bias{int(case['bias'])}-p{case['dropout']}" + ("-extras" if case.get("extras") else "")


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


def run_case(case: dict, mode: str, out: Path, rank: int, mesh, dp_mesh=None) -> None:
    """One case; dp_mesh: FSDP2 over it (each dp rank takes its half of the batch), TP over `mesh`."""
    dtype = torch.float64 if mode == "single64" else getattr(torch, case["dtype"])
    model = build(case, dtype, mesh)
    if dp_mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
    result = {"magnitude_init": {}, "base": {}}
    for name, layer in dora_ext.dora_layers(model).items():
        result["magnitude_init"][name] = _full(layer.lora_magnitude_vector["default"].weight)
        A, B = layer.factors("default")
        result["base"][f"{name}.weight"] = _full(layer.weight)
        result["base"][f"{name}.lora_A"], result["base"][f"{name}.lora_B"] = _full(A), _full(B)
    perturb(model)
    batch = llama_batch(batch=4)
    if dp_mesh is not None:  # equal halves: FSDP2's averaged gradients are the whole batch's
        half, dp = 2, dp_mesh.get_local_rank()
        batch = {k: v[dp * half:(dp + 1) * half] for k, v in batch.items()}
    if case.get("extras"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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
    more = extras(model, batch["input_ids"], mesh) if case.get("extras") else {}
    dora_ext.save_adapter(model, out / case_name(case) / "adapter")  # every rank: shards are gathered
    if mesh is not None and dp_mesh is None:  # and back: the saved files into a fresh sharded model
        fresh = base_llama(case["bias"]).to(dtype)
        shard(fresh, mesh)
        dora_ext.load_adapter(fresh, out / case_name(case) / "adapter")
        with torch.no_grad():
            reloaded = _full(fresh(input_ids=batch["input_ids"]).logits)
    if rank == 0:
        d = out / case_name(case)
        flat = {"loss": loss.detach().reshape(1).double(), "logits": logits}
        if mesh is not None and dp_mesh is None:
            flat["reloaded_logits"] = reloaded
        if dp_mesh is not None:  # the loss of this dp rank's half only
            flat.pop("loss")
        flat.update(more)
        flat.update({f"grad.{n}": g for n, g in grads.items()})
        flat.update({f"step.{n}": t for n, t in stepped.items()})
        flat.update({f"m0.{n}": t for n, t in result["magnitude_init"].items()})
        flat.update({f"base.{n}": t for n, t in result["base"].items()})
        safetensors.torch.save_file({k: v.contiguous() for k, v in flat.items()}, str(d / "result.safetensors"))


@torch.no_grad()
def perturb(model) -> None:
    """B and the magnitude moved off their init (B = 0, m = ‖W‖: gain 1, dA = 0), drawn in float32 from a fixed
    generator, so every gradient and the gain take part from the first step, alike in every run."""
    gen = torch.Generator().manual_seed(3)
    for layer in dora_ext.dora_layers(model).values():
        B, m = layer.factor_tensors("default")[1], layer.lora_magnitude_vector["default"].weight
        _set_whole(B, 0.05 * torch.randn(B.shape, generator=gen).to(B.dtype))
        _set_whole(m, (_full(m).float() * (1 + 0.1 * torch.randn(m.shape, generator=gen))).to(m.dtype))


def _set_whole(p: torch.Tensor, value: torch.Tensor) -> None:
    """p ← value (a whole tensor), for a DTensor p its shards of it."""
    if hasattr(p, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)
    p.copy_(value)


@torch.no_grad()
def extras(model, ids, mesh) -> dict[str, torch.Tensor]:
    """Eval logits after the step with the adapters merged (and the base weights after unmerging: restored), with
    the norm cache on (the second forward reuses the norms), with a second DoRA adapter active beside the first
    (multiplicative composition; its B set from a fixed generator so it changes the output), and compiled."""
    model.eval()
    layers = dora_ext.dora_layers(model)
    before = {n: _full(layer.weight) for n, layer in layers.items()}
    for layer in layers.values():
        layer.merge()
    got = {"merged_logits": _full(model(input_ids=ids).logits)}
    for layer in layers.values():
        layer.unmerge()
    got["unmerge_error"] = torch.stack([(_full(layer.weight) - before[n]).abs().max()
                                        for n, layer in layers.items()]).max().reshape(1)
    with dora_ext.norm_caching():
        model(input_ids=ids)
        got["cached_logits"] = _full(model(input_ids=ids).logits)
    got["compiled_logits"] = _full(torch.compile(model)(input_ids=ids).logits)
    dora_ext.add_adapter(model, dora_ext.DoRAConfig(r=2, alpha=4, target_modules=list(COLWISE + ROWWISE)), "second")
    gen = torch.Generator().manual_seed(2)
    for layer in layers.values():  # drawn in float32 for every run (the float64 oracle's own init draws differ)
        A, B = layer.factor_tensors("second")
        _set_whole(A, torch.randn(A.shape, generator=gen).to(A.dtype) / A.shape[1] ** 0.5)
        _set_whole(B, 0.05 * torch.randn(B.shape, generator=gen).to(B.dtype))
        m = layer.lora_magnitude_vector["second"].weight
        _set_whole(m, _full(layer.weight_norm("second")).to(m.dtype) * (1 + 0.1 * torch.randn(m.shape, generator=gen))
                   .to(m.dtype))
    dora_ext.set_adapter(model, ["default", "second"])
    got["two_adapter_logits"] = _full(model(input_ids=ids).logits)
    return got


def refusals(mesh) -> dict[str, str]:
    """What inject says of layouts it cannot make exact: a replicated DTensor weight, EDoRA on a sharded layer
    (its r×r R is not sharded here); each must leave the model unchanged."""
    from torch.distributed.tensor import Replicate, distribute_module, distribute_tensor

    def replicate(name, module, device_mesh):
        for key, p in list(module.named_parameters(recurse=False)):
            module.register_parameter(key, torch.nn.Parameter(distribute_tensor(p.detach(), device_mesh,
                                                                                [Replicate()])))

    said = {}
    for what, config in (("replicated", dora_ext.DoRAConfig(r=4, target_modules=["q_proj"])),
                         ("edora", dora_ext.DoRAConfig(r=4, target_modules=["q_proj"], variant="edora"))):
        model = base_llama(False)
        if what == "replicated":
            distribute_module(model.model.layers[0].self_attn.q_proj, mesh, replicate)
        else:
            shard(model, mesh)
        try:
            dora_ext.inject(model, config)
            said[what] = "accepted"
        except ValueError as exc:
            said[what] = str(exc) + f" | layers after: {len(dora_ext.dora_layers(model))}"
    return said


def main(rank: int, world: int, mode: str, out_dir: str, port: int) -> None:
    torch.set_num_threads(1)
    mesh = dp_mesh = None
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        from torch.distributed.device_mesh import init_device_mesh

        if mode == "tp_fsdp2":  # a 2-D mesh: FSDP2 over "dp", TP over "tp"
            mesh2d = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
            mesh, dp_mesh = mesh2d["tp"], mesh2d["dp"]
        else:
            mesh = init_device_mesh("cpu", (world,))
    out = Path(out_dir)
    cases = {"single64": [c for c in CASES if c["dtype"] == "float32"], "tp_fsdp2": [FSDP_CASE]}.get(mode, CASES)
    for case in cases:
        run_case(case, mode, out, rank, mesh, dp_mesh)
    refused = refusals(mesh) if mode == "tp" else {}
    if rank == 0:
        (out / "done.json").write_text(json.dumps([case_name(c) for c in cases]))
        (out / "refused.json").write_text(json.dumps(refused))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    mode, out_dir, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode in ("tp", "tp_fsdp2"):
        world = 2 if mode == "tp" else 4
        torch.multiprocessing.spawn(main, args=(world, mode, out_dir, port), nprocs=world, join=True)
    else:
        main(0, 1, mode, out_dir, port)
