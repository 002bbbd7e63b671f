"""Shared test helpers: the parity metric, random weights, devices, the small reference configs, and
a tokenizer trained here. Test files import them from here; the fixtures are in conftest.py."""
from __future__ import annotations

import io
import json
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
no_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")

# The relative-error targets of a module computing in a dtype, never loosened to pass. fp16 keeps 11
# significant bits (each rounding ≤ 2^-11 ≈ 4.9e-4), and a module's many layers add theirs up: 5e-3.
# bf16 keeps 8 bits to fp16's 11: 8× fp16's tolerance. The format rounds alike on either device, so the
# CPU's bf16 has the CUDA target. Measured on the CPU (torch 2.13, 2 cores, AVX-512 BF16), ours against
# the reference in the same dtype: bf16 ≤ 2.4e-2 (AltCLIP's logits; m9's UNet 1.7e-2, the VAEs ≤ 1.9e-2,
# the towers and the safety checker ≤ 1.0e-2), fp16 ≤ 2.3e-3 (the small VAE's decoder).
FP16_TOL, BF16_TOL = 5e-3, 4e-2

# (device, dtype, relative-error tolerance) of the module parity tests: ours in that dtype against the
# reference in the same dtype on the same device (the safety checker's: against fp32 on the CPU).
PRECISIONS = [
    pytest.param("cpu", torch.float32, 1e-5, id="cpu-fp32"),
    pytest.param("cpu", torch.bfloat16, BF16_TOL, id="cpu-bf16"),
    pytest.param("cuda", torch.float32, 1e-5, id="cuda-fp32", marks=no_cuda),
    pytest.param("cuda", torch.float16, FP16_TOL, id="cuda-fp16", marks=no_cuda),
    pytest.param("cuda", torch.bfloat16, BF16_TOL, id="cuda-bf16", marks=no_cuda),
]
# fp16 on the CPU only for the small modules: without AVX-512 FP16 or AMX torch 2.13 convolves fp16 on
# the CPU ~100× slower than bf16 (m9's VAE: 117 s a parity test, 1 s in bf16; measured on 2 cores).
# AltCLIP keeps PRECISIONS: see its test.
SMALL_PRECISIONS = [*PRECISIONS, pytest.param("cpu", torch.float16, FP16_TOL, id="cpu-fp16")]


MEASURED: list[tuple[str, float]] = []  # (test id, relative error): printed after the run


