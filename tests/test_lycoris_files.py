"""DoRA adapter files of the diffusion ecosystem (dora_ext.adapter_files), with LyCORIS itself as the oracle.

A tiny diffusers UNet2DConditionModel and a tiny transformers CLIPTextModel, built from configs (no download), get a
LyCORIS DoRA network (LoCon with dora_wd=True), made non-identity (lora_up and dora_scale randomised) and saved the
way LyCORIS / kohya save it. dora_ext then loads the file onto a fresh copy, and PEFT loads its conversion.

Tolerances (tests/helpers.py): dora_ext and LyCORIS compute the same adapted layers in fp32 but differently (the fused
op over W and B·A against LyCORIS's explicit W' = (W + sΔW)·m/(‖W + sΔW‖ + ε) and x·(W' − W)ᵀ added to the base
output), and LyCORIS adds ε = finfo(float32).eps to the norm where dora_ext clamps it (a relative change of ε/‖row‖,
below 1e-6 here). Through the whole UNet the two fp32 results drift apart by rounding, so each is held against
LyCORIS run in float64 on the same file (ε = finfo(float64).eps there): dora_ext's and PEFT's errors may be at most
twice LyCORIS's own fp32 error plus 8 unit roundoffs of the output norm (assert_error_within). Tensors that are only
moved between files are compared bit for bit.
"""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from torch import nn

import dora_ext
from dora_ext.adapter_files import detect_format
from helpers import TOLERANCES, assert_error_within

lycoris = pytest.importorskip("lycoris")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")
from lycoris.kohya import create_network, create_network_from_weights  # noqa: E402
from lycoris.logging import logger as lycoris_logger  # noqa: E402

lycoris_logger.setLevel(logging.ERROR)  # LyCORIS logs every module it creates

load_file = safetensors_torch.load_file


# ---------------------------------------------------------------------------------------------------- models
def tiny_unet() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, sample_size=16, attention_head_dim=8,
        norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), in_channels=4, out_channels=4).eval()


def tiny_clip() -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(1)
    config = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1)
    return CLIPTextModel(config).eval()


def unet_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    return (torch.randn(1, 4, 8, 8, generator=g).to(dtype), 3, torch.randn(1, 5, 32, generator=g).to(dtype))


def clip_inputs():
    return (torch.randint(2, 100, (2, 7), generator=torch.Generator().manual_seed(3)),)


@torch.no_grad()
def run(model, inputs):
    out = model(*inputs)
    if isinstance(out, torch.Tensor):
        return out
    return out.sample if hasattr(out, "sample") else out.last_hidden_state


@torch.no_grad()
def perturb_(network) -> None:
    """Make a fresh LyCORIS DoRA network non-identity: lora_up (zero at init) and dora_scale (‖W‖ at init)."""
    g = torch.Generator().manual_seed(4)
    for lora in network.loras:
        lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=g) * 0.1)
        lora.dora_scale.mul_(1 + 0.1 * torch.randn(lora.dora_scale.shape, generator=g))


def lycoris_file(base, path, **kwargs):
    """A LyCORIS DoRA file for `base` (LyCORIS's own network, randomised, saved by its save_weights); returns the
    adapted copy LyCORIS runs and its network."""
    model = copy.deepcopy(base)
    network = lycoris.create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2, algo="locon", dora_wd=True, **kwargs)
    network.apply_to()
    perturb_(network)
    network.save_weights(str(path), None, None)
    return model, network


def lycoris_reference(base, path, inputs, dtype):
    """LyCORIS's own reading of the file (create_lycoris_from_weights) on a copy of `base` in `dtype`: its output."""
    model = copy.deepcopy(base).to(dtype)
    network, _ = lycoris.create_lycoris_from_weights(1.0, str(path), model)
    network.to(dtype)
    network.apply_to()
    return run(model, inputs)


