"""altdiff_min.UNet against diffusers' UNet2DConditionModel with the same random weights; the
converter's strictness; input checks."""
from __future__ import annotations

import copy
import re

import pytest
import torch
from helpers import M9_UNET, PRECISIONS, SMALL_PRECISIONS, randomize_, rel_err
from diffusers import UNet2DConditionModel

from altdiff_min.model.attention import attention_backend
from altdiff_min.model.unet import UNet, UNetConfig
from weights_convert.rules import ConversionError
from weights_convert.unet import config_from_hf, load

CA, D, CU, U = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"


# Small variants that between them use every block type, channel changes and attention patterns.
SMALL = {
    # m9's pattern shrunk: attention on all levels but the last, 2 res blocks per level
    "3levels": dict(block_out_channels=(32, 64, 96), down_block_types=(CA, CA, D), up_block_types=(U, CU, CU),
                    layers_per_block=2, cross_attention_dim=48, attention_head_dim=4, norm_num_groups=8),
    # attention on the 2nd and 4th levels only, 3 res blocks, a level that keeps its channels, other in/out widths
    "4levels": dict(in_channels=5, out_channels=3, block_out_channels=(16, 32, 32, 48), down_block_types=(D, CA, D, CA),
                    up_block_types=(CU, U, CU, U), layers_per_block=3, cross_attention_dim=40, attention_head_dim=2,
                    norm_num_groups=8),
}
BACKENDS = ["sdpa", "explicit"]


def make_reference(config: dict, scale: float = 0.05) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return randomize_(UNet2DConditionModel.from_config(config).eval(), scale=scale)


@pytest.fixture(scope="module", params=list(SMALL))
def small_reference(request) -> UNet2DConditionModel:
    return make_reference(SMALL[request.param])


@pytest.fixture(scope="module")
def m9_reference() -> UNet2DConditionModel:
    # ~3.4 GB; ours shares its tensors. Perturbed by 0.02, not 0.05: at m9's width 0.05 makes
    # activations grow to ~4.5e7 by the last up block (measured), past fp16's 65504, so the fp16
    # reference would be inf; at 0.02 the largest is ~120 and the output still far from trivial.
    return make_reference(M9_UNET, scale=0.02)


@torch.no_grad()
def check_parity(ref: UNet2DConditionModel, device: str, dtype: torch.dtype, tol: float, backend: str, timesteps) -> None:
    """Ours and the reference on 2 non-square 16×24 latents: ‖ours − ref‖/‖ref‖ < tol."""
    if (device, dtype) != ("cpu", torch.float32):
        ref = copy.deepcopy(ref).to(device, dtype)
    ours, _ = load(ref.state_dict(), config_from_hf(ref.config))  # shares the reference's tensors
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, ref.config.in_channels, 16, 24, generator=g).to(device, dtype)
    context = torch.randn(2, 77, ref.config.cross_attention_dim, generator=g).to(device, dtype)
    if isinstance(timesteps, torch.Tensor):
        timesteps = timesteps.to(device)
    expected = ref(latents, timesteps, encoder_hidden_states=context).sample
    with attention_backend(backend):
        err = rel_err(ours(latents, timesteps, context), expected)
    assert err < tol, f"relative error {err:.2e} ≥ {tol:.0e}"


