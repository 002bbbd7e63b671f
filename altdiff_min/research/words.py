"""The words of a prompt, read off its XLM-R pieces, and where a word sits among the 77 tokens: what
prompt-to-prompt aligns and reweights by (research/prompt_to_prompt.py).

A piece starting with "▁" starts a word and the pieces after it belong to it; in Chinese and
Japanese text (Han, kana), which has no spaces, every piece is a word of its own (so "红色" is two
words, 红 and 色, where the tokenizer splits it). A lone "▁" piece belongs to the word after it.

    ws, n = words(tokenizer, "un cercle rouge")      # [Word("un", [1]), …], n tokens with <s> and </s>
    positions_of(tokenizer, "一个红色的圆", "红色")     # the token positions of 红 and 色
    mapper, mapped, partner = align(tokenizer, "a red circle", "a blue circle", "swap")  # prompt-to-prompt's
"""
from __future__ import annotations

from dataclasses import dataclass, field
from difflib import SequenceMatcher

import torch

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


def align(tokenizer, source: str, target: str, mode: str, max_length: int = 77
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt-to-prompt's token alignment, `mode` "swap" or "refine": the mapper (max_length, max_length)
    (target column n of the replaced maps is Σ_w M_s[..., w]·mapper[w, n]); which target positions take
    the source's maps (refinement's added words keep their own); and for each target position the
    source position holding the same token (a kept word's piece, <s>, </s>, padding), or -1.

    The words are matched by their text, the longest matching blocks first (difflib.SequenceMatcher),
    Chinese and Japanese words character by character: the same text may be one piece in one prompt and
    two in the other ("青い" and "青" "い"), and is still the same words. Words linked by matched or
    replaced text form groups; a group with as many pieces each side is carried piece for piece (its
    pieces partners where they are the same), any other group's maps summed over its source pieces and
    spread evenly over its target's."""
    src, n_src = words(tokenizer, source)
    tgt, n_tgt = words(tokenizer, target)
    mapper, mapped = torch.zeros(max_length, max_length), torch.zeros(max_length, dtype=torch.bool)
    partner = torch.full((max_length,), -1, dtype=torch.long)

    def carry(a: list[int], b: list[int], same: bool) -> None:  # source positions a's maps onto target's b
        if len(a) == len(b):
            mapper[a, b] = 1.0
            if same:  # the same tokens: partners
                partner[b] = torch.tensor(a)
        else:
            mapper[torch.tensor(a)[:, None], torch.tensor(b)[None, :]] = 1.0 / len(b)  # summed, spread evenly
        mapped[b] = True

    def units(ws: list[Word]) -> list[tuple[str, int]]:  # (text, word index): a CJK word's characters each
        return [(c, i) for i, w in enumerate(ws) for c in (w.text if w.cjk else [w.text])]

    def said(ws: list[Word], us) -> str:
        return " ".join(repr(ws[i].text) for i in dict.fromkeys(i for _, i in us))

    us, ut = units(src), units(tgt)
    ps, pt = tokenizer.pieces(source), tokenizer.pieces(target)
    linked: list[tuple[int, int]] = []  # (source word, target word)
    for tag, i1, i2, j1, j2 in SequenceMatcher(None, [u for u, _ in us], [u for u, _ in ut], autojunk=False).get_opcodes():
        a, b = us[i1:i2], ut[j1:j2]
        if tag == "equal":
            linked += [(x[1], y[1]) for x, y in zip(a, b)]
        elif tag == "delete":
            raise BadValue(f"{mode}: the source's {said(src, a)} is missing from the target {target!r}: "
                           f"every source word must stay or be swapped one for one")
        elif tag == "insert" and mode == "refine":
            continue  # added words keep their own maps
        elif tag == "insert":
            raise BadValue(f"swap: the target's {said(tgt, b)} has no source word to take the place of "
                           f"(a word swap replaces words one for one): add words with mode='refine'")
        elif mode == "refine":
            raise BadValue(f"refine: the target's {said(tgt, b)} replaces the source's {said(src, a)}; "
                           f"a refinement only adds words: swap words with mode='swap'")
        elif len(a) == len(b):
            linked += [(x[1], y[1]) for x, y in zip(a, b)]
        elif any(src[i].cjk for _, i in a) or any(tgt[j].cjk for _, j in b):  # a run for a run
            linked += [(x[1], y[1]) for x in a for y in b]
        else:
            raise BadValue(f"swap: the target's {said(tgt, b)} replaces the source's {said(src, a)}, "
                           f"{len(b)} word(s) for {len(a)}: a word swap replaces words one for one")
    groups: list[tuple[list[int], list[int]]] = []  # (source words, target words); the links run in order,
    for i, j in linked:                                # so a link joins the last group or starts one
        if groups and (i in groups[-1][0] or j in groups[-1][1]):
            si, tj = groups[-1]
            si += [] if i in si else [i]
            tj += [] if j in tj else [j]
        else:
            groups.append(([i], [j]))
    for si, tj in groups:
        a, b = [p for i in si for p in src[i].positions], [p for j in tj for p in tgt[j].positions]
        carry(a, b, same=[ps[p] for p in a] == [pt[p] for p in b])
    carry([0], [0], True)  # <s>
    pads = max_length - max(n_src, n_tgt)
    carry(list(range(n_src - 1, n_src + pads)), list(range(n_tgt - 1, n_tgt + pads)), True)  # </s>, padding
    return mapper, mapped, partner
