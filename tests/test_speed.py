"""altdiff_min/research/speed.py: the speed paths compute what the model files write, are applied per model
(never process-wide), show in repr, and can be left off; a compiled UNet samples with every sampler
after one compilation."""
import os

import pytest
import torch
from helpers import M9_UNET, M9_VAE, rel_diff, rel_err

from altdiff_min.research import speed
from altdiff_min.storage.folder import WEIGHTS
from altdiff_min.model.layers import Conv3x3
from altdiff_min.pipeline import load
from altdiff_min.sampling.samplers import SAMPLERS


def test_fast_m9_unet_equals_the_unet_as_written():
    """m9's UNet (random weights) on 16×24 latents reaches its 4×6 and 2×3 levels at 1280 channels,
    where FastConv3x3 takes the matrix-product path: the same ε, the same state dict."""
    from altdiff_min.model.unet import UNet
    from weights_convert.unet import config_from_hf

    torch.manual_seed(0)
    unet = UNet(config_from_hf(M9_UNET)).eval()
    g = torch.Generator().manual_seed(1)
    latents, context = torch.randn(2, 4, 16, 24, generator=g), torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([999.0, 1.0])
    state = dict(unet.state_dict())
    with torch.no_grad():
        written = unet(latents, t, context)
        speed.apply(unet)
        fast = unet(latents, t, context)
    assert sum(type(m) is speed.FastConv3x3 for m in unet.modules()) == sum(1 for m in unet.modules() if isinstance(m, Conv3x3))
    assert "FastConv3x3" in repr(unet)
    assert {k: v.data_ptr() for k, v in unet.state_dict().items()} == {k: v.data_ptr() for k, v in state.items()}
    assert rel_err(fast, written) < 1e-5


def test_fast_m9_decoder_equals_the_decoder_as_written():
    """m9's VAE decoder (random weights, batch 2, non-square latents) with its activations in channels_last:
    the same picture, contiguous as the decoder as written returns it, and the same state dict."""
    from altdiff_min.model.vae import VAE, Decoder
    from weights_convert.vae import config_from_hf

    torch.manual_seed(0)
    vae = VAE(config_from_hf(M9_VAE)).eval()
    z = torch.randn(2, 4, 6, 10, generator=torch.Generator().manual_seed(1))
    state = dict(vae.state_dict())
    with torch.no_grad():
        written = vae.decode(z)
        speed.apply(vae)
        fast = vae.decode(z)
    assert type(vae.decoder) is speed.FastDecoder and "FastDecoder" in repr(vae)
    assert fast.is_contiguous() and fast.shape == written.shape == (2, 3, 48, 80)
    assert {k: v.data_ptr() for k, v in vae.state_dict().items()} == {k: v.data_ptr() for k, v in state.items()}
    assert rel_err(fast, written) < 1e-5
    speed.as_written(vae)
    assert type(vae.decoder) is Decoder


def test_load_applies_the_speed_paths_per_model_and_fast_false_leaves_them_off(small_model_dir):
    fast, written = load(small_model_dir), load(small_model_dir, fast=False)
    assert "FastConv3x3" in repr(fast.unet) and "FastConv3x3" in repr(fast.vae) and "FastDecoder" in repr(fast.vae)
    assert "FastConv3x3" not in repr(written.unet) + repr(written.vae) and "FastDecoder" not in repr(written.vae)
    assert all(type(m) is Conv3x3 for m in written.unet.modules() if isinstance(m, Conv3x3))  # one model, not the class
    a = fast.generate("un cercle rouge", steps=3, seed=0, height=64, width=96, output="tensor", progress=False)
    b = written.generate("un cercle rouge", steps=3, seed=0, height=64, width=96, output="tensor", progress=False)
    assert rel_diff(a, b) < 1e-6  # the small model's widths never take the matrix-product path


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_unet_samples_with_every_sampler_after_one_compilation(small_model_dir, device, tmp_path):
    """--compile used to recompile at every step (each timestep a new Python constant) until
    fullgraph=True failed at the 8th. Timesteps reach the UNet as float32 tensors: the six samplers
    run on one compiled graph per batch shape (guided: 2 rows a picture; unguided: 1), with results
    equal to the eager model's. Unguided PLMS keeps the UNet's own earlier outputs, which a CUDA graph's
    next replay would overwrite. The compiled model is the same module tree: it saves as the eager one."""
    import torch._dynamo
    from safetensors.torch import load_file
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled, eager = load(small_model_dir, device=device, compile=True), load(small_model_dir, device=device)
    assert type(compiled.unet) is speed.CompiledUNet and "CompiledUNet" in repr(compiled.unet)
    runs = [(sampler, 7.5) for sampler in SAMPLERS] + [("plms", 1.0)]
    for sampler, scale in runs:
        args = dict(n_samples=2, steps=4, sampler=sampler, scale=scale, seed=0, height=64, width=96, output="tensor",
                    progress=False)
        got = compiled.generate("un cercle rouge", **args)
        assert rel_diff(got, eager.generate("un cercle rouge", **args)) < 1e-4, (sampler, scale)
    assert counters["stats"]["unique_graphs"] == 2
    compiled.save(str(tmp_path / "saved"))
    assert load_file(tmp_path / "saved" / WEIGHTS).keys() == load_file(os.path.join(small_model_dir, WEIGHTS)).keys()
