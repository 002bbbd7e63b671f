"""`make demo`: text-to-image from a non-English prompt, in seconds on a CPU.

With the trained toy model shipped (altdiff_min/toy/model) it draws what the prompt asks. Until
then it runs the same pipeline — tokenizer, XLM-R text encoder, guided DDIM sampling in the UNet,
VAE decode — on a small model with RANDOM weights, and says so: the flow is real, the pictures noise.
"""
from __future__ import annotations

import os
import tempfile
import time

import torch

from .pipeline import AltDiffusion, load
from .samplers import ScheduleConfig
from .text_encoder import TextEncoder, TextEncoderConfig
from .tokenizer import Tokenizer
from .unet import UNet, UNetConfig
from .vae import VAE, VAEConfig

# "a red circle on a white background" in AltDiffusion-m9's nine languages.
PROMPTS = {
    "en": "a red circle on a white background",
    "zh": "白色背景上的红色圆圈",
    "es": "un círculo rojo sobre un fondo blanco",
    "fr": "un cercle rouge sur un fond blanc",
    "ru": "красный круг на белом фоне",
    "ja": "白い背景に赤い円",
    "ko": "흰색 배경 위의 빨간 원",
    "ar": "دائرة حمراء على خلفية بيضاء",
    "it": "un cerchio rosso su uno sfondo bianco",
}


def random_model(folder: str, seed: int) -> AltDiffusion:
    """A small AltDiffusion with random weights and a tokenizer trained here on the demo prompts."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(list(PROMPTS.values()) * 4), model_writer=buf,
                                   vocab_size=160, model_type="unigram", character_coverage=1.0,
                                   hard_vocab_limit=False, minloglevel=2)
    path = os.path.join(folder, "sentencepiece.bpe.model")
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    tokenizer = Tokenizer(path)
    torch.manual_seed(seed)
    text = TextEncoder(TextEncoderConfig(vocab_size=tokenizer.vocab_size, hidden=64, layers=2, heads=4, mlp=256, project_dim=64))
    unet = UNet(UNetConfig(channels=(32, 64, 64), layers=1, heads=4, context_dim=64, groups=8, attention=(True, True, False)))
    vae = VAE(VAEConfig(channels=(16, 32, 64, 64), layers=1, groups=8))
    return AltDiffusion(tokenizer, text.eval(), unet.eval(), vae.eval(), ScheduleConfig(), image_size=64)


def run(seed: int = 0, outdir: str = "demo_outputs", langs: tuple[str, ...] = ("zh", "fr", "ar", "ru")) -> None:
    from .toy import TOY_MODEL

    with tempfile.TemporaryDirectory() as tmp:
        if os.path.isfile(os.path.join(TOY_MODEL, "config.json")):
            print("altdiff-min demo: the trained toy model (altdiff_min/toy/model)")
            pipe = load("toy", dtype=torch.float32)
        else:
            print("altdiff-min demo: the full text-to-image pipeline on a small RANDOM-weight model.")
            print("NOTE: the trained toy model is not shipped yet, so the pictures are noise; the flow is real:")
            print("      tokenizer → XLM-R text encoder → guided DDIM in the UNet → VAE decode.\n")
            pipe = random_model(tmp, seed)
        os.makedirs(outdir, exist_ok=True)
        for lang in langs:
            start = time.perf_counter()
            image = pipe.generate(PROMPTS[lang], steps=25, seed=seed, progress=False)[0]
            path = os.path.join(outdir, f"{lang}.png")
            image.save(path)
            print(f"{lang}  {PROMPTS[lang]:38}  → {path}  ({time.perf_counter() - start:.2f} s, "
                  f"{image.size[0]}×{image.size[1]}, 25 DDIM steps, guidance 7.5)")
