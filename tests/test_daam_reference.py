"""DAAM's word heat maps against the daam package itself (daam 0.2.0, Tang et al. 2023) running on
diffusers' AltDiffusionPipeline over the small model. daam's own requirements pin diffusers 0.21 and
spaCy, so `make` installs it without them (`pip install --no-deps daam==0.2.0`, see the Makefile). Its
imports of spaCy and SciPy serve parsing and evaluation only, and are stood in for here when missing."""
import sys
import types

import pytest
import torch
from helpers import diffusers_pipeline, rel_err

from altdiff_min.pipeline import load
from altdiff_min.research.daam import latent_word_maps
from altdiff_min.research.instruments import capture_attention


@pytest.fixture
def daam(monkeypatch):
    for name in ("spacy", "spacy.tokens", "scipy", "scipy.optimize"):  # only their names are read on import
        try:
            __import__(name)
        except ImportError:
            module = types.ModuleType(name)
            module.Token, module.linear_sum_assignment = object, None
            monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(sys.modules["spacy"], "tokens", sys.modules["spacy.tokens"], raising=False)
    import daam  # installed by the Makefile without its requirements

    return daam


@pytest.mark.parametrize("prompt, word", [("un cercle rouge", "cercle"),  # "▁cerc", "le" in the small vocabulary
                                          ("a red circle and a blue circle", "circle")])  # "▁", "c", "i", "r", "c", "le", twice
def test_word_map_equals_daam(daam, hub_layout, reference, small_model_dir, prompt, word):
    ref = diffusers_pipeline(hub_layout, reference, "ddim")
    sample_size = ref.unet.config.sample_size
    ref.unet.register_to_config(sample_size=64)  # daam assumes 64×64 latents only of a 512-px model, else 96×96
    try:
        with daam.trace(ref) as trace:
            ref(prompt, num_inference_steps=2, height=256, width=256, guidance_scale=7.5,
                generator=torch.Generator().manual_seed(3))
            theirs = trace.compute_global_heat_map().compute_word_heat_map(word).heatmap.float()
    finally:
        ref.unet.register_to_config(sample_size=sample_size)
    pipe = load(small_model_dir)
    with capture_attention(pipe.unet) as maps:
        pipe.generate(prompt, steps=2, height=256, width=256, seed=3, progress=False)
    ours = latent_word_maps(maps, pipe.tokenizer, prompt, word, grid=(64, 64))[0]
    assert rel_err(ours, theirs) < 1e-5
