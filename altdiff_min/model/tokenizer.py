"""XLM-RoBERTa tokenizer: a sentencepiece unigram model with fairseq's id mapping, run as FlagAI ran it.

XLM-R was trained in fairseq, whose dictionary puts four special symbols first and then every
sentencepiece piece shifted by one. So the ids the text encoder expects are *not* the ids that
sentencepiece returns:

    fairseq id   0     1      2      3      4 …              last
    symbol       <s>   <pad>  </s>   <unk>  spm piece 3 …    <mask>

sentencepiece's own ids 0, 1, 2 are <unk>, <s>, </s>; its <unk> (0) must become fairseq's <unk> (3),
not 0 + 1 = 1, which would be <pad>.

Which tokenizer: FlagAI encoded AltDiffusion-m9's and AltCLIP-m9's prompts with transformers'
XLMRobertaTokenizerFast (its AltCLIPProcess lists ("XLMRobertaTokenizer", "XLMRobertaTokenizerFast")
and processors pick the fast one; FlagAI pinned transformers 4.20.1). That is not the sentencepiece
library but the `tokenizers` library running the same unigram model behind the pipeline transformers
4.x built from the .model file (convert_slow_tokenizer.SpmConverter), which we build here the same way:
  - text that spells a special token (<s>, </s>, <pad>, <unk>, <mask>) *is* that token; only <mask>
    swallows the space before it;
  - normalisation by the model's precompiled NFKC map, applied per grapheme cluster: a combining mark
    after a character that has a mapping of its own (a fullwidth letter, a space, ZWNJ) is dropped,
    where the sentencepiece library would keep it;
  - whitespace at the end of the prompt, or before a special token, becomes a piece "▁" of its own;
  - U+0085 is an ordinary character (the map does not make it a space).
transformers 5's XLMRobertaTokenizer differs from FlagAI's in the last two (it splits on all Unicode
whitespace first); tests/test_tokenizer.py states each difference.
"""
from __future__ import annotations

import os

import sentencepiece as spm
import torch
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Pipeline
from tokenizers.models import Unigram

from ..errors import BadFile, BadType, BadValue, Missing

BOS, PAD, EOS, UNK = 0, 1, 2, 3
FAIRSEQ_OFFSET = 1  # fairseq id = sentencepiece id + 1 (ids 0..2 of sentencepiece are remapped above)
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")


MAX_LENGTH = 77  # tokens of a prompt AltDiffusion reads (FlagAI, the model card): the rest is cut
# Characters a prompt may have: far more than 77 tokens ever take, and a bound on the work and memory
# one prompt can cost before the tokenizer cuts it (a 60 MB prompt took a server to 12 GB).
MAX_PROMPT_CHARS = 10_000


def check_prompt(prompt: str, name: str = "prompt", max_length: int = MAX_LENGTH) -> None:
    """Raise BadValue for a str that is not a prompt: longer than MAX_PROMPT_CHARS (checked first, before
    any work on the text), or holding a lone surrogate (U+D800–U+DFFF outside a pair, e.g. from a badly
    decoded file), which cannot be encoded as UTF-8, so no tokenizer can read it. `name` starts the
    message; max_length is the tokens kept, which the message says."""
    if len(prompt) > MAX_PROMPT_CHARS:
        raise BadValue(f"{name} is {len(prompt):,} characters; at most {MAX_PROMPT_CHARS:,} are accepted "
                       f"(only the first {max_length} tokens are used)")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadValue(f"{name} {prompt[:40]!r} has a lone surrogate U+{ord(prompt[e.start]):04X} at position "
                       f"{e.start}, which is not text; fix the prompt's encoding") from None


def proto_field(message: bytes, number: int) -> bytes | None:
    """The first length-delimited field `number` of a serialized protobuf message (enough to read the
    normaliser's precompiled map out of a sentencepiece model without the protobuf package)."""
    i = 0
    while i < len(message):
        key, i = varint(message, i)
        field, kind = key >> 3, key & 7
        if kind == 0:
            _, i = varint(message, i)
        elif kind == 1:
            i += 8
        elif kind == 5:
            i += 4
        elif kind == 2:
            size, i = varint(message, i)
            if field == number:
                return message[i:i + size]
            i += size
        else:
            raise ValueError(f"unexpected protobuf wire type {kind}")
    return None


def varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not byte & 0x80:
            return value, i


