"""DAAM word heat maps (Tang et al. 2023): the paper's algorithm computed by hand from raw attention
probabilities equals the module's; word ↔ pieces; IoU; on the toy, the shape word's map finds the
object. (Against the daam package itself: test_daam_reference.py.)"""
import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err

from altdiff_min.errors import BadValue
from altdiff_min.pipeline import load
from altdiff_min.research.daam import (
    THRESHOLD, expand, iou, latent_word_maps, shifted, word_heat_map, word_positions)
from altdiff_min.toy.editing import toy_word_iou
from altdiff_min.research.instruments import AttentionMaps, capture_attention
from altdiff_min.research.interventions import Controller

RUN = dict(steps=2, height=64, width=96, seed=3, output="tensor", progress=False)  # latents 8×12: not square
PROMPTS = ["un cercle rouge", "a red circle and a blue circle"]  # "circle": several pieces, twice
WORDS = ["cercle", "circle"]


@pytest.fixture(scope="module")
def pipe(small_model_dir):
    return load(small_model_dir)


@pytest.fixture(scope="module")
def toy():
    return load("toy")


class Raw(Controller):
    """Every cross-attention's probabilities of every call, as they come: (site, call, guided, probs)."""
    def __init__(self):
        self.seen = []

    def probs(self, site, when, probs):
        if site.kind == "cross":
            self.seen.append((site, when.call, when.guided, when.size, probs.detach().clone()))


def by_hand(raw, tokenizer, prompts, words):
    """The paper's §3 as written: per picture, for each layer l of the down and up blocks, each head
    h and each step t, the word's pieces' attention maps on their grid; summed over t, upsampled
    bicubically to the latents' size, clamped at 0; averaged over (l, h); averaged over the pieces."""
    pictures = len(prompts)
    out = []
    for i, (prompt, word) in enumerate(zip(prompts, words)):
        pieces, mine = tokenizer.pieces(prompt), tokenizer.pieces(word)[1:-1]  # the word alone: "▁…" first
        where = [s + k for s in range(len(pieces)) if pieces[s:s + len(mine)] == mine for k in range(len(mine))]
        assert where
        per_layer = {}
        for site, call, guided, size, probs in raw:
            if site.part == "mid":
                continue
            row = probs[pictures + i] if guided else probs[i]  # (heads, h·w, 77): the prompt's row
            per_layer[site] = per_layer.get(site, 0) + row  # summed over the steps
        maps, pairs = 0, 0
        for site, row in per_layer.items():
            h, w = size[0] // site.scale, size[1] // site.scale
            for head in row:
                grid = head[:, where].T.reshape(len(where), 1, h, w)
                maps = maps + F.interpolate(grid, size=size, mode="bicubic").clamp(min=0)[:, 0]
                pairs += 1
        out.append((maps / pairs).mean(0))
    return torch.stack(out)


def test_word_map_is_the_papers_algorithm_by_hand(pipe):
    raw = Raw()
    with capture_attention(pipe.unet) as maps:
        images = pipe.generate(PROMPTS, controllers=[raw], **RUN)
    expected = by_hand(raw.seen, pipe.tokenizer, PROMPTS, WORDS)
    ours = latent_word_maps(maps, pipe.tokenizer, PROMPTS, WORDS)
    assert ours.shape == expected.shape == (2, 8, 12) and expected.min() > 0
    assert rel_err(ours, expected) < 1e-5
    heat = word_heat_map(maps, pipe.tokenizer, PROMPTS, WORDS, size=(64, 96))
    # min–max scaling magnifies float noise by 1/contrast (~10 for this random UNet): scale ours by hand
    by_hand_heat = F.interpolate(ours[:, None], size=(64, 96), mode="bicubic")[:, 0]
    low, high = by_hand_heat.amin(dim=(1, 2), keepdim=True), by_hand_heat.amax(dim=(1, 2), keepdim=True)
    assert heat.shape == (2, *images.shape[-2:]) and rel_err(heat, (by_hand_heat - low) / (high - low)) < 1e-5
    assert torch.allclose(heat.amin(dim=(1, 2)), torch.zeros(2))
    assert torch.allclose(heat.amax(dim=(1, 2)), torch.ones(2))
    one = latent_word_maps(maps, pipe.tokenizer, PROMPTS[1], "red")  # one string: every picture's
    assert rel_err(one[1], latent_word_maps(maps, pipe.tokenizer, PROMPTS, ["un", "red"])[1]) < 1e-7


