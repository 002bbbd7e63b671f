"""LoRA (altdiff_min/research/lora.py, weights_convert/lora.py) against peft and diffusers' loaders: the
same file gives the same UNet output in diffusers and here, at two scales and merged; kohya files as
diffusers converts them; our own files load in diffusers; several files at once, each at its weight,
as diffusers' set_adapters weighs them (UNet output, and the picture through the pipeline). Also:
m9's parameter count, the names' round trip, and the one-line refusals of bad files."""
from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.nn as nn
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from helpers import M9_UNET, UNET, randomize_, rel_diff, rel_err
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from altdiff_min.errors import BadFile, BadValue
from altdiff_min.model.unet import UNet, UNetConfig
from altdiff_min.research.lora import (LoRA, add_lora, lora_layers, lora_parameters, lora_scales, merge_lora, names,
                                       remove_lora, set_scale, unmerge_lora)
from weights_convert import lora as lora_files
from weights_convert.rules import rename
from weights_convert.unet import RULES, TO_DIFFUSERS, config_from_hf, load

TOL = 1e-5  # fp32
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # diffusers' SD recipe


@pytest.mark.parametrize("r", [4, 8])
def test_m9_lora_parameter_count(r):
    with torch.device("meta"):
        unet = UNet(UNetConfig())
    before = sum(p.numel() for p in unet.parameters())
    layers = add_lora(unet, r)
    assert len(layers) == 16 * 8  # 16 transformer blocks, 4 projections in each of 2 attentions
    assert sum(p.numel() for p in lora_parameters(unet)) == 199_296 * r
    assert sum(p.numel() for p in unet.parameters()) == before + 199_296 * r
    assert all(p.requires_grad for p in lora_parameters(unet))
    assert not any(p.requires_grad for layer in layers.values() for p in layer.base.parameters())


@pytest.mark.parametrize("config", [UNET, M9_UNET], ids=["small", "m9"])
def test_every_diffusers_name_comes_back(config):
    """TO_DIFFUSERS is RULES backwards: every tensor name of a diffusers UNet survives the round trip."""
    with torch.device("meta"):
        names = list(UNet2DConditionModel.from_config(config).state_dict())
    assert [rename(rename(k, RULES), TO_DIFFUSERS) for k in names] == names


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return randomize_(UNet2DConditionModel(**UNET), 2).eval()


@pytest.fixture(scope="module")
def inputs(base):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 16, 24, generator=g), torch.tensor([999, 1]),
            torch.randn(2, 77, base.config.cross_attention_dim, generator=g))


@pytest.fixture(scope="module")
def peft_file(base, tmp_path_factory):
    """A LoRA made with peft the way diffusers' training script makes one (gaussian A, r 4, alpha 8),
    B randomised, saved by diffusers' own save_lora_weights."""
    ref = copy.deepcopy(base)
    ref.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(ref),
                                              unet_lora_adapter_metadata=ref.peft_config["default"].to_dict())
    return str(folder / lora_files.FILE)


def diffusers_with(base, path) -> UNet2DConditionModel:
    """A copy of `base` with the LoRA file loaded by diffusers (kohya keys converted by diffusers)."""
    ref = copy.deepcopy(base)
    state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(path, return_lora_metadata=True)
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=ref, metadata=metadata)
    return ref


def ours_with(base, path, scale=1.0) -> UNet:
    ours, _ = load({k: v.clone() for k, v in base.state_dict().items()}, config_from_hf(base.config))
    lora_files.load_lora(ours, path, scale)
    return ours


@torch.no_grad()
def outputs(base, ours, ref, inputs, scale=1.0):
    x, t, context = inputs
    expected = ref(x, t, encoder_hidden_states=context, cross_attention_kwargs={"scale": scale}).sample
    plain = base(x, t, encoder_hidden_states=context).sample
    assert rel_diff(expected, plain) > 1e-3, "the LoRA changes nothing: the comparison would prove nothing"
    return ours(x, t, context), expected


