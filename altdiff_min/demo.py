"""`make demo`: the most complete part of text-to-image that exists so far, on small random weights.

Today that is prompt → conditioning: the XLM-R tokenizer and text encoder (with its projection) on
one prompt in each of the nine m9 languages. The UNet, VAE, samplers and the trained toy model come
with later issues; the demo grows with them.
"""
from __future__ import annotations

import io
import os
import tempfile
import time

import torch

from .text_encoder import TextEncoder, TextEncoderConfig
from .tokenizer import Tokenizer

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


def train_demo_tokenizer(path: str) -> None:
    """A tiny sentencepiece unigram model (XLM-R's kind) trained on the demo prompts."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(list(PROMPTS.values()) * 4), model_writer=buf,
                                   vocab_size=160, model_type="unigram", character_coverage=1.0,
                                   hard_vocab_limit=False, minloglevel=2)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


@torch.no_grad()
def run(seed: int = 0) -> None:
    print("altdiff-min demo: prompt → conditioning (tokenizer + XLM-R text encoder + projection)")
    print("NOTE: the UNet, VAE, samplers and the trained toy model are not built yet, so no image is made.")
    print("      This runs the part that exists on a small RANDOM-weight encoder and a tokenizer trained")
    print("      just now on the nine prompts below: the shapes and the flow are real, the numbers are not.\n")
    with tempfile.TemporaryDirectory() as tmp:
        model_file = os.path.join(tmp, "sentencepiece.bpe.model")
        train_demo_tokenizer(model_file)
        tokenizer = Tokenizer(model_file)
    torch.manual_seed(seed)
    cfg = TextEncoderConfig(vocab_size=tokenizer.vocab_size, hidden=128, layers=4, heads=4, mlp=512, project_dim=96)
    encoder = TextEncoder(cfg).eval()
    start = time.perf_counter()
    input_ids, mask = tokenizer(list(PROMPTS.values()))
    context = encoder(input_ids, mask)
    took = time.perf_counter() - start
    print(f"{'lang':4}  {'tokens':>6}  {'first pieces':40}  conditioning row: mean / std")
    for i, (lang, prompt) in enumerate(PROMPTS.items()):
        n = int(mask[i].sum())
        pieces = " ".join(tokenizer.sp.IdToPiece(int(t) - 1) for t in input_ids[i, 1 : min(n - 1, 7)])
        print(f"{lang:4}  {n:6d}  {pieces:40}  {context[i].mean():+.3f} / {context[i].std():.3f}")
    print(f"\ninput_ids {tuple(input_ids.shape)} → context {tuple(context.shape)} in {took * 1000:.0f} ms "
          f"(encoder: {cfg.layers} layers × {cfg.hidden} wide; m9's is {TextEncoderConfig().layers} × {TextEncoderConfig().hidden})")
    print("The UNet would attend to all 77 rows of each context, padding included, as AltDiffusion does.")
