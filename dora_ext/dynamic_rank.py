"""DynamicRankAllocator: prune gated rank-1 components to a global budget during training (Mao et al. 2024,
"Dynamic Low-Rank Adaptation", arXiv 2405.17357, §3), for LoRA and for DoRA (the magnitude on top).

Each dynamic adapter holds ΔW = s·Σ_i c_i·b_i·a_iᵀ (layers.Linear: lora_A rows a_i, lora_B columns b_i,
lora_gate c, zero-initialised). After each optimizer step the user calls `allocator.step()`:

  importance  score_i = |c_i|·‖a_i‖·‖b_i‖ / (‖ΔW_c‖_F + eps), with ‖B·diag(c)·A‖_F² = Σ (ccᵀ ⊙ BᵀB ⊙ AAᵀ) from r×r
              Gram matrices (ΔW is never built), and S_i ← β·S_i + (1−β)·score_i (β = 0.9);
  schedule    t = step − ρ_s·T, T_p = (1 − ρ_s − ρ_e)·T (ρ_s = 0.15, ρ_e = 0.5: pruning runs from 15% to 50% of
              training); at t ≥ 0 and every `prune_interval` steps, k = ⌊N·p(t)⌋ components of all N in the model are
              pruned, p(t) = ((r₀ − r)/r₀)·(t/T_p)³ (cubic: slow first, fast at the end), lowest S first;
  masks       a pruned component stays pruned (its gate is zeroed after every step until training ends);
  removal     when pruning ends the pruned components are removed physically (smaller A, B, c per layer: new
              Parameter objects) and, if the optimizer was given, they replace the old ones in it with their state
              sliced to match, so the remaining half of training runs at the final ranks; without an optimizer,
              call finalize() yourself (and build the optimizer after it).

Two deliberate differences from the paper's code: k = 0 prunes nothing (the code zeroes one component at the first
pruning step even then), and pruning is monotone (the code lets a zeroed gate regrow between pruning steps).
The regulariser R = Σ_layers (Var(A, dim=1).sum() + Var(B, dim=0).sum()) / (2·r₀·layers) is opt-in:
`loss = loss + allocator.regularization_loss()` (weighted by `regularization`, 0 after pruning ends).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layers import DoRALayer
from .model_state import AdapterConfigs, dora_layers
from .variants import keep_components

__all__ = ["DynamicRankAllocator"]


class DynamicRankAllocator:
    def __init__(self, model: nn.Module, total_steps: int, target_rank: float | None = None,
                 optimizer: torch.optim.Optimizer | None = None, adapter_name: str = "default",
                 start_ratio: float = 0.15, end_ratio: float = 0.5, beta: float = 0.9, prune_interval: int = 1,
                 regularization: float = 0.0, eps: float = 1e-8):
        what = "dora_ext.DynamicRankAllocator"
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"{what}: expected total_steps >= 1, got {total_steps!r}")
        if not (0 <= start_ratio and 0 <= end_ratio and start_ratio + end_ratio < 1):
            raise ValueError(f"{what}: expected start_ratio, end_ratio >= 0 with start_ratio + end_ratio < 1, got "
                             f"{start_ratio}, {end_ratio}")
        if not 0 <= beta < 1 or prune_interval < 1 or regularization < 0:
            raise ValueError(f"{what}: expected 0 <= beta < 1, prune_interval >= 1, regularization >= 0; got "
                             f"{beta}, {prune_interval}, {regularization}")
        self.layers: dict[str, DoRALayer] = {n: l for n, l in dora_layers(model).items()
                                             if adapter_name in l.variants and l.variants[adapter_name].dynamic}
        if not self.layers:
            raise ValueError(f"{what}: the model has no dynamic-rank adapter {adapter_name!r} (inject with "
                             "DoRAConfig(dynamic_rank=True))")
        self.adapter = adapter_name
        self.optimizer = optimizer
        self.start_rank = {n: l.r[adapter_name] for n, l in self.layers.items()}
        config = AdapterConfigs.of(model).get(adapter_name)
        if target_rank is None:
            target_rank = config.r if config is not None else None
        if target_rank is None or not 0 < target_rank <= min(self.start_rank.values()):
            raise ValueError(f"{what}: expected 0 < target_rank <= r₀ = {min(self.start_rank.values())}, got "
                             f"{target_rank!r}")
        self.total = sum(self.start_rank.values())
        self.final_fraction = 1.0 - target_rank * len(self.layers) / self.total  # (r₀ − r)/r₀ on average
        self.T, self.start, self.span = total_steps, start_ratio * total_steps, (1 - start_ratio - end_ratio) * total_steps
        self.beta, self.interval, self.regularization, self.eps = beta, prune_interval, regularization, eps
        device = next(iter(self.layers.values())).lora_gate[adapter_name].device
        self.scores = {n: torch.zeros(r, device=device) for n, r in self.start_rank.items()}
        self.masks = {n: torch.zeros(r, dtype=torch.bool, device=device) for n, r in self.start_rank.items()}
        self.step_count = 0
        self.pruning_done = False
        self.removed = False

    # ------------------------------------------------------------------------------------------------ queries
    def ranks(self) -> dict[str, int]:
        """Live (unpruned) components per layer."""
        return {n: int((~m).sum()) for n, m in self.masks.items()}

    def average_rank(self) -> float:
        return sum(self.ranks().values()) / len(self.layers)

    def pruned_fraction(self, step: int) -> float:
        """p(t): the fraction of all components pruned by `step` (cubic schedule)."""
        t = step - self.start
        if t < 0:
            return 0.0
        return self.final_fraction * min(1.0, t / self.span) ** 3 if self.span > 0 else self.final_fraction

    def _tensors(self, name: str) -> tuple[Tensor, Tensor, Tensor]:
        layer = self.layers[name]
        return (layer.lora_A[self.adapter].weight, layer.lora_B[self.adapter].weight,
                layer.lora_gate[self.adapter])

    # ------------------------------------------------------------------------------------------------- update
    @torch.no_grad()
    def importance(self, name: str) -> Tensor:
        """score_i = |c_i|·‖a_i‖·‖b_i‖ / (‖B·diag(c)·A‖_F + eps), from r×r Gram matrices (fp32)."""
        A, B, c = (t.detach().float() for t in self._tensors(name))
        c = c.where(~self.masks[name], torch.zeros_like(c))
        gram = torch.outer(c, c) * (B.T @ B) * (A @ A.T)
        fro = gram.sum().clamp_min(0).sqrt()
        return c.abs() * A.norm(dim=1) * B.norm(dim=0) / (fro + self.eps)

    @torch.no_grad()
    def step(self) -> None:
        """Call once per optimizer step, after optimizer.step(): update scores, prune on schedule, keep masks."""
        step, self.step_count = self.step_count, self.step_count + 1
        if not self.pruning_done:
            for name in self.layers:
                self.scores[name].mul_(self.beta).add_(self.importance(name), alpha=1 - self.beta)
            t = step - self.start
            if t >= 0 and (int(t) % self.interval == 0 or t >= self.span):
                self._prune_to(int(self.total * self.pruned_fraction(step)))
            if t >= self.span:
                self.pruning_done = True
                if self.optimizer is not None:
                    self.finalize()
        self._apply_masks()

    def _prune_to(self, k: int) -> None:
        already = sum(int(m.sum()) for m in self.masks.values())
        new = k - already
        if new <= 0:
            return
        names = list(self.layers)
        scores = torch.cat([self.scores[n].masked_fill(self.masks[n], float("inf")) for n in names])
        order = torch.argsort(scores, stable=True)[:new]  # lowest importance first, ties by position
        offsets = torch.tensor([0] + [self.masks[n].numel() for n in names]).cumsum(0)
        for i, n in enumerate(names):
            local = order[(order >= offsets[i]) & (order < offsets[i + 1])] - offsets[i]
            self.masks[n][local] = True

    def _apply_masks(self) -> None:
        for name in self.layers:
            gate = self._tensors(name)[2]
            if self.masks[name].any():
                gate.masked_fill_(self.masks[name].to(gate.device), 0.0)

    def regularization_loss(self) -> Tensor:
        """regularization · Σ (Var(A, dim=1).sum() + Var(B, dim=0).sum()) / (2·r₀·layers); 0 after pruning ends."""
        first = self._tensors(next(iter(self.layers)))[0]
        if self.regularization == 0 or self.pruning_done:
            return first.new_zeros(())
        total = sum(A.var(dim=1).sum() + B.var(dim=0).sum() for A, B, _ in map(self._tensors, self.layers))
        r0 = max(self.start_rank.values())
        return self.regularization * total / (2 * r0 * len(self.layers))

    # ------------------------------------------------------------------------------------------------ removal
    @torch.no_grad()
    def finalize(self) -> dict[str, int]:
        """Physically remove pruned components (each layer keeps at least one; a fully pruned layer keeps one
        zero-gated component, so its magnitude still applies). Returns the per-layer ranks. Idempotent."""
        if self.removed:
            return self.ranks()
        self._apply_masks()
        for name, layer in self.layers.items():
            keep = keep_components(~self.masks[name], self.scores[name])
            layer.keep_components(self.adapter, keep, self._sliced)
            self.scores[name] = self.scores[name][keep]
            self.masks[name] = self.masks[name][keep]
        self.removed = True
        return self.ranks()

    def _sliced(self, p: nn.Parameter, dim: int, keep: Tensor) -> nn.Parameter:
        """A new Parameter holding the kept slice, swapped into the optimizer with its state sliced alike. (A new
        object, not `p.data = …`: autograd caches a leaf's shape in its gradient accumulator.)"""
        keep = keep.to(p.device)
        new = nn.Parameter(p.detach().index_select(dim, keep), requires_grad=p.requires_grad)
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["params"] = [new if q is p else q for q in group["params"]]
            state = self.optimizer.state.pop(p, None)
            if state is not None:  # Adam/AdamW/SGD-momentum buffers have the parameter's shape
                self.optimizer.state[new] = {k: v.index_select(dim, keep.to(v.device))
                                             if isinstance(v, Tensor) and v.shape == p.shape else v
                                             for k, v in state.items()}
        return new

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "pruning_done": self.pruning_done, "removed": self.removed,
                "scores": dict(self.scores), "masks": dict(self.masks)}

    def load_state_dict(self, state: dict) -> None:
        self.step_count, self.pruning_done = state["step_count"], state["pruning_done"]
        self.removed = state["removed"]
        self.scores, self.masks = dict(state["scores"]), dict(state["masks"])
