"""The private APIs of torch and PEFT that dora_ext touches are each bound in one shim; this fails, naming the API,
when an upgrade removes one (the shims raise naming it too, instead of falling back silently)."""

import torch

from dora_ext import torch_private


def test_every_private_torch_api_exists():
    assert torch_private.missing() == [], f"torch {torch.__version__} lacks {torch_private.missing()}"


def test_a_missing_api_raises_naming_it():
    fail = torch_private._missing("torch._C._gone")
    try:
        fail()
    except RuntimeError as exc:
        assert "torch._C._gone" in str(exc) and "torch_private.py" in str(exc)
    else:
        raise AssertionError("expected a RuntimeError")


def test_the_shims_answer_as_torch():
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert torch_private.saved_tensors_hooked()
    assert not torch_private.saved_tensors_hooked()
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            seen.append(torch_private.in_backward())
            return g

    assert not torch_private.in_backward()
    Probe.apply(torch.ones(1, requires_grad=True)).sum().backward()
    assert seen == [True]
    t = torch.zeros(2)
    v = torch_private.version(t)
    t.add_(1)
    assert torch_private.version(t) == v + 1
