"""Text encoder parity with diffusers' RobertaSeriesModelWithTransformation (random weights)."""
import gc
import os

import pytest
import torch
from helpers import M9_TEXT, SMALL_PRECISIONS, randomize_, rel_err
from prompts import EDGE_PROMPTS, PROMPTS

from altdiff_min.model.attention import attention_backend
from altdiff_min.model.text_encoder import TextEncoder, TextEncoderConfig
from altdiff_min.model.tokenizer import Tokenizer
from weights_convert import text_encoder as convert
from weights_convert.rules import ConversionError

SMALL = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
             max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5, project_dim=48)


def reference_model(pre_transformation: bool, **config):
    from diffusers.pipelines.deprecated.alt_diffusion.modeling_roberta_series import (
        RobertaSeriesConfig, RobertaSeriesModelWithTransformation)

    cfg = RobertaSeriesConfig(has_pre_transformation=pre_transformation, **config)
    return randomize_(RobertaSeriesModelWithTransformation(cfg)).eval()


@pytest.fixture(scope="module")
def tokens(spm_dir):
    """Real prompts (a mix of languages, one over-long, one empty): batch 4, realistic padding."""
    tok = Tokenizer(os.path.join(spm_dir, "sentencepiece.bpe.model"))
    return tok([PROMPTS["zh"][1], PROMPTS["ar"][0], EDGE_PROMPTS[-1], ""]), tok.vocab_size


@pytest.mark.parametrize("device,dtype,tol", SMALL_PRECISIONS)
@pytest.mark.parametrize("pre_transformation", [False, True], ids=["m9", "m18-style"])
@pytest.mark.parametrize("backend", ["sdpa", "explicit"])
def test_small_config_matches_reference(tokens, pre_transformation, backend, device, dtype, tol):
    (input_ids, mask), vocab = tokens
    ref = reference_model(pre_transformation, vocab_size=vocab, **SMALL)
    ours, report = convert.load(ref.state_dict(), convert.config_from_hf(ref.config.to_dict()))
    assert report.converted == len(ours.state_dict()) and sum(report.dropped.values()) == 2  # the pooler
    ref, ours = ref.to(device, dtype), ours.to(device, dtype)
    input_ids, mask = input_ids.to(device), mask.to(device)
    with torch.no_grad(), attention_backend(backend):
        expected = ref(input_ids=input_ids, attention_mask=mask).projection_state
        got = ours(input_ids, mask)
    assert got.shape == (4, 77, 48)
    assert rel_err(got, expected) < tol


@pytest.mark.parametrize("backend", ["sdpa", "explicit"])
def test_a_row_with_every_key_masked_matches_reference(tokens, backend):
    """A mask of zeros (a caller's, or a row of padding) attends uniformly, as the reference's additive
    mask does, on both backends: no 0/0."""
    (input_ids, mask), vocab = tokens
    mask = mask.clone()
    mask[1] = 0
    ref = reference_model(False, vocab_size=vocab, **SMALL)
    ours, _ = convert.load(ref.state_dict(), convert.config_from_hf(ref.config.to_dict()))
    with torch.no_grad(), attention_backend(backend):
        expected = ref(input_ids=input_ids, attention_mask=mask).projection_state
        got = ours(input_ids, mask)
    assert rel_err(got, expected) < 1e-5


def test_mask_defaults_to_non_padding(tokens):
    (input_ids, mask), vocab = tokens
    ours = randomize_(TextEncoder(TextEncoderConfig(vocab_size=vocab, hidden=32, layers=1, heads=2, mlp=48, project_dim=16)))
    with torch.no_grad():
        assert torch.equal(ours(input_ids), ours(input_ids, mask))


@pytest.mark.slow
@pytest.mark.parametrize("pre_transformation", [False, True], ids=["m9", "m18-style"])
def test_full_m9_config_matches_reference(pre_transformation):
    ref = reference_model(pre_transformation, **M9_TEXT)
    cfg = convert.config_from_hf(ref.config.to_dict())
    assert cfg == TextEncoderConfig(pre_transformation=pre_transformation)  # our defaults are m9's numbers
    ours, _ = convert.load(ref.state_dict(), cfg)  # shares ref's tensors: no second 2 GB copy
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(4, 250002, (2, 77), generator=g)
    input_ids[:, 0], input_ids[0, 30], input_ids[0, 31:] = 0, 2, 1  # row 0 padded after 31 tokens
    input_ids[1, -1] = 2
    with torch.no_grad():
        expected = ref(input_ids=input_ids, attention_mask=(input_ids != 1).long()).projection_state
        got = ours(input_ids, (input_ids != 1).long())
    del ref, ours
    gc.collect()
    assert got.shape == (2, 77, 768)
    assert rel_err(got, expected) < 1e-5


