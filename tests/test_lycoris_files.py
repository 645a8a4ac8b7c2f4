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
moved between files are compared bit for bit. Input-axis files (wd_on_out=False) are run by LyCORIS's own network
built with wd_on_output=False, the file loaded into it (its readers build output-axis modules only).
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
def lycoris_input_axis_reference(base, path, inputs, dtype, r=4, alpha=2.0):
    """LyCORIS's outputs for an input-axis file (wd_on_out=False). Its readers (create_lycoris_from_weights,
    kohya's create_network_from_weights) build output-axis modules only (LoConModule.make_module_from_state_dict
    leaves wd_on_out=True), so the oracle is LyCORIS's own network built with wd_on_output=False on a copy of `base`
    in `dtype`, the file loaded into it by its load_weights (every key, none left over). Its scale is fixed when the
    network is built (alpha/r, not the alpha buffer the file overwrites), so the file's alphas are checked to be
    that one."""
    model = copy.deepcopy(base).to(dtype)
    network = lycoris.create_lycoris(model, 1.0, linear_dim=r, linear_alpha=alpha, algo="locon", dora_wd=True,
                                     wd_on_output=False)
    network.apply_to()
    assert network.load_weights(str(path)) == {}  # no missing, no unexpected key
    state = load_file(str(path))
    assert all(lora.scale == float(state[f"{lora.lora_name}.alpha"]) / r for lora in network.loras)
    network.to(dtype)
    return run(model, inputs)


@pytest.fixture(scope="module")
def unet_in_file(tmp_path_factory):
    """(the base UNet, a LyCORIS input-axis DoRA file for it, LyCORIS's fp32 and fp64 outputs, the base output,
    the number of modules)."""
    base = tiny_unet()
    path = tmp_path_factory.mktemp("lycoris_in") / "unet_dora_in.safetensors"
    _, network = lycoris_file(base, path, wd_on_output=False)
    y32 = lycoris_input_axis_reference(base, path, unet_inputs(), torch.float32)
    y64 = lycoris_input_axis_reference(base, path, unet_inputs(torch.float64), torch.float64)
    return base, path, y32, y64, run(base, unet_inputs()), len(network.loras)


def test_a_lycoris_input_axis_file_loads_onto_dora_ext_with_lycoris_outputs(unet_in_file):
    """Each module becomes a norm_axis="in" adapter whose magnitude is the file's dora_scale bit for bit, in the
    layer's shape ([in]; a conv: [1, C_in, 1, 1], dora_scale's own). Outputs as for the output axis (module
    docstring); LyCORIS's fp32 ε against dora_ext's clamp is a relative gain change of ε/‖column‖, asserted below
    1e-6 here (tests/test_input_axis.py pins the formula), i.e. within the rounding the comparison allows."""
    base, path, y32, y64, y_base, count = unet_in_file
    state = load_file(str(path))
    model = dora_ext.load_lycoris(copy.deepcopy(base), path)
    layers = dora_ext.dora_layers(model)
    assert len(layers) == count and any(isinstance(l, dora_ext.layers.Conv) for l in layers.values())
    names = {p: f"lycoris_{p.replace('.', '_')}" for p in layers}
    for path_, layer in layers.items():
        assert layer.norm_axis["default"] == "in"
        m, scale = layer.lora_magnitude_vector["default"].weight, state[f"{names[path_]}.dora_scale"]
        conv = isinstance(layer, dora_ext.layers.Conv)
        assert m.shape == (scale.shape if conv else (layer.in_features,)), path_
        assert scale.shape[:2] == (1, layer.in_features) and torch.equal(m, scale.reshape(m.shape)), path_
    assert min(torch.finfo(torch.float32).eps / l.weight_norm("default").min().item() for l in layers.values()) < 1e-6
    y = run(model, unet_inputs())
    assert (y64 - y_base.double()).norm() > 0.1 * y64.norm()  # the adapter is far from identity
    assert_error_within(y, y32, y64, factor=2.0, msg="dora_ext vs LyCORIS (fp64), input axis")
    assert not any(p.requires_grad for p in model.parameters())