def pipeline(sp: spm.SentencePieceProcessor) -> tuple[Pipeline, normalizers.Normalizer]:
    """transformers 4.x's XLMRobertaConverter: the unigram pieces and scores in fairseq's order,
    NFKC by the model's precompiled map, runs of spaces to one, "▁" before every word and segment."""
    vocab = [(s, 0.0) for s in SPECIALS] + [(sp.IdToPiece(i), sp.GetScore(i)) for i in range(3, sp.GetPieceSize())]
    engine = Pipeline(Unigram(vocab + [("<mask>", 0.0)], UNK, False))
    charsmap = proto_field(proto_field(sp.serialized_model_proto(), 3) or b"", 2)  # ModelProto.normalizer_spec
    # Parity: 4.x's Metaspace(add_prefix_space=True) put "▁" before each segment unless it began with one,
    # and before nothing if the segment normalised to nothing ("\ufeff<mask>": no "▁"); today's
    # Metaspace prepends even then. A space prepended before the squeeze does what 4.x did.
    nfkc = normalizers.Precompiled(charsmap) if charsmap else normalizers.Sequence([])
    engine.normalizer = normalizers.Sequence([nfkc, normalizers.Prepend(" "), normalizers.Replace(Regex(" {2,}"), " ")])
    engine.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    engine.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")  # drops the first "▁"
    engine.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS] +
                              [AddedToken("<mask>", lstrip=True, special=True)])
    return engine, nfkc


def mask_swallows_left(text: str, nfkc: normalizers.Normalizer) -> str:
    """Parity: FlagAI's <mask> (lstrip) swallowed the characters before it that the normaliser turns
    into a space or nothing (ZWNJ, BOM, …) as well as whitespace; today's tokenizers only whitespace."""
    parts = text.split("<mask>")
    out = parts[0]
    for part in parts[1:]:
        while out and not nfkc.normalize_str(out[-1]).strip():
            out = out[:-1]
        out += "<mask>" + part
    return out


class Tokenizer:
    """`tokenizer(prompts) -> (input_ids, attention_mask)`, both LongTensors (B, max_length).

    Each row is `<s> pieces… </s>` followed by `<pad>`; over-long prompts are cut so that `</s>` stays
    last. max_length is 77 for AltDiffusion (FlagAI and the model card), whatever the hub's
    tokenizer_config.json says (m9's says 512).
    """

    def __init__(self, model_file: str | os.PathLike, max_length: int = MAX_LENGTH):
        model_file = os.fspath(model_file)
        if not os.path.isfile(model_file):
            raise Missing(f"tokenizer model not found: {model_file}")
        if max_length < 2:
            raise BadValue(f"max_length must leave room for <s> and </s>, got {max_length}")
        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(model_file)
        except (RuntimeError, OSError) as e:
            raise BadFile(f"{model_file} is not a sentencepiece model: {str(e).strip().splitlines()[-1]}") from None
        if (sp.unk_id(), sp.bos_id(), sp.eos_id()) != (0, 1, 2) or sp.GetPieceSize() < 4:
            raise BadFile(f"{model_file} does not put <unk>, <s>, </s> first, as XLM-R's sentencepiece model does")
        self.engine, self.nfkc = pipeline(sp)
        self.model_file = model_file
        self.max_length = max_length
        self.vocab_size = self.engine.get_vocab_size()  # sentencepiece's pieces + 1 (fairseq's shift) + <mask>
        self.mask_id = self.vocab_size - 1

    def encode(self, prompt: str) -> list[int]:
        """Token ids of one prompt, `<s>` and `</s>` included, truncated but not padded."""
        if not isinstance(prompt, str):
            raise BadType(f"a prompt must be a str, got {type(prompt).__name__}: {prompt!r}")
        check_prompt(prompt, max_length=self.max_length)
        pieces = self.engine.encode(mask_swallows_left(prompt, self.nfkc), add_special_tokens=False).ids
        return [BOS] + pieces[: self.max_length - 2] + [EOS]

    def __call__(self, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise BadType(f"prompts must be a str or a non-empty list of str, got {prompts!r}")
        rows = [self.encode(p) for p in prompts]
        input_ids = torch.full((len(rows), self.max_length), PAD, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), self.max_length), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1  # every token of the prompt, a "<pad>" spelled in it too
        return input_ids, attention_mask

    def pieces(self, prompt: str) -> list[str]:
        """The pieces of `prompt` by position, `<s>` and `</s>` included: what each of its ids stands for."""
        return [self.engine.id_to_token(i) for i in self.encode(prompt)]

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """The text of a row of ids, special tokens left out."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return self.engine.decode([i for i in ids if i > UNK and i != self.mask_id], skip_special_tokens=True)