def small_state(**overrides):
    ref = reference_model(False, vocab_size=300, **{**SMALL, **overrides})
    return ref.state_dict(), convert.config_from_hf(ref.config.to_dict())


def test_conversion_names_missing_unexpected_and_misshapen_tensors():
    state, cfg = small_state()
    state.pop("roberta.encoder.layer.1.output.dense.bias")
    state["roberta.encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(3)
    state["transformation.weight"] = torch.zeros(48, 65)
    with pytest.raises(ConversionError) as e:
        convert.load(state, cfg)
    msg = str(e.value)
    assert "missing tensors" in msg and "layers.1.fc2.bias" in msg
    assert "unexpected tensors" in msg and "attention.self.rotary.weight" in msg
    assert "wrong shape" in msg and "transformation.weight: (48, 65), but transformation.weight is (48, 64)" in msg


def test_conversion_drops_only_listed_tensors():
    state, cfg = small_state()
    state["roberta.embeddings.position_ids"] = torch.arange(514)[None]  # present in older checkpoints
    _, report = convert.load(state, cfg)
    assert dict(report.dropped) == {convert.DROPS[0][1]: 2, convert.DROPS[1][1]: 1}


def test_config_keys_left_out_take_the_reference_defaults():
    """A config.json may leave out what equals RobertaSeriesConfig's defaults (transformers 4's
    save_pretrained writes only the differences): layer_norm_eps 1e-12, type_vocab_size 2 and the rest
    must come back as the reference builds them."""
    ref = reference_model(False, vocab_size=300, **{**SMALL, "layer_norm_eps": 1e-12, "type_vocab_size": 2})
    written = {k: v for k, v in ref.config.to_dict().items() if convert.REFERENCE_DEFAULTS.get(k, object()) != v}
    assert "layer_norm_eps" not in written and "type_vocab_size" not in written
    cfg = convert.config_from_hf(written)
    assert cfg == convert.config_from_hf(ref.config.to_dict())
    assert (cfg.eps, cfg.type_vocab_size) == (1e-12, 2)
    defaults = type(ref.config)()  # our table is the class's (transformers 5 has no position_embedding_type
    for key, value in convert.REFERENCE_DEFAULTS.items():  # or has_pre_transformation: absent means the default)
        assert getattr(defaults, key, value) == value, key


@pytest.mark.parametrize("change,named", [
    ({"is_decoder": True}, "is_decoder=true"),  # transformers' XLM-R then attends causally
    ({"add_cross_attention": True}, "add_cross_attention=true"),
    ({"hidden_act": "relu"}, "hidden_act"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ({"use_attention_mask": False}, "use_attention_mask=False: altdiff-min always masks"),  # diffusers would not mask
])
def test_config_rejects_what_is_not_implemented(change, named):
    assert convert.config_from_hf(M9_TEXT) == TextEncoderConfig()
    with pytest.raises(ValueError, match=named):
        convert.config_from_hf({**M9_TEXT, **change})


@pytest.mark.parametrize("make_input,match", [
    (lambda: torch.zeros(2, 5), "LongTensor"),
    (lambda: torch.zeros(5, dtype=torch.long), "LongTensor"),
    (lambda: torch.full((2, 5), 300, dtype=torch.long), "vocab|tokenizer"),
    (lambda: torch.zeros(1, 600, dtype=torch.long), "at most 512"),
])
def test_rejects_bad_input_ids(make_input, match):
    ours = TextEncoder(TextEncoderConfig(vocab_size=300, hidden=32, layers=1, heads=2, mlp=48, project_dim=16))
    with pytest.raises(ValueError, match=match):
        ours(make_input())
    with pytest.raises(ValueError, match="attention_mask"):
        ours(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 6))
