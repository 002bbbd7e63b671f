"""XLM-RoBERTa tokenizer: a sentencepiece unigram model with fairseq's id mapping.

XLM-R was trained in fairseq, whose dictionary puts four special symbols first and then every
sentencepiece piece shifted by one. So the ids the text encoder expects are *not* the ids that
sentencepiece returns:

    fairseq id   0     1      2      3      4 …              last
    symbol       <s>   <pad>  </s>   <unk>  spm piece 3 …    <mask>

sentencepiece's own ids 0, 1, 2 are <unk>, <s>, </s>; its <unk> (0) must become fairseq's <unk> (3),
not 0 + 1 = 1, which would be <pad>.
"""
from __future__ import annotations

import os

import sentencepiece as spm
import torch

from .errors import BadFile, BadType, BadValue, Missing

BOS, PAD, EOS, UNK = 0, 1, 2, 3
FAIRSEQ_OFFSET = 1  # fairseq id = sentencepiece id + 1 (ids 0..2 of sentencepiece are remapped above)


def check_prompt(prompt: str) -> None:
    """Raise BadValue for a str that is not text: a lone surrogate (U+D800–U+DFFF outside a pair, e.g.
    from a badly decoded file) cannot be encoded as UTF-8, so sentencepiece cannot read it."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadValue(f"prompt {prompt[:40]!r} has a lone surrogate U+{ord(prompt[e.start]):04X} at position "
                       f"{e.start}, which is not text; fix the prompt's encoding") from None


class Tokenizer:
    """`tokenizer(prompts) -> (input_ids, attention_mask)`, both LongTensors (B, max_length).

    Each row is `<s> pieces… </s>` followed by `<pad>`; over-long prompts are cut so that `</s>` stays
    last. max_length is 77 for AltDiffusion (FlagAI and the model card), whatever the hub's
    tokenizer_config.json says (m9's says 512).
    """

    def __init__(self, model_file: str | os.PathLike, max_length: int = 77):
        model_file = os.fspath(model_file)
        if not os.path.isfile(model_file):
            raise Missing(f"tokenizer model not found: {model_file}")
        if max_length < 2:
            raise BadValue(f"max_length must leave room for <s> and </s>, got {max_length}")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(model_file)
        except (RuntimeError, OSError) as e:
            raise BadFile(f"{model_file} is not a sentencepiece model: {str(e).strip().splitlines()[-1]}") from None
        self.model_file = model_file
        self.max_length = max_length
        self.vocab_size = self.sp.GetPieceSize() + FAIRSEQ_OFFSET + 1  # + <mask> at the end
        self.mask_id = self.vocab_size - 1

    def encode(self, prompt: str) -> list[int]:
        """Token ids of one prompt, `<s>` and `</s>` included, truncated but not padded."""
        if not isinstance(prompt, str):
            raise BadType(f"a prompt must be a str, got {type(prompt).__name__}: {prompt!r}")
        check_prompt(prompt)
        pieces = [i + FAIRSEQ_OFFSET if i != self.sp.unk_id() else UNK for i in self.sp.EncodeAsIds(prompt)]
        return [BOS] + pieces[: self.max_length - 2] + [EOS]

    def __call__(self, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise BadType(f"prompts must be a str or a non-empty list of str, got {prompts!r}")
        rows = [self.encode(p) for p in prompts]
        input_ids = torch.full((len(rows), self.max_length), PAD, dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
        return input_ids, (input_ids != PAD).long()

    def pieces(self, prompt: str) -> list[str]:
        """The pieces of `prompt` by position, `<s>` and `</s>` included: what each of its ids stands for."""
        names = {BOS: "<s>", PAD: "<pad>", EOS: "</s>", UNK: "<unk>"}
        return [names.get(i) or self.sp.IdToPiece(i - FAIRSEQ_OFFSET) for i in self.encode(prompt)]

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """The text of a row of ids, special tokens left out."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return self.sp.DecodeIds([i - FAIRSEQ_OFFSET for i in ids if i > UNK and i != self.mask_id])
