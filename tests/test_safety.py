"""The safety checker vs diffusers' StableDiffusionSafetyChecker.forward (random weights, concepts
set so that a batch has flagged and unflagged pictures and special-care hits), and replace_flagged."""
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import CHECKER, M9_VISION, PRECISIONS, edit_json, picture, rel_err, small_checker
from PIL import Image

from altdiff_min.errors import BadType, BadValue
from altdiff_min.vision.safety import CONCEPTS, PLACEHOLDER_GREY, SPECIAL_CONCEPTS, SafetyChecker, placeholder, replace_flagged
from altdiff_min.vision.tower import VisionConfig, preprocess
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


# ---- converted from a diffusers folder, loaded with the model, run by generate --------------------------

def test_converted_checker_decides_as_diffusers(checker_model_dir, checker_reference):
    """`convert --with-safety-checker` → `load` builds the checker beside the three modules, and its
    decisions and scores are diffusers' on a batch with flagged and unflagged pictures."""
    from altdiff_min.pipeline import load

    model = load(checker_model_dir)
    assert isinstance(model.safety_checker, SafetyChecker)
    ref = checker_reference
    with torch.no_grad():
        embeds = ref.visual_projection(ref.vision_model(preprocess(pictures(), SMALL_CFG))[1])
        cos = F.normalize(embeds) @ F.normalize(ref.concept_embeds).T
    expected_flags, result, _ = run_reference(ref, preprocess(pictures(), SMALL_CFG))
    flags, scores = model.safety_checker.check(pictures())
    assert flags == expected_flags
    assert np.array_equal(scores["concept"].numpy(), [[r["concept_scores"][k] for k in range(CONCEPTS)] for r in result])
    assert rel_err(scores["concept_cos"], cos) < 1e-5
    assert not load(checker_model_dir, safety_checker=False).safety_checker  # not even loaded


@pytest.fixture
def checked_model(checker_model_dir):
    """The small model with its checker set to flag exactly the pictures the test picks: the threshold
    of concept 0 sits between the cosines of the pictures of seed 0 (n_samples=3)."""
    from altdiff_min.pipeline import load

    model = load(checker_model_dir)
    images = model.generate("un cercle rouge", n_samples=3, steps=2, seed=0, output="tensor", safety_checker=False,
                            progress=False)
    checker = model.safety_checker
    with torch.no_grad():
        cos = F.normalize(checker.image_embeds(preprocess(images, checker.vision.cfg))) @ F.normalize(checker.concept_embeds[:1]).T
        order = cos[:, 0].sort().values
        checker.concept_embeds_weights.fill_(2.0)  # no other concept can be hit: a cosine is ≤ 1
        checker.special_care_embeds_weights.fill_(2.0)
        checker.concept_embeds_weights[0] = (order[0] + order[1]) / 2  # the two larger cosines are hits
    flagged = (cos[:, 0] > (order[0] + order[1]) / 2).tolist()
    assert flagged.count(True) == 2
    return model, images, flagged


def test_generate_replaces_flagged_pictures_and_says_which(checked_model):
    model, clean, flagged = checked_model
    images, flags = model.generate("un cercle rouge", n_samples=3, steps=2, seed=0, output="tensor", return_flags=True,
                                   progress=False)
    assert flags == flagged
    expected = replace_flagged(clean, flagged)
    assert torch.equal(images, expected)
    k = flagged.index(True)
    assert not torch.equal(images[k], clean[k]) and torch.equal(images[flagged.index(False)], clean[flagged.index(False)])
    pil, trajectory, flags = model.generate("un cercle rouge", n_samples=3, steps=2, seed=0, return_trajectory=True,
                                            return_flags=True, progress=False)
    assert flags == flagged and len(trajectory) == 2
    assert np.array_equal(np.asarray(pil[k]), np.asarray(placeholder(*pil[k].size)))
    # Turned off: one argument, and the pictures are the model's.
    off, flags = model.generate("un cercle rouge", n_samples=3, steps=2, seed=0, output="tensor", safety_checker=False,
                                return_flags=True, progress=False)
    assert flags == [False] * 3 and torch.equal(off, clean)


