"""Word heat maps: where in the picture a word of the prompt is read (DAAM; Tang et al. 2023, "What
the DAAM: Interpreting Stable Diffusion Using Cross Attention", ACL 2023).

    with capture_attention(pipe.unet) as maps:
        image = pipe.generate("un cercle rouge", seed=0, output="tensor")
    heat = word_heat_map(maps, pipe.tokenizer, "un cercle rouge", "cercle", size=(512, 512))  # (1, H, W) in [0, 1]
    iou(heat, object_mask, threshold=0.4)                                                     # tensor([0.71])

The map of a word is the paper's §3 as its code computes it (daam 0.2.0, trace.py's
`compute_global_heat_map` and heatmap.py's `compute_word_heat_map`, `expand_as`):

  1. every cross-attention layer of the down and up blocks (not the middle block's), every head h:
     the token's attention probabilities over the layer's grid, summed over the timesteps, for the
     conditional rows only (the prompt's, not the negative prompt's);
  2. each (layer, head) map upsampled bicubically to the latents' size (64×64 for 512 px) and
     clamped at 0 (bicubic undershoots), then averaged over all (layer, head) pairs;
  3. a word spelled by several pieces (all its occurrences too) is the mean of its pieces' maps;
  4. for the picture: upsampled bicubically to its size and scaled to [0, 1] by its own min and max
     (`expand`); thresholded at τ = 0.4 (the paper's) it is the word's segment.

Averaging instead of summing changes every map by one factor, which step 4 removes. DAAM takes one
prompt per run; here every picture of the batch gets its own map (its prompt, its word).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import BadValue
from .instruments import AttentionMaps

THRESHOLD = 0.4  # τ, the paper's threshold on a normalised map (§4: segmentation)


def word_positions(tokenizer, prompt: str, word: str) -> list[int]:
    """The positions (in the 77 the UNet reads, <s> is 0) of the pieces that spell `word` in `prompt`,
    every time it occurs: runs of whole pieces whose text ("▁" read as a space) is the word, with the
    lone "▁" before one if there is one. A word of a spaced script begins with "▁" ("▁cercle", or
    "▁", "c", "ercle"); in Chinese or Japanese a word is whatever run of pieces spells it ("圆形" in
    一个红色的圆形). Several words: "red circle"."""
    if not isinstance(word, str) or not word.split():
        raise BadValue(f"word must be a non-empty string, got {word!r}")
    target = " ".join(word.split())
    pieces = tokenizer.pieces(prompt)
    texts = [p.replace("▁", " ") for p in pieces]
    found, i = [], 1
    while i < len(pieces) - 1:  # between <s> and </s>
        run, end = "", None
        if texts[i].strip():  # a lone "▁" starts no word
            for j in range(i, len(pieces) - 1):
                run += texts[j]
                spelled = " ".join(run.split())
                if spelled == target:
                    end = j
                    break
                if not target.startswith(spelled):
                    break
        if end is None:
            i += 1
        else:  # a lone "▁" before the run is the word's start (sentencepiece's space), as in daam
            found += range(i - (pieces[i - 1] == "▁"), end + 1)
            i = end + 1
    if not found:
        raise BadValue(f"{word!r} is not a word of {prompt!r}, whose pieces are {pieces[1:-1]}")
    return found


def daam_layers(maps: AttentionMaps) -> list[str]:
    """The layers DAAM reads: every captured cross-attention but the middle block's (its locator's
    default; at 512 px its 8×8 maps are the ones DAAM's factor-8 rule leaves out too)."""
    sites = {name: site for site, name in maps.names.items()}
    return [name for name in maps.sums if name in sites and sites[name].part != "mid"]


