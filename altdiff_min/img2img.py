"""Image-to-image and inpainting: start part-way down the route from a picture (SDEdit, Meng et al.
2022), and repaint only a masked region by blending the latents after every step.

    picture ─ prepare_image ─ (1, 3, H, W) in [−1, 1] ─ VAE encoder ─ posterior sample · scaling_factor = z0
    strength s of S steps: only the last int(S·s) steps of the route run (`cut`: diffusers' get_timesteps)
    x_start = z0 noised to the first level of the cut route (schedule.noise_to), the noise drawn
              from the generator after the posterior sample, as diffusers draws both
    inpainting (`Blend`): after each step, the latents outside the mask are set to z0 noised to the
              level that step landed on, and to z0 itself after the last step; inside the mask
              (white = repaint) the sampler's latents stay (and PLMS's warm-up estimate is blended
              too). Any text-to-image model does this: no inpainting-trained UNet is needed
              (diffusers' StableDiffusionInpaintPipeline does the same for 4-channel UNets, and
              at strength 1 starts from pure noise, as here).

Parity with diffusers' AltDiffusionImg2ImgPipeline, and for inpainting with its
StableDiffusionInpaintPipeline: same seed, same picture for every sampler. For
PLMS that means reproducing what diffusers' cut of PNDM's list does (see `cut`): the latents skip a
level after the warm-up step.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .checks import STRENGTH_RANGE, in_strength_range
from .errors import BadType, BadValue, NotFinite
from .schedule import ScheduleConfig, Timesteps, add_noise, noise_to, route
from .vision import eight_bit, rgb_over_white


def default_strength(mask) -> float:
    """diffusers' defaults: 0.8 for image to image (AltDiffusionImg2ImgPipeline), 1.0 for inpainting
    (StableDiffusionInpaintPipeline: the masked region from pure noise)."""
    return 0.8 if mask is None else 1.0


def check_strength(strength, steps: int) -> int:
    """The number of steps strength s runs out of `steps`: int(steps · s), as diffusers counts them."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)):
        raise BadType(f"strength must be a number in {STRENGTH_RANGE}, got {strength!r}")
    if not in_strength_range(strength):
        raise BadValue(f"strength must be in {STRENGTH_RANGE} (0 would run no step), got {strength}")
    run = min(int(steps * strength), steps)
    if run < 1:
        raise BadValue(f"strength {strength} of {steps} steps runs int({steps}·{strength}) = 0 steps: "
                       f"nothing would change the picture (diffusers fails here too); raise strength or steps")
    return run


def cut(ts: Timesteps, steps: int, strength: float, sampler: str = "ddim") -> Timesteps:
    """The last int(steps · strength) steps of the route ts (diffusers' get_timesteps).

    PLMS: diffusers cuts PNDM's list P = [T0, T1, T1, T2, …] (T1 repeated: its warm-up step takes
    two entries) at the same index k. PNDM then runs its warm-up over P[k], P[k+1] and its later
    steps over P[k+2:], so for k ≥ 2 the run starts one timestep higher, T(k−1), the warm-up lands
    on T(k), and the next step is told T(k+1): the latents skip a level. The same route here:
    P[k], then P[k+2:], with the warm-up at P[k+1]."""
    k = steps - check_strength(strength, steps)
    if not route(sampler).warmup or k == 0:
        return ts[k:]
    t, sigmas = ts.t[:2] + ts.t[1:], ts.sigmas[:2] + ts.sigmas[1:]  # PNDM's list, and its levels
    return Timesteps((t[k],) + t[k + 2:], (sigmas[k],) + sigmas[k + 2:], ts.stride, warmup=t[k + 1])


def size_of(image) -> tuple[int, int]:
    """(width, height) of a PIL picture or an image tensor."""
    return image.size if isinstance(image, Image.Image) else (image.shape[-1], image.shape[-2])


def check_picture(image, what: str = "image") -> None:
    """A PIL picture, or a float tensor (3, H, W) / (1, 3, H, W) in [0, 1] (what generate(output="tensor") gives)."""
    if isinstance(image, Image.Image):
        if 0 in image.size:
            raise BadValue(f"{what} is {image.size[0]}×{image.size[1]} pixels: empty")
        return
    if not isinstance(image, torch.Tensor):
        raise BadType(f"{what} must be a PIL image or a float tensor (1, 3, H, W) in [0, 1], got {type(image).__name__}")
    if not image.is_floating_point() or image.ndim not in (3, 4) or image.shape[-3] != 3 or \
            (image.ndim == 4 and image.shape[0] != 1) or 0 in image.shape:
        raise BadValue(f"{what} tensor must be floats (1, 3, H, W) or (3, H, W) in [0, 1], got {image.dtype} {tuple(image.shape)}")
    if not torch.isfinite(image).all():
        raise NotFinite(f"{what} holds NaN or infinite values")
    if image.min() < 0 or image.max() > 1:
        raise BadValue(f"{what} tensor must be in [0, 1], got values in [{image.min():g}, {image.max():g}] "
                       f"(a 0–255 picture: divide it by 255)")