def test_checker_is_optional_and_insisting_on_one_is_an_error(small_model_dir, checked_model, tmp_path):
    from altdiff_min.pipeline import load

    model = load(small_model_dir)
    assert model.safety_checker is None
    images, flags = model.generate("un cercle rouge", n_samples=2, steps=2, seed=0, return_flags=True, progress=False)
    assert flags == [False, False]  # one bool per picture, as with a checker
    with pytest.raises(BadValue, match="holds no safety checker") as e:
        model.generate("un cercle rouge", steps=2, safety_checker=True)
    assert "\n" not in str(e.value)
    with pytest.raises(BadType, match="safety_checker must be None, True or False"):
        model.generate("un cercle rouge", steps=2, safety_checker="yes")
    # save keeps the checker (what `train` writes as its result), load gives it back
    checked, _, _ = checked_model
    checked.save(tmp_path / "saved")
    again = load(tmp_path / "saved")
    assert set(again.safety_checker.state_dict()) == set(checked.safety_checker.state_dict())
    assert all(torch.equal(v, again.safety_checker.state_dict()[k]) for k, v in checked.safety_checker.state_dict().items())


def test_cli_records_flags_and_turns_the_checker_off(checker_model_dir, small_model_dir, tmp_path, capsys):
    import json

    from altdiff_min.apps.cli import main

    common = ["generate", "un cercle rouge", "--model", checker_model_dir, "--steps", "2", "--n-samples", "2", "--skip-grid"]
    assert main([*common, "--outdir", str(tmp_path / "on")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "on" / "manifest.jsonl").read_text().splitlines()]
    assert [r["safety_checker"] for r in rows] == [True, True] and all(isinstance(r["flagged"], bool) for r in rows)
    assert main([*common, "--outdir", str(tmp_path / "off"), "--no-safety-checker"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "off" / "manifest.jsonl").read_text().splitlines()]
    assert [(r["safety_checker"], r["flagged"]) for r in rows] == [(False, None)] * 2
    capsys.readouterr()
    assert main(["generate", "x", "--model", small_model_dir, "--steps", "2", "--safety-checker",
                 "--outdir", str(tmp_path / "none")]) == 2
    assert "holds no safety checker" in capsys.readouterr().err
    assert not (tmp_path / "none" / "samples").exists() or not os.listdir(tmp_path / "none" / "samples")


def test_conversion_without_the_flag_ignores_the_checker(checker_layout, tmp_path, capsys):
    from altdiff_min.apps.cli import main
    from altdiff_min.storage.folder import read_config

    assert main(["convert", checker_layout, str(tmp_path / "m")]) == 0
    assert "not converted: " in (out := capsys.readouterr().out) and "(pass --with-safety-checker)" in out
    assert read_config(tmp_path / "m")["modules"] == ["text_encoder", "unet", "vae"]


