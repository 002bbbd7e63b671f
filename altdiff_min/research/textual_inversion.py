"""Textual inversion (Gal et al. 2022): new words for the XLM-R tokenizer, each one or more learned rows
of the text encoder's token table; the rest of the model stays as it is.

    prompt ─ added tokens matched first ─ the text between them as before ─ ids; an added token's id
    is V + k (V = the vocabulary's size, k = the order it was added in), its row the k-th appended one

`add_words(model, {token: rows})` adds the words to a loaded AltDiffusion in place, after checking all
of them (one line naming the problem, before anything changes): a token that is empty, blank, not in
the normaliser's own form, or already a piece of the vocabulary or an added token; rows of another
width than the encoder's, or not finite. A token with n > 1 rows becomes n tokens, `T`, `T_1`, …
`T_{n-1}` (diffusers' load_textual_inversion convention), and a prompt that holds `T` reads
"T T_1 … T_{n-1}" in its place (diffusers' maybe_convert_prompt).

Added tokens as transformers' are (`tokenizer.add_tokens`), with the whitespace beside them dropped
(lstrip, rstrip): the ids are those diffusers' AltDiffusionPipeline gives after load_textual_inversion
with transformers 5's XLMRobertaTokenizer, which splits words on whitespace before it tokenizes. The
4.x pipeline FlagAI ran (rebuilt with today's tokenizers library: "▁" prepended to every segment)
keeps a space before an added token as a "▁" piece of its own, as it does before "</s>"
(model/tokenizer.py); we follow transformers 5, and so diffusers today. Matching is on the prompt as
written, where transformers matches on the normalised text; a token must therefore be in the
normaliser's form (NFKC by the model's map), and the one added-token difference left is a prompt that
spells the token in another form (a fullwidth "＜ring＞" is not the token here).

Training (`altdiff-min train … --train embeddings --new-token T --init-word W`): `AddedRows` keeps the
new rows as a parameter of their own beside the frozen table, so only they train and the table stays
bit for bit the same (diffusers' script trains the whole table and writes the old rows back after
every step). Files: weights_convert/embeddings.py.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping

import torch
from tokenizers import AddedToken
from torch import nn

from ..errors import BadType, BadValue, NotFinite
from ..model.tokenizer import BOS, EOS, Tokenizer, check_prompt, mask_swallows_left


class WordTokenizer(Tokenizer):
    """A Tokenizer with added tokens: `added` {token: id}, `vectors` {token: its n ≥ 2 token names}."""

    added: dict[str, int]
    vectors: dict[str, list[str]]

    @classmethod
    def extending(cls, tokenizer: Tokenizer) -> WordTokenizer:
        """A copy of `tokenizer` (its own engine: the original is left as it was) that can take words."""
        if isinstance(tokenizer, cls):
            new = copy.copy(tokenizer)
            new.added, new.vectors = dict(tokenizer.added), dict(tokenizer.vectors)
        else:
            new = cls.__new__(cls)
            new.__dict__.update(tokenizer.__dict__)
            new.added, new.vectors = {}, {}
        new.engine = copy.deepcopy(tokenizer.engine)
        return new

    def add(self, tokens: list[str]) -> list[int]:
        """Append `tokens` (checked by the caller) as added tokens; their ids, V + k in order."""
        first = self.engine.get_vocab_size(with_added_tokens=True)
        self.engine.add_tokens([AddedToken(t, lstrip=True, rstrip=True, normalized=False, special=False) for t in tokens])
        ids = [self.engine.token_to_id(t) for t in tokens]
        assert ids == list(range(first, first + len(tokens))), ids  # each a new id, after the vocabulary
        self.added.update(zip(tokens, ids))
        return ids

    def expand(self, prompt: str) -> str:
        """A multi-vector token T written as "T T_1 … T_{n-1}" (diffusers' _maybe_convert_prompt: where
        the tokenized prompt holds T, every T of the text is replaced)."""
        if self.vectors and any(t in prompt for t in self.vectors):
            present = set(self.engine.encode(prompt, add_special_tokens=False).ids)
            for token, names in self.vectors.items():
                if self.added[token] in present:
                    prompt = prompt.replace(token, " ".join(names))
        return prompt

    def encode(self, prompt: str) -> list[int]:
        """Token ids of one prompt (Tokenizer.encode's), its multi-vector tokens expanded first; the
        prompt's length is checked as written."""
        if not isinstance(prompt, str):
            raise BadType(f"a prompt must be a str, got {type(prompt).__name__}: {prompt!r}")
        check_prompt(prompt, max_length=self.max_length)
        pieces = self.engine.encode(mask_swallows_left(self.expand(prompt), self.nfkc), add_special_tokens=False).ids
        return [BOS] + pieces[: self.max_length - 2] + [EOS]


class AddedRows(nn.Module):
    """The token table, frozen, and the added tokens' rows after it: one lookup over V + n ids.

    A lookup, not a concatenated (V + n, D) table (m9's is 1 GB in fp32, per forward pass). Every id
    reads a row of `rows` (the first, for vocabulary ids), masked out by `where`: the rows are in every
    graph, with zero gradient where unused, so DistributedDataParallel never waits for an unused one."""

    def __init__(self, table: nn.Embedding, rows: torch.Tensor):
        super().__init__()
        self.table = table.requires_grad_(False)
        self.rows = nn.Parameter(rows.to(table.weight), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The whole (V + n, D) table (a copy): what a lookup reads."""
        return torch.cat([self.table.weight, self.rows])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        first = self.table.num_embeddings
        new = ids >= first
        out = self.table(ids.masked_fill(new, 0))
        return torch.where(new[..., None], self.rows[(ids - first).clamp(min=0)], out)


def token_names(token: str, n: int) -> list[str]:
    """The tokens of a word with n rows: T, T_1, …, T_{n-1} (diffusers' names)."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def check_tokens(tokenizer: Tokenizer, names: list[str]) -> None:
    """Each of `names` can be a new token of `tokenizer`: a non-blank string in the normaliser's form,
    not yet a piece of the vocabulary or an added token, not given twice; else one line naming it."""
    seen = set()
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise BadValue(f"a new token must be a non-blank string, got {name!r}")
        if (normal := tokenizer.nfkc.normalize_str(name)) != name:
            raise BadValue(f"the token {name!r} is not in the tokenizer's normal form; write it {normal!r}")
        if tokenizer.engine.token_to_id(name) is not None:
            raise BadValue(f"the token {name!r} already exists (a piece of the vocabulary or an added token); "
                           f"choose another")
        if name in seen:
            raise BadValue(f"the token {name!r} is given twice")
        seen.add(name)


def check_words(model, words: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The words as {token: (n, D) rows}, or one line naming what is wrong; nothing is changed."""
    if not isinstance(words, Mapping) or not words:
        raise BadType(f"words must be a non-empty {{token: tensor}} mapping, got {words!r}")
    text = model.text_encoder
    width, first = text.cfg.hidden, model.tokenizer.engine.get_vocab_size(with_added_tokens=True)
    if first != text.cfg.vocab_size:
        raise BadValue(f"the tokenizer has {first} ids but the text encoder's table {text.cfg.vocab_size} rows: "
                       f"new tokens' ids would not be their rows")
    checked = {}
    for token, rows in words.items():
        if not isinstance(rows, torch.Tensor) or not rows.is_floating_point() or rows.ndim not in (1, 2) or not rows.numel():
            raise BadValue(f"the embedding of {token!r} must be a float tensor (D,) or (n, D), got "
                           f"{getattr(rows, 'dtype', type(rows).__name__)} {tuple(getattr(rows, 'shape', ()))}")
        rows = rows.reshape(-1, rows.shape[-1])
        if rows.shape[-1] != width:
            raise BadValue(f"the embedding of {token!r} is {rows.shape[-1]} wide; this text encoder's tokens are {width} "
                           f"(an embedding for another model?)")
        if not torch.isfinite(rows).all():
            raise NotFinite(f"the embedding of {token!r} holds NaN or infinity")
        checked[token] = rows
    check_tokens(model.tokenizer, [name for token, rows in checked.items() for name in token_names(token, len(rows))])
    return checked


def add_words(model, words: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
    """Add each token of `words` ({token: rows (D,) or (n, D)}, e.g. a learned_embeds file) to the
    loaded AltDiffusion `model` in place: its tokenizer gets the tokens, its text encoder the rows (in
    its dtype and device). Everything is checked first (check_words). Returns {token: its ids}."""
    words = check_words(model, words)
    tokenizer, text = WordTokenizer.extending(model.tokenizer), model.text_encoder
    ids = {}
    for token, rows in words.items():
        names = token_names(token, len(rows))
        ids[token] = tokenizer.add(names)
        if len(names) > 1:
            tokenizer.vectors[token] = names
    rows = torch.cat(list(words.values()))
    table = text.token_embedding
    if isinstance(table, AddedRows):
        table.rows = nn.Parameter(torch.cat([table.rows.detach(), rows.to(table.rows)]), requires_grad=False)
    else:
        text.token_embedding = AddedRows(table, rows)
    text.cfg = dataclasses.replace(text.cfg, vocab_size=text.cfg.vocab_size + len(rows))  # ids the encoder takes
    model.tokenizer = tokenizer
    return ids


def init_ids(tokenizer: Tokenizer, tokens: tuple[str, ...], init_words: tuple[str, ...]) -> dict[str, int]:
    """{new token: the id of its init word} (one init word for all, or one each); each init word must be a
    single token of the vocabulary (diffusers' textual_inversion script's rule). The new tokens are
    checked too (check_tokens): all before any change."""
    check_tokens(tokenizer, list(tokens))
    if not tokens or len(init_words) not in (1, len(tokens)):
        raise BadValue(f"give one --init-word, or one per --new-token ({len(tokens)}), not {len(init_words)}")
    ids = {}
    for token, word in zip(tokens, init_words * len(tokens) if len(init_words) == 1 else init_words):
        row = tokenizer.encode(word)[1:-1] if isinstance(word, str) else []
        if len(row) != 1:
            pieces = " ".join(tokenizer.engine.id_to_token(i) for i in row) or "none"
            raise BadValue(f"the init word {word!r} is {len(row)} tokens ({pieces}), not one: choose a word the "
                           f"tokenizer keeps whole")
        ids[token] = row[0]
    return ids


def init_rows(model, tokens: tuple[str, ...], init_words: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The starting row of each new token: a copy of its init word's (init_ids)."""
    ids = init_ids(model.tokenizer, tokens, init_words)
    table = model.text_encoder.token_embedding
    with torch.no_grad():
        return {t: table(torch.tensor([i], device=device_of(model))).float().cpu() for t, i in ids.items()}


def device_of(model) -> torch.device:
    return model.text_encoder.transformation.weight.device


def train_only_new_rows(text_encoder: nn.Module) -> None:
    """Freeze the text encoder but for the added rows (`--train embeddings`)."""
    if not isinstance(text_encoder.token_embedding, AddedRows):
        raise BadValue("--train embeddings: the model has no added tokens to train (give --new-token)")
    text_encoder.requires_grad_(False)
    text_encoder.token_embedding.rows.requires_grad_(True)


def learned(model, tokens: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """{token: its rows (n, D), fp32 on the CPU} of the added words (all, or `tokens`): what a
    learned_embeds file holds."""
    tokenizer, table = model.tokenizer, model.text_encoder.token_embedding
    if not isinstance(tokenizer, WordTokenizer) or not isinstance(table, AddedRows):
        raise BadValue("this model has no added tokens")
    first = table.table.num_embeddings
    out = {}
    for token in tokenizer.added if tokens is None else tokens:
        if token not in tokenizer.added:
            raise BadValue(f"{token!r} is not an added token of this model")
        if any(token in names[1:] for names in tokenizer.vectors.values()):
            continue  # T_1 …: part of T's rows
        ids = [tokenizer.added[name] - first for name in tokenizer.vectors.get(token, [token])]
        out[token] = table.rows.detach()[ids].float().cpu().clone()
    return out
