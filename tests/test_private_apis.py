"""The private APIs of torch and PEFT that dora_ext touches are each bound in one shim; this fails, naming the API,
when an upgrade removes one (the shims raise naming it too, instead of falling back silently)."""

import ast

import pytest
import torch
from package_source import is_private, package_modules, private_accesses, private_defined, root_name, third_party_names

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


# ------------------------------------------------------------------------------------------------------- PEFT
def test_every_private_peft_name_exists():
    from dora_ext import peft_private

    missing = peft_private.check_private()
    assert missing == [], f"this PEFT lacks private names dora_ext uses (dora_ext/peft_private.py PRIVATE): {missing}"


@pytest.mark.parametrize("entry", ["peft.tuners.lora.layer:LoraLayer._mixed_batch_forward",
                                   "peft.tuners.lora.model:LoraModel._create_new_module",
                                   "peft.tuners.lora.layer:VARIANT_KWARG_KEYS"])
def test_a_removed_peft_name_is_reported_by_its_full_name(monkeypatch, entry):
    from dora_ext import peft_private

    monkeypatch.delattr(entry.replace(":", "."))  # as an upgrade that drops it would leave PEFT
    assert peft_private.check_private() == [entry]


def test_variant_kwarg_keys_are_peft_own():
    """The keywords a converted layer keeps from its base layer are PEFT's list, read from PEFT (bnb.py's own for a
    bitsandbytes layer); without it the shim raises naming the API."""
    from peft import LoraConfig
    from peft.tuners.lora import bnb
    from peft.tuners.lora import layer as lora_layer

    from dora_ext import peft_private

    linear = lora_layer.Linear(torch.nn.Linear(4, 3), "a", LoraConfig(r=2, lora_alpha=2), r=2, lora_alpha=2)
    int8 = object.__new__(bnb.Linear8bitLt)  # only its class is read: no bitsandbytes weight needed
    assert peft_private.variant_kwarg_keys(linear) == tuple(lora_layer.VARIANT_KWARG_KEYS) == ("alora_offsets",)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lora_layer, "VARIANT_KWARG_KEYS", ["alora_offsets", "layer_key"])
        mp.setattr(bnb, "VARIANT_KWARG_KEYS", ["alora_offsets", "bnb_key"])
        assert peft_private.variant_kwarg_keys(linear) == ("alora_offsets", "layer_key")
        assert peft_private.variant_kwarg_keys(int8) == ("alora_offsets", "bnb_key")
        mp.delattr(lora_layer, "VARIANT_KWARG_KEYS")
        with pytest.raises(RuntimeError, match="VARIANT_KWARG_KEYS.*peft_private.py"):
            peft_private.variant_kwarg_keys(linear)


def _is_super(node: ast.Attribute) -> bool:
    return isinstance(node.value, ast.Call) and getattr(node.value.func, "id", None) == "super"


def test_every_private_peft_name_the_peft_route_touches_is_listed():
    """In the modules that use PEFT's internals (those importing peft_private), each private name they touch that
    the module does not define itself (module._embed, pv._DoraConvNdVariant), and each PEFT method a class there
    overrides and calls (super()._mixed_batch_forward), is an entry of peft_private.PRIVATE."""
    from dora_ext import peft_private

    listed = {entry.rpartition(":")[2].rpartition(".")[2] for entry in peft_private.PRIVATE}
    found = []
    for module in package_modules().values():
        if "dora_ext.peft_private" not in {imp.target for imp in module.imports}:
            continue
        defined = private_defined(module.tree)
        methods = {}  # private method name -> the classes of this module defining it
        for cls in (n for n in ast.walk(module.tree) if isinstance(n, ast.ClassDef)):
            for item in cls.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and is_private(item.name):
                    methods.setdefault(item.name, set()).add(cls.name)
        for node in private_accesses(module.tree):  # PEFT's where this module does not define the name
            if not _is_super(node) and node.attr not in defined and node.attr not in listed:
                found.append(f"{module.path}:{node.lineno}: {ast.unparse(node)}")
        for cls in (n for n in ast.walk(module.tree) if isinstance(n, ast.ClassDef)):
            for node in private_accesses(cls):  # PEFT's where no other class of this module defines the method
                if _is_super(node) and methods.get(node.attr, set()) <= {cls.name} and node.attr not in listed:
                    found.append(f"{module.path}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "private PEFT names used but not listed in dora_ext/peft_private.py PRIVATE (add one line " \
        "each, 'module:Class.attribute' -> why): " + "; ".join(sorted(set(found)))


# ------------------------------------------------------------------------------------------- torch (and others)
#: private names of third-party libraries touched outside their shim: (file, dotted name) -> why
OUTSIDE_SHIM = {
    ("dora_ext/ops.py", "torch._check"): "documented API for shape checks in fake kernels (torch.compile's docs)",
    ("dora_ext/quantized.py", "bnbF._convert_weight_packed_for_cpu_inverse"):
        "bitsandbytes' inverse of its CPU weight layout; bitsandbytes has no shim module yet",
}


def test_private_torch_names_are_touched_only_in_torch_private():
    """Outside torch_private.py (and peft_private.py's PEFT names, checked above) no module touches a library's
    private name (torch._C._x, Tensor._version), except OUTSIDE_SHIM's."""
    found = []
    for module in package_modules().values():
        if module.path in ("dora_ext/torch_private.py", "dora_ext/peft_private.py"):
            continue
        third_party = {k: v for k, v in third_party_names(module.tree).items() if v != "peft"}
        for node in private_accesses(module.tree):
            dotted = ast.unparse(node)
            if (node.attr == "_version" or root_name(node) in third_party) and \
                    (module.path, dotted) not in OUTSIDE_SHIM:
                found.append(f"{module.path}:{node.lineno}: {dotted}")
    assert not found, "private library names outside their shim (bind them in dora_ext/torch_private.py, listed in " \
        "its table and REQUIRED): " + "; ".join(found)