@pytest.mark.parametrize("breakage,message", [
    ("no-checker", "missing safety_checker/config.json; convert without --with-safety-checker"),
    ("gelu", "safety_checker/config.json: vision tower uses hidden_act='gelu'"),
    ("crop", "preprocessor_config.json: crop_size is (32, 32)"),
    ("mean", "preprocessor_config.json: image_mean is [0.5, 0.5, 0.5]"),
    ("missing-tensor", "missing tensors (nothing in the source fills them) (1):\n    special_care_embeds_weights"),
    ("extra-tensor", "unexpected tensors"),
    ("wrong-shape", "concept_embeds: (17, 8), but concept_embeds is (17, 16)"),
])
def test_bad_checker_fails_clearly_and_writes_nothing(checker_layout, tmp_path, breakage, message):
    import shutil

    from weights_convert.convert import convert
    from weights_convert.rules import ConversionError

    root = tmp_path / "src"
    shutil.copytree(checker_layout, root)
    weights = root / "safety_checker" / "pytorch_model.bin"
    if breakage == "no-checker":
        shutil.rmtree(root / "safety_checker")
    elif breakage == "gelu":
        edit_json(root / "safety_checker" / "config.json", vision_config__hidden_act="gelu")
    elif breakage == "crop":
        edit_json(root / "feature_extractor" / "preprocessor_config.json", crop_size=32)
    elif breakage == "mean":
        edit_json(root / "feature_extractor" / "preprocessor_config.json", image_mean=[0.5, 0.5, 0.5])
    else:
        state = torch.load(weights, weights_only=True)
        if breakage == "missing-tensor":
            del state["special_care_embeds_weights"]
        elif breakage == "extra-tensor":
            state["concept_embeds_2"] = torch.zeros(3)
        else:
            state["concept_embeds"] = state["concept_embeds"][:, :8]
        torch.save(state, weights)
    with pytest.raises(ConversionError) as e:
        convert(str(root), tmp_path / "out", safety_checker=True)
    assert message in str(e.value)
    assert not (tmp_path / "out").exists()


def test_checker_configs_in_every_form_transformers_reads():
    """The hub's checker config is CompVis's: a full vision_config and, from older transformers, a
    vision_config_dict of five keys that wins (the rest then take CLIPVisionConfig's defaults, as
    transformers does). Keys left out take CLIPVisionConfig's defaults; projection_dim CLIPConfig's 512."""
    from transformers import CLIPConfig

    vit_l = {k: M9_VISION[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                                        "patch_size")}
    compvis = {"projection_dim": 768, "vision_config": {**M9_VISION, "image_size": 336}, "vision_config_dict": vit_l}
    ours = safety_config_from_hf(compvis)
    theirs = CLIPConfig(**compvis).vision_config
    assert ours == VisionConfig()  # ViT-L/14 at 224: vision_config_dict left image_size to the default
    assert (theirs.hidden_size, theirs.image_size, theirs.patch_size) == (ours.hidden, ours.image_size, ours.patch)
    defaults = CLIPConfig()
    assert safety_config_from_hf({}) == VisionConfig(hidden=768, layers=12, heads=12, mlp=3072, patch=32, project_dim=512)
    assert safety_config_from_hf({}) == safety_config_from_hf({"vision_config": defaults.vision_config.to_dict(),
                                                               "projection_dim": defaults.projection_dim})


def test_full_checker_key_sets_on_meta():
    """m9's checker (ViT-L/14, 768-wide concepts) as diffusers builds it, on the meta device: every
    tensor converts, both with the hub's names and with the names transformers 5 loads."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    with torch.device("meta"):
        ref = StableDiffusionSafetyChecker(CLIPConfig(vision_config=M9_VISION, projection_dim=768))
    state = ref.state_dict()
    hub = {(f"vision_model.{k}" if k.startswith("vision_model.") else k): v for k, v in state.items()}
    for source in (state, hub):
        ours, report = load(source, VisionConfig())
        assert report.converted == len(ours.state_dict()) == len(state)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("device,dtype,tol", PRECISIONS)
def test_checker_embeddings_in_every_precision(device, dtype, tol):
    """The checker's image embeddings (what every cosine and decision comes from) on each device and
    dtype against diffusers' in fp32 on the CPU."""
    ref = reference_checker()
    ours, _ = load(ref.state_dict(), SMALL_CFG)
    ours = ours.to(device, dtype)
    pixels = preprocess(pictures(), SMALL_CFG)
    with torch.no_grad():
        expected = ref.visual_projection(ref.vision_model(pixels)[1])
        got = ours.image_embeds(pixels.to(device, dtype))
    assert got.dtype == dtype
    assert rel_err(got.float(), expected) < tol
    flags, scores = ours.check(pictures())  # runs in the model's dtype, decides in float32 on the CPU
    assert len(flags) == len(pictures()) and scores["concept"].dtype == torch.float32
