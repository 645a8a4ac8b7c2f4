"""Every dora_ext op once, forward and backward, for compute-sanitizer (memcheck, racecheck) on a GPU: the norm on
a row-major and a transposed weight, the quantized norms (4-bit: both absmax forms and bitsandbytes' CPU layout;
int8), dora_mixed (serving), dora_linear with and without dropout, dora_rescale in both forms, merge_ and
unmerge_, in float32, bfloat16 and float16. Small shapes with tails (no multiple of a block size), so the sanitizer
sees every kernel's boundary handling; each result is checked finite and against the CPU kernels.

    python scripts/cuda_ops_once.py --device cuda     (scripts/gpu_check.sh runs it under compute-sanitizer)
    python scripts/cuda_ops_once.py --device cpu      (the dry run a CPU machine does: same code path, CPU kernels)
"""

from __future__ import annotations

import argparse
import sys

import torch

import dora_ext
from dora_ext import ops

TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def check(name: str, got: torch.Tensor, want: torch.Tensor, dtype) -> None:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if not torch.isfinite(got).all():
        raise SystemExit(f"{name}: non-finite values")
    err = (got - want).norm().item() / max(want.norm().item(), 1e-30)
    if err > TOL[dtype]:
        raise SystemExit(f"{name}: relative error {err:.2e} against the CPU kernels > {TOL[dtype]:g}")


def run(device: str) -> None:
    torch.manual_seed(0)
    T, inp, out, r = 37, 300, 257, 5
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        tag = str(dtype).replace("torch.", "")
        mk = lambda *s: torch.randn(*s, dtype=torch.float32)  # noqa: E731
        x, Wt, b = mk(T, inp).to(dtype), (mk(inp, out) / inp**0.5).to(dtype), mk(out).to(dtype)
        A, B, m = mk(r, inp) / inp**0.5, mk(out, r) / r**0.5, mk(out).abs() + 1
        cpu = dict(x=x, W=Wt.T, Wc=Wt.T.contiguous(), b=b, A=A, B=B, m=m)
        dev = {k: v.to(device) for k, v in cpu.items()}
        dev["W"] = dev["Wc"].T.contiguous().T  # transposed storage on the device too
        for layout in ("W", "Wc"):
            check(f"weight_norm[{tag},{layout}]", ops.weight_norm(dev[layout], dev["A"], dev["B"], 0.7),
                  ops.weight_norm(cpu[layout], A, B, 0.7), torch.float32)
        for dropout in (False, True):
            outs = {}
            for where, t in (("dev", dev), ("cpu", cpu)):
                xs, As, Bs, ms = (t[k].clone().requires_grad_() for k in ("x", "A", "B", "m"))
                xd = xs * 0.5 if dropout else None
                y = ops.dora_linear(xs, t["Wc"], t["b"], As, Bs, ms, 0.7, x_drop=xd)
                y.float().square().sum().backward()
                outs[where] = (y, xs.grad, As.grad, Bs.grad, ms.grad)
            for i, (a, e) in enumerate(zip(*outs.values())):
                check(f"dora_linear[{tag},dropout={dropout}] output/grad {i}", a, e, dtype)
        for has_base in (False, True):
            outs = {}
            for where, t in (("dev", dev), ("cpu", cpu)):
                res = torch.nn.functional.linear(t["x"], t["Wc"], t["b"]).requires_grad_()
                u = (t["x"].float() @ t["A"].T).to(dtype).requires_grad_()
                Bs, ms = t["B"].clone().requires_grad_(), t["m"].clone().requires_grad_()
                base = torch.nn.functional.linear(t["x"] * 0.5, t["Wc"]) if has_base else None
                norm = ops.weight_norm(t["Wc"], t["A"], t["B"], 0.7)
                y = ops.dora_rescale(res, u, Bs, ms, norm, 0.7, bias=None if has_base else t["b"], base=base)
                y.float().square().sum().backward()
                outs[where] = (y, res.grad, u.grad, Bs.grad, ms.grad)
            for i, (a, e) in enumerate(zip(*outs.values())):
                check(f"dora_rescale[{tag},base={has_base}] output/grad {i}", a, e, dtype)
        for layout in ("W", "Wc"):
            w_dev, w_cpu = dev[layout].clone(), cpu[layout].clone()
            if layout == "W":  # keep the transposed storage
                w_dev, w_cpu = dev[layout].T.clone().T, cpu[layout].T.clone().T
            norm = ops.weight_norm(cpu[layout], A, B, 0.7)
            ops.merge_(w_dev, dev["A"], dev["B"], dev["m"], norm.to(device), 0.7)
            ops.merge_(w_cpu, A, B, m, norm, 0.7)
            check(f"merge_[{tag},{layout}]", w_dev, w_cpu, dtype)
            ops.unmerge_(w_dev, dev["A"], dev["B"], dev["m"], norm.to(device), 0.7)
            check(f"unmerge_[{tag},{layout}]", w_dev, cpu[layout], torch.bfloat16 if dtype == torch.float32 else dtype)
    quantized_norms(device)
    mixed_batch(device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def mixed_batch(device: str) -> None:
    """dora_mixed (serving): three adapters (one plain LoRA) and base rows, with and without bias, three dtypes."""
    T, inp, out = 45, 70, 131
    gen = torch.Generator().manual_seed(2)
    adapters = [(torch.randn(r, inp, generator=gen) / inp**0.5, torch.randn(out, r, generator=gen), 0.5,
                 None if r == 2 else torch.rand(out, generator=gen) + 0.5,
                 None if r == 2 else torch.rand(out, generator=gen) + 0.5) for r in (1, 2, 4)]
    index = torch.randint(0, 4, (T,), generator=gen)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x, result = torch.randn(T, inp, generator=gen).to(dtype), torch.randn(T, out, generator=gen).to(dtype)
        for bias in (None, torch.randn(out, generator=gen).to(dtype)):
            on = [tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in a) for a in adapters]
            got = ops.dora_mixed(result.to(device), x.to(device), on, index.to(device),
                                 bias=None if bias is None else bias.to(device))
            check(f"dora_mixed[{dtype},bias={bias is not None}]", got, ops.dora_mixed(result, x, adapters, index,
                                                                                     bias=bias), dtype)


