"""The full m9 text encoder, UNet and VAE decoder in bf16 and fp16 on the CPU: no NaN or inf, and no
further from the reference's fp32 output than the reference computing in that dtype (WORSE below), on
inputs at the scales generate gives them.

Weights: the reference's own initialisation (diffusers/transformers) perturbed by randomize_, as in the
parity tests. Inputs as in the pipeline: the text encoder reads real prompts through a trained
sentencepiece tokenizer (padding included); the UNet reads that encoder's fp32 output as its context,
latents of unit variance (the sampler's space) and timesteps across [1, 999]; the VAE decoder reads
unit-variance latents divided by the scaling factor 0.18215. One forward pass per model and dtype, ours
and the reference's, on small latents: fp16 convolutions are slow on the CPU (m9's VAE decoder on 8×8
latents: ~60 s in fp16, 0.15 s in bf16, measured on 2 cores), so the decoder gets 4×6 latents.

Each model is built, run in fp32, bf16 and fp16, and dropped inside one fixture: the tests check the
outputs, and no two of the multi-GB models are held at once."""
import gc
import os

import pytest
import torch
from helpers import M9_TEXT, M9_UNET, M9_VAE, randomize_, rel_diff, rel_err
from prompts import EDGE_PROMPTS, PROMPTS

from altdiff_min.model.tokenizer import Tokenizer
from weights_convert import text_encoder, unet, vae

pytestmark = pytest.mark.slow  # full m9-size models; `make test` runs them

TIMESTEPS = torch.tensor([1, 333, 666, 999])


def outputs(reference: torch.nn.Module, convert, config, run_reference, run_ours) -> dict:
    """{fp32: the reference's output; bf16 and fp16: (ours, the reference's)}, from one set of weights,
    the fp32 ones and each dtype's rounding of them. run_*(model, dtype) → the model's output."""
    fp32 = dict(reference.state_dict())  # the fp32 weights, kept while the reference runs in other dtypes
    with torch.no_grad():
        out = {torch.float32: run_reference(reference, torch.float32)}
        for dtype in (torch.bfloat16, torch.float16):
            weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in fp32.items()}
            reference.load_state_dict(weights, assign=True)  # the reference computes in dtype, as ours
            out[dtype] = run_ours(convert.load(weights, config)[0], dtype), run_reference(reference, dtype)
            reference.load_state_dict(fp32, assign=True)  # this dtype's copy goes before the next is made
            del weights
            gc.collect()
    return out


@pytest.fixture(scope="module")
def text(spm_dir) -> dict:
    """m9's text encoder on a guided batch: two prompts (one over-long) and two empty negative prompts."""
    from diffusers.pipelines.deprecated.alt_diffusion.modeling_roberta_series import (
        RobertaSeriesConfig, RobertaSeriesModelWithTransformation)

    ids, mask = Tokenizer(os.path.join(spm_dir, "sentencepiece.bpe.model"))([PROMPTS["zh"][1], EDGE_PROMPTS[-1], "", ""])
    torch.manual_seed(0)  # transformers initialises from the global generator
    reference = randomize_(RobertaSeriesModelWithTransformation(RobertaSeriesConfig(**M9_TEXT))).eval()
    return outputs(reference, text_encoder, text_encoder.config_from_hf(reference.config.to_dict()),
                   lambda ref, dtype: ref(input_ids=ids, attention_mask=mask).projection_state,
                   lambda ours, dtype: ours(ids, mask))


@pytest.fixture(scope="module")
def noise_prediction(text) -> dict:
    from diffusers import UNet2DConditionModel

    context = text[torch.float32]
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    # Perturbed by 0.02 as in test_unet.py: at 0.05 m9's random UNet overflows fp16 in the reference too.
    reference = randomize_(UNet2DConditionModel.from_config(M9_UNET), scale=0.02).eval()
    return outputs(reference, unet, unet.config_from_hf(reference.config),
                   lambda ref, dtype: ref(latents.to(dtype), TIMESTEPS, encoder_hidden_states=context.to(dtype)).sample,
                   lambda ours, dtype: ours(latents.to(dtype), TIMESTEPS, context.to(dtype)))


@pytest.fixture(scope="module")
def pictures() -> dict:
    from diffusers import AutoencoderKL

    z = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(2)) / 0.18215
    torch.manual_seed(0)
    reference = randomize_(AutoencoderKL.from_config(M9_VAE)).eval()
    return outputs(reference, vae, vae.config_from_hf(reference.config), lambda ref, dtype: ref.decode(z.to(dtype)).sample,
                   lambda ours, dtype: ours.decode(z.to(dtype)))


# Tolerance: a ratio, not a fixed target. At m9's depth the reference itself strays past the per-module
# targets (its 24-layer text encoder: 3.8e-2 from fp32 in bf16, 4.4e-3 in fp16), so ours is held to the
# reference's own error in the same dtype. Two correct implementations that round in different orders land
# at different distances from fp32: measured ours/reference 1.0 (the UNet and VAE decoder: bit-identical),
# 1.14 and 1.16 (the text encoder), 0.97–1.32 on the small modules' parity tests. A real defect multiplies
# it: the UNet's timestep sinusoids computed in bf16 instead of fp32 gave 3.5 (bf16) and 23 (fp16).
WORSE = 1.5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("model", ["text", "noise_prediction", "pictures"])
def test_finite_and_as_close_to_fp32_as_the_reference(request, model, dtype):
    out = request.getfixturevalue(model)
    (got, reference), expected = out[dtype], out[torch.float32]
    assert got.dtype == dtype
    assert torch.isfinite(got).all(), f"{model} in {dtype}: {(~torch.isfinite(got)).sum().item()} values NaN or inf"
    assert torch.isfinite(reference).all(), f"the reference overflows in {dtype}: these weights prove nothing"
    err, reference_err = rel_err(got, expected), rel_diff(reference, expected)
    assert err < WORSE * reference_err, f"{err:.2e} from fp32, the reference in {dtype} {reference_err:.2e}"
