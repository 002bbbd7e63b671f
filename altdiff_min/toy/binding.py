"""Which words bind in the toy's captions: each colour word with its shape noun, in the nine languages,
for SynGen's binding loss (altdiff_min.research.attend_excite.Bind; `altdiff-min generate --bind`).

    bind = toy_bind(model.tokenizer, caption_scene(scene, "fr"))   # rouge → cercle, bleu → carré
    excite = toy_excite(model.tokenizer, caption_scene(scene, "fr"))   # cercle, carré: the subjects
    tables = evaluate_binding(model)   # {way: evaluate_scenes' table and seconds a picture}, four ways

A colour's noun is the nearest shape word after it in en, zh, ru, ja and ko, before it in es, fr, it
and ar (data.py's OBJECT: "a small red circle", "红色小圆形", "un petit cercle rouge", "un círculo rojo
pequeño", "دائرة حمراء"), a size word or a particle between them or not. The caption's language is the
one of data.LANGUAGES whose colour and shape words (every case and gender of data.said) pair every
colour word of it found in the prompt so, and the most of them (then the longest words: ja's 黄色い,
not zh's 黄色; the first language on a tie); words are found as research/daam.py `word_positions` finds them (runs of
pieces: "квадрат" in "квадрата", "دائرة" in "لدائرة"), each occurrence on its own.
"""
from __future__ import annotations

import time

from ..errors import BadValue
from ..research.attend_excite import AttendAndExcite, Bind, gap, occurrences, prompt_list
from .data import LANGUAGES, caption_scene, said
from .detect import compositions, evaluate_scenes

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


def toy_excite(tokenizer, prompts, **options) -> AttendAndExcite:
    """Attend-and-Excite with each prompt's shape nouns as its subjects (those colour_pairs binds: a
    shape said twice is two subjects, one per object); options: ExciteConfig's."""
    prompts = prompt_list(prompts)
    subjects = [list(dict.fromkeys(tuple(noun) for _, noun in colour_pairs(tokenizer, p))) for p in prompts]
    return AttendAndExcite(subjects, prompts, [len(tokenizer.pieces(p)) for p in prompts], **options)


# The ways `evaluate_binding` compares: which methods each applies, and how a method is built for one
# call's prompts.
METHODS = {"excite": toy_excite, "bind": toy_bind}
WAYS = {"plain": (), "excite": ("excite",), "bind": ("bind",), "both": ("excite", "bind")}


def evaluate_binding(model, ways=tuple(WAYS), languages=LANGUAGES, scenes=None, excite: dict | None = None,
                     bind: dict | None = None, **evaluate) -> dict[str, dict]:
    """Pairs drawn plainly, with Attend-and-Excite (the shape nouns), with the binding loss (each
    colour to its noun), and with both: per way, `evaluate_scenes`' table (default scenes: the 36 pairs
    of `compositions()`, phrasing 0) and the seconds a picture. One call of `generate` a language, its
    controllers built for that call's prompts. excite, bind: the methods' options (ExciteConfig's and
    BindConfig's fields, e.g. the grid's `scale`); evaluate: evaluate_scenes' other arguments (seeds,
    scale, steps, sampler: A&E and the loss take ddim and dpm++2m)."""
    if unknown := [w for w in ways if w not in WAYS]:
        raise BadValue(f"ways are some of {tuple(WAYS)}, got {unknown}")
    scenes = compositions(singles=0) if scenes is None else scenes
    options = {"excite": excite or {}, "bind": bind or {}}
    out = {}
    for way in ways:
        table, start = {}, time.perf_counter()
        for lang in languages:
            prompts = [caption_scene(s, lang, 0) for s in scenes]
            table |= evaluate_scenes(model, scenes, languages=(lang,), batch_size=len(scenes),
                                     controllers=[METHODS[m](model.tokenizer, prompts, **options[m]) for m in WAYS[way]],
                                     **evaluate)
        out[way] = {"table": table, "seconds": (time.perf_counter() - start) / (len(languages) * len(scenes))}
    return out
