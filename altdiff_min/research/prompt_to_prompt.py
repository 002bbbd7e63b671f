"""Prompt-to-prompt (Hertz et al., ICLR 2023): edit a picture by editing its prompt, on the door.

    source, edited = edit(pipe, "a red circle", "a blue circle", seed=0)                  # word swap
    source, edited = edit(pipe, "a circle", "a big circle", mode="refine", seed=0)          # words added
    source, edited = edit(pipe, "a red circle", mode="reweight", weights={"red": 3}, seed=0)

The source and target prompts run in one batch from the same x_T (their rows: the sources, then the
targets; with guidance the unconditional rows come first and are left alone, as the paper's code
edits only the conditional half). While steps are in `cross_replace_steps`, each target row's
cross-attention probabilities M_t are replaced by its source's M_s carried over to the target's
token positions (§3.2: word swap, refinement, reweighting); while in `self_replace_steps`, its
self-attention probabilities by the source's, at the sites with at most `self_max_positions` query
positions (the paper's code: ≤ 16² positions; the toy's 8×8 latents: every site). LocalBlend (§3.3)
keeps the source's latents outside the edited words' attention mask after each step.

Words are read off the XLM-R pieces and aligned by `words.align`: <s>, </s> and the padding with
the other prompt's; the target's words with the source's by equal text (in Chinese and Japanese
character by character, as their split into pieces varies with the text around them). `swap`: the
other words must be replaced one for one (in Chinese and Japanese a replaced run may have any number
of words); `refine`: the target is the source with words added, which keep their own maps. A
replaced word's maps go to the target's pieces summed over its source pieces and divided evenly over
the target's (one for one when the counts agree, as the reference's replacement mapper). A word added
to a swap, or replaced or dropped in a refinement, is a one-line BadValue naming it, before any work.
Source and target may be in different languages only as far as the rules above carry them: a swap
maps words by position, so a translation is accepted only with the same number of words and is
meaningful only where the word order matches.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import BadType, BadValue
from .interventions import Controller
from .words import align, positions_of

MODES = ("swap", "refine", "reweight")
SELF_MAX_POSITIONS = 16 ** 2  # google/prompt-to-prompt replaces self-attention only where Lq ≤ 16²
BLEND_THRESHOLD, BLEND_START, BLEND_SIDE = 0.3, 0.2, 16  # its LocalBlend: th 0.3, start_blend 0.2, 16×16 maps


def check_prompts(sources, targets) -> tuple[list[str], list[str]]:
    sources = [sources] if isinstance(sources, str) else sources
    targets = [targets] if isinstance(targets, str) else targets
    for name, ps in (("source", sources), ("target", targets)):
        if not isinstance(ps, (list, tuple)) or not ps or not all(isinstance(p, str) for p in ps):
            raise BadType(f"the {name} must be a prompt (str) or a non-empty list of them, got {ps!r}")
    if len(sources) != len(targets):
        raise BadValue(f"one target per source: got {len(sources)} sources and {len(targets)} targets")
    return list(sources), list(targets)


def steps_window(value, name: str) -> tuple[float, float]:
    """A fraction f (the first f of the steps) or (start, end) fractions, 0 ≤ start ≤ end ≤ 1."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (0.0, float(value))
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            or not 0 <= value[0] <= value[1] <= 1):
        raise BadValue(f"{name} must be a fraction in [0, 1] or (start, end) with 0 <= start <= end <= 1, got {value!r}")
    return float(value[0]), float(value[1])


