"""The safety checker vs diffusers' StableDiffusionSafetyChecker.forward (random weights, concepts
set so that a batch has flagged and unflagged pictures and special-care hits), and replace_flagged."""
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import CHECKER, M9_VISION, picture, rel_err, small_checker
from PIL import Image

from altdiff_min.errors import BadType, BadValue
from altdiff_min.safety import CONCEPTS, PLACEHOLDER_GREY, SPECIAL_CONCEPTS, SafetyChecker, placeholder, replace_flagged
from altdiff_min.vision import VisionConfig, preprocess
from weights_convert.rules import rename
from weights_convert.vision import DROPS as VISION_DROPS
from weights_convert.vision import SAFETY_RULES as RULES
from weights_convert.vision import config_from_hf
from weights_convert.vision import load_safety_checker as load
from weights_convert.vision import safety_config_from_hf

SMALL_CFG = safety_config_from_hf(CHECKER)  # the small tower, projecting to 16



def pictures() -> list[Image.Image]:
    """The batch, four pictures unlike each other (under the random tower, cosines ≤ 0.93): 0 will be
    flagged outright, 1 only thanks to the special-care adjustment, 2 has a special-care hit but stays
    unflagged, 3 has nothing."""
    noise = np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return [picture("RGB", 96, 80), picture("RGBA", 70, 90, seed=1).transpose(Image.Transpose.ROTATE_180),
            Image.fromarray(noise), Image.new("RGB", (120, 64), (20, 200, 90))]


def reference_checker():
    return small_checker()




def run_reference(ref, pixels):
    """diffusers' forward, and the per-picture `result` dicts it builds and keeps to itself (read from
    its frame as it returns)."""
    code = type(ref).forward.__wrapped__.__code__  # under @torch.no_grad()
    seen = {}

    def profile(frame, event, arg):
        if event == "return" and frame.f_code is code:
            seen["result"] = frame.f_locals["result"]

    images = torch.ones(len(pixels), 3, 8, 8)
    sys.setprofile(profile)
    try:
        out_images, flags = ref(clip_input=pixels, images=images)
    finally:
        sys.setprofile(None)
    return flags, seen["result"], out_images


def with_concepts(ref, pixels):
    """Set ref's concepts and thresholds from its own embeddings of the pictures (see `pictures`)."""
    with torch.no_grad():
        e = F.normalize(ref.visual_projection(ref.vision_model(pixels)[1]))
        g = torch.Generator().manual_seed(1)
        concepts = F.normalize(torch.randn(CONCEPTS, SMALL_CFG.project_dim, generator=g))
        concepts[0], concepts[5] = e[0], e[1]
        special = F.normalize(torch.randn(SPECIAL_CONCEPTS, SMALL_CFG.project_dim, generator=g))
        special[0], special[2] = e[1], e[2]
        # Random concepts: 0.02 above every picture's cosine (the 0.01 adjustment cannot reach them).
        t = (e @ concepts.t()).max(dim=0).values + 0.02
        t[0] = 0.995  # picture 0: cos 1 → score 0.005
        t[5] = 1.005  # picture 1: cos 1 → −0.005, + 0.01 after its special-care hit → 0.005
        s = (e @ special.t()).max(dim=0).values + 0.02
        s[0] = s[2] = 0.99
        ref.concept_embeds.copy_(concepts)
        ref.special_care_embeds.copy_(special)
        ref.concept_embeds_weights.copy_(t)
        ref.special_care_embeds_weights.copy_(s)
        cos = e @ concepts.t()
        assert (cos[1:, 0] < 0.975).all() and (cos[[0, 2, 3], 5] < 0.98).all(), "pictures too alike for the test"
    return ref