def test_a_lycoris_input_axis_file_round_trips_bit_for_bit_and_has_no_peft_form(unet_in_file, tmp_path):
    base, path, *_ = unet_in_file
    model = dora_ext.load_lycoris(copy.deepcopy(base), path)
    adapters = dora_ext.model_adapters(model)
    assert {a.axis for a in adapters.values()} == {"in"} and adapters["conv_in"].magnitude.shape == (4,)
    dora_ext.save_lycoris(adapters, tmp_path / "again.safetensors")
    assert_same_files(path, tmp_path / "again.safetensors")
    # PEFT's DoRA normalises output rows: no exact PEFT (or ai-toolkit) form, refused before anything is written
    for convert in (lambda: dora_ext.lycoris_to_peft(path, base, tmp_path / "peft"),
                    lambda: dora_ext.save_peft(adapters, tmp_path / "peft"),
                    lambda: dora_ext.save_adapter(model, tmp_path / "peft")):
        with pytest.raises(ValueError, match="not be exact|cannot represent"):
            convert()
    assert not (tmp_path / "peft").exists()
    with pytest.raises(ValueError, match="not exact"):
        dora_ext.save_lycoris(adapters, tmp_path / "out.safetensors", norm_axis="out")
    with pytest.raises(ValueError, match="norm_axis='out' was given"):
        dora_ext.read_adapter_file(path, base, norm_axis="out")
    with pytest.raises(ValueError, match="linear-only"):
        dora_ext.save_ai_toolkit(adapters, tmp_path / "ait.safetensors")


def test_a_text_encoder_input_axis_file_keeps_per_module_ranks_and_alphas(tmp_path):
    """Linear layers of a CLIP text encoder. One module is rewritten at rank 8 with the same s·B·A (A stacked twice
    and halved, B stacked, alpha 4 so s = 4/8 = 0.5 as the others' 2/4): LyCORIS on the uniform file is its oracle,
    and a loader that lost the module's rank or alpha would give it another scaling (2/8 or 4/4)."""
    base = tiny_clip()
    path = tmp_path / "clip_in.safetensors"
    lycoris_file(base, path, wd_on_output=False)
    state = load_file(str(path))
    name = "lycoris_encoder_layers_1_mlp_fc1"
    assert state[f"{name}.dora_scale"].shape == (1, 32)
    state[f"{name}.lora_down.weight"] = torch.cat([state[f"{name}.lora_down.weight"]] * 2) * 0.5
    state[f"{name}.lora_up.weight"] = torch.cat([state[f"{name}.lora_up.weight"]] * 2, dim=1)
    state[f"{name}.alpha"] = torch.tensor(4.0)
    model = dora_ext.load_lycoris(copy.deepcopy(base), state)
    layer = dora_ext.dora_layers(model)["encoder.layers.1.mlp.fc1"]
    assert layer.r["default"] == 8 and layer.lora_alpha["default"] == 4.0 and layer.norm_axis["default"] == "in"
    y32 = lycoris_input_axis_reference(base, path, clip_inputs(), torch.float32)
    y64 = lycoris_input_axis_reference(base, path, clip_inputs(), torch.float64)
    assert (y64 - run(base, clip_inputs()).double()).norm() > 0.1 * y64.norm()
    assert_error_within(run(model, clip_inputs()), y32, y64, factor=2.0, msg="dora_ext, input axis, mixed ranks")
    adapters = dora_ext.model_adapters(model)
    assert adapters["encoder.layers.1.mlp.fc1"].rank == 8 and adapters["encoder.layers.1.mlp.fc1"].alpha == 4.0


def _lycoris_module_paths(model: nn.Module) -> list[str]:
    """The module paths LyCORIS's default network (preset "full", locon) adapts in `model`."""
    network = lycoris.create_lycoris(copy.deepcopy(model), 1.0, linear_dim=4, linear_alpha=2, algo="locon")
    return sorted(n for n, _ in model.named_modules() if n and f"lycoris_{n.replace('.', '_')}" in
                  {lora.lora_name for lora in network.loras})