def test_diffusers_file_same_output_as_diffusers(base, peft_file, inputs):
    keys = list(load_file(peft_file))
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    ref, ours = diffusers_with(base, peft_file), ours_with(base, peft_file)
    assert {layer.alpha for layer in lora_layers(ours).values()} == {8.0}  # from the file's metadata
    for scale in (1.0, 0.5):
        set_scale(ours, scale)
        assert rel_err(*outputs(base, ours, ref, inputs, scale)) <= TOL
    set_scale(ours, 1.0)
    merge_lora(ours)
    assert all(layer.merged for layer in lora_layers(ours).values())
    assert rel_err(*outputs(base, ours, ref, inputs)) <= TOL
    unmerge_lora(ours)
    remove_lora(ours)
    assert not lora_layers(ours) and not any(isinstance(m, LoRA) for m in ours.modules())
    x, t, context = inputs
    with torch.no_grad():
        assert rel_err(ours(x, t, context), base(x, t, encoder_hidden_states=context).sample) <= TOL


# Layers kohya's LoCon adapts beside the attention: (diffusers path, down shape, up shape) at r 4.
LOCON = [("down_blocks.0.attentions.0.proj_in", (4, 32, 1, 1), (32, 4, 1, 1)),
         ("down_blocks.0.resnets.0.conv1", (4, 32, 3, 3), (32, 4, 1, 1)),
         ("down_blocks.0.downsamplers.0.conv", (4, 32, 3, 3), (32, 4, 1, 1)),
         ("up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2", (4, 256), (64, 4)),
         ("mid_block.resnets.1.time_emb_proj", (4, 128), (64, 4))]


def test_training_script_file_same_output_as_diffusers(base, peft_file, inputs, tmp_path):
    """diffusers' train_text_to_image_lora.py saves convert_state_dict_to_diffusers(peft's state dict):
    the older `.lora.down` / `.lora.up` keys and no metadata, so alpha is the rank."""
    from diffusers.utils import convert_state_dict_to_diffusers

    tensors = {k.removeprefix("unet."): v for k, v in load_file(peft_file).items()}
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(tensors))
    path = str(tmp_path / lora_files.FILE)
    assert all(k.endswith((".lora.down.weight", ".lora.up.weight")) for k in load_file(path))
    ref, ours = diffusers_with(base, path), ours_with(base, path)
    assert {layer.alpha for layer in lora_layers(ours).values()} == {4.0}
    assert rel_err(*outputs(base, ours, ref, inputs)) <= TOL


def test_file_without_alphas_of_mixed_ranks_same_output_as_diffusers(base, peft_file, inputs, tmp_path):
    """No metadata and no alphas, one layer of rank 2 among rank 4: diffusers reads each layer's alpha as
    its own rank (scale 1), not the most common one."""
    tensors = {k: v.clone() for k, v in load_file(peft_file).items()}
    tensors[A], tensors[B] = tensors[A][:2].contiguous(), tensors[B][:, :2].contiguous()
    path = bad(tmp_path, tensors)
    ref, ours = diffusers_with(base, path), ours_with(base, path)
    assert lora_layers(ours)["mid_attn.block.self_attn.q"].alpha == 2.0
    assert {layer.alpha for layer in lora_layers(ours).values()} == {2.0, 4.0}
    assert rel_err(*outputs(base, ours, ref, inputs)) <= TOL


def kohya_file(peft_file, folder, alpha=2.0) -> str:
    """The same weights under kohya's names, with a per-layer alpha ≠ r, and LoCon layers (1×1 and 3×3
    convolutions, a feed-forward and a time projection)."""
    out = {}
    g = torch.Generator().manual_seed(5)
    locon = {f"unet.{path}.lora_{p}.weight": torch.randn(shape, generator=g) * 0.1
             for path, down, up in LOCON for p, shape in (("A", down), ("B", up))}
    for key, tensor in {**load_file(peft_file), **locon}.items():
        path, part = key.removeprefix("unet.").rsplit(".lora_", 1)
        kohya = "lora_unet_" + path.replace(".", "_")
        out[f"{kohya}.lora_{'down' if part == 'A.weight' else 'up'}.weight"] = tensor
        out[f"{kohya}.alpha"] = torch.tensor(alpha)
    path = str(folder / "kohya.safetensors")
    save_file(out, path)
    return path


