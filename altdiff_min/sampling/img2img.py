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

import torch
import torch.nn.functional as F

from ..checks import STRENGTH_RANGE, in_strength_range
from ..errors import BadType, BadValue
from .schedule import ScheduleConfig, Timesteps, add_noise, noise_to, route


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