def assert_same_files(a, b):
    sa, sb = load_file(str(a)), load_file(str(b))
    assert set(sa) == set(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


# ------------------------------------------------------------------------------------------- the output axis
@pytest.fixture(scope="module")
def unet_file(tmp_path_factory):
    """(the base UNet, a LyCORIS output-axis DoRA file for it, LyCORIS's fp32 and fp64 outputs, the base output)."""
    base = tiny_unet()
    path = tmp_path_factory.mktemp("lycoris") / "unet_dora.safetensors"
    _, network = lycoris_file(base, path)
    y32 = lycoris_reference(base, path, unet_inputs(), torch.float32)
    y64 = lycoris_reference(base, path, unet_inputs(torch.float64), torch.float64)
    return base, path, y32, y64, run(base, unet_inputs()), len(network.loras)


def test_a_lycoris_output_axis_file_loads_onto_dora_ext_with_lycoris_outputs(unet_file):
    base, path, y32, y64, y_base, count = unet_file
    assert detect_format(load_file(str(path))) == "lycoris"
    model = dora_ext.load_lycoris(copy.deepcopy(base), path)
    layers = dora_ext.dora_layers(model)
    assert len(layers) == count and any(isinstance(l, dora_ext.layers.Conv) for l in layers.values())
    y = run(model, unet_inputs())
    assert (y64 - y_base.double()).norm() > 0.1 * y64.norm()  # the adapter is far from identity
    assert_error_within(y, y32, y64, factor=2.0, msg="dora_ext vs LyCORIS (fp64)")
    assert not any(p.requires_grad for p in model.parameters())  # is_trainable=False, as PEFT's default


def test_a_lycoris_file_round_trips_through_dora_ext_bit_for_bit(unet_file, tmp_path):
    base, path, *_ = unet_file
    model = dora_ext.load_lycoris(copy.deepcopy(base), path)
    dora_ext.save_lycoris(dora_ext.model_adapters(model), tmp_path / "again.safetensors")
    assert_same_files(path, tmp_path / "again.safetensors")


def test_a_lycoris_file_converts_to_peft_which_peft_loads_with_lycoris_outputs(unet_file, tmp_path):
    import peft

    base, path, y32, y64, *_ = unet_file
    dora_ext.lycoris_to_peft(path, base, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["use_dora"] and config["r"] == 4 and config["lora_alpha"] == 2.0
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft"))
    assert_error_within(run(peft_model, unet_inputs()), y32, y64, factor=2.0, msg="PEFT vs LyCORIS (fp64)")
    # dora_ext reads the directory onto the same layers, with the same tensors, as the LyCORIS file
    via_peft = dora_ext.model_adapters(dora_ext.load_adapter(copy.deepcopy(base), tmp_path / "peft"))
    via_file = dora_ext.model_adapters(dora_ext.load_lycoris(copy.deepcopy(base), path))
    assert via_peft.keys() == via_file.keys()
    for name, a in via_peft.items():
        b = via_file[name]
        assert a.alpha == b.alpha and all(torch.equal(x, y) for x, y in ((a.lora_A, b.lora_A), (a.lora_B, b.lora_B),
                                                                       (a.magnitude, b.magnitude)))
    dora_ext.peft_to_lycoris(tmp_path / "peft", tmp_path / "back.safetensors")
    assert_same_files(path, tmp_path / "back.safetensors")


def test_peft_conversion_keeps_per_module_ranks_and_alphas(tmp_path):
    import peft

    base = tiny_clip()
    path = tmp_path / "clip.safetensors"
    lycoris_file(base, path)
    state = load_file(str(path))
    # one module of another rank and alpha: rank_pattern / alpha_pattern carry it
    name = "lycoris_encoder_layers_1_mlp_fc1"
    state[f"{name}.lora_down.weight"] = torch.cat([state[f"{name}.lora_down.weight"]] * 2) * 0.5
    state[f"{name}.lora_up.weight"] = torch.cat([state[f"{name}.lora_up.weight"]] * 2, dim=1)
    state[f"{name}.alpha"] = torch.tensor(3.0)
    safetensors_torch.save_file(state, str(tmp_path / "mixed.safetensors"))
    dora_ext.lycoris_to_peft(tmp_path / "mixed.safetensors", base, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 2.0
    assert config["rank_pattern"] == {r"encoder\.layers\.1\.mlp\.fc1": 8}
    assert config["alpha_pattern"] == {r"encoder\.layers\.1\.mlp\.fc1": 3.0}
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft"))
    ours = dora_ext.load_lycoris(copy.deepcopy(base), state)
    layer = peft_model.base_model.model.get_submodule("encoder.layers.1.mlp.fc1")
    assert layer.scaling["default"] == 3.0 / 8 == dora_ext.dora_layers(ours)["encoder.layers.1.mlp.fc1"] \
        .scaling["default"]
    y32 = lycoris_reference(base, tmp_path / "mixed.safetensors", clip_inputs(), torch.float32)
    y64 = lycoris_reference(base, tmp_path / "mixed.safetensors", clip_inputs(), torch.float64)
    assert_error_within(run(ours, clip_inputs()), y32, y64, factor=2.0, msg="dora_ext, mixed ranks")
    assert_error_within(run(peft_model, clip_inputs()), y32, y64, factor=2.0, msg="PEFT, mixed ranks")


class Stack(nn.Module):
    """A top-level `proj` whose name ends another module's (`blk.proj`), as Flux's top-level and per-block proj_out."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.blk = nn.Module()
        self.blk.proj = nn.Linear(8, 8)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(torch.tanh(self.blk.proj(x)))


def test_a_module_name_that_ends_another_is_targeted_exactly(tmp_path):
    import peft

    base = Stack()
    lycoris_file(base, tmp_path / "both.safetensors")
    state = {k: v for k, v in load_file(str(tmp_path / "both.safetensors")).items()
             if not k.startswith("lycoris_blk_proj.")}
    safetensors_torch.save_file(state, str(tmp_path / "top.safetensors"))
    dora_ext.lycoris_to_peft(tmp_path / "top.safetensors", base, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["proj"] and config["exclude_modules"] == ["blk.proj"]
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft"))
    assert type(peft_model.base_model.model.blk.proj) is nn.Linear
    ours = dora_ext.load_lycoris(copy.deepcopy(base), tmp_path / "top.safetensors")
    assert list(dora_ext.dora_layers(ours)) == ["proj"]
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(7))
    y32 = lycoris_reference(base, tmp_path / "top.safetensors", (x,), torch.float32)
    y64 = lycoris_reference(base, tmp_path / "top.safetensors", (x.double(),), torch.float64)
    assert_error_within(run(ours, (x,)), y32, y64, factor=2.0, msg="dora_ext")
    assert_error_within(run(peft_model, (x,)), y32, y64, factor=2.0, msg="PEFT")


# ------------------------------------------------------------------------------------ kohya: UNet + text encoder
def test_a_kohya_file_of_unet_and_text_encoder_loads_with_prefixes(tmp_path):
    unet, clip = tiny_unet(), tiny_clip()
    base_unet, base_clip = copy.deepcopy(unet), copy.deepcopy(clip)
    network = create_network(1.0, 4, 2, None, clip, unet, preset="attn-mlp", algo="locon", dora_wd=True)
    network.apply_to(clip, unet, True, True)
    perturb_(network)
    path = tmp_path / "kohya.safetensors"
    network.save_weights(str(path), None, {})
    keys = list(load_file(str(path)))
    assert any(k.startswith("lora_unet_") for k in keys) and any(k.startswith("lora_te_") for k in keys)
    y32 = run(unet, unet_inputs()), run(clip, clip_inputs())
    # LyCORIS's own kohya reader in float64: the oracle
    unet64, clip64 = copy.deepcopy(base_unet).double(), copy.deepcopy(base_clip).double()
    ref, _ = create_network_from_weights(1.0, str(path), None, clip64, unet64)
    ref.apply_to(clip64, unet64, True, True)
    ref.to(torch.float64)
    y64 = run(unet64, unet_inputs(torch.float64)), run(clip64, clip_inputs())

    both = nn.ModuleDict({"unet": copy.deepcopy(base_unet), "text_encoder": copy.deepcopy(base_clip)})
    with pytest.raises(ValueError, match=r"prefixes \['lora_te', 'lora_unet'\]"):
        dora_ext.load_lycoris(both, path)
    prefixes = {"lora_unet": "unet", "lora_te": "text_encoder"}
    dora_ext.load_lycoris(both, path, prefixes=prefixes)
    assert len(dora_ext.dora_layers(both)) == len(network.unet_loras) + len(network.text_encoder_loras)
    ours = run(both["unet"], unet_inputs()), run(both["text_encoder"], clip_inputs())
    for mine, theirs, oracle, what in zip(ours, y32, y64, ("unet", "text encoder")):
        assert_error_within(mine, theirs, oracle, factor=2.0, msg=what)
    dora_ext.save_lycoris(dora_ext.model_adapters(both), tmp_path / "again.safetensors", prefixes=prefixes)
    assert_same_files(path, tmp_path / "again.safetensors")


def test_onetrainer_dotted_names_read_as_the_underscored_ones(unet_file):
    base, path, *_ = unet_file
    underscored = dora_ext.read_adapter_file(path, base)
    state = load_file(str(path))
    # OneTrainer's "diffusers" key format: the prefix and the module path joined by "." (convert_lora_util.py)
    by_name = {f"lycoris_{p.replace('.', '_')}": p for p in underscored}
    dotted = {}
    for key, t in state.items():
        name, _, suffix = key.partition(".")
        dotted[f"lora_unet.{by_name[name]}.{suffix}"] = t
    read = dora_ext.read_adapter_file(dotted, base)
    assert set(read) == set(underscored)
    for p, a in read.items():
        b = underscored[p]
        assert a.alpha == b.alpha and a.axis == b.axis == "out"
        assert all(torch.equal(x, y) for x, y in ((a.lora_A, b.lora_A), (a.lora_B, b.lora_B),
                                                  (a.magnitude, b.magnitude)))


# ------------------------------------------------------------------------------------------- the input axis
def test_an_input_axis_file_is_read_and_written_but_neither_loaded_nor_converted_to_peft(tmp_path):
    base = tiny_unet()
    path = tmp_path / "in_axis.safetensors"
    lycoris_file(base, path, wd_on_output=False)
    state = load_file(str(path))
    assert state["lycoris_conv_in.dora_scale"].shape == (1, 4, 1, 1)  # [1, C_in, 1, 1]: LyCORIS's input axis
    adapters = dora_ext.read_adapter_file(path, base)
    assert {a.axis for a in adapters.values()} == {"in"}
    assert adapters["conv_in"].magnitude.shape == (4,)
    dora_ext.save_lycoris(adapters, tmp_path / "again.safetensors")
    assert_same_files(path, tmp_path / "again.safetensors")

    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NotImplementedError, match="input-axis"):
        dora_ext.load_lycoris(model, path)
    assert not dora_ext.dora_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="not be exact"):
        dora_ext.lycoris_to_peft(path, base, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    with pytest.raises(ValueError, match="not exact"):
        dora_ext.save_lycoris(adapters, tmp_path / "out.safetensors", norm_axis="out")
    with pytest.raises(ValueError, match="norm_axis='out' was given"):
        dora_ext.read_adapter_file(path, base, norm_axis="out")
    with pytest.raises(ValueError, match="linear-only"):
        dora_ext.save_ai_toolkit(adapters, tmp_path / "ait.safetensors")


def test_a_magnitude_that_fits_both_axes_needs_norm_axis(tmp_path):
    base = nn.Sequential(nn.Linear(1, 1))
    path = tmp_path / "one.safetensors"
    adapted, _ = lycoris_file(base, path)
    assert load_file(str(path))["lycoris_0.dora_scale"].shape == (1, 1)
    with pytest.raises(ValueError, match="pass norm_axis='out' or 'in'"):
        dora_ext.load_lycoris(copy.deepcopy(base), path)
    assert dora_ext.read_adapter_file(path, base, norm_axis="in")["0"].axis == "in"
    model = dora_ext.load_lycoris(copy.deepcopy(base), path, norm_axis="out")
    x = torch.randn(5, 1, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(run(model, (x,)), run(adapted, (x,)), **TOLERANCES[torch.float32])


# ---------------------------------------------------------------------------------------------------- refusals
def test_tucker_cores_are_refused_by_name(tmp_path):
    base = tiny_unet()
    path = tmp_path / "tucker.safetensors"
    lycoris_file(base, path, use_tucker=True)
    assert any(k.endswith(".lora_mid.weight") for k in load_file(str(path)))
    with pytest.raises(ValueError, match=r"lora_mid\.weight.*Tucker"):
        dora_ext.read_adapter_file(path, base)


def test_unknown_unmatched_and_ambiguous_names_are_refused(unet_file):
    base, path, *_ = unet_file
    state = load_file(str(path))
    unmatched = {k.replace("lycoris_conv_in.", "lycoris_conv_nowhere."): v for k, v in state.items()}
    with pytest.raises(ValueError, match=r"no module of the model has: \['lycoris_conv_nowhere'\]"):
        dora_ext.load_lycoris(copy.deepcopy(base), unmatched)
    with pytest.raises(ValueError, match=r"does not know: \['lycoris_conv_in.hada_w1_a'\]"):
        dora_ext.read_adapter_file({**state, "lycoris_conv_in.hada_w1_a": torch.zeros(1)}, base)
    no_scale = {k: v for k, v in state.items() if k != "lycoris_conv_in.dora_scale"}
    with pytest.raises(ValueError, match=r"'lycoris_conv_in' has no \['dora_scale'\]"):
        dora_ext.read_adapter_file(no_scale, base)

    class Holder(nn.Module):
        def __init__(self, **children):
            super().__init__()
            for k, v in children.items():
                setattr(self, k, v)

    # LyCORIS itself cannot make this file (its two modules get one name, an assertion in its network), but a file
    # naming `lycoris_a_b_c` could mean either module
    twins = Holder(a_b=Holder(c=nn.Linear(3, 3)), a=Holder(b_c=nn.Linear(3, 3)))
    one = {"lycoris_a_b_c.lora_down.weight": torch.randn(2, 3), "lycoris_a_b_c.lora_up.weight": torch.randn(3, 2),
           "lycoris_a_b_c.alpha": torch.tensor(2.0), "lycoris_a_b_c.dora_scale": torch.ones(3, 1)}
    with pytest.raises(ValueError, match=r"lycoris_a_b_c \(modules \['a.b_c', 'a_b.c'\]\)"):
        dora_ext.read_adapter_file(one, twins)


def test_a_refused_load_leaves_the_model_as_it_was(unet_file):
    base, path, *_ = unet_file
    state = load_file(str(path))
    key = sorted(k for k in state if k.endswith("lora_up.weight"))[-1]
    state[key] = state[key][:-1]  # one module's lora_up of the wrong shape, checked after the others
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="has shape"):
        dora_ext.load_lycoris(model, state)
    assert not dora_ext.dora_layers(model)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------------- ai-toolkit
def test_ai_toolkit_files_hold_the_same_dora_at_scaling_one(tmp_path):
    base = tiny_clip()
    path = tmp_path / "clip.safetensors"
    adapted, network = lycoris_file(base, path)
    adapters = dora_ext.read_adapter_file(path, base)
    assert {a.scaling for a in adapters.values()} == {0.5}
    dora_ext.save_ai_toolkit(adapters, tmp_path / "ait.safetensors", prefixes={"lora_te": ""})
    state = load_file(str(tmp_path / "ait.safetensors"))
    assert detect_format(state) == "ai-toolkit" and not any(k.endswith(".alpha") for k in state)
    read = dora_ext.read_adapter_file(state, base)
    assert {a.scaling for a in read.values()} == {1.0}

    model = dora_ext.load_lycoris(copy.deepcopy(base), tmp_path / "ait.safetensors", prefixes={"lora_te": ""})
    y64 = lycoris_reference(base, path, clip_inputs(), torch.float64)
    assert_error_within(run(model, clip_inputs()), run(adapted, clip_inputs()), y64, factor=2.0, msg="ai-toolkit")

    # ai-toolkit's own forward (toolkit/network_mixins.py, toolkit/models/DoRA.py) at alpha = rank, multiplier 1:
    # y = W x + b + up·down·x + (m/‖W + up·down‖ − 1)·(W + up·down)·x, i.e. the merged weight below, in float64,
    # against LyCORIS's merged weight of the same module (its ε in float64: 2e-16 relative)
    network.to(torch.float64)
    name = "encoder.layers.0.self_attn.q_proj"
    lora = next(l for l in network.loras if l.lora_name == "lycoris_" + name.replace(".", "_"))
    lora.org_module[0].to(torch.float64)
    W = base.get_submodule(name).weight.double()
    prefix = "lora_te_" + name.replace(".", "_")
    BA = state[f"{prefix}.lora_up.weight"].double() @ state[f"{prefix}.lora_down.weight"].double()
    m = state[f"{prefix}.magnitude"].double()
    ai_toolkit = (W + BA) * (m / (W + BA).norm(dim=1)).unsqueeze(1)
    torch.testing.assert_close(ai_toolkit, lora.get_merged_weight()[0], **TOLERANCES[torch.float64])
