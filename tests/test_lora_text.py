"""A LoRA on m9's text encoder (XLM-R) beside the UNet's, in one file (weights_convert/lora.py,
research/lora.py's TEXT_TARGETS and its pipeline-wide functions), against diffusers' AltDiffusionPipeline
with peft: our file loaded by diffusers' load_lora_weights, and a file diffusers' save_lora_weights wrote
from peft-wrapped modules loaded by us, give the same text-encoder output, UNet output and picture for
the same seed; scales, merging, per-call scales and removal act on both modules' adapters of a name. Also
the names' round trip, m9's parameter count, and the one-line refusals of bad text-encoder keys."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers.pipelines.deprecated.alt_diffusion import AltDiffusionPipeline
from diffusers.pipelines.deprecated.alt_diffusion.modeling_roberta_series import (
    RobertaSeriesConfig, RobertaSeriesModelWithTransformation)
from helpers import M9_TEXT, TEXT, diffusers_pipeline, rel_diff, rel_err
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import load_file, save_file

from altdiff_min.errors import BadFile, BadValue
from altdiff_min.model.text_encoder import TextEncoder
from altdiff_min.pipeline import load as load_model
from altdiff_min.research.lora import (TEXT_TARGETS, add_lora, lora_layers, lora_parameters, lora_scales, merge_lora,
                                       names, remove_lora, set_scale, targets_of, unmerge_lora)
from weights_convert import lora as lora_files
from weights_convert.export import export
from weights_convert.text_encoder import config_from_hf

TOL = 1e-5  # fp32, one module
PICTURE_TOL = 1e-4  # fp32, end to end
PROMPTS = ["一只戴着帽子的小狗", "a red circle on a blue square"]
PICTURE = {"steps": 5, "height": 64, "width": 96, "seed": 42}  # two pictures of the first prompt
TEXT_LAYERS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")


@pytest.mark.parametrize("config", [TEXT, M9_TEXT], ids=["small", "m9"])
def test_every_transformers_name_comes_back_and_text_targets_are_diffusers_recipe(config):
    """TO_TRANSFORMERS is the text encoder's RULES backwards: every Linear of transformers' encoder
    (its pooler aside: conversion drops it) names one of ours and comes back; TEXT_TARGETS choose
    exactly the self-attentions' query, key, value and output.dense (diffusers' q/k/v/out_proj)."""
    hf = {"vocab_size": 250, **config}
    with torch.device("meta"):
        ref = RobertaSeriesModelWithTransformation(RobertaSeriesConfig(**hf))
        ours = TextEncoder(config_from_hf(hf))
    linear = [n for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear) and ".pooler." not in n]
    ours_linear = {n for n, m in ours.named_modules() if isinstance(m, torch.nn.Linear)}
    assert sorted(lora_files.to_ours(n, "text_encoder") for n in linear) == sorted(ours_linear)
    assert [lora_files.to_diffusers(lora_files.to_ours(n, "text_encoder"), "text_encoder") for n in linear] == linear
    chosen = {lora_files.to_diffusers(n, "text_encoder") for n in targets_of(ours, TEXT_TARGETS)}
    assert chosen == {n for n in linear if n.endswith(TEXT_LAYERS)} and len(chosen) == 4 * hf["num_hidden_layers"]


@pytest.mark.parametrize("r", [4, 8])
def test_m9_text_lora_parameter_count(r):
    with torch.device("meta"):
        te = TextEncoder(config_from_hf({"vocab_size": 250002, **M9_TEXT}))
    assert len(add_lora(te, r, targets=TEXT_TARGETS)) == 24 * 4
    assert sum(p.numel() for p in lora_parameters(te)) == 196_608 * r  # 96 layers · r · (1024 + 1024)


def randomize_lora_(model, seed: int) -> None:
    """Every LoRA weight random and non-zero (A and B; peft's B starts at zero, which would prove nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def our_file(small_model_dir, tmp_path_factory) -> str:
    """A file written by save_lora from our UNet (r 3, alpha 5) and text encoder (r 2, alpha 3)."""
    model = load_model(small_model_dir)
    add_lora(model.unet, 3, alpha=5)
    add_lora(model.text_encoder, 2, alpha=3, targets=TEXT_TARGETS)
    randomize_lora_(model.unet, 4)
    randomize_lora_(model.text_encoder, 5)
    return lora_files.save_lora(model.unet, str(tmp_path_factory.mktemp("both")), "both.safetensors",
                                text_encoder=model.text_encoder)


@pytest.fixture(scope="module")
def diffusers_file(reference, tmp_path_factory):
    """A file diffusers' save_lora_weights wrote from a peft-wrapped text encoder (r 4, alpha 8: diffusers'
    text-encoder recipe, in XLM-R's names) and UNet (r 2, alpha 3), with their peft configs; returns the
    path and the wrapped modules (the reference)."""
    te, unet = copy.deepcopy(reference["text_encoder"]), copy.deepcopy(reference["unet"])
    te_config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "key", "value", "attention.output.dense"],
                           init_lora_weights="gaussian")
    inject_adapter_in_model(te_config, te)  # what transformers' add_adapter does (it asks for peft ≥ 0.22)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=3, target_modules=["to_k", "to_q", "to_v", "to_out.0"],
                                init_lora_weights="gaussian"))
    randomize_lora_(te, 6)
    randomize_lora_(unet, 7)
    folder = tmp_path_factory.mktemp("diffusers")
    AltDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet),
                                           text_encoder_lora_layers=get_peft_model_state_dict(te),
                                           unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
                                           text_encoder_lora_adapter_metadata=te_config.to_dict())
    return str(folder / lora_files.FILE), te.eval(), unet.eval()