def cross_alpha(tokenizer, targets: Sequence[str], steps: int, cross_replace_steps) -> torch.Tensor:
    """(steps + 1, pairs, 77) bool: which of each target's columns take the source's maps at each step.
    cross_replace_steps: a window for every column (a fraction or (start, end), steps_window), or a
    dict of windows, {"default_": window, word: window, ...}, as the reference's (google/prompt-to-
    prompt ptp_utils.get_time_words_attention_alpha, "default_" (0, 1) when left out): a word's window
    holds at its positions in each target that has it. A window [start, end) counts steps + 1 rows,
    int(start·(steps + 1)) ≤ i < int(end·(steps + 1)), as the reference does. A word in no target:
    BadValue naming it."""
    windows = cross_replace_steps if isinstance(cross_replace_steps, dict) else {"default_": cross_replace_steps}
    windows = {"default_": (0.0, 1.0), **windows}
    alpha = torch.zeros(steps + 1, len(targets), tokenizer.max_length, dtype=torch.bool)

    def fill(window, name, row, columns):
        start, end = steps_window(window, name)
        alpha[:, row, columns] = False
        alpha[int(start * (steps + 1)):int(end * (steps + 1)), row, columns] = True

    fill(windows["default_"], "cross_replace_steps", slice(None), slice(None))
    for word, window in windows.items():
        if word == "default_":
            continue
        found = False
        for row, target in enumerate(targets):
            try:
                columns = positions_of(tokenizer, target, word)
            except BadValue:
                continue
            fill(window, f"cross_replace_steps[{word!r}]", row, columns)
            found = True
        if not found:
            raise BadValue(f"cross_replace_steps names the word {word!r}, which no target prompt holds: {list(targets)}")
    return alpha