def test_matches_diffusers_forward():
    ref = reference_checker()
    images = pictures()
    cfg = SMALL_CFG
    pixels = preprocess(images, cfg)
    ref = with_concepts(ref, pixels)
    expected_flags, result, out_images = run_reference(ref, pixels)
    ours, report = load(ref.state_dict(), cfg)
    assert report.converted == len(ref.state_dict())

    flags, scores = ours.check(images)
    assert expected_flags == [True, True, False, False], "the concepts did not set up the intended batch"
    assert flags == expected_flags
    assert [r["special_care"] != [] for r in result] == [False, True, True, False]
    assert scores["special_care"].tolist() == [False, True, True, False]
    assert (out_images[:2] == 0).all() and (out_images[2:] == 1).all()
    # Picture 1 is flagged only thanks to the adjustment: its best score is below 0.01.
    assert 0 < scores["concept"][1].max() < 0.01

    # Rounded scores: exactly diffusers' np.float32 values.
    expected_special = np.array([[r["special_scores"][j] for j in range(SPECIAL_CONCEPTS)] for r in result])
    expected_concept = np.array([[r["concept_scores"][k] for k in range(CONCEPTS)] for r in result])
    assert expected_special.dtype == expected_concept.dtype == np.float32
    assert np.array_equal(scores["special"].numpy(), expected_special)
    assert np.array_equal(scores["concept"].numpy(), expected_concept)
    assert [r["bad_concepts"] for r in result] == [torch.nonzero(c > 0).flatten().tolist() for c in scores["concept"]]

    # Cosines, before rounding: diffusers' own steps on its own modules.
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    with torch.no_grad():
        embeds = ref.visual_projection(ref.vision_model(pixels)[1])
        assert rel_err(ours.image_embeds(pixels), embeds) < 1e-5
        assert rel_err(scores["concept_cos"], cosine_distance(embeds, ref.concept_embeds)) < 1e-5
        assert rel_err(scores["special_cos"], cosine_distance(embeds, ref.special_care_embeds)) < 1e-5

    # Tensors in [0, 1] go the pipeline's way (8-bit pictures) and give the same answer for the same pictures.
    as_tensor = torch.stack([torch.from_numpy(np.array(im.convert("RGB").resize((64, 64)))).permute(2, 0, 1)
                             for im in images]).float() / 255
    flags, scores = ours.check(as_tensor)
    expected_flags, result, _ = run_reference(ref, preprocess(as_tensor, cfg))
    assert flags == expected_flags
    assert np.array_equal(scores["concept"].numpy(), [[r["concept_scores"][k] for k in range(CONCEPTS)] for r in result])


def test_hub_layout_converts():
    """The hub's safety_checker files say vision_model.vision_model.… and keep position_ids."""
    ref = reference_checker()
    state = {(f"vision_model.{k}" if k.startswith("vision_model.") else k): v for k, v in ref.state_dict().items()}
    assert "vision_model.vision_model.embeddings.class_embedding" in state
    state["vision_model.vision_model.embeddings.position_ids"] = torch.arange(65)[None]
    ours, report = load(state, SMALL_CFG)
    assert dict(report.dropped) == {VISION_DROPS[0][1]: 1}
    assert rename("visual_projection.weight", RULES) == "visual_projection.weight"
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(ours.image_embeds(pixels), load(ref.state_dict(), ours.vision.cfg)[0].image_embeds(pixels))


def test_conversion_is_strict():
    from weights_convert.rules import ConversionError

    state = dict(reference_checker().state_dict())
    del state["special_care_embeds_weights"]
    state["concept_embeds_extra"] = torch.zeros(1)
    with pytest.raises(ConversionError, match="special_care_embeds_weights"):
        load(state, SMALL_CFG)


def test_fresh_checker_flags_nothing():
    ours = SafetyChecker(SMALL_CFG)
    flags, scores = ours.check(torch.rand(3, 3, 40, 50, generator=torch.Generator().manual_seed(0)))
    assert flags == [False] * 3 and scores["concept"].shape == (3, CONCEPTS) and scores["special"].shape == (3, SPECIAL_CONCEPTS)


