"""CLIP's vision transformer vs transformers' CLIPVisionModel (random weights), and `preprocess` vs
transformers' PIL CLIPImageProcessor (bit for bit)."""
import gc

import numpy as np
import pytest
import torch
from helpers import M9_VISION, SMALL_PRECISIONS, VISION, picture, randomize_, rel_err
from PIL import Image

from altdiff_min.model.attention import attention_backend
from altdiff_min.errors import BadType, BadValue, NotFinite
from altdiff_min.pipeline import to_pil
from altdiff_min.vision.tower import CLIP_MEAN, CLIP_STD, VisionConfig, VisionTransformer, preprocess
from weights_convert.rules import load_model, rename
from weights_convert.vision import DROPS, RULES, config_from_hf

# transformers' CLIPVisionModel layout → altdiff_min.vision.tower.VisionTransformer (the tower alone: the
# converter reads it inside AltCLIP and the safety checker).
def load(state_dict, cfg: VisionConfig):
    return load_model(lambda: VisionTransformer(cfg), state_dict, RULES, DROPS, "vision tower state dict")


SMALL = VISION


def reference_model(randomize: bool = True, **config):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)  # transformers initialises from the global generator
    ref = CLIPVisionModel(CLIPVisionConfig(**config))
    return (randomize_(ref) if randomize else ref).eval()


# (mode, width, height): landscape whose long side 224·305/200 = 341.6 truncates (round would give 342),
# portrait, near-square, smaller than 224 (upscaled), palette with transparency, exactly 224², large.
PICTURES = [("RGB", 305, 200), ("L", 180, 333), ("RGBA", 225, 224), ("RGB", 100, 70), ("P", 257, 400),
            ("RGB", 224, 224), ("RGBA", 640, 479)]


def clip_image_processor():
    """transformers' PIL CLIPImageProcessor. Named explicitly: in transformers 5 `CLIPImageProcessor`
    is the torchvision one (torch's bicubic, not PIL's) and only falls back to this one, with a
    warning, where torchvision is missing."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil()


def test_rules_cover_both_layouts():
    assert rename("vision_model.encoder.layers.11.self_attn.out_proj.bias", RULES) == "layers.11.attn.out.bias"
    assert rename("encoder.layers.0.mlp.fc2.weight", RULES) == "layers.0.fc2.weight"
    assert rename("vision_model.embeddings.class_embedding", RULES) == "class_embedding"
    assert rename("embeddings.position_embedding.weight", RULES) == "position_embedding"


@pytest.mark.parametrize("device,dtype,tol", SMALL_PRECISIONS)
@pytest.mark.parametrize("backend", ["sdpa", "explicit"])
def test_small_config_matches_reference(backend, device, dtype, tol):
    ref = reference_model(**SMALL)
    ours, report = load(ref.state_dict(), config_from_hf(SMALL))
    assert report.converted == len(ours.state_dict()) == len(ref.state_dict()) and not report.dropped
    ref, ours = ref.to(device, dtype), ours.to(device, dtype)
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    with torch.no_grad(), attention_backend(backend):
        expected = ref(pixel_values=pixels)
        hidden, pooled = ours(pixels)
    assert hidden.shape == (3, 1 + 64, 48) and pooled.shape == (3, 48)
    assert rel_err(hidden, expected.last_hidden_state) < tol
    assert rel_err(pooled, expected.pooler_output) < tol


def test_hub_layout_converts():
    """The hub's files (and transformers 4.x) prefix vision_model. and keep the position_ids buffer."""
    ref = reference_model(**SMALL)
    state = {f"vision_model.{k}": v for k, v in ref.state_dict().items()}
    state["vision_model.embeddings.position_ids"] = torch.arange(65)[None]
    ours, report = load(state, config_from_hf(SMALL))
    assert dict(report.dropped) == {DROPS[0][1]: 1}
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(ours(pixels)[1], load(ref.state_dict(), ours.cfg)[0](pixels)[1])


