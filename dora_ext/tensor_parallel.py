"""Tensor-parallel DoRA on torch's DTensor, exact: the layer's base weight is a DTensor sharded over a 1-D mesh by
`parallelize_module` (ColwiseParallel: W [out, in] as Shard(0), whole rows per rank; RowwiseParallel: Shard(1), a
slice of every row), and the DoRA norm is the norm of the *full* row on every rank.

* Column-parallel: each rank owns whole rows, so its norm, gain and output columns are local and exact. lora_B and
  the magnitude are sharded like W (Shard(0)), lora_A is replicated. No communication beyond LoRA's.
* Row-parallel: each rank holds a slice of every row. The fused norm op gives the sum of squares of the local slice
  of W + s·B·A (still no [out, in] temporary; as ‖·‖², exact to an fp32 ulp, far below the sum's own rounding), one
  all-reduce of that [out] fp32 vector adds the slices, then the square root: the norm of the full row, detached as
  always. lora_A is sharded like W (Shard(1)), lora_B and the magnitude replicated. The fused forward runs on the
  local slice without the bias (its output is a partial sum, as the base layer's is: DoRA's gain multiplies a sum,
  so it distributes over the slices), one all-reduce adds the partial outputs (the one the base layer issues
  anyway), and the bias is added once, after it. With dropout the mask is the slice of one mask drawn for the full
  input, so PEFT's additive form stays exact.

The choice: the fused ops run on local shards with the collectives written out here, not through DTensor sharding
rules for the custom ops. The row-parallel norm is not linear in the shards (√ of a sum), so no placement of the
op's output can express it; the forward's epilogue and its backward (which keeps the gain) would need rules for
every op and its backward; and written out, the communication is visible and countable (benchmarks/bench_tp.py):
one [out] fp32 all-reduce per row-parallel layer and forward beyond LoRA's. Gradients follow one rule (`local`): a
tensor that enters each rank's partial share of the result whole (column-parallel: x and lora_A; row-parallel:
lora_B and the magnitude; any whole tensor sliced here) has as gradient the sum of the ranks' gradients, so it is
all-reduced over the TP group; a shard gets its local gradient; what is applied after the reduction (the
row-parallel bias) is computed alike on every rank and keeps its own gradient.

Randomness: TP ranks must draw the same numbers (seed them alike, as DTensor's own random ops assume): the dropout
mask of a replicated input is then the same on every rank, and a sharded input's mask is the rank's slice of the
full one. On the CPU this is the mask F.dropout draws for the full input in one process, bit for bit.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

try:  # torch.distributed.tensor is absent from builds without distributed support
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
except ImportError:  # pragma: no cover - such builds cannot shard a layer either
    DTensor = None

__all__ = ["Layout", "is_sharded", "layout_of", "check_target", "local", "shard_like_base", "weight_norm", "linear", "rescale_one",
           "merge_args", "run_with_base_hooks", "check_base_forward", "whole_factors", "COLWISE", "ROWWISE"]

COLWISE, ROWWISE = "colwise", "rowwise"


class Layout(NamedTuple):
    """How a layer's [out, in] base weight is split: style COLWISE (Shard(0)) or ROWWISE (Shard(1)) over `mesh`."""
    style: str
    mesh: object  # torch.distributed.device_mesh.DeviceMesh

    @property
    def group(self):
        return self.mesh.get_group()

    @property
    def split_dim(self) -> int:
        """The [out, in] dim the shards split."""
        return 0 if self.style == COLWISE else 1

    def placement(self, dim: int | None):
        """Shard(dim), or Replicate() for None."""
        return Replicate() if dim is None else Shard(dim)

    def shard_dims(self) -> dict[str, int | None]:
        """Where each DoRA tensor is split: {A, B, magnitude, norm}: the dim of the tensor sharded, None if whole."""
        if self.style == COLWISE:
            return {"A": None, "B": 0, "magnitude": 0, "norm": 0}
        return {"A": 1, "B": None, "magnitude": None, "norm": None}


