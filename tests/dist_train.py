"""A few DoRA training steps on the small Llama: single process, or 2 processes (gloo, CPU) under DDP or FSDP2.

Every process sees an equal share of one fixed batch, so the mean of the per-rank losses and the averaged gradients
equal single-process training on the whole batch. Writes losses.json and the saved adapter to the output directory.
Run by tests/test_distributed.py.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
import dora_ext  # noqa: E402
from real_models import llama_batch, tiny_llama  # noqa: E402

STEPS = 3


def train(rank: int, world: int, mode: str, out_dir: str, port: int) -> None:
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    model = tiny_llama()
    torch.manual_seed(0)  # the same adapter init on every rank
    dora_ext.inject(model, dora_ext.DoRAConfig(r=4, alpha=8, target_modules="all-linear"))
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
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(STEPS):
        loss = wrapped(**local).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        losses.append(mean.item())
    dora_ext.save_adapter(model, Path(out_dir) / "adapter")  # every rank calls: sharded tensors are gathered
    if rank == 0:
        (Path(out_dir) / "losses.json").write_text(json.dumps(losses))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    mode, out_dir, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "single":
        train(0, 1, mode, out_dir, port)
    else:
        torch.multiprocessing.spawn(train, args=(2, mode, out_dir, port), nprocs=2, join=True)