def test_kohya_file_same_output_as_diffusers_conversion(base, peft_file, inputs, tmp_path):
    path = kohya_file(peft_file, tmp_path)
    ref, ours = diffusers_with(base, path), ours_with(base, path)
    assert {(layer.r, layer.alpha) for layer in lora_layers(ours).values()} == {(4, 2.0)}
    assert len(lora_layers(ours)) == 4 * 2 * 11 + len(LOCON)  # 11 transformer blocks in the small UNet
    assert rel_err(*outputs(base, ours, ref, inputs)) <= TOL


def test_our_file_loads_in_diffusers(base, inputs, tmp_path):
    ours, _ = load({k: v.clone() for k, v in base.state_dict().items()}, config_from_hf(base.config))
    add_lora(ours, 3, alpha=5)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in lora_parameters(ours):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    path = lora_files.save_lora(ours, str(tmp_path))
    assert path.endswith("pytorch_lora_weights.safetensors")
    ref = diffusers_with(base, path)
    assert rel_err(*outputs(base, ours, ref, inputs)) <= TOL
    again = ours_with(base, path)  # and back: the same layers, ranks and alphas
    assert {n: (m.r, m.alpha) for n, m in lora_layers(again).items()} == {n: (3, 5.0) for n in lora_layers(ours)}


def test_conv_lora_merges_to_the_same_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 5, 1), nn.Linear(6, 4))
    add_lora(model, 2, alpha=3, targets=[r"\d"])
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_()
    x = torch.randn(2, 3, 7, 6)
    with torch.no_grad():
        before = model(x)
        merge_lora(model)
        assert rel_err(model(x), before) <= TOL
    remove_lora(model)
    assert [type(m) for m in model] == [nn.Conv2d, nn.Conv2d, nn.Linear]


def bad(tmp_path, tensors) -> str:
    path = str(tmp_path / "bad.safetensors")
    save_file(tensors, path)
    return path


A, B = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight", \
    "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"


