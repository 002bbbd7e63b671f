"""`altdiff-min train … --train embeddings --new-token T --init-word W`: textual inversion (Gal et al.
2022) in the one training loop. The new words are added to the loaded model (research/textual_inversion.py:
each starts as its init word's row), the loop trains their rows alone, and the run's result is
OUT_DIR/learned_embeds.safetensors in diffusers' form, not a model folder.

On --resume the words are added again from their init words, then the checkpoint's rows replace them.
"""
from __future__ import annotations

import os

from ..errors import BadValue
from ..model.tokenizer import Tokenizer
from ..research import textual_inversion
from ..storage.folder import TOKENIZER, resolve
from .config import TrainConfig


def check(model_path: str, config: dict, cfg: TrainConfig) -> None:
    """Before the data is read: the new tokens are new to the model's tokenizer and each init word is
    one of its tokens."""
    if cfg.train != "embeddings":
        return
    tokenizer = Tokenizer(os.path.join(resolve(model_path), TOKENIZER), config["tokenizer"]["max_length"])
    try:
        textual_inversion.init_ids(tokenizer, cfg.new_tokens, cfg.init_words)
    except BadValue as e:
        raise BadValue(f"--new-token/--init-word: {e}") from None


def check_captions(cfg: TrainConfig, dataset) -> None:
    """Before the model loads or OUT_DIR is touched: every new token is in at least one caption (else
    its row would never be read, so never trained)."""
    if cfg.train != "embeddings":
        return
    unread = set(cfg.new_tokens)
    for i in range(len(dataset)):
        unread -= {t for t in unread if any(t in text for text in dataset.texts(i))}
        if not unread:
            return
    raise BadValue(f"no caption of the data holds {', '.join(map(repr, sorted(unread)))}: its row would never train "
                   f"(write the new token into the captions, e.g. 'a photo of {min(unread)}')")


def start(model, cfg: TrainConfig) -> None:
    """Add the new tokens to the loaded model, each row a copy of its init word's."""
    if cfg.train == "embeddings":
        textual_inversion.add_words(model, textual_inversion.init_rows(model, cfg.new_tokens, cfg.init_words))


def save(model, cfg: TrainConfig, out_dir: str, rank: int) -> str:
    """The trained rows as OUT_DIR/learned_embeds.safetensors ({token: (1, D)}, fp32; rank 0 writes)."""
    from weights_convert.embeddings import FILE, write_embeddings  # FILE: diffusers' TEXT_INVERSION_NAME_SAFE

    path = os.path.join(out_dir, FILE)
    if rank == 0:
        write_embeddings(path, textual_inversion.learned(model, cfg.new_tokens))
    return path
