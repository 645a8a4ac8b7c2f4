"""A few DoRA training steps on the small Llama: single process (float32, or float64 as the oracle), or 2 processes (gloo, CPU) under DDP or FSDP2.
The peft_* modes: the Llama with biased projections, PEFT DoRA converted by dora_ext.from_peft, single process or under
FSDP1 with use_orig_params=True (whose frozen biases require grad in the forward); they also write stats.json
(calls of PEFT's own DoRA forward, fused calls with a bias that requires grad) and save no adapter files.

Every process sees an equal share of one fixed batch, so the mean of the per-rank losses and the averaged gradients
equal single-process training on the whole batch. Writes losses.json, the first step's gradients (grads.safetensors,
whole tensors), the initial and the trained adapter to the output directory. Run by tests/test_distributed.py.

Plain SGD, not Adam: SGD moves each parameter by lr × its gradient, so a rounding difference in a gradient (two half
batches + all-reduce against one batch, vendor-specific GEMM kernels) stays a rounding difference in the parameter.
Adam's first steps move every element by about ±lr whatever the gradient's size, so a near-zero gradient whose last
bits differ can move an element by an lr-sized amount the other way.
"""

from __future__ import annotations

import gc
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
from real_models import llama_batch, tiny_llama  # noqa: E402

STEPS = 3
LR = 0.5  # large enough that three steps move every adapter tensor well above rounding


def _peft_llama():
    """The small Llama with a bias in every projection, PEFT DoRA on all its linears (frozen biases), converted."""
    import peft
    from transformers import LlamaForCausalLM

    config = tiny_llama().config
    config.attention_bias = config.mlp_bias = True
    torch.manual_seed(0)  # the same base and adapter init on every rank
    model = peft.get_peft_model(LlamaForCausalLM(config), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                                          target_modules="all-linear"))
    return dora_ext.from_peft(model)


def _count_paths(stats: dict) -> None:
    """stats["peft_forward"]: calls of PEFT's own DoraLinearVariant.forward (the fused variant's fallback);
    stats["fused_grad_bias"]: fused calls given a bias that requires grad."""
    from peft.tuners.lora import variants

    peft_forward, rescale = variants.DoraLinearVariant.forward, dora_ext.ops.dora_rescale

    def counted_forward(*args, **kwargs):
        stats["peft_forward"] += 1
        return peft_forward(*args, **kwargs)

    def counted_rescale(*args, bias=None, **kwargs):
        stats["fused_grad_bias"] += bias is not None and bias.requires_grad
        return rescale(*args, bias=bias, **kwargs)

    variants.DoraLinearVariant.forward = staticmethod(counted_forward)
    dora_ext.ops.dora_rescale = counted_rescale


def train(rank: int, world: int, mode: str, out_dir: str, port: int) -> None:
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    peft_route, stats = mode.startswith("peft"), {"peft_forward": 0, "fused_grad_bias": 0}
    if peft_route:
        model = _peft_llama()
        _count_paths(stats)
    else:
        model = tiny_llama()
        torch.manual_seed(0)  # the same adapter init on every rank
        dora_ext.inject(model, dora_ext.DoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    if mode in ("single64", "peft_single64"):  # the float64 oracle the fp32 runs are measured against
        model = model.double()
    batch = llama_batch(batch=8)
    share = 8 // world
    local = {k: v[rank * share:(rank + 1) * share] for k, v in batch.items()}
    wrapped = model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model)
    elif mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif mode == "peft_fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        wrapped = FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"),
                                           auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}))
    wrapped.train()
    out = Path(out_dir)
    if not peft_route:
        dora_ext.save_adapter(model, out / "init")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for step in range(STEPS):
        loss = wrapped(**local).loss
        loss.backward()
        if step == 0:
            _save_grads(model, out / "grads.safetensors", rank, wrapped if mode == "peft_fsdp1" else None)
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        losses.append(mean.item())
    if not peft_route:
        dora_ext.save_adapter(model, out / "adapter")  # every rank calls: sharded tensors are gathered
    if rank == 0:
        (out / "losses.json").write_text(json.dumps(losses))
        if peft_route:
            (out / "stats.json").write_text(json.dumps(stats))
    if world > 1:
        # DDP's reducer holds the process group (and gloo's worker threads) alive past destroy_process_group; left
        # to interpreter shutdown, gloo's threads can be torn down with it and abort the worker ("terminate called
        # without an active exception", seen once in ~20 runs). Drop it first, while the interpreter is whole.
        del wrapped
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def _save_grads(model, path: Path, rank: int, fsdp1=None) -> None:
    """The whole gradient of every trainable tensor (FSDP2 shards, and FSDP1's (`fsdp1`: the root wrapper) are
    gathered: every rank must call)."""
    if fsdp1 is not None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(fsdp1, with_grads=True):
            grads = {name.replace("_fsdp_wrapped_module.", ""): p.grad.detach().clone()
                     for name, p in model.named_parameters() if p.requires_grad}
        if rank == 0:
            safetensors.torch.save_file(grads, str(path))
        return
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            g = p.grad
            grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    if rank == 0:
        safetensors.torch.save_file(grads, str(path))


if __name__ == "__main__":
    mode, out_dir, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode in ("single", "single64", "peft_single", "peft_single64"):
        train(0, 1, mode, out_dir, port)
    else:
        torch.multiprocessing.spawn(train, args=(2, mode, out_dir, port), nprocs=2, join=True)
