"""A few DoRA training steps on the small Llama: single process (float32, or float64 as the oracle), or 2 processes (gloo, CPU) under DDP or FSDP2.

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


def train(rank: int, world: int, mode: str, out_dir: str, port: int) -> None:
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    model = tiny_llama()
    torch.manual_seed(0)  # the same adapter init on every rank
    dora_ext.inject(model, dora_ext.DoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    if mode == "single64":  # the float64 oracle the fp32 runs are measured against: the same values, cast
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
    wrapped.train()
    out = Path(out_dir)
    dora_ext.save_adapter(model, out / "init")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for step in range(STEPS):
        loss = wrapped(**local).loss
        loss.backward()
        if step == 0:
            _save_grads(model, out / "grads.safetensors", rank)
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        losses.append(mean.item())
    dora_ext.save_adapter(model, out / "adapter")  # every rank calls: sharded tensors are gathered
    if rank == 0:
        (out / "losses.json").write_text(json.dumps(losses))
    if world > 1:
        # DDP's reducer holds the process group (and gloo's worker threads) alive past destroy_process_group; left
        # to interpreter shutdown, gloo's threads can be torn down with it and abort the worker ("terminate called
        # without an active exception", seen once in ~20 runs). Drop it first, while the interpreter is whole.
        del wrapped
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def _save_grads(model, path: Path, rank: int) -> None:
    """The whole gradient of every trainable tensor (FSDP2 shards are gathered: every rank must call)."""
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            g = p.grad
            grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    if rank == 0:
        safetensors.torch.save_file(grads, str(path))


if __name__ == "__main__":
    mode, out_dir, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode in ("single", "single64"):
        train(0, 1, mode, out_dir, port)
    else:
        torch.multiprocessing.spawn(train, args=(2, mode, out_dir, port), nprocs=2, join=True)