def latent_word_maps(maps: AttentionMaps, tokenizer, prompt: str | list[str], word: str | list[str],
                     layers: list[str] | None = None, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """DAAM's raw word map, unnormalised (steps 1–3 above): (pictures, h, w), (h, w) = grid.
    prompt, word: one per picture, in the batch's order (a prompt of n_samples pictures repeated n
    times), or one string for all; layers: names as in `maps.sums` (default `daam_layers`); grid:
    the size each (layer, head) map is upsampled to, the latents' by default (DAAM's code takes
    64×64 for a 512-px model and 96×96 for others, whatever size the picture is drawn at)."""
    if not maps.sums:
        raise BadValue("no attention maps were captured: generate inside `with capture_attention(pipe.unet) as maps:`")
    first = next(iter(maps.sums.values()))
    pictures = len(first) // 2 if maps.guided else len(first)
    prompts = [prompt] * pictures if isinstance(prompt, str) else list(prompt)
    words = [word] * pictures if isinstance(word, str) else list(word)
    if len(prompts) != pictures or len(words) != pictures:
        raise BadValue(f"the maps hold {pictures} picture(s): give one prompt and one word per picture "
                       f"(or one string for all), got {len(prompts)} prompt(s) and {len(words)} word(s)")
    layers = daam_layers(maps) if layers is None else list(layers)
    if unknown := sorted(set(layers) - set(maps.sums)):
        raise BadValue(f"no maps were captured for layer(s) {unknown}; captured: {sorted(maps.sums)}")
    if not layers:
        raise BadValue("no layer to read: DAAM reads the down and up blocks' cross-attention")
    positions = [word_positions(tokenizer, p, w) for p, w in zip(prompts, words)]
    if (last := max(max(p) for p in positions)) >= first.shape[-1]:
        raise BadValue(f"the word's position {last} is past the {first.shape[-1]} tokens the UNet reads")
    height, width = maps.size
    grid = (height, width) if grid is None else tuple(grid)
    total, pairs = [0.0] * pictures, 0
    for name in layers:
        probs = maps.sums[name]  # (rows, heads, h·w, 77): summed over the UNet calls (DAAM: over time)
        probs = probs[len(probs) // 2:] if maps.guided else probs  # the conditional rows
        heads, own = probs.shape[1], (height // maps.scales[name], width // maps.scales[name])
        for i, where in enumerate(positions):
            one = probs[i][..., where].permute(0, 2, 1).reshape(-1, 1, *own)  # (heads·pieces, 1, h, w)
            one = F.interpolate(one, size=grid, mode="bicubic").clamp_min(0)  # clamped: bicubic undershoots
            total[i] = total[i] + one.reshape(heads, len(where), *grid).sum(0)
        pairs += heads
    return torch.stack([t.mean(0) / pairs for t in total])  # pieces averaged; (layer, head) pairs averaged


def expand(heat: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(pictures, h, w) maps → (pictures, H, W): bicubic to `size`, each scaled to [0, 1] by its own
    min and max (DAAM's `expand_as`)."""
    heat = F.interpolate(heat[:, None].float(), size=tuple(size), mode="bicubic")[:, 0]
    low = heat.amin(dim=(1, 2), keepdim=True)
    return (heat - low) / (heat.amax(dim=(1, 2), keepdim=True) - low + 1e-8)


def word_heat_map(maps: AttentionMaps, tokenizer, prompt: str | list[str], word: str | list[str],
                  size: tuple[int, int], layers: list[str] | None = None) -> torch.Tensor:
    """Where `word` is read in each picture: (pictures, H, W) in [0, 1], `size` the picture's (H, W).
    `latent_word_maps`, then `expand`: compare places within a map; `> THRESHOLD` is the segment."""
    if not (isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
        raise BadValue(f"size must be (height, width) in pixels, got {size!r}")
    return expand(latent_word_maps(maps, tokenizer, prompt, word, layers), size)


def iou(heat: torch.Tensor, mask: torch.Tensor, threshold: float = THRESHOLD) -> torch.Tensor:
    """Intersection over union of each map thresholded (heat > threshold) with a boolean mask:
    (pictures, H, W) each → (pictures,); 0 where both are empty."""
    if heat.shape != mask.shape or heat.dim() < 2:
        raise BadValue(f"heat map {tuple(heat.shape)} and mask {tuple(mask.shape)} must be the same (…, H, W)")
    seen, mask = heat > threshold, mask.bool()
    inter = (seen & mask).sum(dim=(-2, -1)).float()
    union = (seen | mask).sum(dim=(-2, -1)).float()
    return inter / union.clamp_min(1)


def shifted(heat: torch.Tensor) -> torch.Tensor:
    """A baseline map: each map rolled by half the picture both ways (its blob, away from its object)."""
    return heat.roll(shifts=(heat.shape[-2] // 2, heat.shape[-1] // 2), dims=(-2, -1))