@pytest.mark.parametrize("timesteps", [981, torch.tensor(500.0), torch.tensor([999, 1])], ids=["int", "0-d", "per-sample"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device,dtype,tol", SMALL_PRECISIONS)
def test_small_unet_matches_diffusers(small_reference, device, dtype, tol, backend, timesteps):
    check_parity(small_reference, device, dtype, tol, backend, timesteps)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device,dtype,tol", PRECISIONS)
def test_m9_unet_matches_diffusers(m9_reference, device, dtype, tol, backend):
    check_parity(m9_reference, device, dtype, tol, backend, torch.tensor([999, 1]))


def test_m9_config():
    assert config_from_hf(M9_UNET) == UNetConfig()  # sample_size 32 ignored


@pytest.mark.parametrize("change,named", [
    ({"use_linear_projection": True}, "use_linear_projection"),  # SD 2.x
    ({"addition_embed_type": "text_time"}, "addition_embed_type"),  # SDXL
    ({"down_block_types": [CA, CA, "SimpleCrossAttnDownBlock2D", D]}, "down_block_types"),
    ({"up_block_types": [CU, CU, CU, U]}, "up_block_types"),  # not the mirror of the down path
    ({"attention_head_dim": [5, 10, 20, 20]}, "attention_head_dim"),  # heads per level
    ({"attention_head_dim": [8, 8]}, re.escape("attention_head_dim=[8, 8]: 2 values for 4 levels")),  # diffusers refuses it
    ({"layers_per_block": [2]}, re.escape("layers_per_block=[2]: 1 values for 4 levels")),
    ({"transformer_layers_per_block": [[1], [1], [1], [1]]}, "a different value per block"),
])
def test_config_rejects_what_is_not_implemented(change, named):
    with pytest.raises(ValueError, match=named):
        config_from_hf({**M9_UNET, **change})


@pytest.fixture(scope="module")
def small_state_dict() -> dict[str, torch.Tensor]:
    return dict(make_reference(SMALL["3levels"]).state_dict())


@pytest.mark.parametrize("edit,named", [
    (lambda sd: sd.pop("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"),
     r"missing tensors[^\n]*\n\s*down\.1\.attn\.0\.block\.cross_attn\.k\.weight"),
    (lambda sd: sd.update({"mid_block.attentions.0.transformer_blocks.0.attn3.to_q.weight": torch.zeros(96, 96)}),
     r"unexpected tensors[^\n]*\n\s*mid_block\.attentions\.0\.transformer_blocks\.0\.attn3\.to_q\.weight"),
    (lambda sd: sd.update({"up_blocks.1.resnets.2.conv_shortcut.weight": torch.zeros(64, 96, 3, 3)}),
     re.escape("up_blocks.1.resnets.2.conv_shortcut.weight: (64, 96, 3, 3), "
               "but up.1.res.2.shortcut.weight is (64, 96, 1, 1)")),
], ids=["missing", "unexpected", "mis-shaped"])
def test_converter_names_the_offending_tensor(small_state_dict, edit, named):
    sd = dict(small_state_dict)
    edit(sd)
    with pytest.raises(ConversionError, match=named):
        load(sd, config_from_hf(SMALL["3levels"]))


@pytest.mark.parametrize("latents,timesteps,context,named", [
    ((2, 4, 15, 24), 1, (2, 77, 48), "latent size 15×24 is not a multiple of 4"),
    ((2, 4, 16, 26), 1, (2, 77, 48), "latent size 16×26 is not a multiple of 4"),
    ((2, 3, 16, 24), 1, (2, 77, 48), "latents must be (batch, 4 channels"),
    ((4, 16, 24), 1, (2, 77, 48), "latents must be (batch, 4 channels"),
    ((2, 4, 16, 24), 1, (2, 77, 768), "context must be (batch, tokens, 48)"),
    ((2, 4, 16, 24), 1, (3, 77, 48), "batch sizes disagree: 2 latents but 3 contexts"),
    ((2, 4, 16, 24), torch.tensor([1, 2, 3]), (2, 77, 48), "timesteps must be a number or a (2,) tensor"),
], ids=["height", "width", "channels", "3-d", "context-width", "context-batch", "timesteps-batch"])
def test_bad_input_is_rejected_before_the_forward_pass(latents, timesteps, context, named):
    unet = UNet(UNetConfig(channels=(32, 64, 96), attention=(True, True, False), heads=4, context_dim=48, groups=8))
    unet.conv_in.register_forward_pre_hook(lambda *_: pytest.fail("the forward pass started"))
    with pytest.raises(ValueError, match=re.escape(named)):
        unet(torch.randn(latents), timesteps, torch.randn(context))


def test_compiles_as_one_graph():
    """torch.compile(fullgraph=True) raises at the first graph break; aot_eager traces without codegen."""
    torch._dynamo.reset()
    unet = UNet(UNetConfig(channels=(32, 64, 96), attention=(True, True, False), heads=4, context_dim=48, groups=8)).eval()
    compiled = torch.compile(unet, fullgraph=True, backend="aot_eager")
    latents, context = torch.randn(2, 4, 16, 24), torch.randn(2, 77, 48)
    with torch.no_grad():
        assert rel_err(compiled(latents, torch.tensor([10, 900]), context), unet(latents, torch.tensor([10, 900]), context)) < 1e-6


@pytest.mark.parametrize("in_ch,out_ch,h,w", [(1280, 1280, 4, 6), (640, 1280, 8, 8), (64, 64, 4, 4), (1280, 1280, 12, 8)],
                         ids=["im2col", "im2col-640-in", "direct-few-channels", "direct-many-pixels"])
def test_fast_conv3x3_equals_the_direct_convolution(in_ch, out_ch, h, w):
    """speed.FastConv3x3's CPU shortcut (a matrix product over unfolded patches) computes the same
    convolution; while its weight trains it is the direct kernel itself. With the weight frozen (a
    LoRA's base) and gradients recorded it takes the product too: the input's gradient is the direct
    kernel's, and autograd keeps no unfolded input (nothing saved but the weight it already holds)."""
    from altdiff_min.model.layers import Conv3x3
    from altdiff_min.research.speed import FastConv3x3, apply, as_written

    torch.manual_seed(0)
    conv = apply(torch.nn.Sequential(Conv3x3(in_ch, out_ch)).eval())[0]
    assert type(conv) is FastConv3x3 and "FastConv3x3" in repr(conv)
    x = torch.randn(2, in_ch, h, w)
    direct = torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1)
    with torch.no_grad():
        assert rel_err(conv(x), direct) < 1e-5
    assert torch.equal(conv(x), direct)  # grad enabled and the weight trains: the direct kernel
    conv.requires_grad_(False)
    x.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = conv(x)
    assert rel_err(out, direct) < 1e-5
    grad = torch.randn_like(out)
    (fast_grad,), (direct_grad,) = (torch.autograd.grad(o, x, grad) for o in (out, torch.nn.functional.conv2d(
        x, conv.weight, padding=1)))
    assert rel_err(fast_grad, direct_grad) < 1e-5
    held = {conv.weight.data_ptr(), conv.bias.data_ptr()}
    assert sum(t.numel() for t in saved if t.data_ptr() not in held) <= x.numel()  # never the 9× unfolded input
    assert type(as_written(torch.nn.Sequential(conv))[0]) is Conv3x3
