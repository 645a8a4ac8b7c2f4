"""DoRA on nn.Embedding: the norm runs over the vocabulary, one gain per embedding dim (PEFT)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional
from .base import DoRALayer

__all__ = ["Embedding"]


class Embedding(DoRALayer):
    """DoRA on a frozen nn.Embedding: the norm runs over the vocabulary, one gain per embedding dim (PEFT)."""

    saved_keys = (("lora_embedding_A", "lora_embedding_A"), ("lora_embedding_B", "lora_embedding_B"),
                  ("lora_magnitude_vector", "lora_magnitude_vector"))

    def __init__(self, base_layer: nn.Module):
        if not isinstance(base_layer, nn.Embedding):
            raise TypeError(f"dora_ext.Embedding: expected an nn.Embedding, got {type(base_layer).__name__}")
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim

    @classmethod
    def factor_shapes(cls, base, r):
        return (r, base.num_embeddings), (base.embedding_dim, r), (base.embedding_dim,)

    def weight_2d(self, weight=None):
        return (self.weight if weight is None else weight).T  # [dim, vocab]

    def factors(self, name):
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def _create_factors(self, name, r, factory):
        self.lora_embedding_A[name] = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_embedding_B[name] = nn.Parameter(torch.empty(self.out_features, r, **factory))

    def factor_tensors(self, name):
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def _init_adapter(self, name, sigma):
        nn.init.zeros_(self.lora_embedding_A[name])  # PEFT's embedding init: A = 0, B ~ N(0, 1)
        nn.init.normal_(self.lora_embedding_B[name])

    def _embed(self, ids: Tensor, table: Tensor) -> Tensor:
        b = self.base_layer
        return F.embedding(ids, table, b.padding_idx, b.max_norm, b.norm_type, b.scale_grad_by_freq, b.sparse)

    def _adapted_forward(self, x: Tensor, active: list[str], *args, **kwargs) -> Tensor:
        embed_scale = getattr(self.base_layer, "embed_scale", None)
        embed_scale = embed_scale if isinstance(embed_scale, Tensor) or embed_scale is None else torch.tensor(
            embed_scale)
        return functional.embedding(x, self.base_layer(x, *args, **kwargs), self._embed, embed_scale,
                                    [self._adapter(a) for a in active])
