"""Which words bind in the toy's captions: each colour word with its shape noun, in the nine languages,
for SynGen's binding loss (altdiff_min.research.attend_excite.Bind; `altdiff-min generate --bind`).

    bind = toy_bind(model.tokenizer, caption_scene(scene, "fr"))   # rouge → cercle, bleu → carré

A colour's noun is the nearest shape word after it in en, zh, ru, ja and ko, before it in es, fr, it
and ar (data.py's OBJECT: "a small red circle", "红色小圆形", "un petit cercle rouge", "un círculo rojo
pequeño", "دائرة حمراء"), a size word or a particle between them or not. The caption's language is the
one of data.LANGUAGES whose colour and shape words (every case and gender of data.said) pair every
colour word of it found in the prompt so, and the most of them (then the longest words: ja's 黄色い,
not zh's 黄色; the first language on a tie); words are found as research/daam.py `word_positions` finds them (runs of
pieces: "квадрат" in "квадрата", "دائرة" in "لدائرة"), each occurrence on its own.
"""
from __future__ import annotations

from ..errors import BadValue
from ..research.attend_excite import Bind, gap, occurrences, prompt_list
from .data import LANGUAGES, said

NOUN_FIRST = frozenset({"es", "fr", "it", "ar"})  # the colour after its noun (data.OBJECT)


def spans(tokenizer, prompt: str, forms: set[str]) -> list[list[int]]:
    """Every occurrence of any of `forms` in `prompt` (positions), none inside another."""
    found = []
    for form in forms:
        try:
            found += occurrences(tokenizer, prompt, form)
        except BadValue:
            pass
    return sorted(s for s in found if not any(t != s and set(s) <= set(t) for t in found))


def colour_pairs(tokenizer, prompt: str) -> list[tuple[list[int], list[int]]]:
    """(colour positions, noun positions) for every colour word of a toy caption (see the module's
    docstring); a prompt without a colour word bound to a shape word in one of the nine languages is a
    one-line BadValue."""
    best, score = None, (0, 0)
    for lang in LANGUAGES:
        forms = [f for _, cases in said(lang) for f in cases]
        colours, nouns = spans(tokenizer, prompt, {f[1] for f in forms}), spans(tokenizer, prompt, {f[0] for f in forms})
        pairs = []
        for c in colours:
            side = [n for n in nouns if (n[-1] < c[0] if lang in NOUN_FIRST else n[0] > c[-1])]
            if side:
                pairs.append((c, min(side, key=lambda n: gap(c, n))))
        here = (len(pairs), sum(len(c) + len(n) for c, n in pairs))  # most colours, then the longest words
        if len(pairs) == len(colours) and here > score:
            best, score = pairs, here
    if best:
        return best
    raise BadValue(f"--bind pairs the toy's colour words with its shape words (nine languages), and {prompt!r} "
                   f"has no colour word with its shape; give the pairs (--bind-pairs red=circle,blue=square)")


def toy_bind(tokenizer, prompts, **options) -> Bind:
    """Bind with every colour of each prompt bound to its shape (colour_pairs); options: BindConfig's."""
    prompts = prompt_list(prompts)
    return Bind([colour_pairs(tokenizer, p) for p in prompts], [len(tokenizer.pieces(p)) for p in prompts],
                prompts, **options)