class EditAttention(Controller):
    """The edit itself, for pairs of rows (sources, then targets) on one batch: built by WordSwap,
    Refine or Reweight. `steps`: the run's steps; step i is UNet call i (DDIM, DPM-Solver, Euler:
    one call a step), in a window when int(start·steps) ≤ i < int(end·steps), as the reference
    counts (the cross-attention windows over steps + 1, `cross_alpha`, which also takes a window per
    word). `weights` {word: c}: the target's words whose cross-attention columns are multiplied by c
    while the maps are replaced (the reference's equalizer, applied on top of the replacement).

    value_replace_steps (not in the paper; 0 by default): while in it, the target's cross-attention
    values at its kept tokens (the words it shares with the source, <s>, </s>, padding) are the
    source's. XLM-R reads both ways, so every token's embedding, <s> and the padding included, holds
    the swapped word too, and carries it into the picture through its value whatever the maps say;
    CLIP, the paper's encoder, reads left to right, and the tokens before the swap stay the same."""

    def __init__(self, tokenizer, sources, targets, mode: str, steps: int, cross_replace_steps=0.8,
                 self_replace_steps=0.4, weights: dict[str, float] | None = None,
                 self_max_positions: int = SELF_MAX_POSITIONS, value_replace_steps=0.0):
        if mode not in MODES:
            raise BadValue(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise BadValue(f"steps must be an int >= 1, got {steps!r}")
        self.sources, self.targets = check_prompts(sources, targets)
        if mode == "reweight" and self.sources != self.targets:
            raise BadValue("reweight: the target is the source (weights change how its words are read); "
                           "to reweight a swap or a refinement, pass weights with mode='swap' or 'refine'")
        if weights is not None and (not isinstance(weights, dict) or not all(
                isinstance(c, (int, float)) and not isinstance(c, bool) for c in weights.values())):
            raise BadValue(f"weights must be a dict {{word: number}}, got {weights!r}")
        if mode == "reweight" and not weights:
            raise BadValue("reweight needs weights={word: c}")
        own = steps_window(self_replace_steps, "self_replace_steps")
        self.self = range(int(own[0] * steps), int(own[1] * steps))
        values = steps_window(value_replace_steps, "value_replace_steps")
        self.values = range(int(values[0] * steps), int(values[1] * steps))
        self.self_max_positions = self_max_positions
        length = tokenizer.max_length
        pairs = [align(tokenizer, s, t, "swap" if mode == "reweight" else mode, length)
                 for s, t in zip(self.sources, self.targets)]
        self.mapper = torch.stack([m for m, _, _ in pairs])  # (pairs, 77, 77)
        self.mapped = torch.stack([k for _, k, _ in pairs])  # (pairs, 77)
        self.partner = torch.stack([p for _, _, p in pairs])  # (pairs, 77)
        self.equalizer = torch.ones(len(pairs), length)  # (pairs, 77)
        for i, t in enumerate(self.targets):
            for word, c in (weights or {}).items():
                self.equalizer[i, positions_of(tokenizer, t, word)] = float(c)
        self.alpha = cross_alpha(tokenizer, self.targets, steps, cross_replace_steps)  # (steps + 1, pairs, 77)
        self.cross = {i for i, columns in enumerate(self.alpha) if columns.any()}  # the calls that replace any

    def rows(self, batch: int, guided: bool) -> int:
        """Where the conditional rows start (sources, then targets), checked against the pairs."""
        first = batch // 2 if guided else 0
        if batch - first != 2 * len(self.sources):
            raise BadValue(f"prompt-to-prompt was built for {len(self.sources)} source/target pair(s) "
                           f"({2 * len(self.sources)} rows), and the UNet's batch holds {batch - first} conditional rows")
        return first

    def qkv(self, site, when, q, k, v):
        if site.kind != "cross" or when.call not in self.values:
            return None
        first, n = self.rows(len(v), when.guided), len(self.sources)
        kept = self.partner >= 0
        v = v.clone()
        for i in range(n):  # the target's kept tokens read the source's values
            v[first + n + i, kept[i]] = v[first + i, self.partner[i, kept[i]]]
        return q, k, v

    def probs(self, site, when, probs):
        step, n = when.call, len(self.sources)
        replace_self = site.kind == "self" and step in self.self and probs.shape[2] <= self.self_max_positions
        if not (site.kind == "cross" and step in self.cross) and not replace_self:
            return None
        first = self.rows(probs.shape[0], when.guided)
        base, edited = probs[first:first + n], probs[first + n:]
        if replace_self:
            new = base
        else:  # §3.2: M_t ← the source's maps carried to the target's positions, then reweighted
            mapper, eq = (x.to(probs.device, probs.dtype) for x in (self.mapper, self.equalizer))
            carried = torch.einsum("bhqw,bwn->bhqn", base, mapper)
            replaced = torch.where(self.mapped[:, None, None, :].to(probs.device), carried, edited) * eq[:, None, None, :]
            new = torch.where(self.alpha[step, :, None, None, :].to(probs.device), replaced, edited)  # this call's columns
        probs = probs.clone()
        probs[first + n:] = new
        return probs


class WordSwap(EditAttention):
    """Word swap (the reference's AttentionReplace): "a red circle" → "a blue circle"."""

    def __init__(self, tokenizer, sources, targets, steps: int, **options):
        super().__init__(tokenizer, sources, targets, "swap", steps, **options)


class Refine(EditAttention):
    """Refinement (AttentionRefine): "a circle" → "a big circle"; the added words keep their own maps."""

    def __init__(self, tokenizer, sources, targets, steps: int, **options):
        super().__init__(tokenizer, sources, targets, "refine", steps, **options)


class Reweight(EditAttention):
    """Reweighting alone (AttentionReweight): the same prompt twice, `weights` {word: c} on the second."""

    def __init__(self, tokenizer, prompts, weights: dict[str, float], steps: int, **options):
        super().__init__(tokenizer, prompts, prompts, "reweight", steps, weights=weights, **options)


class LocalBlend(Controller):
    """§3.3: after each step from int(start·steps) on, each target's latents are its source's outside
    the mask where `words` are read, in the source's or the target's maps. The maps: the words'
    cross-attention columns summed (conditional rows, heads averaged) over the sites of the finest
    grid whose side is at most `side` (the reference: 16×16), summed over the steps so far; then a
    3×3 max-pool, nearest upsampling to the latents, scaled to a maximum of 1, > threshold. A word may
    be in the source, the target or both. Read by the controller (probs), applied by `callback`."""

    def __init__(self, tokenizer, sources, targets, words: Sequence[str], steps: int,
                 threshold: float = BLEND_THRESHOLD, start: float = BLEND_START, side: int = BLEND_SIDE):
        self.sources, self.targets = check_prompts(sources, targets)
        if isinstance(words, str) or not isinstance(words, (list, tuple)) or not words:
            raise BadValue(f"local_blend must be a non-empty list of words, got {words!r}")
        if not 0 <= threshold < 1 or not 0 <= start <= 1:
            raise BadValue(f"threshold must be in [0, 1) and start in [0, 1], got {threshold!r}, {start!r}")
        length = tokenizer.max_length
        self.alpha = torch.zeros(2 * len(self.sources), length)  # (rows, 77): the words' columns per row
        for row, prompt in enumerate(self.sources + self.targets):
            for word in words:
                try:
                    self.alpha[row, positions_of(tokenizer, prompt, word)] = 1.0
                except BadValue:
                    pass
        for i, (s, t) in enumerate(zip(self.sources, self.targets)):
            if not (self.alpha[i].any() or self.alpha[len(self.sources) + i].any()):
                raise BadValue(f"local_blend: none of {list(words)} is a word of {s!r} or {t!r}")
        self.threshold, self.start, self.side = threshold, int(start * steps), side
        self.maps: dict[int, torch.Tensor] = {}  # site scale → (rows, h, w) summed

    def probs(self, site, when, probs):
        h, w = when.size[0] // site.scale, when.size[1] // site.scale
        if site.kind != "cross" or max(h, w) > self.side:
            return None
        rows = probs[probs.shape[0] // 2:] if when.guided else probs
        read = torch.einsum("bqn,bn->bq", rows.float().mean(dim=1), self.alpha.to(rows.device)).reshape(-1, h, w)
        self.maps[site.scale] = self.maps[site.scale] + read if site.scale in self.maps else read
        return None

    def mask(self, size: tuple[int, int]) -> torch.Tensor:
        """(pairs, 1, H, W): 1 where a target is free to change (the source's or its own words' mask)."""
        maps = self.maps[min(self.maps)][:, None]
        maps = F.interpolate(F.max_pool2d(maps, 3, 1, padding=1), size=size)  # "nearest", as the reference
        maps = maps / maps.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
        n = len(self.sources)
        return ((maps[:n] > self.threshold) | (maps[n:] > self.threshold)).float()

    def callback(self, i: int, t: float, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor | None:
        if i < self.start or not self.maps:
            return None
        n = len(self.sources)
        mask = self.mask(tuple(x.shape[-2:])).to(x.device, x.dtype)
        return torch.cat([x[:n], x[:n] + mask * (x[n:] - x[:n])])


class StepUnconditional(Controller):
    """Per-step unconditional contexts (null-text inversion's ∅_t, one (1 or P, 77, D) a step): at guided
    calls, the unconditional rows' cross-attention keys and values are those of embeddings[call]. P
    rows (P pictures inverted at once): row p is the unconditional context of every p-th row of the
    batch's half (edit's sources, then its targets: pair p's two rows share picture p's ∅_t)."""

    def __init__(self, unet: torch.nn.Module, embeddings: Sequence[torch.Tensor]):
        self.layers = {m.site: m for m in unet.modules() if getattr(m, "site", None) is not None}
        self.embeddings = list(embeddings)

    def qkv(self, site, when, q, k, v):
        if site.kind != "cross" or not when.guided:
            return None
        if when.call >= len(self.embeddings):
            raise BadValue(f"{len(self.embeddings)} unconditional embeddings for a run of more UNet calls")
        layer, half = self.layers[site], len(k) // 2
        e = self.embeddings[when.call].to(k.device, k.dtype)
        if half % len(e):
            raise BadValue(f"{len(e)} unconditional rows a step for a guided batch of {half} rows")
        e = e.repeat(half // len(e), 1, 1)
        k, v = k.clone(), v.clone()
        k[:half], v[:half] = layer.k(e), layer.v(e)
        return q, k, v


def edit(model, source: str | list[str], target: str | list[str] | None = None, mode: str = "swap",
         seed: int = 0, steps: int = 50, scale: float = 7.5, cross_replace_steps=0.8, self_replace_steps=0.4,
         value_replace_steps=0.0, weights: dict[str, float] | None = None, local_blend: Sequence[str] | None = None,
         latents: torch.Tensor | None = None, uncond_embeddings: Sequence[torch.Tensor] | None = None, null_text_steps=1.0,
         sampler: str = "ddim", height: int | None = None, width: int | None = None, output: str = "tensor",
         progress: bool = True, blend_options: dict | None = None) -> tuple:
    """(source pictures, edited pictures) of one generate call holding both prompts, from one x_T.

    source/target: a prompt each, or equal-length lists (pair i: source[i] → target[i]); for
    mode="reweight" the target is the source (leave it None). latents: x_T, (1 or pairs, C, h, w),
    e.g. from inverting a real picture, instead of the seed's draw (torch.randn((pairs, C, h, w)) from
    `seed`, as generate draws it for the source prompts alone; height × width: the pictures', default
    the model's image_size). uncond_embeddings: one (1, 77, D)
    unconditional context per step (null-text inversion), or (pairs, 77, D): pair p's picture's.
    null_text_steps (not in the paper; 1 by default, the paper's): the window of steps in which the
    targets' unconditional rows read uncond_embeddings too; outside it they read the empty prompt's,
    as plain generation does (the fitted ∅_t hold the inverted picture, its colour included: on the
    toy a colour swap of an inverted picture mostly keeps the old colour; docs/editing.md). output
    "tensor" (pairs, 3, H, W) or "pil".
    """
    target = source if target is None and mode == "reweight" else target
    if target is None:
        raise BadValue(f"mode {mode!r} needs a target prompt")
    sources, targets = check_prompts(source, target)
    edit_ = EditAttention(model.tokenizer, sources, targets, mode, steps, cross_replace_steps,
                          self_replace_steps, weights, value_replace_steps=value_replace_steps)
    controllers: list[Controller] = [edit_]
    callback: Callable | None = None
    if local_blend is not None:
        blend = LocalBlend(model.tokenizer, sources, targets, local_blend, steps, **(blend_options or {}))
        controllers.append(blend)
        callback = blend.callback
    if uncond_embeddings is not None:
        if len(uncond_embeddings) != steps:
            raise BadValue(f"uncond_embeddings must hold one context per step ({steps}), got {len(uncond_embeddings)}")
        if any(e.dim() != 3 or len(e) not in (1, len(sources)) for e in uncond_embeddings):
            raise BadValue(f"each step's uncond_embeddings must be (1 or {len(sources)}, 77, D), got "
                           f"{[tuple(e.shape) for e in uncond_embeddings[:1]]}")
        start, end = steps_window(null_text_steps, "null_text_steps")
        fitted = range(int(start * steps), int(end * steps))
        if len(fitted) < steps:
            empty = model.encode([""]).to(uncond_embeddings[0].device, uncond_embeddings[0].dtype)
            n = len(sources)
            uncond_embeddings = [e if i in fitted else torch.cat([e.expand(n, -1, -1), empty.expand(n, -1, -1)])
                                 for i, e in enumerate(uncond_embeddings)]  # the sources' rows ∅_t, the targets' empty
        controllers.insert(0, StepUnconditional(model.unet, uncond_embeddings))
    elif steps_window(null_text_steps, "null_text_steps") != (0.0, 1.0):
        raise BadValue("null_text_steps chooses where the targets read uncond_embeddings: give uncond_embeddings")
    down, height, width = model.vae.cfg.size_multiple, height or model.image_size, width or model.image_size
    shape = (len(sources), model.unet.cfg.in_channels, height // down, width // down)
    if latents is None:
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or latents.shape[0] not in (1, len(sources)):
        raise BadValue(f"latents must be x_T of shape (1 or {len(sources)}, C, h, w), got "
                       f"{getattr(latents, 'shape', latents)!r}")
    latents = latents.expand(len(sources), -1, -1, -1)
    images = model.generate(sources + targets, steps=steps, sampler=sampler, scale=scale, seed=seed,
                            height=height, width=width, latents=torch.cat([latents, latents]), output=output, callback=callback,
                            progress=progress, controllers=controllers)
    n = len(sources)
    if isinstance(source, str):
        return images[0], images[n]
    return images[:n], images[n:]