def test_replace_flagged_pil():
    images = [picture("RGB", 120, 90, seed=0), picture("RGB", 64, 200, seed=1), picture("RGB", 300, 40, seed=2)]
    out = replace_flagged(images, [True, False, True])
    assert [im.size for im in out] == [im.size for im in images]
    assert out[1] is images[1]
    for i in (0, 2):
        pixels = np.asarray(out[i])
        assert out[i].mode == "RGB" and not np.array_equal(pixels, np.asarray(images[i]))
        assert tuple(pixels[0, 0]) == PLACEHOLDER_GREY  # grey background …
        assert (pixels != PLACEHOLDER_GREY).any()  # … with the words drawn on it
    assert np.array_equal(np.asarray(out[0]), np.asarray(placeholder(120, 90)))


def test_replace_flagged_tensor():
    images = torch.rand(3, 3, 48, 72, generator=torch.Generator().manual_seed(0))
    before = images.clone()
    out = replace_flagged(images, [False, True, False])
    assert torch.equal(images, before)  # the input is untouched
    assert out.shape == images.shape and torch.equal(out[[0, 2]], images[[0, 2]])
    expected = torch.from_numpy(np.array(placeholder(72, 48))).permute(2, 0, 1).float() / 255
    assert torch.equal(out[1], expected)
    assert torch.equal(replace_flagged(images, [False] * 3), images)


@pytest.mark.parametrize("images,flags,error,match", [
    ([Image.new("RGB", (8, 8))], [True, False], BadValue, "2 flags for 1 pictures"),
    (torch.zeros(2, 3, 8, 8), [True], BadValue, "1 flags for 2 pictures"),
    (torch.zeros(2, 8, 8), [True, True], BadValue, "batch, 3, height, width"),
    (np.zeros((1, 8, 8, 3)), [True], BadType, "PIL images or"),
    (Image.new("RGB", (8, 8)), [True], BadType, "PIL images or"),
])
def test_replace_flagged_rejects_bad_input(images, flags, error, match):
    with pytest.raises(error, match=match) as e:
        replace_flagged(images, flags)
    assert "\n" not in str(e.value)


def test_rejects_bad_config():
    with pytest.raises(BadType, match="VisionConfig"):
        SafetyChecker(dict(CHECKER))


@pytest.mark.slow
def test_full_checker_matches_reference():
    """m9's checker size (ViT-L/14, 768-wide concepts) with diffusers' ones-initialised concepts
    replaced by random ones and thresholds: scores equal, cosines within 1e-5."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    torch.manual_seed(0)
    ref = StableDiffusionSafetyChecker(CLIPConfig(vision_config=M9_VISION, projection_dim=768)).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        ref.concept_embeds.copy_(torch.randn(CONCEPTS, 768, generator=g))
        ref.special_care_embeds.copy_(torch.randn(SPECIAL_CONCEPTS, 768, generator=g))
        ref.concept_embeds_weights.uniform_(-0.05, 0.05, generator=g)
        ref.special_care_embeds_weights.uniform_(-0.05, 0.05, generator=g)
    cfg = config_from_hf(M9_VISION)
    assert cfg == VisionConfig()
    ours, _ = load(ref.state_dict(), cfg)
    images = [picture("RGB", 512, 384), picture("RGBA", 300, 500, seed=1)]
    pixels = preprocess(images)
    expected_flags, result, _ = run_reference(ref, pixels)
    flags, scores = ours.check(images)
    assert flags == expected_flags
    expected = np.array([[r["concept_scores"][k] for k in range(CONCEPTS)] for r in result])
    assert np.array_equal(scores["concept"].numpy(), expected)
    with torch.no_grad():
        embeds = ref.visual_projection(ref.vision_model(pixels)[1])
    assert rel_err(ours.image_embeds(pixels), embeds) < 1e-5