@pytest.mark.slow
def test_full_vit_l14_matches_reference():
    ref = reference_model(randomize=False, **M9_VISION)
    cfg = config_from_hf(M9_VISION)
    assert cfg == VisionConfig()  # our defaults are ViT-L/14's numbers
    ours, _ = load(ref.state_dict(), cfg)  # shares ref's tensors: no second 1.2 GB copy
    pixels = preprocess([picture("RGB", 512, 384), picture("RGBA", 300, 500, seed=1)])
    with torch.no_grad():
        expected = ref(pixel_values=pixels)
        hidden, pooled = ours(pixels)
    expected_hidden, expected_pooled = expected.last_hidden_state, expected.pooler_output
    del ref, ours, expected
    gc.collect()
    assert hidden.shape == (2, 257, 1024) and pooled.shape == (2, 1024)
    assert rel_err(hidden, expected_hidden) < 1e-5
    assert rel_err(pooled, expected_pooled) < 1e-5


def test_preprocess_matches_clip_image_processor():
    processor = clip_image_processor()
    assert (tuple(processor.image_mean), tuple(processor.image_std)) == (CLIP_MEAN, CLIP_STD)
    assert (processor.size.shortest_edge, processor.crop_size.height, processor.crop_size.width) == (224, 224, 224)
    images = [picture(mode, w, h, seed=i) for i, (mode, w, h) in enumerate(PICTURES)]
    expected = processor(images=images, return_tensors="pt").pixel_values
    got = preprocess(images)
    assert got.shape == (len(PICTURES), 3, 224, 224) and got.dtype == torch.float32
    # Tolerance 0: both resize with the same PIL call and do the same float ops in the same order.
    assert rel_err(got, expected) == 0.0 and torch.equal(got, expected)
    assert torch.equal(preprocess(images[0]), got[:1])  # a single picture is a batch of one


def test_preprocess_of_tensors_matches_the_pipeline_route():
    """Float pictures in [0, 1] reach CLIPImageProcessor as diffusers' pipelines send them: rounded to
    uint8 PIL images (VaeImageProcessor.numpy_to_pil), as altdiff_min.pipeline.to_pil does too."""
    from diffusers.image_processor import VaeImageProcessor

    g = torch.Generator().manual_seed(3)
    ramp = torch.linspace(0, 1, 72)[None, None, :, None] * torch.linspace(0.2, 1, 96)[None, None, None, :]
    images = (ramp * torch.rand(2, 3, 1, 1, generator=g) + 0.05 * torch.randn(2, 3, 72, 96, generator=g)).clamp(0, 1)
    expected = clip_image_processor()(VaeImageProcessor.numpy_to_pil(images.permute(0, 2, 3, 1).numpy()),
                                      return_tensors="pt").pixel_values
    got = preprocess(images)
    assert rel_err(got, expected) == 0.0 and torch.equal(got, expected)
    assert torch.equal(got, preprocess(to_pil(images)))


@pytest.mark.parametrize("images,error,match", [
    (np.zeros((64, 64, 3), np.uint8), BadType, "PIL images or"),
    ("picture.png", BadType, "PIL images or"),
    ([], BadValue, "no images"),
    ([Image.new("RGB", (0, 10))], BadValue, "0×10 pixels"),
    (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), BadType, "floats in"),
    (torch.zeros(2, 4, 8, 8), BadValue, r"\(batch, 3, height, width\)"),
    (torch.full((1, 3, 8, 8), 2.0), BadValue, r"\[0, 1\]"),
    (torch.full((1, 3, 8, 8), float("nan")), NotFinite, "NaN"),
])
def test_preprocess_rejects_bad_input(images, error, match):
    with pytest.raises(error, match=match) as e:
        preprocess(images)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("make_input,error,match", [
    (lambda: torch.zeros(2, 1, 64, 64), BadValue, "3 channels"),
    (lambda: torch.zeros(3, 64, 64), BadValue, "3 channels"),
    (lambda: torch.zeros(2, 3, 56, 64), BadValue, "56×64.*64×64"),
    (lambda: torch.zeros(2, 3, 224, 224), BadValue, "224×224.*64×64"),
    (lambda: torch.zeros(2, 3, 64, 64, dtype=torch.long), BadType, "float tensor"),
])
def test_rejects_bad_pixels(make_input, error, match):
    ours = VisionTransformer(config_from_hf(SMALL))
    with pytest.raises(error, match=match) as e:
        ours(make_input())
    assert "\n" not in str(e.value)


def test_config_rejects_what_is_not_implemented():
    with pytest.raises(ValueError, match="hidden_act"):
        config_from_hf({**SMALL, "hidden_act": "gelu"})