def legacy_attention_name(key: str) -> str:
    """A VAE tensor's name as diffusers < 0.14 wrote it: mid_block.attentions.0.query/key/value/proj_attn."""
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
        key = key.replace(f"mid_block.attentions.0.{new}.", f"mid_block.attentions.0.{old}.")
    return key


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64; for checks that two things *differ* (not recorded as parity)."""
    a, b = a.double().cpu(), b.double().cpu()
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != reference {tuple(b.shape)}"
    assert torch.isfinite(b).all(), "the reference output holds inf or NaN: the comparison would prove nothing"
    assert b.norm() > 0, "the reference output is all zeros: the comparison would prove nothing"
    return ((a - b).norm() / b.norm()).item()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """‖ours − ref‖ / ‖ref‖, computed in float64, and recorded for the parity summary at the end."""
    err = rel_diff(ours, ref)
    MEASURED.append((os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0], err))
    return err


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


def small_configs(reference) -> dict:
    """Our configs of the small reference modules: what a single checkpoint of them would need."""
    from weights_convert import text_encoder, unet, vae

    return {"text_encoder": text_encoder.config_from_hf(reference["text_encoder"].config.to_dict()),
            "unet": unet.config_from_hf(dict(reference["unet"].config)), "vae": vae.config_from_hf(dict(reference["vae"].config))}


# The diffusers scheduler behind each sampler, re-targeted with from_config as the model card does.
SCHEDULERS = {"ddim": ("DDIMScheduler", {}), "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
              "dpm++2m": ("DPMSolverMultistepScheduler", {}),
              "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
              "euler": ("EulerDiscreteScheduler", {}), "euler_a": ("EulerAncestralDiscreteScheduler", {})}


def diffusers_pipeline(hub_layout, reference, sampler: str, scheduler_folder: str | None = None, img2img: bool = False,
                       inpaint: bool = False):
    """diffusers' AltDiffusionPipeline (or AltDiffusionImg2ImgPipeline, or StableDiffusionInpaintPipeline,
    whose 4-channel path blends; AltDiffusion has none, and it reads the RobertaSeries encoder alike)
    on the small reference modules, with the scheduler behind `sampler`, from m9's config or the one
    saved in scheduler_folder."""
    import diffusers
    from diffusers.pipelines.deprecated.alt_diffusion import AltDiffusionImg2ImgPipeline, AltDiffusionPipeline
    from transformers import XLMRobertaTokenizer

    loaded = (diffusers.DDIMScheduler.from_pretrained(scheduler_folder) if scheduler_folder
              else diffusers.DDIMScheduler.from_config(SCHEDULER))
    name, extra = SCHEDULERS[sampler]
    scheduler = getattr(diffusers, name).from_config(loaded.config, **extra)
    # Components loaded explicitly (model_index's class names no longer resolve); tokenizer length 77.
    tokenizer = XLMRobertaTokenizer.from_pretrained(os.path.join(hub_layout, "tokenizer"), model_max_length=77)
    cls = diffusers.StableDiffusionInpaintPipeline if inpaint else AltDiffusionImg2ImgPipeline if img2img else AltDiffusionPipeline
    return cls(vae=reference["vae"], text_encoder=reference["text_encoder"], tokenizer=tokenizer,
                                unet=reference["unet"], scheduler=scheduler, safety_checker=None,
                                feature_extractor=None, requires_safety_checker=False)


def edit_json(path, **changes):
    """Change keys of a JSON file in place: a__b=v sets data["a"]["b"]; the value KeyError deletes the key."""
    data = json.loads(path.read_text())
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = data
        for p in parents:
            node = node[p]
        if value is KeyError:
            del node[key]
        else:
            node[key] = value
    path.write_text(json.dumps(data))


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def put_in(model, name: str, change) -> None:
    """Rewrite model.safetensors with `change(tensor)` applied in place to the tensor `name`."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(model / "model.safetensors")
    change(tensors[name])
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})


def no_weights_read(monkeypatch):
    """Fail the test if conversion or loading reads a tensor: for refusals that must come first."""
    import altdiff_min.storage.folder as folder
    import weights_convert.convert as conversion

    monkeypatch.setattr(conversion, "read_component", lambda *a: pytest.fail("weights were read"))
    monkeypatch.setattr(folder, "load_file", lambda *a, **k: pytest.fail("weights were read"))


HW = dict(height=64, width=96, steps=2, progress=False)  # a small, non-square generate call on the small model


# The full m9 configs as published (BAAI/AltDiffusion-m9's text_encoder/, unet/ and vae/config.json),
# for the full-size parity tests and the benchmark. The UNet's sample_size 32 is m9's known mistake.
M9_TEXT = dict(vocab_size=250002, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
               max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5, project_dim=768)
M9_UNET = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.8.0.dev0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
    "sample_size": 32, "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
