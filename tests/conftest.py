"""Fixtures shared by the tests (a tokenizer trained here, random reference modules, the small model
in the hub layout and converted), and the parity summary printed after the run."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from helpers import (MEASURED, MODEL_INDEX, SCHEDULER, TEXT, UNET, VAE, legacy_attention_name, randomize_,
                     train_sentencepiece, write_json)
from prompts import ALL_PROMPTS

from altdiff_min.model.tokenizer import Tokenizer


# `make test-fast` (pytest -m core): the core's parity tests on small configs, in fp32 on the CPU, chosen
# to run in under two minutes on a 2-core machine. The marker is given here, by file and name, so the
# test files need no decoration; `make test` still runs everything.
CORE_FILES = {"test_tokenizer.py", "test_text_encoder.py", "test_unet.py", "test_vae.py", "test_samplers.py",
              "test_pipeline.py"}
CORE_SKIPPED = {  # the slow ones of those files (their cases are in `make test`)
    "test_property_equal_to_transformers_but_the_documented_category",  # 1,200 hypothesis prompts
    "test_compiles_as_one_graph",  # torch.compile
    "test_bf16_images_match_diffusers_in_fp32_and_in_bf16",
}
CORE_SKIPPED_PARAMS = ("cuda", "bf16", "fp16", "m9-cpu")  # other devices and dtypes; the m9-sized VAE
CORE_ONLY_PARAMS = {  # of these parametrised tests, only the cases whose id holds the word
    "test_small_unet_matches_diffusers": "per-sample",
    "test_same_images_with_a_config_saved_by_current_diffusers": "dpm++2m",
}


def is_core(item) -> bool:
    name = getattr(item, "originalname", item.name)
    params = item.callspec.id if hasattr(item, "callspec") else ""
    return (item.path.name in CORE_FILES and name not in CORE_SKIPPED and item.get_closest_marker("slow") is None
            and not any(word in params for word in CORE_SKIPPED_PARAMS)
            and CORE_ONLY_PARAMS.get(name, "") in params)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if is_core(item):
            item.add_marker(pytest.mark.core)


def pytest_terminal_summary(terminalreporter):
    if MEASURED:
        terminalreporter.section("parity: relative errors ‖ours − ref‖ / ‖ref‖ (largest per test)")
        worst: dict[str, float] = {}
        for test, err in MEASURED:
            worst[test] = max(err, worst.get(test, 0.0))
        for test, err in worst.items():
            terminalreporter.write_line(f"{err:9.2e}  {test}")


@pytest.fixture(scope="session", autouse=True)
def true_fp32():
    """fp32 parity means fp32. On Ampere and later GPUs PyTorch lets cuDNN convolutions run in TF32
    (10-bit mantissa) by default, which turns float noise of 1e-7 into differences of ~1e-3 (measured
    on an H200: 4e-4–2e-3 on the UNet and VAE). The tests compare in true fp32; generate keeps
    PyTorch's defaults."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture(scope="session")
def spm_dir(tmp_path_factory) -> str:
    """A folder holding `sentencepiece.bpe.model` trained on prompts in all nine m9 languages."""
    d = tmp_path_factory.mktemp("spm")
    train_sentencepiece(str(d / "sentencepiece.bpe.model"), ALL_PROMPTS * 3)
    return str(d)