@pytest.mark.parametrize("tensors,words", [
    ({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8)}, "XLM-R"),
    ({"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 8)}, "XLM-R"),
    ({"unet.down_blocks.9.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 8)}, "names no layer"),
    ({"unet.conv_in.weight": torch.zeros(4, 8)}, "not a LoRA weight"),
    ({A: torch.zeros(4, 64), B: torch.zeros(64, 3)}, "rank mismatch"),
    ({A: torch.zeros(4, 65), B: torch.zeros(64, 4)}, "another architecture"),
    ({A: torch.full((4, 64), float("nan")), B: torch.zeros(64, 4)}, "NaN"),
    ({A: torch.zeros(4, 64)}, "not both"),
], ids=["kohya-te", "diffusers-te", "unknown", "no-lora", "rank", "shape", "nan", "half"])
def test_bad_files_are_refused_in_one_line(base, tmp_path, tensors, words):
    path = bad(tmp_path, tensors)
    ours, _ = load(base.state_dict(), config_from_hf(base.config))
    with pytest.raises(BadFile, match=words) as e:
        lora_files.load_lora(ours, path)
    assert "\n" not in str(e.value) and next(iter(tensors)).removeprefix("unet.").split(".lora")[0] in str(e.value)
    assert not lora_layers(ours)  # nothing attached


def test_add_lora_refusals():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(BadValue, match="no nn.Linear"):
        add_lora(model, 2, targets=["nothing"])
    with pytest.raises(BadValue, match="positive int"):
        add_lora(model, 0, targets=["0"])
    with pytest.raises(BadValue, match="finite"):
        add_lora(model, 1, targets=["0"], scale=float("nan"))
    add_lora(model, 1, targets=["0"])
    with pytest.raises(BadValue, match="already has a LoRA named 'default'"):
        add_lora(model, 1, targets=["0"])
    for name in ("a.b", "", "train", 3):
        with pytest.raises(BadValue, match="name"):
            add_lora(model, 1, targets=["0"], name=name)
    add_lora(model, 2, targets=["0"], name="second")  # a second adapter on the same layer
    assert names(model) == ["default", "second"] and len(lora_layers(model)["0"].adapters) == 2
    with pytest.raises(BadValue, match="holds 2 LoRAs"):
        lora_layers(model)["0"].lora_A  # noqa: B018  (one adapter's shorthand: several are named)
    with pytest.raises(BadValue, match="no LoRA named 'third'"):
        set_scale(model, 0.5, "third")


# Several LoRAs at once: diffusers loads each file as a named peft adapter and weighs them with
# set_adapters(names, weights); ours stacks named adapters on one layer (research/lora.py).
WEIGHTS = {"style": 0.7, "kohya": -0.45}


@pytest.fixture(scope="module")
def two_files(peft_file, tmp_path_factory) -> dict[str, str]:
    """A diffusers file (attention, r 4, alpha 8) and a kohya file (the same attention layers again,
    alpha 2, and LoCon layers besides), named as their adapters."""
    folder = tmp_path_factory.mktemp("two")
    style = folder / "style.safetensors"
    shutil.copy(peft_file, style)
    return {"style": str(style), "kohya": kohya_file(peft_file, folder)}


def diffusers_adapters(unet, files: dict[str, str], weights: dict[str, float]):
    """`unet` with each file loaded by diffusers as the adapter of its name, weighed by set_adapters."""
    for name, path in files.items():
        state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(path, return_lora_metadata=True)
        StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=unet, adapter_name=name, metadata=metadata)
    unet.set_adapters(list(weights), list(weights.values()))
    return unet


def test_two_files_same_output_as_diffusers_adapters(base, two_files, inputs):
    """y = W x + Σ_i weight_i · (alpha_i / r_i) · B_i A_i x, each file at its weight, as diffusers' set_adapters;
    then one adapter reweighed, merged, merged both, unmerged, removed: each against diffusers."""
    x, t, context = inputs
    ref = diffusers_adapters(copy.deepcopy(base), two_files, WEIGHTS)
    ours, _ = load({k: v.clone() for k, v in base.state_dict().items()}, config_from_hf(base.config))
    added = lora_files.attach_lora_files(ours, lora_files.read_lora_files([(two_files[n], s) for n, s in WEIGHTS.items()]))
    assert list(added) == list(WEIGHTS) and set(names(ours)) == set(WEIGHTS)
    assert sum(len(layer.adapters) == 2 for layer in lora_layers(ours).values()) == 4 * 2 * 11  # attention: both
    with torch.no_grad():
        plain = base(x, t, encoder_hidden_states=context).sample

        def check(weights):
            expected = ref(x, t, encoder_hidden_states=context).sample
            assert rel_diff(expected, plain) > 1e-3
            assert rel_err(ours(x, t, context), expected) <= TOL, weights
        check(WEIGHTS)
        for one, weight in WEIGHTS.items():  # each alone differs from both: the sum is really taken
            ref.set_adapters([one], [weight])
            assert rel_diff(ref(x, t, encoder_hidden_states=context).sample, ours(x, t, context)) > 1e-3
        reweighed = {"style": 0.7, "kohya": 1.3}
        ref.set_adapters(list(reweighed), list(reweighed.values()))
        set_scale(ours, 1.3, "kohya")
        check(reweighed)
        merge_lora(ours, "style")
        assert [a.merged for a in lora_layers(ours)["mid_attn.block.self_attn.q"].adapters.values()] == [True, False]
        check(reweighed)
        merge_lora(ours)
        check(reweighed)
        set_scale(ours, -0.45, "kohya")  # a merged adapter rescaled: unmerged, rescaled, merged again
        ref.set_adapters(list(WEIGHTS), list(WEIGHTS.values()))
        check(WEIGHTS)
        unmerge_lora(ours)
        with lora_scales(ours, {"style": 0.0}):  # per call: only this call is changed
            ref.set_adapters(["kohya"], [WEIGHTS["kohya"]])
            check({"kohya": WEIGHTS["kohya"]})
        assert lora_layers(ours)["mid_attn.block.self_attn.q"].adapters["style"].scale == 0.7
        remove_lora(ours, "style")
        ref.delete_adapters("style")
        ref.set_adapters(["kohya"], [WEIGHTS["kohya"]])
        check({"kohya": WEIGHTS["kohya"]})
        assert names(ours) == ["kohya"] and lora_layers(ours)["mid_attn.block.self_attn.q"].r == 4
        remove_lora(ours)
        assert not lora_layers(ours) and rel_err(ours(x, t, context), plain) <= TOL


def test_a_second_file_loads_beside_the_first(base, two_files, inputs):
    """load_lora twice (the Python way of stacking) is the two files read at once."""
    ours = ours_with(base, two_files["style"], WEIGHTS["style"])
    lora_files.load_lora(ours, two_files["kohya"], WEIGHTS["kohya"])
    ref = diffusers_adapters(copy.deepcopy(base), two_files, WEIGHTS)
    x, t, context = inputs
    with torch.no_grad():
        assert rel_err(ours(x, t, context), ref(x, t, encoder_hidden_states=context).sample) <= TOL
    with pytest.raises(BadValue, match="already has a LoRA named 'kohya'"):
        lora_files.load_lora(ours, two_files["kohya"])
    assert set(names(ours)) == {"style", "kohya"}


def test_two_files_same_picture_as_diffusers_pipeline(hub_layout, reference, small_model_dir, two_files):
    """The pipeline: load(MODEL, lora=[(FILE, SCALE), …]) against diffusers' AltDiffusionPipeline with
    load_lora_weights(adapter_name=…) and set_adapters(…, adapter_weights=…): same seed, same picture."""
    from helpers import diffusers_pipeline

    from altdiff_min.pipeline import load as load_model

    pipe = diffusers_pipeline(hub_layout, {**reference, "unet": copy.deepcopy(reference["unet"])}, "ddim")
    for name, path in two_files.items():
        pipe.load_lora_weights(path, adapter_name=name)
    pipe.set_adapters(list(WEIGHTS), adapter_weights=list(WEIGHTS.values()))
    pipe.set_progress_bar_config(disable=True)
    arguments = {"num_inference_steps": 5, "guidance_scale": 7.5, "height": 64, "width": 96, "output_type": "pt",
                 "num_images_per_prompt": 2}
    with torch.no_grad():
        expected = pipe("一只戴着帽子的小狗", generator=torch.Generator("cpu").manual_seed(42), **arguments).images
        pipe.disable_lora()
        plain = pipe("一只戴着帽子的小狗", generator=torch.Generator("cpu").manual_seed(42), **arguments).images
    ours = load_model(small_model_dir, lora=[(two_files[n], s) for n, s in WEIGHTS.items()])
    got = ours.generate("一只戴着帽子的小狗", n_samples=2, steps=5, height=64, width=96, seed=42, output="tensor",
                        progress=False)
    assert rel_diff(expected, plain) > 1e-3, "the LoRAs change nothing: the comparison would prove nothing"
    assert rel_err(got, expected) <= 1e-4


def test_adapter_names_come_from_the_files():
    assert [lora_files.default_name(p) for p in ("a/style.safetensors", "b/style.v2.safetensors", "c/train.safetensors",
                                                 "d/keys.safetensors")] == ["style", "style_v2", "train_lora", "keys_lora"]


@pytest.mark.parametrize("lora,words", [
    ("FILE", None), (["FILE", ("FILE", 0.5)], "is given twice"), ([("FILE", float("nan"))], "finite"),
    ([("FILE", 1, 2)], "FILE or \\(FILE, SCALE\\)"), (["FILE", "OTHER/style.safetensors"], "would both be the LoRA 'style'"),
    (3, "a list of LoRA files"), (["nowhere.safetensors"], "not found"),
], ids=["one", "twice", "nan", "triple", "same-name", "type", "missing"])
def test_lora_lists_are_checked_before_any_model(two_files, tmp_path, lora, words):
    other = tmp_path / "style.safetensors"
    shutil.copy(two_files["style"], other)

    def real(x):
        return x.replace("OTHER/style.safetensors", str(other)).replace("FILE", two_files["style"]) if isinstance(x, str) else x
    lora = real(lora) if isinstance(lora, str) else [tuple(map(real, i)) if isinstance(i, tuple) else real(i)
                                                    for i in lora] if isinstance(lora, list) else lora
    if words is None:
        assert [f[:3] for f in lora_files.read_lora_files(lora)] == [(two_files["style"], 1.0, "style")]
        return
    with pytest.raises((BadValue, BadFile, TypeError), match=words) as e:
        lora_files.read_lora_files(lora)
    assert "\n" not in str(e.value)


@pytest.mark.slow  # torch.compile of the small UNet: minutes on a small CPU (as test_speed's compile test)
def test_a_compiled_unet_runs_its_loras_in_the_graph(small_model_dir, two_files):
    """load(…, lora=…, compile=True) attaches before compiling (fullgraph: the adapters' sum is in the
    graph): the picture is the eager one's; per-call scales cannot reach a compiled graph and are refused."""
    from altdiff_min.pipeline import load as load_model

    lora = [(two_files[n], s) for n, s in WEIGHTS.items()]
    compiled, eager = load_model(small_model_dir, lora=lora, compile=True), load_model(small_model_dir, lora=lora)
    args = {"n_samples": 2, "steps": 3, "height": 64, "width": 96, "seed": 1, "output": "tensor", "progress": False}
    assert rel_err(compiled.generate("un chien", **args), eager.generate("un chien", **args)) <= 1e-4
    with pytest.raises(BadValue, match="compiled UNet reads no per-call LoRA scales"), \
            lora_scales(compiled.unet, {"style": 0.0}):
        pass


def test_a_model_with_loras_is_saved_only_once_they_are_merged_and_removed(small_model_dir, two_files, tmp_path):
    """A LoRA layer's state dict (…q.base.weight, …adapters.style.lora_A.weight) loads into no UNet: save
    refuses it in one line, writing nothing; merged and removed, the weights are plain and save."""
    from altdiff_min.pipeline import load as load_model
    from altdiff_min.research.lora import remove_lora

    model = load_model(small_model_dir, lora=[two_files["style"]])
    with pytest.raises(BadValue, match="holds LoRA layers"):
        model.save(str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    with torch.no_grad():
        x = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))
        context = torch.randn(2, 77, model.unet.cfg.context_dim, generator=torch.Generator().manual_seed(1))
        t = torch.tensor([10.0, 500.0])
        want = model.unet(x, t, context)
        merge_lora(model.unet)
        remove_lora(model.unet)
        model.save(str(tmp_path / "out"))
        assert rel_err(load_model(str(tmp_path / "out")).unet(x, t, context), want) <= TOL


def test_per_call_scales_change_only_the_model_they_name(base, two_files, inputs):
    """Two models holding the same file (one adapter name): lora_scales on one leaves the other's as set."""
    x, t, context = inputs
    first, second = ours_with(base, two_files["style"], 0.7), ours_with(base, two_files["style"], 0.7)
    with torch.no_grad():
        before = second(x, t, context)
        with lora_scales(first, {"style": 0.0}):
            changed, other = first(x, t, context), second(x, t, context)
        assert torch.equal(other, before) and rel_diff(changed, before) > 1e-3