M9_VAE = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.8.0.dev0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3,
    "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def write_pictures(folder, n: int, captions: str = "jsonl", seed: int = 0, sizes=((96, 72), (72, 104), (64, 64))) -> list[str]:
    """n random RGB pictures (of the given, non-square sizes in turn) in folder, captioned in
    metadata.jsonl ("jsonl") or in NAME.txt files ("txt"); returns the captions."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    words = ["un cercle rouge", "一只戴着帽子的小狗", "a blue square", "кошка на крыше", "赤い円", "un perro"]
    texts = [words[i % len(words)] + f" {i}" for i in range(n)]
    rows = []
    for i, text in enumerate(texts):
        w, h = sizes[i % len(sizes)]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i:03}.png"))
        if captions == "txt":
            with open(os.path.join(folder, f"{i:03}.txt"), "w") as f:
                f.write(text)
        rows.append(json.dumps({"file_name": f"{i:03}.png", "text": text}, ensure_ascii=False))
    if captions == "jsonl":
        with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
            f.write("\n".join(rows) + "\n")
    return texts


# CLIP ViT-L/14's vision tower as m9's safety checker publishes it (safety_checker/config.json, vision_config).
M9_VISION = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, patch_size=14,
                 image_size=224, num_channels=3, layer_norm_eps=1e-5, projection_dim=768, hidden_act="quick_gelu")

# AltCLIP-m9 (BAAI/AltCLIP-m9, transformers' AltCLIPModel): m9's text tower (XLM-R large + its 1024 → 768
# `transformation`), CLIP ViT-L/14's vision tower, and CLIP ViT-L/14's 768-wide joint space.
M9_ALTCLIP = dict(text_config=M9_TEXT, vision_config=M9_VISION, projection_dim=768, logit_scale_init_value=2.6592)


# The vision side at toy widths: every width differs from the others, so a transposed or misrouted
# projection cannot fit. CLIP's vision tower 48 wide on 64² pictures (8 px patches).
VISION = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, patch_size=8,
              image_size=64, num_channels=3, layer_norm_eps=1e-5, projection_dim=32, hidden_act="quick_gelu")
ALTCLIP_TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5, project_dim=24)
ALTCLIP = dict(text_config=ALTCLIP_TEXT, vision_config=VISION, projection_dim=16)  # + text_config's vocab_size
CHECKER = dict(vision_config=VISION, projection_dim=16)  # the safety checker's CLIPConfig


def picture(mode: str, w: int, h: int, seed: int = 0):
    """A smooth gradient in each channel plus noise (alpha too: partly transparent everywhere)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    smooth = np.stack([x, y, 1 - (x + y) / 2, np.sqrt(x * y)], axis=-1) * 235
    rgba = Image.fromarray(np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8))
    if mode == "RGBA":
        return rgba
    if mode == "P":  # a palette picture whose colour 0 is transparent
        p = rgba.convert("RGB").quantize(64)
        p.info["transparency"] = 0
        return p
    return rgba.convert("RGB").convert(mode)


def small_checker(seed: int = 0):
    """diffusers' StableDiffusionSafetyChecker at the small config, every tensor perturbed."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    torch.manual_seed(seed)
    return randomize_(StableDiffusionSafetyChecker(CLIPConfig(**CHECKER))).eval()


def small_altclip(vocab_size: int, seed: int = 0):
    """transformers' AltCLIPModel at the small config, every tensor perturbed."""
    from transformers import AltCLIPConfig, AltCLIPModel

    torch.manual_seed(seed)  # transformers initialises from the global generator
    model = randomize_(AltCLIPModel(AltCLIPConfig(**{**ALTCLIP, "text_config": {**ALTCLIP_TEXT, "vocab_size": vocab_size}})))
    with torch.no_grad():
        # Random towers agree on nothing: every cosine comes out near −0.05, so every CLIP score would
        # be 0 and a test of scores would prove nothing. With the image projection negated every
        # cosine is positive and every score differs from the next.
        model.visual_projection.weight.neg_()
    return model.eval()


def bomb_png(path, side: int = 12000) -> int:
    """A 1-bit black PNG of side × side pixels written by hand (no picture is made in memory): a few
    tens of KB that PIL would decode to side² bytes (1.1 GB at 12000). Returns the file's size."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (side + 7) // 8)  # filter byte 0, then the packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


def lora_file(folder, model: str = "toy", name: str = "style.safetensors", seed: int = 0, r: int = 2) -> str:
    """A diffusers-format LoRA of a model folder's UNet attention (rank r, random non-zero B, strong enough
    to change its pictures), as weights_convert/lora.py save_lora writes it; returns its path."""
    from altdiff_min.pipeline import load
    from altdiff_min.research.lora import add_lora
    from weights_convert.lora import save_lora

    unet = load(model).unet
    generator = torch.Generator().manual_seed(seed)
    for layer in add_lora(unet, r).values():
        layer.lora_B.weight.data = torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.3
    return save_lora(unet, str(folder), name)
