"""Single-file checkpoints in the original latent-diffusion layout: FlagAI's `model.ckpt` and the
web UIs' `Alt-Diffusion-M9.safetensors`.

One file holds everything under four prefixes: `model.diffusion_model.` (the UNet, CompVis names),
`first_stage_model.` (the VAE), `cond_stage_model.` (XLM-R under `roberta.`, with transformers'
names, and the `transformation` head), plus the noise schedule and maybe EMA copies. Such files
carry no configs: the module configs default to m9's.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

from altdiff_min.model.text_encoder import TextEncoder, TextEncoderConfig
from altdiff_min.model.unet import UNet, UNetConfig
from altdiff_min.model.vae import VAE, VAEConfig
from altdiff_min.sampling.schedule import ScheduleConfig, alphas_cumprod, betas

from . import text_encoder, unet
from .rules import ConversionError, Drop, Report, Rule, load_model

PREFIXES = {"text_encoder": "cond_stage_model.", "unet": "model.diffusion_model.", "vae": "first_stage_model."}
DEFAULT_CONFIGS = {"text_encoder": TextEncoderConfig(), "unet": UNetConfig(), "vae": VAEConfig()}

DROPS: list[Drop] = [
    (r"^(betas|alphas_cumprod(_prev)?|sqrt_(one_minus_)?alphas_cumprod|log_one_minus_alphas_cumprod|"
     r"sqrt_recip(m1)?_alphas_cumprod|posterior_\w+|logvar|lvlb_weights)$",
     "noise-schedule buffers: the schedule is recomputed from its config"),
    (r"^model_ema\.", "EMA copies of the UNet: the main weights are converted (as diffusers does by default)"),
    (r"^first_stage_model\.loss\.", "the VAE's training loss (LPIPS and discriminator)"),
]

# ---- UNet: CompVis numbers blocks in one flat list per path; where each sits depends on the config.
# Inside a resnet (anchored on it: read backwards by export, a transformer block's norm1/norm2 must stay).
RES = r"(res\.\d+|mid_res[12])\."
RES_INSIDE: list[Rule] = [(RES + theirs, rf"\1.{ours}.") for theirs, ours in [
    (r"in_layers\.0\.", "norm1"), (r"in_layers\.2\.", "conv1"), (r"emb_layers\.1\.", "time_proj"),
    (r"out_layers\.0\.", "norm2"), (r"out_layers\.3\.", "conv2"), (r"skip_connection\.", "shortcut")]]


def unet_rules(cfg: UNetConfig) -> list[Rule]:
    """input_blocks.0 is conv_in; then per level `layers` blocks of [res, attention?] and a downsampler.
    output_blocks: per level `layers`+1 blocks of [res, attention?], the last with the upsampler after them."""
    levels, per = len(cfg.channels), cfg.layers + 1
    places: list[Rule] = [(r"^time_embed\.", "time_mlp."), (r"^input_blocks\.0\.0\.", "conv_in."),
                          (r"^middle_block\.0\.", "mid_res1."), (r"^middle_block\.1\.", "mid_attn."),
                          (r"^middle_block\.2\.", "mid_res2."), (r"^out\.0\.", "norm_out."), (r"^out\.2\.", "conv_out.")]
    for i in range(levels):
        for j in range(cfg.layers):
            k = 1 + i * per + j
            places += [(rf"^input_blocks\.{k}\.0\.", f"down.{i}.res.{j}."), (rf"^input_blocks\.{k}\.1\.", f"down.{i}.attn.{j}.")]
        if i < levels - 1:
            places.append((rf"^input_blocks\.{(i + 1) * per}\.0\.op\.", f"down.{i}.downsample.conv."))
        has_attn = cfg.attention[levels - 1 - i]
        if i < levels - 1:
            places.append((rf"^output_blocks\.{i * per + cfg.layers}\.{2 if has_attn else 1}\.conv\.", f"up.{i}.upsample.conv."))
        for j in range(per):
            places.append((rf"^output_blocks\.{i * per + j}\.0\.", f"up.{i}.res.{j}."))
            if has_attn:
                places.append((rf"^output_blocks\.{i * per + j}\.1\.", f"up.{i}.attn.{j}."))
    return places + RES_INSIDE + unet.TRANSFORMER_INSIDE


# ---- VAE: ldm's decoder numbers its levels from the finest (up.0), ours in the order they run.
def vae_rules(cfg: VAEConfig) -> list[Rule]:
    levels = len(cfg.channels)
    # Reversed through a name no rule reads (up_N), so that no level is renamed twice, in either direction.
    places: list[Rule] = [(rf"^decoder\.up\.{i}\.", f"decoder.up_{levels - 1 - i}.") for i in range(levels)]
    places += [(r"^decoder\.up_(\d+)\.", r"decoder.up.\1."),
               (r"\.block\.(\d+)\.", r".res.\1."), (r"\.mid\.block_1\.", ".mid.res1."),
               (r"\.mid\.block_2\.", ".mid.res2."), (r"\.mid\.attn_1\.", ".mid.attn.")]
    return places + [(r"\.nin_shortcut\.", ".shortcut."), (r"\.attn\.proj_out\.", ".attn.out.")]


# Parity: ldm keeps the VAE's attention projections as 1×1 convs (C, C, 1, 1): the same numbers as a Linear.
ATTN_CONV = re.compile(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def as_linear(name: str, t: torch.Tensor) -> torch.Tensor:
    return t[:, :, 0, 0] if ATTN_CONV.search(name) and t.ndim == 4 else t


def as_conv(name: str, t: torch.Tensor) -> torch.Tensor:
    """as_linear backwards, for export: the (C, C) weight as ldm's 1×1 conv."""
    return t[:, :, None, None] if ATTN_CONV.search(name) and t.ndim == 2 else t


