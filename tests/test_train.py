"""The training maths against the reference: for one batch with given noise, timesteps and caption
dropout, the loss and every gradient of our UNet and text encoder equal those of diffusers'
UNet2DConditionModel and RobertaSeriesModelWithTransformation holding the same weights."""
import copy

import torch
from helpers import rel_err

from altdiff_min.pipeline import load
from altdiff_min.schedule import add_noise
from altdiff_min.train import diffusion_loss, drop_captions, trainable, vae_loss
from weights_convert import text_encoder as text_rules
from weights_convert import unet as unet_rules
from weights_convert.rules import rename

CAPTIONS = ["a red circle on a white background", "un cercle rouge", "一只戴着帽子的小狗"]


def batch(ours, seed=0):
    """Three captions, the middle one dropped to the empty prompt; latents 8×12; t spread over the schedule."""
    g = torch.Generator().manual_seed(seed)
    ids, _ = ours.tokenizer(CAPTIONS)
    empty = ours.tokenizer("")[0][0]
    ids = drop_captions(ids, empty, torch.tensor([False, True, False]))
    latents = torch.randn(3, 4, 8, 12, generator=g)
    noise = torch.randn(3, 4, 8, 12, generator=g)
    t = torch.tensor([999, 500, 3])
    return ids, (ids != 1).long(), latents, noise, t


def gradients(named_parameters, rules=None):
    return {rename(n, rules) if rules else n: p.grad for n, p in named_parameters if p.grad is not None}


def test_loss_and_every_gradient_equal_diffusers(small_model_dir, reference):
    from helpers import SCHEDULER
    from diffusers import DDPMScheduler

    ours = load(small_model_dir)
    trainable(ours.unet, ours.text_encoder)
    ids, mask, latents, noise, t = batch(ours)
    assert ids[1].tolist() == ours.tokenizer("")[0][0].tolist()
    loss = diffusion_loss(ours.unet, ours.text_encoder(ids, mask), latents, noise, t, ours.schedule)
    loss.backward()

    unet, text = copy.deepcopy(reference["unet"]), copy.deepcopy(reference["text_encoder"])  # eval: no dropout
    unet.requires_grad_(True), text.requires_grad_(True)
    x_t = DDPMScheduler.from_config({k: v for k, v in SCHEDULER.items() if k != "_class_name"}).add_noise(latents, noise, t)
    context = text(input_ids=ids, attention_mask=mask)[0]
    ref_loss = torch.nn.functional.mse_loss(unet(x_t, t, encoder_hidden_states=context).sample, noise)
    ref_loss.backward()

    assert rel_err(loss.detach(), ref_loss.detach()) < 1e-6
    for module, ref_module, rules in [(ours.unet, unet, unet_rules.RULES), (ours.text_encoder, text, text_rules.RULES)]:
        ours_grads, ref_grads = gradients(module.named_parameters()), gradients(ref_module.named_parameters(), rules)
        assert set(ours_grads) == set(ref_grads), set(ours_grads) ^ set(ref_grads)
        # Attention key biases have a gradient of exactly 0 in exact arithmetic (softmax ignores a shift
        # shared by every key); both sides hold float noise there, compared against the module's scale.
        scale = torch.cat([g.flatten() for g in ref_grads.values()]).norm()
        zero = {n for n in ref_grads if n.endswith(".k.bias")}
        assert all((ours_grads[n] - ref_grads[n]).norm() < 1e-6 * scale for n in zero)
        worst = max(rel_err(ours_grads[n], ref_grads[n]) for n in ours_grads if n not in zero)
        assert worst < 1e-5, f"{type(module).__name__}: largest gradient error {worst:.2e}"


def test_trainable_undoes_load(small_model_dir):
    ours = load(small_model_dir)
    assert not any(p.requires_grad for p in ours.unet.parameters()) and not ours.unet.training
    trainable(ours.unet)
    assert all(p.requires_grad for p in ours.unet.parameters()) and ours.unet.training
    assert not any(p.requires_grad for p in ours.vae.parameters())  # only what was asked


def test_vae_loss_is_reconstruction_plus_kl(small_model_dir):
    ours = load(small_model_dir)
    images = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mean, logvar = ours.vae.encode(images)
    g = torch.Generator().manual_seed(2)
    z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=torch.Generator().manual_seed(2))
    error = ours.vae.decode(z) - images
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean()
    expected = error.abs().mean() + error.pow(2).mean() + 0.1 * kl
    assert rel_err(vae_loss(ours.vae, images, 0.1, g), expected) < 1e-6
    assert kl > 0 and vae_loss(ours.vae, images, 0.0, torch.Generator().manual_seed(2)) < vae_loss(ours.vae, images, 1.0, torch.Generator().manual_seed(2))


def test_add_noise_is_what_the_loss_sees(small_model_dir):
    """At t the UNet sees √ᾱ_t·x0 + √(1−ᾱ_t)·ε: a zero UNet output gives a loss of mean ε²."""
    ours = load(small_model_dir)
    _, _, latents, noise, t = batch(ours)
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x, t, context):
            seen.append(x)
            return torch.zeros_like(x)

    loss = diffusion_loss(Spy(), None, latents, noise, t, ours.schedule)
    assert torch.equal(seen[0], add_noise(latents, noise, t, ours.schedule))
    assert rel_err(loss, noise.pow(2).mean()) < 1e-7
