"""Image to image against diffusers' AltDiffusionImg2ImgPipeline (the same random AltDiffusion), and
inpainting by latent blending, tested by what it must do."""
import numpy as np
import pytest
import torch
from helpers import diffusers_pipeline, picture, rel_diff, rel_err
from PIL import Image

from altdiff_min.arguments import check_picture_arguments
from altdiff_min.errors import BadType, BadValue
from altdiff_min.pipeline import load

PROMPT, NEGATIVE = "一只戴着帽子的小狗", "模糊"
# 100×70 rounds down to 96×64 both in diffusers (multiples of 8) and here (the small model takes
# multiples of 32): a non-square picture that is resized, with latents 8×12.
INIT = picture("RGB", 100, 70, seed=3)


@pytest.fixture(scope="module")
def ours(small_model_dir):
    return load(small_model_dir)


def img2img_parity(ours, hub_layout, reference, sampler, steps, strength, image=INIT, eta=0.0):
    pipe = diffusers_pipeline(hub_layout, reference, sampler, img2img=True)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        expected = pipe(PROMPT, image=image, strength=strength, negative_prompt=NEGATIVE, num_images_per_prompt=2,
                        num_inference_steps=steps, guidance_scale=7.5, eta=eta, output_type="pt",
                        generator=torch.Generator("cpu").manual_seed(7)).images
    got = ours.generate(PROMPT, image=image, strength=strength, negative_prompt=NEGATIVE, n_samples=2, steps=steps,
                        sampler=sampler, eta=eta, seed=7, output="tensor", progress=False)
    assert got.shape == expected.shape == (2, 3, 64, 96)
    assert rel_err(got, expected) < 1e-4
    assert (got[0] - got[1]).abs().mean() > 1e-3  # two different samples
    return got


@pytest.mark.parametrize("sampler,steps,strength,eta", [
    ("ddim", 10, 0.6, 0.0), ("ddim", 8, 0.75, 1.0), ("dpm++2m", 9, 0.5, 0.0), ("dpm++2m-karras", 9, 0.7, 0.0),
    ("euler", 8, 0.6, 0.0), ("euler_a", 8, 0.8, 0.0),
    # PLMS: cut well inside the route, cut at its second step, and one step left (a warm-up alone)
    ("plms", 10, 0.6, 0.0), ("plms", 8, 0.875, 0.0), ("plms", 8, 0.125, 0.0),
], ids=["ddim", "ddim-eta1", "dpm++2m", "dpm++2m-karras", "euler", "euler_a", "plms", "plms-cut-1", "plms-1-step"])
def test_same_seed_same_picture_as_diffusers(ours, hub_layout, reference, sampler, steps, strength, eta):
    """Each sampler part-way down its route: the posterior sample and the noise drawn in diffusers'
    order, the picture noised as that scheduler's add_noise, the cut route run (PLMS's as diffusers
    cuts PNDM's list: img2img.cut)."""
    img2img_parity(ours, hub_layout, reference, sampler, steps, strength, eta=eta)


@pytest.mark.parametrize("sampler", ["ddim", "plms", "dpm++2m", "euler_a"])
def test_strength_one_runs_the_whole_route_as_diffusers(ours, hub_layout, reference, sampler):
    """strength 1: every step runs, from the picture noised to the first level (not pure noise)."""
    img2img_parity(ours, hub_layout, reference, sampler, 6, 1.0)


