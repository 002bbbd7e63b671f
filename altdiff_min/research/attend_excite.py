"""Latent guidance by cross-attention, on the door: Attend-and-Excite, and SynGen's binding loss.

    prompt = "a red circle to the left of a blue square"
    excite = AttendAndExcite.for_words(pipe.tokenizer, prompt, ["circle", "square"])
    bind = Bind.for_pairs(pipe.tokenizer, prompt, [("red", "circle"), ("blue", "square")])
    images = pipe.generate(prompt, seed=0, controllers=[excite])          # or [bind]; DDIM or DPM-Solver++

Both are controllers with a `latents` hook (research/interventions.py): before a step's guided UNet
evaluation, one conditional UNet pass at that step's timestep with autograd on (`step.unet`, which the
run's other controllers do not see); its cross-attention probabilities at the sites of one grid,
`scale` times smaller than the latents (4: 16×16 at 512 px, diffusers' attn_res), averaged over those
sites and all their heads → maps (B, h, w, 77); a loss on the maps; x ← x − α·∇ₓ loss. The UNet keeps
a batch's pictures apart, so the gradient of the summed loss is each picture's own gradient, as the
references' one-picture-at-a-time passes give it.

Attend-and-Excite (Chefer et al., SIGGRAPH 2023, §3.2–3.4), as diffusers 0.42.1 computes it
(pipelines/deprecated/stable_diffusion_attend_and_excite):
  1. the maps without <s> and the last of the 77 positions, × 100, softmax over the 75 left;
  2. each subject's map smoothed by a 3×3 Gaussian (σ 0.5, reflect padding), and its maximum;
  3. loss = max over the subjects of max(0, 1 − maximum): the most neglected one;
  4. at a step i of `thresholds` whose loss is above 1 − threshold, iterative refinement: a pass
     and an update, again while the loss before the update stays above it (at most 20 times); then
     one more pass gives the loss;
  5. while i < max_iter_to_alter: x ← x − α_i·∇ loss, α_i = scale_factor · √(linspace(1, 0.5, steps)[i]).
A subject word of several pieces (research/daam.py `word_positions`, its lone "▁" too) is one subject:
its pieces' shares summed after the softmax, so a one-piece word is diffusers' token exactly.

SynGen (Rassin et al., NeurIPS 2023, "Linguistic Binding in Diffusion Models", §3), as the authors'
compute_loss.py and syngen_diffusion_pipeline.py compute it: S is a noun with its modifiers, U(S) every
piece of the prompt (between <s> and </s>) outside S, A_w a word's map over the grid as a distribution
(its pieces' probabilities summed, divided by their total; the authors' code pairs single pieces and
keeps the largest distance of a multi-piece word's), dist(P, Q) = ½(KL(P‖Q) + KL(Q‖P)):
    L = Σ_S Σ_{m ∈ S} [ dist(A_m, A_n) − (1/|U|) Σ_{u ∈ U} ½(dist(A_m, A_u) + dist(A_n, A_u)) ]
(the positive term pulls each modifier's map onto its noun's, the negative pushes both from the rest),
and x ← x − 20·∇ₓ L at each of the first 25 steps (no refinement; the step size does not decay).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import BadType, BadValue
from .daam import word_positions
from .interventions import Controller, Step, alone

SAMPLERS = ("ddim", "dpm++2m", "dpm++2m-karras")  # one UNet evaluation a step, on the latents as they are


@dataclass(frozen=True)
class ExciteConfig:
    """diffusers' StableDiffusionAttendAndExcitePipeline defaults (the authors' RunConfig): steps are
    indices of the run's steps, 0 the noisiest."""
    max_iter_to_alter: int = 25
    thresholds: tuple[tuple[int, float], ...] = ((0, 0.05), (10, 0.5), (20, 0.8))
    scale_factor: float = 20.0
    scale: int = 4  # the maps' grid: latents / 4, i.e. attn_res 16×16 at 512 px
    max_refinement_steps: int = 20
    kernel_size: int = 3  # GaussianSmoothing's
    sigma: float = 0.5
    # The authors' option (diffusers lacks it): the softmax over the prompt's own pieces only, without
    # </s> and the padding, which take most of the attention (their setting for SD 2.1; on the toy too).
    normalize_eot: bool = False