def is_sharded(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def layout_of(weight_2d: Tensor, where: str) -> Layout | None:
    """The Layout of an [out, in] (view of a) base weight, None for a plain tensor. Anything but a 1-D mesh with
    Shard(0) or Shard(1) is refused, naming `where` and the placements: the norm of a row dora_ext cannot see
    whole is never taken silently over a slice."""
    if not is_sharded(weight_2d):
        return None
    mesh, placements = weight_2d.device_mesh, tuple(weight_2d.placements)
    if mesh.ndim == 1 and isinstance(placements[0], Shard) and placements[0].dim in (0, 1):
        return Layout(COLWISE if placements[0].dim == 0 else ROWWISE, mesh)
    raise ValueError(f"{where}: the base weight is a DTensor with placements {placements} over a {mesh.ndim}-D mesh "
                     f"{mesh.mesh.tolist()}; dora_ext's tensor parallelism takes a 1-D TP mesh with the [out, in] "
                     "weight as Shard(0) (ColwiseParallel) or Shard(1) (RowwiseParallel). Apply FSDP2 on another "
                     "mesh dim (fully_shard after parallelize_module), or leave this layer unsharded")


def check_target(weight: Tensor, supported: bool, where: str) -> None:
    """Refuse, before anything changes, a target whose base weight is sharded in a way dora_ext cannot make exact
    (layout_of), or whose layer kind / variant does not run sharded (supported=False), naming `where`."""
    if not is_sharded(weight):
        return
    if not supported:
        raise ValueError(f"{where}: its weight is sharded by tensor parallelism (placements "
                         f"{tuple(weight.placements)}); dora_ext runs DoRA and LoRA on sharded nn.Linear layers only")
    layout_of(weight, where)


def _world(layout: Layout) -> tuple[int, int]:
    return layout.mesh.size(), layout.mesh.get_local_rank()


# ------------------------------------------------------------------------------------------------ collectives
class _AllReduceSum(torch.autograd.Function):
    """Forward: the sum over the TP group (partial outputs → the output). Backward: identity, since every rank
    computes the same loss from the summed output and so already holds its full gradient."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _GradAllReduce(torch.autograd.Function):
    """Forward: identity. Backward: the sum of the gradients over the TP group: for a tensor every rank uses whole
    (or slices itself) whose rank-local gradient is a partial sum."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _chunk(t: Tensor, dim: int, layout: Layout) -> Tensor:
    """This rank's Shard(dim) slice of a whole tensor (torch.chunk, as DTensor's Shard splits)."""
    world, rank = _world(layout)
    parts = torch.chunk(t, world, dim)
    return parts[rank] if rank < len(parts) else t.narrow(dim, 0, 0)


def local(t: Tensor | None, layout: Layout, dim: int | None) -> Tensor | None:
    """The rank-local tensor the fused ops take for a tensor the layout splits on `dim` (None: used whole), with
    the gradient rule of the module docstring: a DTensor already sharded on `dim` gives its local shard (its
    gradient is local and exact); anything else (a replicated DTensor, a whole plain tensor, sliced here if `dim`
    says so) has its gradient all-reduced over the TP group first."""
    if t is None:
        return None
    if is_sharded(t):
        if dim is not None and tuple(t.placements) == (Shard(dim),):
            return t.to_local()
        t = t.redistribute(t.device_mesh, [Replicate()]).to_local()
    if t.requires_grad and torch.is_grad_enabled():
        t = _GradAllReduce.apply(t, layout.group)
    return t if dim is None else _chunk(t, dim, layout)


def shard_like_base(layout: Layout, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """{role: DTensor} for whole adapter tensors {role ∈ A, B, magnitude: tensor}, distributed from rank 0 of the
    mesh (so every rank holds the same adapter, whatever its RNG drew) as shard_dims() says."""
    dims = layout.shard_dims()
    return {role: distribute_tensor(t.detach(), layout.mesh, [layout.placement(dims[role])], src_data_rank=0)
            for role, t in tensors.items()}


@torch.no_grad()
def whole_factors(lora_A: nn.Linear, lora_B: nn.Linear, weight_2d: Tensor, where: str) -> None:
    """Make a PEFT layer's factors whole and equal on every rank, in place: PEFT (before its TP support) sizes
    them from the local shard of a sharded base ([out/tp, r] lora_B column-parallel, [r, in/tp] lora_A
    row-parallel), drawn independently per rank. A local-sized factor is gathered to its whole shape; every factor
    is then broadcast from the mesh's first rank. Whole adapters are what PEFT saves and loads."""
    layout = layout_of(weight_2d, where)
    out_f, in_f = weight_2d.shape
    src = dist.get_global_rank(layout.group, 0)
    for module, dim, size in ((lora_A, 1, in_f), (lora_B, 0, out_f)):
        w = module.weight
        if is_sharded(w):
            w = w.full_tensor()
        elif w.shape[dim] != size:  # the local slice PEFT sized from the shard: gather the slices
            shape = list(w.shape)
            shape[dim] = size
            w = DTensor.from_local(w.detach(), layout.mesh, [Shard(dim)], run_check=False, shape=torch.Size(shape),
                                   stride=torch.empty(shape, device="meta").stride()).full_tensor()
        w = w.detach().clone().contiguous()
        dist.broadcast(w, src=src, group=layout.group)
        module.weight = nn.Parameter(w, requires_grad=module.weight.requires_grad)
        module.in_features, module.out_features = w.shape[1], w.shape[0]


# --------------------------------------------------------------------------------------------------- the norm
def weight_norm(weight_2d: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                local_norm: Callable[[Tensor, Tensor, Tensor, float], Tensor], where: str) -> Tensor:
    """‖W + s·B·A‖ of every full row of a sharded base weight, as a DTensor placed like the magnitude (Shard(0)
    column-parallel, Replicate row-parallel). local_norm: the fused norm of local tensors (ops.weight_norm)."""
    layout = layout_of(weight_2d, where)
    dims = layout.shard_dims()
    with torch.no_grad():
        A, B = local(lora_A, layout, dims["A"]), local(lora_B, layout, dims["B"])
        n = local_norm(weight_2d.to_local(), A, B, scaling)
        if layout.style == ROWWISE:
            n = n.square()
            dist.all_reduce(n, group=layout.group)  # Σ over the slices of every row
            n = n.sqrt_()
    out = weight_2d.shape[0]  # the global size: shards may be uneven (torch.chunk)
    return DTensor.from_local(n, layout.mesh, [layout.placement(dims["norm"])], run_check=False, shape=(out,),
                              stride=(1,))


# ------------------------------------------------------------------------------------------------ the forward
class _LocalAdapter(NamedTuple):
    A: Tensor
    B: Tensor
    magnitude: Tensor | None
    norm: Tensor | None


def _localize(layout: Layout, A: Tensor, B: Tensor, magnitude: Tensor | None, norm: Tensor | None) -> _LocalAdapter:
    dims = layout.shard_dims()
    return _LocalAdapter(local(A, layout, dims["A"]), local(B, layout, dims["B"]),
                         local(magnitude, layout, dims["magnitude"]),
                         None if norm is None else local(norm.detach(), layout, dims["norm"]))


def sliced_dropout(layout: Layout, full_in: int) -> Callable[[Tensor, float], Tensor]:
    """Dropout of a row-parallel layer's input slice [..., in/tp]: this rank's slice of the mask F.dropout would
    draw for the full [..., in] input (on the CPU bit for bit: ATen's dropout is x · bernoulli(1−p)/(1−p) over a
    tensor of x's shape), so every rank drops what one process would."""
    def dropout(x: Tensor, p: float) -> Tensor:
        noise = torch.empty((*x.shape[:-1], full_in), dtype=x.dtype, device=x.device).bernoulli_(1 - p)
        return x * _chunk(noise.div_(1 - p), -1, layout)
    return dropout


def linear(x: Tensor, weight_2d: Tensor, bias: Tensor | None, adapters: Sequence, training: bool,
           local_linear: Callable, norm_of: Callable[[object], Tensor], where: str) -> Tensor:
    """A sharded linear layer's DoRA forward on rank-local tensors. x and the result are local as the TP styles'
    defaults have them: column-parallel takes the whole x and returns its columns of y; row-parallel takes its
    slice of x and returns the whole y (summed, bias added once). adapters: functional.Adapter tuples holding the
    layer's (DTensor) parameters; norm_of(adapter): its norm when it has none yet. local_linear: functional.linear
    itself, applied to the local tensors."""
    layout = layout_of(weight_2d, where)
    local_adapters = []
    for a in adapters:
        norm = a.norm if a.magnitude is None or a.norm is not None else norm_of(a)
        la = _localize(layout, a.lora_A, a.lora_B, a.magnitude, norm)
        if layout.style == ROWWISE and a.dropout > 0:
            a = a._replace(dropout_fn=sliced_dropout(layout, weight_2d.shape[1]))
        local_adapters.append(a._replace(lora_A=la.A, lora_B=la.B, magnitude=la.magnitude, norm=la.norm))
    w = weight_2d.to_local()
    if layout.style == COLWISE:  # x is used whole by every rank's columns: its gradient is their sum
        x = _GradAllReduce.apply(x, layout.group) if x.requires_grad and torch.is_grad_enabled() else x
        return local_linear(x, w, local(bias, layout, 0), local_adapters, training)
    y = _AllReduceSum.apply(local_linear(x, w, None, local_adapters, training), layout.group)
    if bias is None:
        return y
    return y + (bias.to_local() if is_sharded(bias) else bias).to(y.dtype)  # after the sum: every rank alike


def rescale_one(x: Tensor, result: Tensor, a, bias: Tensor | None, training: bool, weight_2d: Tensor, first: bool,
                local_rescale: Callable, where: str) -> Tensor:
    """One adapter's update of a sharded layer's output computed elsewhere (PEFT's layer: `result` is the sharded
    base layer's own output, as its TP forward returns it), on rank-local tensors:

    * column-parallel: result holds this rank's columns; the update of those columns is local (as `linear`).
    * row-parallel: result is whole (summed, bias added) on every rank, so the update is computed alike on every
      rank from the whole x·Aᵀ: one all-reduce of the rank's partial [.., r] product (and, with dropout, of its
      partial W·x_dᵀ [.., out], PEFT's additive form). lora_B and the magnitude then enter a computation every rank
      repeats, so they keep their own gradients; x's slice and lora_A's slice get local, exact ones.

    The adapter's tensors may be DTensors or whole plain tensors (PEFT keeps its adapters whole on every rank;
    `local` slices them and sums their gradients)."""
    layout = layout_of(weight_2d, where)
    dims = layout.shard_dims()
    w = weight_2d.to_local()
    if layout.style == COLWISE:
        la = _localize(layout, a.lora_A, a.lora_B, a.magnitude, a.norm)
        x = _GradAllReduce.apply(x, layout.group) if x.requires_grad and torch.is_grad_enabled() else x
        local_a = a._replace(lora_A=la.A, lora_B=la.B, magnitude=la.magnitude, norm=la.norm)
        return local_rescale(x, result, local_a, local(bias, layout, 0), training, weight=w, first=first)

    def whole(t):  # used alike on every rank after the reduction: its own gradient
        return t.redistribute(t.device_mesh, [Replicate()]).to_local() if is_sharded(t) else t

    local_a = a._replace(lora_A=local(a.lora_A, layout, dims["A"]), lora_B=whole(a.lora_B),
                         magnitude=whole(a.magnitude), norm=None if a.norm is None else whole(a.norm).detach(),
                         reduce=lambda t: _AllReduceSum.apply(t, layout.group),
                         dropout_fn=sliced_dropout(layout, weight_2d.shape[1]))
    return local_rescale(x, result, local_a, None if bias is None else whole(bias), training, weight=w, first=False)


#: the input / output layouts of a replaced forward that run_with_base_hooks reproduces: each style's default
_DEFAULT_LAYOUTS = {COLWISE: ("Replicate()", "Shard(dim=-1)"), ROWWISE: ("Shard(dim=-1)", "Replicate()")}


def check_base_forward(base_layer: nn.Module, layout: Layout) -> None:
    """Refuse what the wrapped forward cannot reproduce, by name: hooks taking kwargs (or always_call ones), and a
    forward replaced on the instance (transformers' tp_plan installs its style that way) by a style whose layouts
    are not the TP style's defaults (sequence parallel, colwise_rep, rowwise_split_input, ...): the wrapper would
    take a whole input for a slice, or skip a gather."""
    where = f"dora_ext: a {layout.style} {type(base_layer).__name__} base layer"
    # torch.nn.Module's own bookkeeping of hooks registered with_kwargs / always_call
    odd = [n for n in ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")
           if getattr(base_layer, n, None)]
    if odd:
        raise ValueError(f"{where} has forward hooks registered with kwargs or always_call ({odd}); dora_ext runs "
                         "the TP styles' plain input/output hooks only")
    forward = vars(base_layer).get("forward")
    if forward is None:
        return
    style = next((c.cell_contents for c in (getattr(forward, "__closure__", None) or ())
                  if hasattr(c.cell_contents, "input_layouts") and hasattr(c.cell_contents, "output_layouts")), None)
    layouts = None if style is None else (repr(style.input_layouts), repr(style.output_layouts))
    if layouts != _DEFAULT_LAYOUTS[layout.style]:
        raise ValueError(f"{where} runs a replaced forward ({type(style).__name__ if style else forward!r} with "
                         f"layouts {layouts}); dora_ext reproduces the default {layout.style} layouts "
                         f"{_DEFAULT_LAYOUTS[layout.style]} only")


def run_with_base_hooks(base_layer: nn.Module, x: Tensor, layout: Layout, compute: Callable[[Tensor], Tensor]):
    """compute(x_local) between the TP input and output conversions parallelize_module installed on the base
    layer (its forward pre-hook and forward hook), so the wrapped layer takes and returns exactly what the sharded
    base layer does (any input_layouts, use_local_output). compute's result is wrapped as the DTensor the base's
    F.linear would produce before the output hook: Shard(-1) column-parallel; row-parallel the summed output,
    Replicate (where the base would hand over a Partial: the reduction is done already, so the hook's
    redistribute to Replicate is free and one to Shard (sequence parallel) is a local slice)."""
    check_base_forward(base_layer, layout)
    args = (x,)
    for hook in base_layer._forward_pre_hooks.values():
        out = hook(base_layer, args)
        if out is not None:
            args = out if isinstance(out, tuple) else (out,)
    x_in = args[0]
    if is_sharded(x_in):
        want = Replicate() if layout.style == COLWISE else Shard(x_in.dim() - 1)
        if tuple(x_in.placements) != (want,):
            x_in = x_in.redistribute(layout.mesh, [want])
        x_local = x_in.to_local()
    else:
        x_local = x_in
    y = compute(x_local)
    if base_layer._forward_hooks:
        shape = (*y.shape[:-1], base_layer.weight.shape[0])  # global: column shards may be uneven
        y = DTensor.from_local(y, layout.mesh, [Shard(y.dim() - 1) if layout.style == COLWISE else Replicate()],
                               run_check=False, shape=shape, stride=torch.empty(shape, device="meta").stride())
        for hook in base_layer._forward_hooks.values():
            out = hook(base_layer, args, y)
            if out is not None:
                y = out
    return y


# ------------------------------------------------------------------------------------------------------ merge
def merge_args(w2d: Tensor, A: Tensor, B: Tensor, magnitude: Tensor | None, norm: Tensor | None, where: str):
    """(w2d, A, B, magnitude, norm) as local tensors for the in-place merge kernels: the rank's slice of W is
    edited in place with the full rows' gains (norm: the full-row norm, weight_norm's)."""
    layout = layout_of(w2d, where)
    la = _localize(layout, A, B, magnitude, norm)
    return w2d.to_local(), la.A, la.B, la.magnitude, la.norm