def test_unguided_maps_read_every_row(pipe):
    raw = Raw()
    with capture_attention(pipe.unet) as maps:
        pipe.generate(PROMPTS, scale=1.0, controllers=[raw], **RUN)
    assert not raw.seen[0][2]
    expected = by_hand(raw.seen, pipe.tokenizer, PROMPTS, WORDS)
    assert rel_err(latent_word_maps(maps, pipe.tokenizer, PROMPTS, WORDS), expected) < 1e-5


def test_word_positions(pipe, toy):
    pieces = pipe.tokenizer.pieces(PROMPTS[1])
    where = word_positions(pipe.tokenizer, PROMPTS[1], "circle")
    assert "".join(pieces[k] for k in where) == "▁circle▁circle"  # both, each with its "▁"
    assert word_positions(toy.tokenizer, "a red circle", "circle") == [3]
    assert word_positions(toy.tokenizer, "a red circle", " red  circle ") == [2, 3]
    zh = "一个红色的圆形"
    for word in ("圆形", "红色"):  # a piece, or a run of pieces ("红", "色"), whichever the tokenizer makes
        where = word_positions(toy.tokenizer, zh, word)
        assert "".join(toy.tokenizer.pieces(zh)[k] for k in where).lstrip("▁") == word and where == sorted(where)
    for prompt, word in (("a red circle", "circ"), ("a red circle", "ed"), ("a red circle", "")):
        with pytest.raises(BadValue, match="not a word of|non-empty"):
            word_positions(toy.tokenizer, prompt, word)


def test_iou():
    heat = torch.tensor([[[0.9, 0.5], [0.1, 0.4]], [[0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[[True, False], [True, False]], [[False, False], [False, False]]])
    assert torch.allclose(iou(heat, mask), torch.tensor([1 / 3, 0.0]))  # > 0.4: 0.9, 0.5 (0.4 is not above)
    assert torch.allclose(iou(heat, mask, threshold=0.05), torch.tensor([0.5, 0.0]))
    assert torch.equal(shifted(torch.arange(4.0).reshape(1, 2, 2)), torch.tensor([[[3.0, 2.0], [1.0, 0.0]]]))
    with pytest.raises(BadValue, match="must be the same"):
        iou(heat, mask[0])
    assert THRESHOLD == 0.4 and torch.allclose(expand(heat[:1], (2, 2)), (heat[:1] - 0.1) / 0.8)


def test_bad_arguments_fail_in_one_line(pipe):
    with pytest.raises(BadValue, match="no attention maps were captured"):
        latent_word_maps(AttentionMaps(), pipe.tokenizer, "a", "a")
    with capture_attention(pipe.unet) as maps:
        pipe.generate(PROMPTS, **(RUN | dict(steps=1)))
    with pytest.raises(BadValue, match=r"2 picture\(s\): give one prompt and one word per picture"):
        latent_word_maps(maps, pipe.tokenizer, PROMPTS[:1], WORDS)
    with pytest.raises(BadValue, match="no maps were captured for layer"):
        latent_word_maps(maps, pipe.tokenizer, PROMPTS, WORDS, layers=["down.9"])
    with pytest.raises(BadValue, match="size must be"):
        word_heat_map(maps, pipe.tokenizer, PROMPTS, WORDS, size=64)


def test_toy_shape_words_map_onto_the_object(toy):
    """The measure behind docs/interventions.md's table, on a handful: each language's shape-word map
    overlaps the drawn object far more than the same map moved half a picture away."""
    table = toy_word_iou(toy, seeds=(0,), languages=("fr", "ko"), colours=("red", "blue", "green"), steps=10)
    for lang, row in table.items():
        assert row["pictures"] >= 7  # of 9: a picture with nothing drawn has no object to find
        assert row["iou"] > 0.45 and row["iou"] > row["shifted"] + 0.35, (lang, row)  # measured 0.57–0.58 against 0.02–0.04


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
def test_object_mask_is_the_drawn_shape(shape):
    from altdiff_min.toy.data import mask, render
    from altdiff_min.toy.detect import object_mask

    picture = render(shape, "yellow", size=30, center=(20.0, 40.0))
    assert (object_mask(picture) == mask(shape, 30, (20.0, 40.0))).all() and mask(shape, 30, (20.0, 40.0)).sum() > 300
    picture[2, 2] = 0  # a speck: not an object
    assert object_mask(picture).sum() == mask(shape, 30, (20.0, 40.0)).sum()