def quantized_norms(device: str) -> None:
    """weight_norm_4bit / weight_norm_int8 on synthetic packed weights (no bitsandbytes needed: the kernels only read
    bytes, scales and code tables), each against the CPU kernel."""
    out, inp, r, bs = 96, 320, 3, 64
    blocks = out * inp // bs
    gen = torch.Generator().manual_seed(1)
    packed = torch.randint(0, 256, (out * inp // 2,), generator=gen, dtype=torch.uint8)
    code = torch.linspace(-1, 1, 16)
    A, B = torch.randn(r, inp, generator=gen), torch.randn(out, r, generator=gen)
    forms = {"float absmax": (torch.rand(blocks, generator=gen) + 0.5, None, None, None, 0),
             "nested absmax": (torch.randint(0, 256, (blocks,), generator=gen, dtype=torch.uint8),
                               torch.linspace(-1, 1, 256), torch.rand((blocks + 255) // 256, generator=gen) + 0.5,
                               torch.tensor([0.7]), 256)}
    for name, (absmax, a_code, a_scale, a_off, a_bs) in forms.items():
        for row_group in (0, 32):
            for dtype in (torch.float32, torch.bfloat16):
                args = (packed, absmax, code, bs, a_code, a_scale, a_off, a_bs, out, inp, dtype)
                to = [t.to(device) if isinstance(t, torch.Tensor) else t for t in args]
                got = torch.ops.dora_ext.weight_norm_4bit(*to, A.to(device), B.to(device), 0.7, row_group)
                want = torch.ops.dora_ext.weight_norm_4bit(*args, A, B, 0.7, row_group)
                check(f"weight_norm_4bit[{name},row_group={row_group},{dtype}]", got, want, torch.float32)
    CB = torch.randint(-127, 128, (out, inp), generator=gen, dtype=torch.int8)
    SCB = torch.rand(out, generator=gen) + 0.1
    check("weight_norm_int8", ops.weight_norm_int8(CB.to(device), SCB.to(device), A.to(device), B.to(device), 0.7),
          ops.weight_norm_int8(CB, SCB, A, B, 0.7), torch.float32)
    print(f"cuda_ops_once: every op ran on {device} and matched the CPU kernels (dora_ext {dora_ext.__version__}, "
          f"torch {torch.__version__})")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    run(p.parse_args().device)
    sys.exit(0)