def check_schedule(state_dict: Mapping[str, torch.Tensor], cfg: ScheduleConfig) -> None:
    """The noise schedule the file keeps (ldm's `betas` and `alphas_cumprod` buffers) must be the one it
    will be sampled with, `cfg` (m9's unless configured): these files carry no schedule config."""
    for key, ours in (("betas", betas(cfg, torch.float64)), ("alphas_cumprod", alphas_cumprod(cfg, torch.float64))):
        if key not in state_dict:
            continue
        theirs = state_dict[key]
        if not isinstance(theirs, torch.Tensor) or tuple(theirs.shape) != tuple(ours.shape):
            got = tuple(theirs.shape) if isinstance(theirs, torch.Tensor) else type(theirs).__name__
            raise ConversionError(f"the checkpoint's noise schedule has {key} of shape {got}, not the "
                                  f"({cfg.num_train_timesteps},) of the schedule it would be sampled with")
        diff = ((theirs.double() - ours).norm() / ours.norm()).item()
        if not diff < 1e-5:  # FlagAI stores its float64 schedule as float32: ~1e-7
            raise ConversionError(
                f"the checkpoint's noise schedule is not the one it would be sampled with: its {key} differs "
                f"from scaled_linear β {cfg.beta_start}–{cfg.beta_end} over {cfg.num_train_timesteps} steps "
                f"by {diff:.2g} (relative); altdiff-min reads only that schedule from a single file")


def split(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], Report]:
    """The tensors of each module (prefix removed), and a report of the file-level tensors dropped."""
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in PREFIXES}
    report, unknown = Report(), []
    for key, t in state_dict.items():
        name = next((n for n, p in PREFIXES.items() if key.startswith(p)), None)
        reason = next((why for pattern, why in DROPS if re.search(pattern, key)), None)
        if reason is not None:
            report.dropped[reason] += 1
        elif name is not None:
            parts[name][key[len(PREFIXES[name]):]] = t
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(f"not an AltDiffusion checkpoint in the ldm layout: {len(unknown)} tensors outside "
                              f"{sorted(PREFIXES.values())}, e.g. {unknown[:5]}")
    if empty := [PREFIXES[n] for n, p in parts.items() if not p]:
        raise ConversionError(f"not an AltDiffusion checkpoint in the ldm layout: no tensors under {empty}")
    return parts, report


TEXT_DROPS: list[Drop] = [(r"^pre_LN\.", "pre_LN: present in m9 files, used only by m18's path")]


def load(name: str, tensors: Mapping[str, torch.Tensor], cfg) -> tuple[torch.nn.Module, Report]:
    """One module from its ldm tensors (prefix already removed), loaded strictly."""
    what = f"{name} tensors under {PREFIXES[name]}"
    if name == "text_encoder":
        drops = text_encoder.DROPS + ([] if cfg.pre_transformation else TEXT_DROPS)
        return load_model(lambda: TextEncoder(cfg), tensors, text_encoder.RULES, drops, what)
    if name == "unet":
        return load_model(lambda: UNet(cfg), tensors, unet_rules(cfg), [], what)
    tensors = {k: as_linear(k, t) for k, t in tensors.items()}
    return load_model(lambda: VAE(cfg), tensors, vae_rules(cfg), [], what)