# A small AltDiffusion: every block type of the m9 architecture, at toy widths.
@pytest.fixture(scope="session")
def reference(spm_dir):
    """Random diffusers/transformers modules of the small AltDiffusion (text encoder, UNet, VAE)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.deprecated.alt_diffusion.modeling_roberta_series import (
        RobertaSeriesConfig, RobertaSeriesModelWithTransformation)

    torch.manual_seed(0)  # diffusers/transformers initialise from the global generator
    vocab = Tokenizer(os.path.join(spm_dir, "sentencepiece.bpe.model")).vocab_size
    text = RobertaSeriesModelWithTransformation(RobertaSeriesConfig(vocab_size=vocab, **TEXT))
    return {"text_encoder": randomize_(text, 1).eval(), "unet": randomize_(UNet2DConditionModel(**UNET), 2).eval(),
            "vae": randomize_(AutoencoderKL(**VAE), 3).eval()}


@pytest.fixture(scope="session")
def hub_layout(reference, spm_dir, tmp_path_factory):
    """The small model saved as BAAI/AltDiffusion-m9 is on the hub: pickled .bin weights (the text
    encoder's with its pooler), the tokenizer's 512-token config, the UNet's sample_size 32."""
    root = tmp_path_factory.mktemp("hub") / "AltDiffusion-m9"
    write_json(root / "model_index.json", MODEL_INDEX)
    write_json(root / "scheduler" / "scheduler_config.json", SCHEDULER)
    text = reference["text_encoder"]
    write_json(root / "text_encoder" / "config.json", {**text.config.to_dict(), "architectures": ["RobertaSeriesModelWithTransformation"]})
    torch.save(text.state_dict(), root / "text_encoder" / "pytorch_model.bin")
    assert any(k.startswith("roberta.pooler.") for k in text.state_dict())
    for name in ("unet", "vae"):
        write_json(root / name / "config.json", dict(reference[name].config))
        state = reference[name].state_dict()
        if name == "vae":  # the hub's vae/ was saved by diffusers 0.8: the attention's names of before 0.14
            state = {legacy_attention_name(k): v for k, v in state.items()}
        torch.save(state, root / name / "diffusion_pytorch_model.bin")
    assert json.loads((root / "unet" / "config.json").read_text())["sample_size"] == 32
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "sentencepiece.bpe.model").write_bytes(open(os.path.join(spm_dir, "sentencepiece.bpe.model"), "rb").read())
    write_json(root / "tokenizer" / "tokenizer_config.json", {"model_max_length": 512, "tokenizer_class": "XLMRobertaTokenizer"})
    write_json(root / "tokenizer" / "special_tokens_map.json", {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>"})
    # Never read: conversion must not need (or choke on) the safety checker.
    (root / "safety_checker").mkdir()
    (root / "safety_checker" / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    return str(root)


def converted(src: str, tmp_path_factory, name: str, **options) -> str:
    """`src` converted by weights_convert into a fresh model folder `name`."""
    from weights_convert.convert import convert

    out = tmp_path_factory.mktemp("model") / name
    convert(src, out, **options)
    return str(out)


@pytest.fixture(scope="session")
def small_model_dir(hub_layout, tmp_path_factory) -> str:
    """The small AltDiffusion converted by weights_convert into a model folder."""
    return converted(hub_layout, tmp_path_factory, "small")


@pytest.fixture
def src(hub_layout, tmp_path):
    """A private copy of the small model in the hub layout, to break."""
    root = tmp_path / "src"
    shutil.copytree(hub_layout, root)
    return root


@pytest.fixture
def model(small_model_dir, tmp_path):
    """A private copy of the small converted model folder, to break."""
    root = tmp_path / "model"
    shutil.copytree(small_model_dir, root)
    return root


# The vision side: AltCLIP in the transformers layout, and the small AltDiffusion with a safety checker.
CLIP_FEATURE_EXTRACTOR = {  # m9's feature_extractor/preprocessor_config.json, at the small tower's 64 px
    "crop_size": 64, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 64}


@pytest.fixture(scope="session")
def altclip_reference(spm_dir):
    from helpers import small_altclip

    return small_altclip(Tokenizer(os.path.join(spm_dir, "sentencepiece.bpe.model")).vocab_size)


@pytest.fixture(scope="session")
def altclip_layout(altclip_reference, spm_dir, tmp_path_factory) -> str:
    """The small AltCLIP saved as BAAI/AltCLIP-m9 is on the hub: config.json, a pickled state dict in
    transformers 4.x's names (encoder.layer.N) with XLM-R's pooler, the tokenizer, and CLIP's
    preprocessor config in its current form."""
    root = tmp_path_factory.mktemp("hub") / "AltCLIP-m9"
    ref = altclip_reference
    write_json(root / "config.json", {**ref.config.to_dict(), "architectures": ["AltCLIPModel"]})
    state = {k.replace(".encoder.layers.", ".encoder.layer.") if k.startswith("text_model.") else k: v
             for k, v in ref.state_dict().items()}
    hidden = ref.config.text_config.hidden_size
    state["text_model.roberta.pooler.dense.weight"] = torch.zeros(hidden, hidden)
    state["text_model.roberta.pooler.dense.bias"] = torch.zeros(hidden)
    torch.save(state, root / "pytorch_model.bin")
    (root / "sentencepiece.bpe.model").write_bytes(open(os.path.join(spm_dir, "sentencepiece.bpe.model"), "rb").read())
    write_json(root / "preprocessor_config.json", {
        "crop_size": {"height": 64, "width": 64}, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
        "do_rescale": True, "do_resize": True, "image_mean": CLIP_FEATURE_EXTRACTOR["image_mean"],
        "image_processor_type": "CLIPImageProcessor", "image_std": CLIP_FEATURE_EXTRACTOR["image_std"],
        "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 64}})
    return str(root)


@pytest.fixture(scope="session")
def altclip_dir(altclip_layout, tmp_path_factory) -> str:
    """The small AltCLIP converted into a model folder (holding the module `altclip`)."""
    return converted(altclip_layout, tmp_path_factory, "altclip")


@pytest.fixture(scope="session")
def checker_reference():
    from helpers import small_checker

    return small_checker()


@pytest.fixture(scope="session")
def checker_layout(hub_layout, checker_reference, tmp_path_factory) -> str:
    """The small AltDiffusion in the hub layout with a real safety checker: the hub's names
    (vision_model.vision_model.…), pickled, and the CLIPFeatureExtractor config beside it."""
    root = tmp_path_factory.mktemp("hub") / "AltDiffusion-m9-checker"
    shutil.copytree(hub_layout, root)
    ref = checker_reference
    write_json(root / "safety_checker" / "config.json", {**ref.config.to_dict(), "architectures": ["StableDiffusionSafetyChecker"]})
    torch.save({(f"vision_model.{k}" if k.startswith("vision_model.") else k): v for k, v in ref.state_dict().items()},
               root / "safety_checker" / "pytorch_model.bin")
    write_json(root / "feature_extractor" / "preprocessor_config.json", CLIP_FEATURE_EXTRACTOR)
    return str(root)


@pytest.fixture(scope="session")
def checker_model_dir(checker_layout, tmp_path_factory) -> str:
    """The small AltDiffusion with its safety checker, converted (--with-safety-checker)."""
    return converted(checker_layout, tmp_path_factory, "checked", safety_checker=True)