def test_tensor_pictures_as_diffusers(ours, hub_layout, reference):
    """A (1, 3, H, W) tensor in [0, 1] (what generate(output="tensor") gives) is taken as diffusers
    takes it; its size (a multiple already) is kept."""
    tensor = torch.from_numpy(np.asarray(INIT.resize((96, 64)), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    img2img_parity(ours, hub_layout, reference, "ddim", 8, 0.5, image=tensor)


def test_low_strength_keeps_the_picture(ours):
    """Fewer steps from less noise: the result is nearer the picture as strength falls."""
    target = torch.from_numpy(np.asarray(INIT.resize((96, 64), Image.Resampling.LANCZOS), dtype=np.float32) / 255)
    target = target.permute(2, 0, 1)[None]
    errors = [rel_diff(ours.generate("x", image=INIT, strength=s, steps=10, seed=0, output="tensor", progress=False),
                       target) for s in (0.1, 0.5, 1.0)]
    assert errors[0] < errors[1] < errors[2]


def test_strength_edge_cases_are_clear_errors(ours, hub_layout, reference):
    """diffusers fails on a strength that runs no step (its route is empty); here it is a clear error."""
    pipe = diffusers_pipeline(hub_layout, reference, "ddim", img2img=True)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(Exception):
        pipe("x", image=INIT, strength=0.0, num_inference_steps=4, output_type="pt")
    for strength, steps, match in ((0.0, 10, r"must be in \(0, 1\]"), (0.09, 10, "runs int")):
        with pytest.raises(BadValue, match=match) as e:
            ours.generate("x", image=INIT, strength=strength, steps=steps, progress=False)
        assert "\n" not in str(e.value)


def mask_left(w=100, h=70, fraction=0.5) -> Image.Image:
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[:, : int(w * fraction)] = 255  # white: repaint the left part
    return Image.fromarray(mask)


def test_inpainting_repaints_the_mask_and_keeps_the_rest():
    """With the one-object toy (a trained VAE, so its round trip is faithful), 128×96, the left quarter
    repainted: the kept latents end exactly at the picture's; the kept pixels away from the
    boundary (the decoder mixes neighbours) stay within the VAE's round-trip error; the repainted
    ones change; with paste_unmasked the kept pixels are the picture's exactly. Not the scene toy:
    its decoder's mid-block attention carries the repainted quarter's change across the whole
    picture (its far pixels measured at 1–10× its round trip's error), so only its latents are kept."""
    from altdiff_min.storage import pictures

    toy = load("toy-one")
    init = toy.generate("un cercle rouge", steps=10, seed=3, width=128, height=96, progress=False)[0]
    pixels = torch.from_numpy(np.asarray(init, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        mean, _ = toy.vae.encode(pixels * 2 - 1)
        round_trip = (toy.vae.decode(mean).clamp(-1, 1) + 1) / 2
        z0 = toy.encode_image(pictures.prepare_image(init, (128, 96)), torch.Generator().manual_seed(0))
    columns = {"repainted": slice(0, 32), "kept": slice(32, 128), "far": slice(64, 128)}

    def error(images, part, reference=pixels):
        return (images[..., columns[part]] - reference[..., columns[part]]).abs().mean().item()

    for prompt in ("un carré bleu", "一个绿色的三角形"):
        got, trajectory = toy.generate(prompt, image=init, mask=mask_left(128, 96, 0.25), strength=1.0, steps=10,
                                       seed=0, output="tensor", return_trajectory=True, progress=False)
        assert torch.equal(trajectory[-1]["latents"][..., 4:], z0.expand(1, -1, -1, -1)[..., 4:])  # latent columns ≥ 32 px / 8
        assert error(got, "far") < 1.25 * error(round_trip, "far")
        assert error(got, "repainted") > 20 * error(round_trip, "repainted")  # 33× and 172× measured (from pure noise)
    pasted = toy.generate(prompt, image=init, mask=mask_left(128, 96, 0.25), strength=1.0, steps=10, seed=0,
                          output="tensor", paste_unmasked=True, progress=False)
    assert error(pasted, "kept") < 1e-6
    assert torch.equal(pasted[..., columns["repainted"]], got[..., columns["repainted"]])


@pytest.mark.parametrize("sampler,steps,strength,eta", [
    ("ddim", 8, 0.6, 0.0), ("ddim", 8, 1.0, 0.0), ("ddim", 6, 0.75, 1.0), ("dpm++2m", 9, 0.5, 0.0),
    ("dpm++2m-karras", 8, 1.0, 0.0), ("euler", 8, 0.6, 0.0), ("euler", 6, 1.0, 0.0), ("euler_a", 8, 0.8, 0.0),
    # PLMS: its warm-up's Euler estimate is blended too; the whole route, cut inside it, cut at its second step
    ("plms", 8, 1.0, 0.0), ("plms", 10, 0.6, 0.0), ("plms", 8, 0.875, 0.0),
], ids=["ddim", "ddim-strength1", "ddim-eta1", "dpm++2m", "dpm++2m-karras-strength1", "euler", "euler-strength1",
        "euler_a", "plms-strength1", "plms", "plms-cut-1"])
def test_inpainting_same_seed_same_picture_as_diffusers(ours, hub_layout, reference, sampler, steps, strength, eta):
    """diffusers' StableDiffusionInpaintPipeline with a 4-channel UNet blends as we do: after each step the
    kept latents are the picture's noised to the next timestep; at strength 1 it starts from pure noise."""
    pipe = diffusers_pipeline(hub_layout, reference, sampler, inpaint=True)
    pipe.set_progress_bar_config(disable=True)
    mask = mask_left(fraction=0.4)
    with torch.no_grad():
        expected = pipe(PROMPT, image=INIT, mask_image=mask, height=64, width=96, strength=strength,
                        negative_prompt=NEGATIVE, num_images_per_prompt=2, num_inference_steps=steps, guidance_scale=7.5,
                        eta=eta, output_type="pt", generator=torch.Generator("cpu").manual_seed(5)).images
    got = ours.generate(PROMPT, image=INIT, mask=mask, strength=strength, negative_prompt=NEGATIVE, n_samples=2,
                        steps=steps, sampler=sampler, eta=eta, seed=5, output="tensor", progress=False)
    assert got.shape == expected.shape == (2, 3, 64, 96)
    assert rel_err(got, expected) < 1e-4
    assert (got[0] - got[1]).abs().mean() > 1e-3  # two different samples


def test_inpainting_with_a_tensor_mask_equals_the_picture_mask(ours):
    mask = torch.from_numpy(np.asarray(mask_left(), dtype=np.float32) / 255)
    a = ours.generate("x", image=INIT, mask=mask_left(), steps=4, seed=1, output="tensor", progress=False)
    b = ours.generate("x", image=INIT, mask=mask, steps=4, seed=1, output="tensor", progress=False)
    assert torch.equal(a, b)


def masks_in_every_mode():
    """The same left-quarter mask as PIL modes a user may hand over; RGBA/LA/P: white strokes on a
    layer that is transparent black elsewhere (what painting programs and Gradio's editor export)."""
    grey = mask_left(fraction=0.25)
    layer = Image.merge("RGBA", [grey] * 4)  # alpha = the strokes
    palette = grey.convert("P")
    palette.info["transparency"] = 0
    return {"L": grey, "1": grey.convert("1"), "RGB": grey.convert("RGB"), "RGBA": layer,
            "LA": layer.convert("LA"), "P": palette}


@pytest.mark.parametrize("mode", ["L", "1", "RGB", "RGBA", "LA", "P"])
def test_masks_of_every_mode_read_as_diffusers_reads_them(mode):
    """diffusers' inpainting mask processor (convert("L"), binarised at 0.5): alpha is ignored, so a
    transparent background is kept, not repainted."""
    from diffusers.image_processor import VaeImageProcessor

    from altdiff_min.storage.pictures import prepare_mask

    mask = masks_in_every_mode()[mode]
    processor = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    expected = processor.preprocess(mask, height=64, width=96)
    got = prepare_mask(mask, INIT, (96, 64))
    assert torch.equal(got, expected) and 0.2 < got.mean() < 0.3


def test_sixteen_bit_pictures_and_masks_are_scaled_not_clipped():
    """PIL's convert clips 16-bit levels at 255 (a picture all white, a dark mask all "repaint"):
    they are scaled to 8 bits, as the command line's reader does."""
    from altdiff_min.storage.pictures import prepare_image, prepare_mask

    grey = INIT.convert("L")
    deep = Image.fromarray(np.asarray(grey, dtype=np.uint16) * 257)  # the same levels in 16 bits
    assert deep.mode.startswith("I")
    assert torch.equal(prepare_image(deep, (96, 64)), prepare_image(grey, (96, 64)))
    dark = Image.fromarray(np.full((70, 100), 40 * 257, dtype=np.uint16))
    assert prepare_mask(dark, INIT, (96, 64)).sum() == 0  # 40 of 255: keep everything
    assert torch.equal(prepare_mask(Image.fromarray(np.asarray(mask_left(), dtype=np.uint16) * 257), INIT, (96, 64)),
                       prepare_mask(mask_left(), INIT, (96, 64)))


def test_the_command_lines_mask_reader_is_generates(tmp_path):
    from altdiff_min.storage.pictures import prepare_mask
    from altdiff_min.storage.pictures import read_picture_argument as read_picture

    for mode, mask in masks_in_every_mode().items():
        mask.save(tmp_path / f"{mode}.png")
        read = read_picture(str(tmp_path / f"{mode}.png"), "--mask", mask=True)
        assert torch.equal(prepare_mask(read, INIT, (96, 64)), prepare_mask(mask, INIT, (96, 64))), mode


def test_inpainting_defaults_to_strength_one_as_diffusers(ours):
    a = ours.generate("x", image=INIT, mask=mask_left(), steps=4, seed=1, output="tensor", progress=False)
    b = ours.generate("x", image=INIT, mask=mask_left(), strength=1.0, steps=4, seed=1, output="tensor", progress=False)
    c = ours.generate("x", image=INIT, strength=0.8, steps=5, seed=1, output="tensor", progress=False)
    d = ours.generate("x", image=INIT, steps=5, seed=1, output="tensor", progress=False)
    assert torch.equal(a, b) and torch.equal(c, d)


@pytest.mark.parametrize("given,size", [(dict(height=64), (64, 96)), (dict(width=64), (64, 64)),
                                        (dict(height=128, width=32), (128, 32)), ({}, (64, 96))])
def test_a_side_not_given_is_the_pictures_rounded_down(ours, given, size):
    """100×70 with only one side given: the other is 96 or 64, as diffusers rounds it (to 8)."""
    assert check_picture_arguments(ours.shape, INIT, None, None, False, None, given.get("height"), given.get("width")) == size


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(image="photo.png"), BadType, "image must be a PIL image or a float tensor"),
    (dict(image=torch.zeros(1, 4, 64, 64)), BadValue, "image tensor must be floats"),
    (dict(image=INIT, mask=Image.new("L", (64, 64))), BadValue, "the mask is 64×64 pixels but the picture is 100×70"),
    (dict(image=INIT, strength=1.5), BadValue, "strength must be in \\(0, 1\\]"),
    (dict(image=INIT, strength=0), BadValue, "strength must be in \\(0, 1\\] \\(0 would run no step\\), got 0"),
    (dict(image=INIT, strength="0.5"), BadType, "strength must be a number"),
    (dict(image=Image.new("RGB", (20, 90))), BadValue, "rounding down leaves nothing"),
    (dict(image=INIT, height=50), BadValue, "multiples of 32"),
    (dict(mask=Image.new("L", (64, 64))), BadValue, "mask needs an image"),
    (dict(strength=0.5), BadValue, "strength needs an image"),
    (dict(image=INIT, paste_unmasked=True), BadValue, "give a mask"),
    (dict(image=INIT, latents=torch.zeros(1, 4, 8, 12)), BadValue, "give image or latents"),
])
def test_bad_picture_arguments_fail_before_any_model_work(ours, monkeypatch, kwargs, error, match):
    monkeypatch.setattr(ours.text_encoder, "forward", lambda *a: pytest.fail("the model ran"))
    monkeypatch.setattr(ours.vae, "encode", lambda *a: pytest.fail("the VAE ran"))
    with pytest.raises(error, match=match) as e:
        ours.generate("a dog", steps=4, progress=False, **kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("strength", [0, 0.0, -0.1, 1.01, float("nan")])
def test_strength_help_and_errors_say_one_range_and_the_check_keeps_it(strength, capsys):
    """(0, 1]: strength 0 runs no step. --help, the type error and the value error all say so."""
    from altdiff_min.apps.cli import main
    from altdiff_min.sampling.img2img import check_strength

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "how much of the route runs, (0, 1];" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(BadValue, match=r"^strength must be in \(0, 1\] "):
        check_strength(strength, 1000)
    with pytest.raises(BadType, match=r"^strength must be a number in \(0, 1\], "):
        check_strength("1", 1000)
    assert check_strength(1, 1000) == 1000 and check_strength(0.001, 1000) == 1
