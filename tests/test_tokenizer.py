"""Tokenizer parity with transformers' XLMRobertaTokenizer on a unigram model trained in the test."""
import os

import pytest
import torch
from prompts import EDGE_PROMPTS, PROMPTS

from altdiff_min.tokenizer import BOS, EOS, PAD, UNK, Tokenizer


@pytest.fixture(scope="module")
def pair(spm_dir):
    from transformers import XLMRobertaTokenizer

    return Tokenizer(os.path.join(spm_dir, "sentencepiece.bpe.model")), XLMRobertaTokenizer.from_pretrained(spm_dir)


def reference(ref, prompts, max_length=77):
    out = ref(prompts, max_length=max_length, padding="max_length", truncation=True, return_tensors="pt")
    return out.input_ids, out.attention_mask


@pytest.mark.parametrize("lang", sorted(PROMPTS))
def test_matches_transformers_per_language(pair, lang):
    ours, ref = pair
    ids, mask = ours(PROMPTS[lang])
    ref_ids, ref_mask = reference(ref, PROMPTS[lang])
    assert ids.dtype == mask.dtype == torch.long and ids.shape == (len(PROMPTS[lang]), 77)
    assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)


@pytest.mark.parametrize("prompt", EDGE_PROMPTS, ids=["empty", "spaces", "tab-newline", "leading-trailing",
                                                      "inner-spaces", "emoji", "unseen-chars", "nfkc", "over-long"])
def test_matches_transformers_on_edges(pair, prompt):
    ours, ref = pair
    ids, mask = ours(prompt)
    ref_ids, ref_mask = reference(ref, [prompt])
    assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)


def test_layout_truncation_and_special_ids(pair):
    ours, ref = pair
    long_prompt, empty, emoji = EDGE_PROMPTS[-1], EDGE_PROMPTS[0], EDGE_PROMPTS[5]
    ids, mask = ours([long_prompt, empty, emoji])
    assert ids[0, 0] == BOS and ids[0, -1] == EOS and mask[0].all()  # truncated, </s> kept last
    assert ids[1, :2].tolist() == [BOS, EOS] and (ids[1, 2:] == PAD).all() and mask[1].sum() == 2
    assert UNK in ids[2].tolist()  # sentencepiece's unknown (0) became fairseq's <unk> (3), not <pad>
    assert ours.vocab_size == len(ref) and ours.mask_id == ref.mask_token_id == ours.vocab_size - 1


def test_length_is_a_parameter(pair, spm_dir):
    _, ref = pair
    short = Tokenizer(os.path.join(spm_dir, "sentencepiece.bpe.model"), max_length=16)
    prompts = PROMPTS["fr"] + [EDGE_PROMPTS[-1]]
    ids, mask = short(prompts)
    ref_ids, ref_mask = reference(ref, prompts, max_length=16)
    assert ids.shape == (len(prompts), 16) and torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)


def test_decode_round_trip(pair):
    ours, _ = pair
    ids, _ = ours(PROMPTS["en"][0])
    assert ours.decode(ids[0]) == PROMPTS["en"][0]


@pytest.mark.parametrize("bad", [3, None, ["fine", 7], [], b"bytes"])
def test_rejects_non_string_prompts(pair, bad):
    ours, _ = pair
    with pytest.raises(TypeError, match="str"):
        ours(bad)


def test_rejects_missing_or_invalid_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Tokenizer(tmp_path / "nope.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        Tokenizer(junk)