def module_inputs(model):
    """Our tokenizer's ids and mask of two prompts; the UNet's latents, timesteps and a random context."""
    ids, mask = model.tokenizer(PROMPTS)
    g = torch.Generator().manual_seed(1)
    return ids, mask, (torch.randn(2, 4, 16, 24, generator=g), torch.tensor([999, 1]),
                       torch.randn(2, 77, model.unet.cfg.context_dim, generator=g))


@torch.no_grad()
def compare(model, pipe, inputs, against=None) -> tuple[float, float]:
    """rel_err of our text encoder's and UNet's outputs against the pipeline's; `against` (text, UNet
    outputs): the outputs of the plain model, from which the LoRA must move the reference's."""
    ids, mask, (x, t, context) = inputs
    text = pipe.text_encoder(input_ids=ids, attention_mask=mask).projection_state
    eps = pipe.unet(x, t, encoder_hidden_states=context).sample
    if against is not None:
        assert rel_diff(text, against[0]) > 1e-3 and rel_diff(eps, against[1]) > 1e-3, "the LoRA changes nothing"
    return rel_err(model.text_encoder(ids, mask), text), rel_err(model.unet(x, t, context), eps)


@torch.no_grad()
def pictures(model, pipe):
    ours = model.generate(PROMPTS[0], n_samples=2, output="tensor", progress=False, **PICTURE)
    if pipe is None:
        return ours
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPTS[0], generator=torch.Generator("cpu").manual_seed(PICTURE["seed"]), num_inference_steps=PICTURE["steps"],
               guidance_scale=7.5, height=PICTURE["height"], width=PICTURE["width"], output_type="pt",
               num_images_per_prompt=2).images
    return ours, ref


def test_our_file_loads_in_diffusers_same_text_unet_and_picture(hub_layout, reference, small_model_dir, our_file):
    """save_lora's file (text_encoder.roberta.… and unet.… keys, each module's peft config) in diffusers'
    AltDiffusionPipeline.load_lora_weights, and in load(…, lora=…): same outputs and picture; then scaled,
    merged, weighed per call, unmerged and removed, on both modules at once, against diffusers'
    set_adapters / delete_adapters."""
    keys = load_file(our_file)
    assert "text_encoder.roberta.encoder.layer.0.attention.self.query.lora_linear_layer.down.weight" in keys
    assert "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    plain_pipe = diffusers_pipeline(hub_layout, reference, "ddim")
    pipe = diffusers_pipeline(hub_layout, {**reference, "text_encoder": copy.deepcopy(reference["text_encoder"]),
                                           "unet": copy.deepcopy(reference["unet"])}, "ddim")
    pipe.load_lora_weights(our_file, adapter_name="both")
    model = load_model(small_model_dir, lora=[our_file])
    assert names(model) == ["both"] and names(model.text_encoder) == ["both"] == names(model.unet)
    assert {(m.r, m.alpha) for m in lora_layers(model.text_encoder).values()} == {(2, 3.0)}
    assert {(m.r, m.alpha) for m in lora_layers(model.unet).values()} == {(3, 5.0)}
    inputs = module_inputs(model)
    ids, mask, (x, t, context) = inputs
    with torch.no_grad():
        plain = (plain_pipe.text_encoder(input_ids=ids, attention_mask=mask).projection_state,
                 plain_pipe.unet(x, t, encoder_hidden_states=context).sample)
    assert max(compare(model, pipe, inputs, plain)) <= TOL
    got, expected = pictures(model, pipe)
    assert rel_err(got, expected) <= PICTURE_TOL
    with lora_scales(model.text_encoder, {"both": 0.0}):  # the text encoder's part reaches the picture
        assert rel_diff(pictures(model, None), got) > 1e-3

    set_scale(model, 0.5, "both")
    pipe.set_adapters(["both"], [0.5])
    assert max(compare(model, pipe, inputs, plain)) <= TOL
    merge_lora(model)
    assert all(m.merged for m in lora_layers(model).values()) and len(lora_layers(model)) == 8 + 8 * 11
    assert max(compare(model, pipe, inputs)) <= TOL
    unmerge_lora(model)
    with lora_scales(model, {"both": 0.0}):  # per call, on both modules
        assert max(compare(model, plain_pipe, inputs)) <= TOL
    assert max(compare(model, pipe, inputs)) <= TOL
    remove_lora(model)
    assert not lora_layers(model) and max(compare(model, plain_pipe, inputs)) <= TOL