def rounded_size(image, multiple: int) -> tuple[int, int]:
    """The picture's (width, height) rounded down to a multiple of `multiple` (diffusers rounds to 8;
    a model whose UNet halves the latents k times takes multiples of 8·2^k: m9's 64)."""
    w, h = size_of(image)
    size = (w - w % multiple, h - h % multiple)
    if 0 in size:
        raise BadValue(f"the picture is {w}×{h} pixels: this model takes sides that are multiples of {multiple}, "
                       f"and rounding down leaves nothing; give a picture at least {multiple}×{multiple}")
    return size


def prepare_image(image, size: tuple[int, int]) -> torch.Tensor:
    """A picture → (1, 3, height, width) float32 in [−1, 1], as diffusers' VaeImageProcessor.preprocess:
    a PIL picture resized (when its size differs) with PIL's Lanczos filter, then /255; a tensor in
    [0, 1] resized with F.interpolate's default (nearest). Then 2x − 1. Pictures that are not RGB
    are composited over white first (diffusers would pass their other channel counts to the VAE), and
    16-bit ones scaled to 8 bits (vision.eight_bit; PIL's convert would clip them white)."""
    w, h = size
    if isinstance(image, Image.Image):
        image = rgb_over_white(eight_bit(image))
        if image.size != (w, h):
            image = image.resize((w, h), Image.Resampling.LANCZOS)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    else:
        pixels = image.float().cpu().reshape(1, 3, *image.shape[-2:])
        if tuple(pixels.shape[-2:]) != (h, w):
            pixels = F.interpolate(pixels, size=(h, w))
    return 2.0 * pixels - 1.0


def prepare_mask(mask, image, size: tuple[int, int]) -> torch.Tensor:
    """A mask the size of `image` (PIL, any mode; or a float tensor (H, W), (1, H, W) or (1, 1, H, W)
    in [0, 1]) → (1, 1, height, width) of 0 and 1 at the prepared picture's size: 1 (white, ≥ 0.5
    after resizing) = repaint, 0 = keep.

    A PIL mask is read as diffusers' mask processor reads it: resized in its own mode, then its grey
    levels (convert("L")), so an alpha band is ignored: white strokes painted on a layer that is
    transparent black elsewhere repaint the strokes only (composited over white, as pictures are,
    the whole layer would be repainted). 16-bit masks are scaled to 8 bits first (vision.eight_bit)."""
    if isinstance(mask, Image.Image):
        if mask.size != size_of(image):
            raise BadValue(f"the mask is {mask.size[0]}×{mask.size[1]} pixels but the picture is "
                           f"{size_of(image)[0]}×{size_of(image)[1]}: they must be the same size")
        grey = eight_bit(mask)
        if grey.size != size:
            grey = grey.resize(size, Image.Resampling.LANCZOS)
        m = torch.from_numpy(np.asarray(grey.convert("L"), dtype=np.float32) / 255.0)[None, None]
    elif isinstance(mask, torch.Tensor):
        if not mask.is_floating_point() or mask.ndim < 2 or mask.ndim > 4 or mask[..., 0, 0].numel() != 1:
            raise BadValue(f"a mask tensor must be floats (H, W), (1, H, W) or (1, 1, H, W) in [0, 1], "
                           f"got {mask.dtype} {tuple(mask.shape)}")
        if (mask.shape[-1], mask.shape[-2]) != size_of(image):
            raise BadValue(f"the mask is {mask.shape[-1]}×{mask.shape[-2]} pixels but the picture is "
                           f"{size_of(image)[0]}×{size_of(image)[1]}: they must be the same size")
        if not torch.isfinite(mask).all():
            raise NotFinite("the mask holds NaN or infinite values")
        m = mask.float().cpu().reshape(1, 1, *mask.shape[-2:])
        if (m.shape[-1], m.shape[-2]) != size:
            m = F.interpolate(m, size=(size[1], size[0]))
    else:
        raise BadType(f"mask must be a PIL image or a float tensor in [0, 1], got {type(mask).__name__}")
    return (m >= 0.5).float()


class Blend:
    """Inpainting by latent blending, as a sampler callback (samplers.after_step): after step i the
    kept region (mask 0) becomes z0 noised to the level step i landed on, and z0 after the last step;
    the region to repaint (mask 1) keeps the sampler's latents. The noise is the one that noised the
    starting latents, as in diffusers' inpainting pipeline."""

    def __init__(self, sampler: str, z0: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor, ts: Timesteps,
                 cfg: ScheduleConfig):
        self.sampler, self.z0, self.noise, self.ts, self.cfg = sampler, z0, noise, ts, cfg
        self.mask = F.interpolate(mask, size=z0.shape[-2:]).to(z0)  # to the latents' size: nearest, as diffusers

    def __call__(self, i: int, t: float, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        if i + 1 < len(self.ts):
            kept = noise_to(self.sampler, self.z0, self.noise, self.ts.sigmas[i + 1], self.ts.t[i + 1], self.cfg)
        else:
            kept = self.z0
        return self.mask * x + (1 - self.mask) * kept

    def warmup(self, t: float, x: torch.Tensor) -> torch.Tensor:
        """PLMS's Euler estimate at timestep t (samplers.plms' `warmup`), blended as after a step."""
        return self.mask * x + (1 - self.mask) * add_noise(self.z0, self.noise, int(t), self.cfg)
