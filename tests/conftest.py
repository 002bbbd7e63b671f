"""Shared test helpers: the parity metric, random weights, devices, and a tokenizer trained here."""
from __future__ import annotations

import io
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from prompts import ALL_PROMPTS  # noqa: E402

from altdiff_min.tokenizer import Tokenizer  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
no_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")

# (device, dtype, relative-error tolerance). fp16 is checked on CUDA only: CPU fp16 kernels are slow
# and not what anyone runs. The tolerances are the project's targets, never loosened to pass.
PRECISIONS = [
    pytest.param("cpu", torch.float32, 1e-5, id="cpu-fp32"),
    pytest.param("cuda", torch.float32, 1e-5, id="cuda-fp32", marks=no_cuda),
    pytest.param("cuda", torch.float16, 5e-3, id="cuda-fp16", marks=no_cuda),
]


MEASURED: list[tuple[str, float]] = []  # (test id, relative error): printed after the run


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64; for checks that two things *differ* (not recorded as parity)."""
    a, b = a.double().cpu(), b.double().cpu()
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != reference {tuple(b.shape)}"
    assert b.norm() > 0, "the reference output is all zeros: the comparison would prove nothing"
    return ((a - b).norm() / b.norm()).item()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """‖ours − ref‖ / ‖ref‖, computed in float64, and recorded for the parity summary at the end."""
    err = rel_diff(ours, ref)
    MEASURED.append((os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0], err))
    return err


def pytest_terminal_summary(terminalreporter):
    if MEASURED:
        terminalreporter.section("parity: relative errors ‖ours − ref‖ / ‖ref‖ (largest per test)")
        worst: dict[str, float] = {}
        for test, err in MEASURED:
            worst[test] = max(err, worst.get(test, 0.0))
        for test, err in worst.items():
            terminalreporter.write_line(f"{err:9.2e}  {test}")


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Perturb every parameter, so zero-initialised biases, unit norms and zeroed output convs
    (diffusers zero-inits some) all take part in the comparison."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module


def train_sentencepiece(path: str, sentences: list[str], vocab_size: int = 320) -> str:
    """Train a small sentencepiece *unigram* model (as XLM-R's is) and write it to `path`."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf, vocab_size=vocab_size, model_type="unigram",
        character_coverage=1.0, hard_vocab_limit=False, minloglevel=2,
    )
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return path


@pytest.fixture(scope="session")
def spm_dir(tmp_path_factory) -> str:
    """A folder holding `sentencepiece.bpe.model` trained on prompts in all nine m9 languages."""
    d = tmp_path_factory.mktemp("spm")
    train_sentencepiece(str(d / "sentencepiece.bpe.model"), ALL_PROMPTS * 3)
    return str(d)


# A small AltDiffusion: every block type of the m9 architecture, at toy widths.
TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=514,
            type_vocab_size=1, layer_norm_eps=1e-5, project_dim=32, pad_token_id=1, bos_token_id=0, eos_token_id=2)
UNET = dict(sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=4, cross_attention_dim=32, norm_num_groups=8)
VAE = dict(in_channels=3, out_channels=3, block_out_channels=(16, 32, 32, 32), layers_per_block=2, latent_channels=4,
           norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           sample_size=64)
SCHEDULER = dict(_class_name="DDIMScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                 trained_betas=None, prediction_type="epsilon")
MODEL_INDEX = {"_class_name": "AltDiffusionPipeline", "_diffusers_version": "0.11.0.dev0",
               "feature_extractor": ["transformers", "CLIPFeatureExtractor"],
               "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
               "scheduler": ["diffusers", "DDIMScheduler"],
               "text_encoder": ["alt_diffusion", "RobertaSeriesModelWithTransformation"],
               "tokenizer": ["transformers", "XLMRobertaTokenizer"],
               "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}


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


def small_configs(reference) -> dict:
    """Our configs of the small reference modules: what a single checkpoint of them would need."""
    from weights_convert import text_encoder, unet, vae

    return {"text_encoder": text_encoder.config_from_hf(reference["text_encoder"].config.to_dict()),
            "unet": unet.config_from_hf(dict(reference["unet"].config)), "vae": vae.config_from_hf(dict(reference["vae"].config))}


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


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