def test_an_input_axis_adapter_trained_by_dora_ext_saves_a_file_lycoris_runs(tmp_path):
    """dora_ext's norm_axis="in" adapters, on the modules LyCORIS adapts in the UNet (convs and linears), trained a
    few steps, then written by save_lycoris: dora_scale float32 [1, in] / [1, C_in, 1, 1] and alpha per module.
    LyCORIS's network with wd_on_output=False takes the file key for key and gives dora_ext's outputs (fp32 and fp64
    LyCORIS, as above); the file loads back into dora_ext with the same tensors and writes the same file."""
    import re

    base = tiny_unet()
    paths = _lycoris_module_paths(base)
    config = dora_ext.DoRAConfig(r=4, alpha=2.0, norm_axis="in",
                                 target_modules="|".join(re.escape(p) for p in paths))
    model = dora_ext.inject(copy.deepcopy(base), config)
    assert sorted(dora_ext.dora_layers(model)) == paths
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    target = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    model.train()
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(*unet_inputs()).sample, target).backward()
        opt.step()
    model.eval()
    trained = dora_ext.model_adapters(model)
    assert {a.axis for a in trained.values()} == {"in"}
    path = tmp_path / "trained_in.safetensors"
    dora_ext.save_lycoris(trained, path)
    state = load_file(str(path))
    for p, layer in dora_ext.dora_layers(model).items():
        scale, alpha = state[f"lycoris_{p.replace('.', '_')}.dora_scale"], state[f"lycoris_{p.replace('.', '_')}.alpha"]
        assert scale.dtype == torch.float32 and alpha.dtype == torch.float32 and alpha.item() == 2.0
        kernel = (1,) * (layer.weight.dim() - 2)
        assert scale.shape == (1, layer.in_features, *kernel), p

    y = run(model, unet_inputs())
    y32 = lycoris_input_axis_reference(base, path, unet_inputs(), torch.float32)
    y64 = lycoris_input_axis_reference(base, path, unet_inputs(torch.float64), torch.float64)
    assert (y64 - run(base, unet_inputs()).double()).norm() > 0.1 * y64.norm()  # training moved the output
    assert_error_within(y, y32, y64, factor=2.0, msg="dora_ext-trained input-axis adapter vs LyCORIS (fp64)")

    again = dora_ext.model_adapters(dora_ext.load_lycoris(copy.deepcopy(base), path))
    assert again.keys() == trained.keys()
    for p, a in trained.items():
        b = again[p]
        assert a.alpha == b.alpha and a.axis == b.axis == "in"
        assert all(torch.equal(x, y) for x, y in ((a.lora_A, b.lora_A), (a.lora_B, b.lora_B),
                                                  (a.magnitude, b.magnitude)))
    dora_ext.save_lycoris(again, tmp_path / "again.safetensors")
    assert_same_files(path, tmp_path / "again.safetensors")


def test_a_file_mixing_the_axes_is_refused_and_leaves_the_model_as_it_was(unet_file, unet_in_file):
    base, out_path, *_ = unet_file
    _, in_path, *_ = unet_in_file
    mixed = {k: v for k, v in load_file(str(out_path)).items() if not k.startswith("lycoris_conv_in.")}
    mixed.update({k: v for k, v in load_file(str(in_path)).items() if k.startswith("lycoris_conv_in.")})
    assert dora_ext.read_adapter_file(mixed, base)["conv_in"].axis == "in"
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"mix the output axis .* and the input axis \(1, e\.g\. \['conv_in'\]\)"):
        dora_ext.load_lycoris(model, mixed)
    assert not dora_ext.dora_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # an output-axis adapter of the same name is not overwritten by an input-axis file
    dora_ext.load_lycoris(model, out_path)
    held = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="norm_axis 'out' vs the file's 'in'"):
        dora_ext.load_lycoris(model, in_path)
    assert all(torch.equal(held[k], v) for k, v in model.state_dict().items())


def test_a_magnitude_that_fits_both_axes_needs_norm_axis(tmp_path):
    base = nn.Sequential(nn.Linear(1, 1))
    path = tmp_path / "one.safetensors"
    adapted, _ = lycoris_file(base, path)
    assert load_file(str(path))["lycoris_0.dora_scale"].shape == (1, 1)
    with pytest.raises(ValueError, match="pass norm_axis='out' or 'in'"):
        dora_ext.load_lycoris(copy.deepcopy(base), path)
    assert dora_ext.read_adapter_file(path, base, norm_axis="in")["0"].axis == "in"
    x = torch.randn(5, 1, generator=torch.Generator().manual_seed(5))
    for axis in ("out", "in"):  # one weight: its row and its column are the same, so both axes give LyCORIS's
        model = dora_ext.load_lycoris(copy.deepcopy(base), path, norm_axis=axis)
        assert dora_ext.dora_layers(model)["0"].norm_axis["default"] == axis
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