@dataclass(frozen=True)
class BindConfig:
    """The SynGen authors' pipeline: the first 25 steps, step size 20, the 16×16 maps."""
    max_iter_to_alter: int = 25
    step_size: float = 20.0
    scale: int = 4


def check_config(cfg, ints: Sequence[str], positive: Sequence[str]) -> None:
    for name in ints:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name != "max_iter_to_alter" else 0):
            raise BadValue(f"{name} must be an int ≥ {1 if name != 'max_iter_to_alter' else 0}, got {v!r}")
    for name in positive:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise BadValue(f"{name} must be a finite number > 0, got {v!r}")


class Reader(Controller):
    """Keeps the cross-attention probabilities of the sites `scale` times smaller than the latents,
    with their autograd graph."""

    def __init__(self, scale: int):
        self.scale, self.seen = scale, []

    def probs(self, site, when, probs):
        if site.kind == "cross" and site.scale == self.scale:
            self.seen.append(probs)
        return None


def attention_maps(step: Step, x: torch.Tensor, scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One conditional UNet pass on x (a new leaf that autograd follows; call under enable_grad) →
    (that leaf, maps (B, h, w, tokens) in float32: the mean over the grid's sites and their heads, as
    diffusers' AttentionStore.aggregate_attention)."""
    h, w = x.shape[-2] // scale, x.shape[-1] // scale
    if h < 2 or w < 2:
        raise BadValue(f"the attention maps on latents / {scale} would be {h}×{w}, and need at least 2×2: "
                       f"a larger picture, or a smaller grid scale")
    reader, x = Reader(scale), x.detach().requires_grad_(True)
    with alone([reader]):
        step.unet(x)
    if not reader.seen:
        raise BadValue(f"no cross-attention ran on a grid {scale} times smaller than the latents: choose the "
                       f"scale of a level with attention (1, 2, 4, …), and let the UNet read the text")
    probs = torch.cat(reader.seen, dim=1).float()  # (B, Σ heads, h·w, tokens)
    return x, probs.mean(dim=1).reshape(len(x), h, w, -1)


def descend(x: torch.Tensor, loss: torch.Tensor, alpha: float) -> torch.Tensor:
    """x − α·∇ₓ Σ loss: each picture moved down its own loss's gradient."""
    (grad,) = torch.autograd.grad(loss.sum(), [x])
    return (x - alpha * grad).detach()


def rows(per_prompt: tuple, batch: int, what: str) -> list:
    """One entry per picture of a batch from one per prompt (generate's rows: each prompt's n_samples)."""
    if batch % len(per_prompt):
        raise BadValue(f"{what} was given for {len(per_prompt)} prompt(s), and the batch holds {batch} pictures")
    n = batch // len(per_prompt)
    return [per_prompt[r // n] for r in range(batch)]


def check_call(name: str, built_for: tuple[str, ...] | None, sampler: str, prompts: list[str], count: int) -> None:
    if sampler not in SAMPLERS:
        raise BadValue(f"{name} moves the latents before each step's UNet evaluation, as the reference does for "
                       f"DDIM-like samplers: sampler must be one of {SAMPLERS}, got {sampler!r}")
    if built_for is not None and tuple(prompts) != built_for:
        raise BadValue(f"{name} was built for the prompt(s) {list(built_for)}, and generate got {prompts}")
    if count not in (1, len(prompts)):
        raise BadValue(f"{name} was given for {count} prompt(s), and generate got {len(prompts)}")


def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """diffusers' (and the authors') GaussianSmoothing kernel: per axis exp(−((d − mean) / (2σ))²), as
    they write it (not exp(−d²/2σ²)), the product of the axes normalised to sum 1."""
    d = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    k = torch.exp(-((d / (2 * sigma)) ** 2))
    k = torch.outer(k, k)
    return k / k.sum()


def excite_loss(maps: torch.Tensor, subjects: list, cfg: ExciteConfig = ExciteConfig(),
                lengths: list[int] | None = None) -> torch.Tensor:
    """Attend-and-Excite's loss per picture (B,): steps 1–3 of the module's docstring. subjects: per
    picture, a list of subjects, each a list of positions among the 77 (1 ≤ p ≤ 75); lengths: per
    picture its prompt's token count, for cfg.normalize_eot."""
    kernel, pad = gaussian_kernel(cfg.kernel_size, cfg.sigma).to(maps), cfg.kernel_size // 2
    losses = []
    for b, words in enumerate(subjects):
        end = lengths[b] - 1 if cfg.normalize_eot else maps.shape[-1] - 1  # <s> and the last position left out
        text = (maps[b][..., 1:end] * 100).softmax(dim=-1)
        peaks = []
        for positions in words:
            m = text[..., [p - 1 for p in positions]].sum(dim=-1)
            m = F.conv2d(F.pad(m[None, None], (pad,) * 4, mode="reflect"), kernel[None, None])
            peaks.append(m.max())
        losses.append(torch.clamp(1 - torch.stack(peaks).min(), min=0))  # = max over subjects of max(0, 1 − peak)
    return torch.stack(losses)


def as_subjects(indices) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """diffusers' token_indices, [i, j] (one prompt) or [[i, j], [k]] (one list a prompt), or subjects
    as lists of positions ([[[i], [j, j + 1]]]) → per prompt, per subject, its positions."""
    if not isinstance(indices, (list, tuple)) or not indices:
        raise BadType(f"indices must be a non-empty list (diffusers' token_indices), got {indices!r}")
    if all(isinstance(i, int) for i in indices):
        indices = [indices]
    out = []
    for prompt in indices:
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise BadType(f"indices: each prompt's must be a non-empty list, got {prompt!r}")
        subjects = tuple(tuple(s) if isinstance(s, (list, tuple)) else (s,) for s in prompt)
        for s in subjects:
            if not s or not all(isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 75 for p in s):
                raise BadValue(f"indices: a subject is one or more token positions in [1, 75] (0 is <s>), got {list(s)}")
        out.append(subjects)
    return tuple(out)


def prompt_list(prompts) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise BadType(f"prompts must be a prompt (str) or a non-empty list of them, got {prompts!r}")
    return list(prompts)


class AttendAndExcite(Controller):
    """Attend-and-Excite: before each step (see the module's docstring), the latents moved so that
    every subject token is attended somewhere. indices: diffusers' token_indices (positions among the
    77, <s> is 0), one list for all prompts or one per prompt; `for_words` finds them by text. Options:
    ExciteConfig's fields. `losses`: (step, each picture's loss) of every pass, refinement's too, for study."""

    def __init__(self, indices, prompts: Sequence[str] | None = None, lengths: Sequence[int] | None = None, **options):
        self.subjects, self.prompts = as_subjects(indices), None if prompts is None else tuple(prompt_list(prompts))
        self.lengths = None if lengths is None else tuple(lengths)
        if isinstance(options.get("thresholds"), dict):  # diffusers' form, {step: threshold}
            options["thresholds"] = tuple(options["thresholds"].items())
        self.cfg = ExciteConfig(**options)
        check_config(self.cfg, ("max_iter_to_alter", "scale", "max_refinement_steps", "kernel_size"),
                     ("scale_factor", "sigma"))
        if self.cfg.normalize_eot and (self.lengths is None or len(self.lengths) != len(self.subjects)):
            raise BadValue("normalize_eot needs each prompt's token count (lengths; for_words gives them)")
        if not isinstance(self.cfg.thresholds, (tuple, list)) or not all(
                isinstance(s, int) and isinstance(v, (int, float)) and 0 <= v <= 1 for s, v in self.cfg.thresholds):
            raise BadValue(f"thresholds must be (step, threshold in [0, 1]) pairs, got {self.cfg.thresholds!r}")
        self.losses: list[tuple[int, list[float]]] = []

    @classmethod
    def for_words(cls, tokenizer, prompts, words: Sequence[str], **options) -> AttendAndExcite:
        """The subjects by text: each word of `words` in each prompt (daam.word_positions: its pieces,
        every time it occurs; a word a prompt lacks is a one-line BadValue)."""
        prompts = prompt_list(prompts)
        if isinstance(words, str) or not isinstance(words, (list, tuple)) or not words:
            raise BadType(f"words must be a non-empty list of words, got {words!r}")
        return cls([[word_positions(tokenizer, p, w) for w in words] for p in prompts], prompts,
                   [len(tokenizer.pieces(p)) for p in prompts], **options)

    def check(self, sampler, prompts):
        check_call("Attend-and-Excite", self.prompts, sampler, prompts, len(self.subjects))

    def latents(self, step: Step, x: torch.Tensor) -> torch.Tensor | None:
        cfg, thresholds = self.cfg, dict(self.cfg.thresholds)
        if step.i >= cfg.max_iter_to_alter and step.i not in thresholds:
            return None
        subjects = rows(self.subjects, len(x), "Attend-and-Excite")
        lengths = rows(self.lengths, len(x), "Attend-and-Excite") if self.lengths else None
        alpha = cfg.scale_factor * math.sqrt(1 - 0.5 * step.i / (step.steps - 1) if step.steps > 1 else 1.0)

        def read(z):
            z, maps = attention_maps(step, z, cfg.scale)
            loss = excite_loss(maps, subjects, cfg, lengths)
            self.losses.append((step.i, loss.detach().tolist()))
            return z, loss
        with torch.enable_grad():
            z, loss = read(x)
            target = 1 - thresholds.get(step.i, 0.0)
            active, refined = loss.detach() > target, False
            for k in range(cfg.max_refinement_steps if step.i in thresholds else 0):  # step 4
                if not active.any():
                    break
                if k:
                    z, loss = read(z)
                z, refined = descend(z, loss * active, alpha), True
                active = active & (loss.detach() > target)  # the loss before this update
            if refined:
                z, loss = read(z)
            return descend(z, loss, alpha) if step.i < cfg.max_iter_to_alter else z.detach()


def sym_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """½(KL(p‖q) + KL(q‖p)) of two distributions over the last axis; logs of the probabilities clamped
    to [eps, 1 − eps] as torch.distributions.Categorical takes them (the authors' code)."""
    eps = torch.finfo(p.dtype).eps
    lp, lq = p.clamp(eps, 1 - eps).log(), q.clamp(eps, 1 - eps).log()
    return ((p * (lp - lq)).sum(-1) + (q * (lq - lp)).sum(-1)) / 2


def binding_loss(maps: torch.Tensor, subtrees: list, lengths: list[int]) -> torch.Tensor:
    """SynGen's loss per picture (B,): the module's docstring's L. subtrees: per picture, a list of
    (noun positions, [modifier positions, …]); lengths: per picture, its prompt's token count
    (<s> and </s> included), so U is every position in [1, length − 2] outside the subtree."""
    def spread(b: int, positions) -> torch.Tensor:
        m = maps[b][..., list(positions)].sum(dim=-1).flatten()
        return m / m.sum()
    losses = []
    for b, (trees, length) in enumerate(zip(subtrees, lengths)):
        loss = maps.new_zeros(())
        for noun, modifiers in trees:
            inside = set(noun) | {p for m in modifiers for p in m}
            outside = [u for u in range(1, length - 1) if u not in inside]
            a_n = spread(b, noun)
            a_u = torch.stack([spread(b, [u]) for u in outside]) if outside else None
            for modifier in modifiers:
                a_m = spread(b, modifier)
                loss = loss + sym_kl(a_m, a_n)
                if a_u is not None:
                    loss = loss - (sym_kl(a_m[None], a_u).sum() + sym_kl(a_n[None], a_u).sum()) / (2 * len(outside))
        losses.append(loss)
    return torch.stack(losses)


def occurrences(tokenizer, prompt: str, word: str) -> list[list[int]]:
    """Each occurrence of `word` in `prompt` as its run of positions (daam.word_positions, split where
    the positions stop being consecutive)."""
    runs: list[list[int]] = []
    for p in word_positions(tokenizer, prompt, word):
        if runs and p == runs[-1][-1] + 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def gap(a: list[int], b: list[int]) -> int:
    return max(a[0] - b[-1], b[0] - a[-1])


class Bind(Controller):
    """SynGen's binding loss (see the module's docstring) as latent guidance. pairs: per prompt, a list
    of (modifier positions, noun positions); the modifiers of one noun form its subtree. lengths: per
    prompt its token count (tokenizer.pieces); `for_pairs` finds both by text. Options: BindConfig's
    fields. `losses`: each picture's loss at each step it was read."""

    def __init__(self, pairs, lengths: Sequence[int], prompts: Sequence[str] | None = None, **options):
        if not isinstance(pairs, (list, tuple)) or not pairs or len(pairs) != len(lengths):
            raise BadValue(f"pairs and lengths must hold one entry per prompt, got {pairs!r} and {lengths!r}")
        self.subtrees, self.lengths = [], tuple(lengths)
        for prompt_pairs, length in zip(pairs, lengths):
            trees: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
            if not isinstance(prompt_pairs, (list, tuple)) or not prompt_pairs:
                raise BadValue(f"each prompt needs at least one (modifier, noun) pair, got {prompt_pairs!r}")
            for modifier, noun in prompt_pairs:
                modifier, noun = tuple(modifier), tuple(noun)
                if not all(isinstance(p, int) and 1 <= p <= length - 2 for p in (*modifier, *noun)) or not modifier \
                        or not noun or set(modifier) & set(noun):
                    raise BadValue(f"a pair is two disjoint non-empty lists of positions in [1, {length - 2}], "
                                   f"got {list(modifier)}, {list(noun)}")
                trees.setdefault(noun, []).append(modifier)
            self.subtrees.append(tuple(trees.items()))
        self.subtrees, self.prompts = tuple(self.subtrees), None if prompts is None else tuple(prompt_list(prompts))
        self.cfg = BindConfig(**options)
        check_config(self.cfg, ("max_iter_to_alter", "scale"), ("step_size",))
        self.losses: list[tuple[int, list[float]]] = []

    @classmethod
    def for_pairs(cls, tokenizer, prompts, pairs: Sequence[tuple[str, str]], **options) -> Bind:
        """Pairs by text, the same for every prompt: [("red", "circle"), ("blue", "square")]. Each pair
        is the occurrence of the modifier and of the noun nearest each other (a colour said twice binds
        to each noun by where it stands); a word a prompt lacks is a one-line BadValue."""
        prompts = prompt_list(prompts)
        if isinstance(pairs, str) or not isinstance(pairs, (list, tuple)) or not pairs or \
                not all(isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(w, str) for w in p) for p in pairs):
            raise BadType(f"pairs must be a non-empty list of (modifier, noun) words, got {pairs!r}")
        found = []
        for prompt in prompts:
            found.append([min(((m, n) for m in occurrences(tokenizer, prompt, modifier)
                               for n in occurrences(tokenizer, prompt, noun)), key=lambda mn: gap(*mn))
                          for modifier, noun in pairs])
        return cls(found, [len(tokenizer.pieces(p)) for p in prompts], prompts, **options)

    def check(self, sampler, prompts):
        check_call("the binding loss", self.prompts, sampler, prompts, len(self.subtrees))

    def latents(self, step: Step, x: torch.Tensor) -> torch.Tensor | None:
        if step.i >= self.cfg.max_iter_to_alter:
            return None
        subtrees, lengths = rows(self.subtrees, len(x), "the binding loss"), rows(self.lengths, len(x), "the binding loss")
        with torch.enable_grad():
            z, maps = attention_maps(step, x, self.cfg.scale)
            loss = binding_loss(maps, subtrees, lengths)
            self.losses.append((step.i, loss.detach().tolist()))
            return descend(z, loss, self.cfg.step_size)
