"""The words of a prompt, read off its XLM-R pieces, and where a word sits among the 77 tokens: what
prompt-to-prompt aligns and reweights by (research/prompt_to_prompt.py).

A piece starting with "▁" starts a word and the pieces after it belong to it; in Chinese and
Japanese text (Han, kana), which has no spaces, every piece is a word of its own (so "红色" is two
words, 红 and 色, where the tokenizer splits it). A lone "▁" piece belongs to the word after it.

    ws, n = words(tokenizer, "un cercle rouge")      # [Word("un", [1]), …], n tokens with <s> and </s>
    positions_of(tokenizer, "一个红色的圆", "红色")     # the token positions of 红 and 色
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import BadValue


def is_cjk(text: str) -> bool:
    """Whether `text` holds a character of a script written without spaces: Han, hiragana, katakana."""
    return any(0x3040 <= (o := ord(c)) <= 0x30FF or 0x3400 <= o <= 0x4DBF or 0x4E00 <= o <= 0x9FFF
               or 0xF900 <= o <= 0xFAFF or 0xFF66 <= o <= 0xFF9F or 0x20000 <= o <= 0x2FFFF for c in text)


@dataclass
class Word:
    """A word of a prompt: its text (normalised, without "▁") and its positions among the 77 tokens."""
    text: str
    positions: list[int] = field(default_factory=list)
    cjk: bool = False


def words(tokenizer, prompt: str) -> tuple[list[Word], int]:
    """The words of `prompt` (see the module's docstring) and its length in tokens, <s> and </s> included."""
    pieces = tokenizer.pieces(prompt)
    found: list[Word] = []
    pending: list[int] = []  # a lone "▁" piece: the next word's
    for pos, piece in enumerate(pieces[1:-1], start=1):
        if piece == "▁":
            pending.append(pos)
            continue
        cjk = is_cjk(piece)
        if pending or not found or piece.startswith("▁") or cjk or found[-1].cjk:
            found.append(Word("", [], cjk))
        found[-1].text += piece.lstrip("▁")
        found[-1].positions += [*pending, pos]
        pending = []
    if pending:  # whitespace at the end: the last word's
        found[-1:] = [Word(found[-1].text, found[-1].positions + pending, found[-1].cjk)] if found else [Word("", pending)]
    return found, len(pieces)


def positions_of(tokenizer, prompt: str, word: str) -> list[int]:
    """The token positions of every occurrence of `word` in `prompt`: whole words, or in Chinese and
    Japanese any run of words whose text it is ("红色"). A word it does not hold: BadValue naming it."""
    if not isinstance(word, str) or not word.strip():
        raise BadValue(f"a word to find must be a non-empty str, got {word!r}")
    ws, _ = words(tokenizer, prompt)
    target = tokenizer.nfkc.normalize_str(word).strip()
    found = []
    for i in range(len(ws)):
        text = ""
        for j in range(i, len(ws)):
            text += ws[j].text
            if text == target and (j == i or ws[i].cjk):
                found += [p for w in ws[i:j + 1] for p in w.positions]
            if len(text) >= len(target):
                break
    if not found:
        raise BadValue(f"the prompt {prompt!r} has no word {word!r}; its words: {[w.text for w in ws]}")
    return sorted(set(found))
