"""altdiff_min.VAE against diffusers' AutoencoderKL with the same random weights; the converter's
strictness; input checks."""
from __future__ import annotations

import copy
import re

import pytest
import torch
from helpers import M9_VAE, PRECISIONS, SMALL_PRECISIONS, legacy_attention_name, randomize_, rel_err
from diffusers import AutoencoderKL

from altdiff_min.model.attention import attention_backend
from altdiff_min.model.vae import VAE, VAEConfig
from weights_convert.rules import ConversionError
from weights_convert.vae import config_from_hf, load

ENC, DEC = "DownEncoderBlock2D", "UpDecoderBlock2D"


SMALL = {
    # m9's shape shrunk: channel changes between levels, 2 res blocks (3 in the decoder)
    "3levels": dict(block_out_channels=(16, 32, 64), down_block_types=[ENC] * 3, up_block_types=[DEC] * 3,
                    layers_per_block=2, norm_num_groups=8),
    # a level that keeps its channels, 1 res block, 8 latent channels, 1-channel images
    "4levels": dict(in_channels=1, out_channels=1, latent_channels=8, block_out_channels=(16, 32, 32, 64),
                    down_block_types=[ENC] * 4, up_block_types=[DEC] * 4, layers_per_block=1, norm_num_groups=8),
}
BACKENDS = ["sdpa", "explicit"]


def make_reference(config: dict) -> AutoencoderKL:
    torch.manual_seed(0)
    return randomize_(AutoencoderKL.from_config(config).eval())


# (reference, device, dtype, tolerance): m9's VAE is small (seconds, ~0.4 GB) but not in fp16 on the
# CPU, where it takes ~2 minutes a test (helpers.SMALL_PRECISIONS).
CASES = [pytest.param(name, *p.values, id=f"{name}-{p.id}", marks=p.marks)
         for name in [*SMALL, "m9"] for p in (PRECISIONS if name == "m9" else SMALL_PRECISIONS)]


@pytest.fixture(scope="module")
def reference(request) -> AutoencoderKL:
    return make_reference(M9_VAE if request.param == "m9" else SMALL[request.param])


def on(ref: AutoencoderKL, device: str, dtype: torch.dtype) -> tuple[AutoencoderKL, VAE]:
    """The reference on device in dtype, and our VAE sharing its tensors."""
    if (device, dtype) != ("cpu", torch.float32):
        ref = copy.deepcopy(ref).to(device, dtype)
    return ref, load(ref.state_dict(), config_from_hf(ref.config))[0]


def random(shape: tuple[int, ...], device: str, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)


@torch.no_grad()
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reference,device,dtype,tol", CASES, indirect=["reference"])
def test_decode_matches_diffusers(reference, device, dtype, tol, backend):
    ref, ours = on(reference, device, dtype)
    z = random((2, ref.config.latent_channels, 8, 12), device, dtype)  # non-square
    expected = ref.decode(z).sample
    with attention_backend(backend):
        err = rel_err(ours.decode(z), expected)
    assert err < tol, f"relative error {err:.2e} ≥ {tol:.0e}"


@torch.no_grad()
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reference,device,dtype,tol", CASES, indirect=["reference"])
def test_encode_matches_diffusers(reference, device, dtype, tol, backend):
    ref, ours = on(reference, device, dtype)
    scale = 2 ** (len(ref.config.block_out_channels) - 1)
    images = random((2, ref.config.in_channels, 8 * scale, 12 * scale), device, dtype)
    posterior = ref.encode(images).latent_dist
    with attention_backend(backend):
        mean, logvar = ours.encode(images)
    for name, err in [("mean", rel_err(mean, posterior.mean)), ("logvar", rel_err(logvar, posterior.logvar))]:
        assert err < tol, f"{name}: relative error {err:.2e} ≥ {tol:.0e}"


@torch.no_grad()
def test_logvar_is_clamped_as_in_diffusers():
    ref = make_reference(SMALL["3levels"])
    ref.quant_conv.bias[4:] += 100.0  # the log-variance half: far above the clamp
    _, ours = on(ref, "cpu", torch.float32)
    images = random((1, 3, 16, 16), "cpu", torch.float32)
    logvar = ours.encode(images)[1]
    assert logvar.max() == 20.0 and torch.equal(logvar, ref.encode(images).latent_dist.logvar)