def test_diffusers_file_same_text_unet_and_picture_in_ours(hub_layout, reference, small_model_dir, diffusers_file):
    """A file diffusers wrote from peft-wrapped modules (peft's lora_A/B keys, each module's own rank and
    alpha in its metadata) in load(…, lora=…): the outputs and picture of those wrapped modules."""
    path, te, unet = diffusers_file
    assert any(k.startswith("text_encoder.roberta.") and k.endswith(".lora_A.weight") for k in load_file(path))
    model = load_model(small_model_dir, lora=[(path, 1.0)])
    assert {(m.r, m.alpha) for m in lora_layers(model.text_encoder).values()} == {(4, 8.0)}
    assert {(m.r, m.alpha) for m in lora_layers(model.unet).values()} == {(2, 3.0)}
    pipe = diffusers_pipeline(hub_layout, {**reference, "text_encoder": te, "unet": unet}, "ddim")
    inputs = module_inputs(model)
    ids, mask, (x, t, context) = inputs
    with torch.no_grad():
        plain = (reference["text_encoder"](input_ids=ids, attention_mask=mask).projection_state,
                 reference["unet"](x, t, encoder_hidden_states=context).sample)
    assert max(compare(model, pipe, inputs, plain)) <= TOL
    got, expected = pictures(model, pipe)
    assert rel_err(got, expected) <= PICTURE_TOL


TE = "text_encoder.roberta.encoder.layer.0.attention.self.query"
UNET_A, UNET_B = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight", \
    "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"


def text_part(path: str, a, b, parts=("lora_linear_layer.down.weight", "lora_linear_layer.up.weight")) -> dict:
    return {f"{path}.{parts[0]}": a, f"{path}.{parts[1]}": b}


@pytest.mark.parametrize("tensors,words", [
    (text_part("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", torch.ones(4, 32), torch.ones(32, 4),
               ("lora_A.weight", "lora_B.weight")), "CLIP's text tower"),
    ({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(4, 32),
      "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(32, 4)}, "CLIP's text tower"),
    (text_part("text_encoder.roberta.encoder.layer.7.attention.self.query", torch.ones(4, 32), torch.ones(32, 4)),
     "names no layer of this text encoder"),
    (text_part(TE, torch.ones(4, 32), torch.ones(32, 3)), "rank mismatch"),
    (text_part(TE, torch.full((4, 32), float("nan")), torch.ones(32, 4)), "NaN"),
    (text_part(TE, torch.ones(4, 32), torch.ones(32, 4)), "no text encoder was given"),
], ids=["clip-diffusers", "clip-kohya", "no-such-layer", "rank", "nan", "no-text-encoder"])
def test_bad_text_keys_are_refused_in_one_line_and_nothing_attaches(small_model_dir, tmp_path, tensors, words):
    """Each file also holds a good UNet layer: on a refusal neither module gets an adapter."""
    path = str(tmp_path / "bad.safetensors")
    save_file({UNET_A: torch.ones(4, 64), UNET_B: torch.ones(64, 4), **tensors}, path)
    model = load_model(small_model_dir)
    given = None if words.startswith("no text encoder") else model.text_encoder
    with pytest.raises((BadFile, BadValue), match=words) as e:
        lora_files.attach_lora_files(model.unet, lora_files.read_lora_files([path]), given)
    assert "\n" not in str(e.value) and next(iter(tensors)).rsplit(".lora", 1)[0] in str(e.value)
    assert not lora_layers(model)


def test_text_encoder_lora_has_no_kohya_form_and_no_model_folder(small_model_dir, our_file, tmp_path):
    out = tmp_path / "kohya.safetensors"
    with pytest.raises(BadFile, match="kohya form cannot name") as e:
        export(our_file, out, to="kohya")
    assert "\n" not in str(e.value) and "text_encoder.roberta." in str(e.value) and not out.exists()
    model = load_model(small_model_dir)
    add_lora(model.text_encoder, 2, targets=TEXT_TARGETS)
    with pytest.raises(BadValue, match="holds LoRA layers"):
        model.save(str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    # the text encoder's part alone is a file too (--train embeddings --lora R with text targets)
    randomize_lora_(model.text_encoder, 8)
    alone = lora_files.save_lora(model.unet, str(tmp_path), "text.safetensors", text_encoder=model.text_encoder)
    assert all(k.startswith("text_encoder.roberta.") for k in load_file(alone))
    again = load_model(small_model_dir, lora=[alone])
    assert not lora_layers(again.unet) and names(again.text_encoder) == ["text"]
    ids, mask = again.tokenizer(PROMPTS)
    with torch.no_grad():
        assert rel_err(again.text_encoder(ids, mask), model.text_encoder(ids, mask)) <= TOL
