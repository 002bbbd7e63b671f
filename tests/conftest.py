"""Fixtures shared by the tests (a tokenizer trained here, random reference modules, the small model
in the hub layout and converted), and the parity summary printed after the run."""
from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import MEASURED, MODEL_INDEX, SCHEDULER, TEXT, UNET, VAE, randomize_, train_sentencepiece, write_json
from prompts import ALL_PROMPTS

from altdiff_min.tokenizer import Tokenizer


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
        torch.save(reference[name].state_dict(), root / name / "diffusion_pytorch_model.bin")
    assert json.loads((root / "unet" / "config.json").read_text())["sample_size"] == 32
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "sentencepiece.bpe.model").write_bytes(open(os.path.join(spm_dir, "sentencepiece.bpe.model"), "rb").read())
    write_json(root / "tokenizer" / "tokenizer_config.json", {"model_max_length": 512, "tokenizer_class": "XLMRobertaTokenizer"})
    write_json(root / "tokenizer" / "special_tokens_map.json", {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>"})
    # Never read: conversion must not need (or choke on) the safety checker.
    (root / "safety_checker").mkdir()
    (root / "safety_checker" / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    return str(root)


@pytest.fixture(scope="session")
def small_model_dir(hub_layout, tmp_path_factory) -> str:
    """The small AltDiffusion converted by weights_convert into a model folder."""
    from weights_convert.convert import convert

    out = tmp_path_factory.mktemp("model") / "small"
    convert(hub_layout, out)
    return str(out)
