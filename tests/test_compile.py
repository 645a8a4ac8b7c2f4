"""torch.compile(fullgraph=True) of a model built from DoRALinear layers: same outputs and gradients as eager."""

import pytest
import torch
from torch import nn

import dora_ext
from helpers import assert_close


class TwoLayer(nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        self.up = dora_ext.DoRALinear.from_linear(nn.Linear(32, 64), r=8, alpha=16, dropout=dropout)
        self.down = dora_ext.DoRALinear.from_linear(nn.Linear(64, 16, bias=False), r=4, dropout=dropout)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(device, backend):
    model = TwoLayer().to(device)
    with torch.no_grad():
        for p in trainable(model):
            p.add_(0.1 * torch.randn_like(p))
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    x = torch.randn(3, 5, 32, device=device, requires_grad=True)
    y_eager = model(x)
    y_eager.square().sum().backward()
    eager_grads = [t.grad.clone() for t in [x] + trainable(model)]
    for t in [x] + trainable(model):
        t.grad = None
    y = compiled(x)
    y.square().sum().backward()
    assert_close(y, y_eager, torch.float32)
    for a, t in zip(eager_grads, [x] + trainable(model)):
        assert_close(t.grad, a, torch.float32)


def test_compile_with_dropout_in_training(device):
    model = TwoLayer(dropout=0.2).to(device).train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 32, device=device)
    compiled(x).sum().backward()
    assert all(p.grad is not None for p in trainable(model))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_reduce_overhead():
    """Kernels launched on the default stream instead of the current one give wrong results under CUDA graphs
    (pytorch/pytorch#157363); replaying a captured graph must match eager."""
    model = TwoLayer().cuda().eval()
    with torch.no_grad():
        for p in trainable(model):
            p.add_(0.1 * torch.randn_like(p))
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    for step in range(4):
        x = torch.randn(8, 32, device="cuda")
        with torch.no_grad():
            y = compiled(x)
            assert_close(y, model(x), torch.float32, msg=f"replay {step}")