def test_m9_config():
    assert config_from_hf(M9_VAE) == VAEConfig()


@pytest.mark.parametrize("change,named", [
    ({"down_block_types": [ENC, ENC, ENC, "AttnDownEncoderBlock2D"]}, "down_block_types"),
    ({"mid_block_add_attention": False}, "mid_block_add_attention"),
    ({"use_quant_conv": False}, "use_quant_conv"),
    ({"latents_mean": [0.0] * 4}, "latents_mean"),  # SD3/Flux-style latent normalisation
    ({"out_channels": 4}, "out_channels"),
])
def test_config_rejects_what_is_not_implemented(change, named):
    with pytest.raises(ValueError, match=named):
        config_from_hf({**M9_VAE, **change})


def test_attention_names_of_diffusers_before_0_14_convert_alike():
    """m9's hub vae/ was saved by diffusers 0.8: its mid-block attention is query/key/value/proj_attn,
    which diffusers still loads (renamed on load). The same tensors under either spelling, one model."""
    sd = make_reference(SMALL["3levels"]).state_dict()
    old = {legacy_attention_name(k): v for k, v in sd.items()}
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in old and "encoder.mid_block.attentions.0.key.bias" in old
    new_model, _ = load(sd, config_from_hf(SMALL["3levels"]))
    old_model, report = load(old, config_from_hf(SMALL["3levels"]))
    assert report.converted == len(old) and new_model.state_dict().keys() == old_model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(new_model.state_dict().values(), old_model.state_dict().values()))


@pytest.mark.parametrize("edit,named", [
    (lambda sd: sd.pop("decoder.mid_block.attentions.0.to_v.bias"),
     r"missing tensors[^\n]*\n\s*decoder\.mid\.attn\.v\.bias"),
    (lambda sd: sd.update({"encoder.mid_block.attentions.0.rotary.weight": torch.zeros(64, 64)}),
     r"unexpected tensors[^\n]*\n\s*encoder\.mid_block\.attentions\.0\.rotary\.weight"),
    (lambda sd: sd.update({"encoder.mid_block.attentions.0.query.weight": torch.zeros(64, 64)}),  # both spellings
     r"renamed onto the same target[^\n]*\n\s*encoder\.mid_block\.attentions\.0\.(query|to_q)\.weight"),
    (lambda sd: sd.update({"decoder.up_blocks.2.resnets.0.conv_shortcut.weight": torch.zeros(16, 32, 3, 3)}),
     re.escape("decoder.up_blocks.2.resnets.0.conv_shortcut.weight: (16, 32, 3, 3), "
               "but decoder.up.2.res.0.shortcut.weight is (16, 32, 1, 1)")),
], ids=["missing", "unexpected", "both-attention-spellings", "mis-shaped"])
def test_converter_names_the_offending_tensor(edit, named):
    sd = dict(make_reference(SMALL["3levels"]).state_dict())
    edit(sd)
    with pytest.raises(ConversionError, match=named):
        load(sd, config_from_hf(SMALL["3levels"]))


@pytest.mark.parametrize("method,shape,named", [
    ("decode", (2, 3, 8, 12), "latents must be (batch, 4 channels"),
    ("decode", (4, 8, 12), "latents must be (batch, 4 channels"),
    ("encode", (2, 4, 64, 96), "images must be (batch, 3 channels"),
    ("encode", (2, 3, 60, 96), "image size 60×96 is not a multiple of 8"),
    ("encode", (2, 3, 64, 100), "image size 64×100 is not a multiple of 8"),
], ids=["decode-channels", "decode-3-d", "encode-channels", "encode-height", "encode-width"])
def test_bad_input_is_rejected_before_the_forward_pass(method, shape, named):
    with torch.device("meta"):  # m9's VAE; the checks never reach the (absent) weights
        vae = VAE(VAEConfig())
    for conv in (vae.encoder.conv_in, vae.decoder.conv_in, vae.quant_conv, vae.post_quant_conv):
        conv.register_forward_pre_hook(lambda *_: pytest.fail("the forward pass started"))
    with pytest.raises(ValueError, match=re.escape(named)):
        getattr(vae, method)(torch.randn(shape))
