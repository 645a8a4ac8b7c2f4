"""Tensor-parallel DoRA on a transformers model loaded with `tp_plan="auto"` (2 gloo processes on the CPU), for
tests/test_tensor_parallel.py: a tiny Llama saved locally (non-zero biases in the attention projections, none in the
MLP), and a PEFT DoRA adapter (dropout 0.1) saved by PEFT in one process (trained-looking: B and the magnitude
perturbed), then, per route:

  inject      dora_ext.load_adapter onto the model (dora_ext's own layers)
  patch_peft  peft.PeftModel.from_pretrained under dora_ext.patch_peft() (PEFT's layers, fused variants)
  peft_lora   plain PEFT LoRA (the same adapter without magnitude), eval logits only: PEFT's own TP support

the eval logits, and for the DoRA routes one training step: loss, the whole gradient of every trainable tensor, the
tensors after one SGD step, and the adapter as the route saves it (gathered or whole). transformers' tp_plan shards
q/k/v/gate/up column-wise and o/down row-wise (DTensor weights, replaced forwards, no hooks).

Usage: tp_hf.py prep DIR | tp_hf.py MODE DIR PORT with MODE in single, single64, tp.
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
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROUTES = ("inject", "patch_peft", "peft_lora")


def prep(root: Path) -> None:
    """The base model and the two adapters, written by one process."""
    import peft

    model = tiny_llama()
    # biased attention projections, unbiased MLP: both kinds of fused path on both layouts
    model.config.attention_bias, model.config.mlp_bias = True, False
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(model.config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(root / "base")
    for kind, use_dora in (("dora", True), ("lora", False)):
        torch.manual_seed(1)
        pm = peft.get_peft_model(LlamaForCausalLM.from_pretrained(root / "base"),
                                 peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=use_dora,
                                                 lora_dropout=0.1))
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
                elif "lora_magnitude_vector" in name:
                    p.mul_(1 + 0.1 * torch.randn_like(p))
        pm.save_pretrained(root / kind)


def _full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _load(root: Path, route: str, dtype: torch.dtype, tp: bool):
    import peft
    from transformers import AutoModelForCausalLM

    kwargs = {"tp_plan": "auto"} if tp else {}
    base = AutoModelForCausalLM.from_pretrained(root / "base", dtype=dtype, **kwargs).eval()
    if route == "inject":
        return dora_ext.load_adapter(base, root / "dora", is_trainable=True)
    if route == "patch_peft":
        with dora_ext.peft_patched():
            return peft.PeftModel.from_pretrained(base, root / "dora", is_trainable=True)
    return peft.PeftModel.from_pretrained(base, root / "lora")


def run(rank: int, world: int, mode: str, root: str, port: int) -> None:
    torch.set_num_threads(1)
    root, tp = Path(root), world > 1
    if tp:  # transformers initialises the process group itself from these
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dtype = torch.float64 if mode == "single64" else torch.float32
    batch = llama_batch(batch=4)
    out = {}
    for route in ROUTES:
        model = _load(root, route, dtype, tp).eval()  # new layers start in train mode (PEFT's too)
        with torch.no_grad():
            out[f"{route}.logits"] = _full(model(input_ids=batch["input_ids"]).logits)
        if route == "peft_lora":
            continue
        model.train()
        torch.manual_seed(1)  # the dropout masks: the same draws in every run
        loss = model(**batch).loss
        loss.backward()
        params = {n.replace("base_model.model.", ""): p for n, p in model.named_parameters() if p.requires_grad}
        out[f"{route}.loss"] = loss.detach().double().reshape(1)
        out.update({f"{route}.grad.{n}": _full(p.grad) for n, p in params.items()})
        with torch.no_grad():
            for p in params.values():
                p.add_(p.grad, alpha=-LR)
        out.update({f"{route}.step.{n}": _full(p) for n, p in params.items()})
        saved = root / mode / route
        if route == "inject":
            dora_ext.save_adapter(model, saved)
        else:
            model.save_pretrained(saved, is_main_process=rank == 0)
    if rank == 0:
        safetensors.torch.save_file({k: v.contiguous() for k, v in out.items()}, str(root / mode / "result.safetensors"))
        (root / mode / "done.json").write_text(json.dumps(sorted(out)))
    if tp:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "prep":
        prep(Path(sys.argv[2]))
    else:
        mode, root, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
        (Path(root) / mode).mkdir(parents=True, exist_ok=True)
        if mode == "tp":
            torch.multiprocessing.spawn(run, args=(2, mode, root, port), nprocs=2, join=True)
        else:
            run(0, 1, mode, root, port)
