"""AltCLIP-m9 vs transformers' AltCLIPModel (random weights): text and image embeddings, logits, the
conversion of its state dict, and clip_score."""
import copy
import gc
import os
import resource
import shutil
import time

import numpy as np
import pytest
import torch
from helpers import M9_ALTCLIP, PRECISIONS, VISION, edit_json, picture, randomize_, rel_diff, rel_err, small_altclip
from prompts import PROMPTS

from altdiff_min.vision.altclip import AltCLIPConfig, clip_score
from altdiff_min.model.attention import attention_backend
from altdiff_min.errors import BadType, BadValue
from altdiff_min.model.text_encoder import TextEncoderConfig
from altdiff_min.model.tokenizer import Tokenizer
from altdiff_min.vision.tower import preprocess
from weights_convert.rules import rename
from weights_convert.vision import ALTCLIP_DROPS as DROPS
from weights_convert.vision import ALTCLIP_RULES as RULES
from weights_convert.vision import altclip_config_from_hf as config_from_hf
from weights_convert.vision import load_altclip as load
from weights_convert.vision import config_from_hf as vision_config_from_hf





def reference_model(randomize: bool = True, **config):
    from transformers import AltCLIPConfig as HFAltCLIPConfig
    from transformers import AltCLIPModel

    torch.manual_seed(0)  # transformers initialises from the global generator
    ref = AltCLIPModel(HFAltCLIPConfig(**config))
    return (randomize_(ref) if randomize else ref).eval()


# Prompts in six of the nine languages, of different lengths (one truncated at 77 tokens, one empty).
TEXTS = [PROMPTS["zh"][1], PROMPTS["ar"][0], PROMPTS["ru"][2], PROMPTS["ja"][3], ", ".join(PROMPTS["fr"] * 3), ""]


@pytest.fixture(scope="module")
def tokenizer(spm_dir):
    return Tokenizer(os.path.join(spm_dir, "sentencepiece.bpe.model"))


@pytest.fixture
def small(tokenizer):
    """The small reference, ours holding its weights, and a batch: 6 prompts, 4 pictures."""
    ref = small_altclip(tokenizer.vocab_size)
    ours, report = load(ref.state_dict(), config_from_hf(ref.config.to_dict()))
    input_ids, mask = tokenizer(TEXTS)
    lengths = mask.sum(1).tolist()
    assert len(set(lengths)) == len(TEXTS) and max(lengths) == 77 and min(lengths) == 2
    pictures = [picture("RGB", 96, 80, seed=0), picture("RGBA", 70, 120, seed=1), picture("L", 64, 64, seed=2),
                picture("RGB", 150, 90, seed=3)]
    return ref, ours, report, input_ids, mask, pictures


def test_rules_cover_both_layouts():
    assert rename("text_model.roberta.encoder.layers.1.attention.self.query.weight", RULES) == \
        "text.layers.1.attn.q.weight"
    assert rename("text_model.roberta.encoder.layer.1.output.LayerNorm.bias", RULES) == "text.layers.1.mlp_norm.bias"
    assert rename("text_model.roberta.embeddings.word_embeddings.weight", RULES) == "text.token_embedding.weight"
    assert rename("text_model.pre_LN.weight", RULES) == "text_norm.weight"
    assert rename("text_model.transformation.bias", RULES) == "text.transformation.bias"
    assert rename("vision_model.encoder.layers.0.self_attn.out_proj.weight", RULES) == "vision.layers.0.attn.out.weight"
    assert rename("vision_model.embeddings.position_embedding.weight", RULES) == "vision.position_embedding"
    for name in ("text_projection.weight", "visual_projection.weight", "logit_scale"):
        assert rename(name, RULES) == name


def test_conversion_is_strict_both_ways(small):
    ref, ours, report, *_ = small
    assert report.converted == len(ours.state_dict()) == len(ref.state_dict()) and not report.dropped
    text = TextEncoderConfig(vocab_size=ours.cfg.text.vocab_size, hidden=32, layers=2, heads=4, mlp=64, project_dim=24)
    vision = vision_config_from_hf({**VISION, "projection_dim": 16})
    assert ours.cfg == AltCLIPConfig(text=text, vision=vision, projection_dim=16)


# Not in fp16 on the CPU (helpers.SMALL_PRECISIONS): the random towers' cosines are 0.04–0.16, so the
# logits' relative error is ~5× the embeddings' (measured: text 1.7e-3, logits 7.7e-3 > fp16's 5e-3; the
# reference's own fp16 logits are 3.2e-3 from its fp32 ones, ours 5.0e-3).
@pytest.mark.parametrize("device,dtype,tol", PRECISIONS)
@pytest.mark.parametrize("backend", ["sdpa", "explicit"])
def test_small_config_matches_reference(small, backend, device, dtype, tol):
    ref, ours, _, input_ids, mask, pictures = small
    pixels = preprocess(pictures, ours.cfg.vision)
    ref, ours = ref.to(device, dtype), ours.to(device, dtype)
    input_ids, mask, pixels = input_ids.to(device), mask.to(device), pixels.to(device, dtype)
    with torch.no_grad(), attention_backend(backend):
        text = ours.encode_text(input_ids, mask)
        image = ours.encode_image(pixels)
        per_image, per_text = ours(input_ids, mask, pixels)
        expected = ref(input_ids=input_ids, pixel_values=pixels, attention_mask=mask)
        expected_text = ref.get_text_features(input_ids=input_ids, attention_mask=mask).pooler_output
        expected_image = ref.get_image_features(pixel_values=pixels).pooler_output
    assert text.shape == (6, 16) and image.shape == (4, 16) and per_image.shape == (4, 6)
    assert rel_err(text, expected_text) < tol
    assert rel_err(image, expected_image) < tol
    assert rel_err(per_image, expected.logits_per_image) < tol
    assert rel_err(per_text, expected.logits_per_text) < tol
    assert torch.equal(per_text, per_image.T)


def test_padding_and_default_mask_change_nothing(small):
    """Prompts padded to 77 tokens (FlagAI's padding="max_length") or only to the longest prompt, with
    the tokenizer's mask or none: the same embeddings."""
    _, ours, _, input_ids, mask, _ = small
    short = [1, 2, 3, 5]  # without the 77-token prompt the longest has fewer tokens
    width = int(mask[short].sum(1).max())
    assert width < 40
    with torch.no_grad():
        full = ours.encode_text(input_ids[short], mask[short])
        trimmed = ours.encode_text(input_ids[short, :width], mask[short, :width])
        assert torch.allclose(trimmed, full, rtol=1e-5, atol=1e-6)
        assert torch.allclose(ours.encode_text(input_ids, mask)[short], full, rtol=1e-5, atol=1e-6)  # batch-mates
        assert torch.equal(ours.encode_text(input_ids), ours.encode_text(input_ids, mask))


def test_text_tower_is_the_diffusion_text_encoder(small):
    """AltCLIP.text still gives m9's UNet context: transformation of every token, without pre_LN."""
    ref, ours, _, input_ids, mask, _ = small
    with torch.no_grad():
        hidden = ref.text_model.roberta(input_ids=input_ids, attention_mask=mask).last_hidden_state
        assert rel_err(ours.text(input_ids, mask), ref.text_model.transformation(hidden)) < 1e-5


def test_clip_score_matches_hand_computation(small, tokenizer):
    ref, ours, _, _, _, pictures = small
    prompts = [TEXTS[0], TEXTS[3], TEXTS[1], TEXTS[4]]  # one per picture
    input_ids, mask = tokenizer(prompts)
    pixels = preprocess(pictures, ours.cfg.vision)

    def by_hand():
        with torch.no_grad():
            image = ref.get_image_features(pixel_values=pixels).pooler_output.double()
            text = ref.get_text_features(input_ids=input_ids, attention_mask=mask).pooler_output.double()
        cos = (image * text).sum(-1) / (image.norm(dim=-1) * text.norm(dim=-1))
        return cos, 100 * cos.clamp(min=0)

    # The small model's towers agree (helpers.small_altclip): every cosine positive, every score too.
    cos, expected = by_hand()
    assert (cos > 0).all(), cos
    got = clip_score(ours, tokenizer, pictures, prompts)
    assert got.shape == (4,) and got.dtype == torch.float32
    assert rel_err(got, expected) < 1e-5
    # Negating the image projection negates every cosine: now every score is exactly 0.
    flipped = copy.deepcopy(ref)
    with torch.no_grad():
        flipped.visual_projection.weight.neg_()
    flipped_ours, _ = load(flipped.state_dict(), ours.cfg)
    assert torch.equal(clip_score(flipped_ours, tokenizer, pictures, prompts), torch.zeros(4))
    # Float pictures in [0, 1] take the pipeline's route (rounded to 8 bits first): the same pixels for
    # a picture that is already 8-bit, so the same score (up to rounding: a batch of one, not of four).
    as_tensor = torch.from_numpy(np.array(pictures[2].convert("RGB")))[None].permute(0, 3, 1, 2).float() / 255
    assert torch.equal(preprocess(as_tensor, ours.cfg.vision), pixels[2:3])
    assert rel_diff(clip_score(ours, tokenizer, as_tensor, prompts[2]), got[2:3]) < 1e-5


def test_clip_score_rejects_unpaired_input(small, tokenizer):
    _, ours, _, _, _, pictures = small
    with pytest.raises(BadValue, match="4 images and 3 prompts"):
        clip_score(ours, tokenizer, pictures, TEXTS[:3])


def test_hub_layout_converts(small):
    """The hub's file (FlagAI's names, transformers 4.x) says encoder.layer.N and keeps XLM-R's pooler
    and the index buffers: converted, the same model."""
    ref, ours, _, input_ids, mask, pictures = small
    state = {k.replace(".encoder.layers.", ".encoder.layer.") if k.startswith("text_model.") else k: v
             for k, v in ref.state_dict().items()}
    assert any(".encoder.layer.1." in k for k in state)
    state["text_model.roberta.pooler.dense.weight"] = torch.zeros(32, 32)
    state["text_model.roberta.pooler.dense.bias"] = torch.zeros(32)
    state["text_model.roberta.embeddings.position_ids"] = torch.arange(514)[None]
    state["text_model.roberta.embeddings.token_type_ids"] = torch.zeros(1, 514, dtype=torch.long)
    state["vision_model.embeddings.position_ids"] = torch.arange(65)[None]
    hub, report = load(state, ours.cfg)
    assert report.converted == len(ours.state_dict())
    assert dict(report.dropped) == {DROPS[0][1]: 2, DROPS[1][1]: 2, DROPS[2][1]: 1}
    pixels = preprocess(pictures, ours.cfg.vision)
    with torch.no_grad():
        assert torch.equal(hub(input_ids, mask, pixels)[0], ours(input_ids, mask, pixels)[0])


def test_config_checks():
    m9_vision = vision_config_from_hf(M9_ALTCLIP["vision_config"])
    assert AltCLIPConfig() == AltCLIPConfig(TextEncoderConfig(), m9_vision, 768)
    with pytest.raises(BadValue, match="pre_transformation"):
        AltCLIPConfig(text=TextEncoderConfig(pre_transformation=True))
    with pytest.raises(BadType, match="TextEncoderConfig"):
        AltCLIPConfig(text={"hidden": 1024})
    with pytest.raises(BadType, match="projection_dim"):
        AltCLIPConfig(projection_dim=7.5)


@pytest.mark.slow
def test_full_altclip_m9_matches_reference():
    start = time.perf_counter()
    ref = reference_model(**M9_ALTCLIP)
    built = time.perf_counter()
    cfg = config_from_hf(ref.config.to_dict())
    assert cfg == AltCLIPConfig()  # our defaults are AltCLIP-m9's numbers
    ours, report = load(ref.state_dict(), cfg)  # shares ref's tensors: no second 3.5 GB copy
    assert report.converted == len(ours.state_dict()) == len(ref.state_dict())
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(4, 250002, (3, 77), generator=g)
    input_ids[:, 0], input_ids[0, 30], input_ids[0, 31:], input_ids[1, -1] = 0, 2, 1, 2  # row 0 padded after 31 tokens
    input_ids[2, 5], input_ids[2, 6:] = 2, 1
    mask = (input_ids != 1).long()
    pixels = preprocess([picture("RGB", 512, 384), picture("RGBA", 300, 500, seed=1)])
    with torch.no_grad():
        expected = ref(input_ids=input_ids, pixel_values=pixels, attention_mask=mask)
        expected_text = ref.get_text_features(input_ids=input_ids, attention_mask=mask).pooler_output
        expected_image = ref.get_image_features(pixel_values=pixels).pooler_output
        text, image = ours.encode_text(input_ids, mask), ours.encode_image(pixels)
        per_image, per_text = ours(input_ids, mask, pixels)
    expected_per_image, expected_per_text = expected.logits_per_image, expected.logits_per_text
    del ref, ours, expected  # 3.5 GB of weights (ours shares them) and the towers' outputs
    gc.collect()
    print(f"\nAltCLIP-m9 full test: build {built - start:.1f} s, total {time.perf_counter() - start:.1f} s, "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    assert text.shape == (3, 768) and image.shape == (2, 768) and per_image.shape == (2, 3)
    assert rel_err(text, expected_text) < 1e-5
    assert rel_err(image, expected_image) < 1e-5
    assert rel_err(per_image, expected_per_image) < 1e-5
    assert rel_err(per_text, expected_per_text) < 1e-5


# ---- AltCLIP-m9 as a model folder: `altdiff-min convert` from the transformers layout ------------------

def read_altclip(path):
    from altdiff_min.storage.folder import read_config, read_modules

    return read_modules(str(path), read_config(path, require=("altclip",)))["altclip"]


def test_converted_folder_matches_reference(altclip_dir, altclip_reference, tokenizer):
    """The hub layout (4.x names, pooler, pickled) → a model folder holding `altclip` and the
    tokenizer → the reference's embeddings and logits."""
    from altdiff_min.storage.folder import read_config

    config = read_config(altclip_dir, require=("altclip",))
    assert config["modules"] == ["altclip"] and config["tokenizer"]["max_length"] == 77
    assert "schedule" not in config and "image_size" not in config
    ours = read_altclip(altclip_dir)
    ids, mask = Tokenizer(os.path.join(altclip_dir, "sentencepiece.bpe.model"))(TEXTS[:4])
    pixels = preprocess([picture("RGB", 96, 80), picture("RGBA", 70, 120, seed=1), picture("L", 64, 64, seed=2)],
                        ours.cfg.vision)
    with torch.no_grad():
        ref = altclip_reference(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        per_image, per_text = ours(ids, mask, pixels)
        text = ours.encode_text(ids, mask)
        expected_text = altclip_reference.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
    assert rel_err(per_image, ref.logits_per_image) < 1e-5 and rel_err(per_text, ref.logits_per_text) < 1e-5
    assert rel_err(text, expected_text) < 1e-5


def test_folder_saved_by_the_installed_transformers_converts(altclip_layout, altclip_reference, tmp_path):
    """transformers 5.x's save_pretrained renames on the way out (vision_model.encoder.layer.N)."""
    import shutil

    from weights_convert.convert import convert

    src = tmp_path / "saved"
    altclip_reference.save_pretrained(src)
    for name in ("sentencepiece.bpe.model", "preprocessor_config.json"):
        shutil.copy(os.path.join(altclip_layout, name), src / name)
    convert(src, tmp_path / "out")
    ours = read_altclip(tmp_path / "out")
    ids, mask = Tokenizer(str(src / "sentencepiece.bpe.model"))(TEXTS[:3])
    pixels = preprocess([picture("RGB", 96, 80), picture("RGB", 64, 72, seed=3)], ours.cfg.vision)
    with torch.no_grad():
        ref = altclip_reference(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        per_image, _ = ours(ids, mask, pixels)
    assert rel_err(per_image, ref.logits_per_image) < 1e-5


def test_altclip_and_altdiffusion_folders_are_not_confused(altclip_dir, small_model_dir, altclip_layout, tmp_path):
    from altdiff_min.errors import BadFile
    from altdiff_min.storage.folder import read_config
    from altdiff_min.pipeline import load as load_diffusion
    from weights_convert.convert import convert

    with pytest.raises(BadFile, match="holds altclip, not text_encoder and unet and vae; pass an AltDiffusion") as e:
        load_diffusion(altclip_dir)
    assert "\n" not in str(e.value)
    with pytest.raises(BadFile, match="holds text_encoder and unet and vae, not altclip; pass an AltCLIP folder"):
        read_config(small_model_dir, require=("altclip",))
    with pytest.raises(BadValue, match="an AltCLIP, which holds no safety checker"):
        convert(altclip_layout, tmp_path / "x", safety_checker=True)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("breakage,message", [
    ("clip", "config.json: model_type is 'clip', not 'altclip'"),
    ("no-tokenizer", "has no sentencepiece.bpe.model: pass --tokenizer"),
    ("size", "preprocessor_config.json: size is 80"),
    ("longest-edge", "preprocessor_config.json: size is {'shortest_edge': 64, 'longest_edge': 80}; altdiff-min's preprocess resizes the shortest edge only"),
    ("pad", "preprocessor_config.json: do_pad is True; altdiff-min's preprocess does not pad"),
    ("vocab", "ids but the text encoder embeds 300"),
    ("no-weights", "no model weights found"),
    ("extra-tensor", "text_model.extra.weight"),
    ("wrong-shape", "text_projection.weight: (16, 12), but text_projection.weight is (16, 24)"),
])
def test_bad_altclip_fails_clearly_and_writes_nothing(altclip_layout, tmp_path, breakage, message):
    from weights_convert.convert import convert
    from weights_convert.rules import ConversionError

    root = tmp_path / "src"
    shutil.copytree(altclip_layout, root)
    weights = root / "pytorch_model.bin"
    if breakage == "clip":
        edit_json(root / "config.json", model_type="clip")
    elif breakage == "no-tokenizer":
        (root / "sentencepiece.bpe.model").unlink()
    elif breakage == "size":
        edit_json(root / "preprocessor_config.json", size={"shortest_edge": 80})
    elif breakage == "longest-edge":
        edit_json(root / "preprocessor_config.json", size={"shortest_edge": 64, "longest_edge": 80})
    elif breakage == "pad":
        edit_json(root / "preprocessor_config.json", do_pad=True)
    elif breakage == "vocab":
        edit_json(root / "config.json", text_config__vocab_size=300)
    elif breakage == "no-weights":
        weights.unlink()
    else:
        state = torch.load(weights, weights_only=True)
        if breakage == "extra-tensor":
            state["text_model.extra.weight"] = torch.zeros(2)
        else:
            state["text_projection.weight"] = state["text_projection.weight"][:, :12]
        torch.save(state, weights)
    with pytest.raises(ConversionError) as e:
        convert(str(root), tmp_path / "out")
    assert message in str(e.value)
    assert not (tmp_path / "out").exists()


def test_altclip_from_the_hub_online_and_offline(altclip_layout, altclip_reference, monkeypatch, tmp_path):
    """Online, the listing of a transformers repo decides what is fetched (config, tokenizer,
    preprocessor config, one weight file); offline, the cache is read as it is."""
    import shutil

    import huggingface_hub

    from weights_convert.convert import convert

    listing = ["config.json", "preprocessor_config.json", "pytorch_model.bin", "sentencepiece.bpe.model",
               "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "README.md"]
    asked = []
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, revision=None: listing)
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, revision=None, allow_patterns=None, **kw: asked.append(allow_patterns) or altclip_layout)
    convert("BAAI/AltCLIP-m9", tmp_path / "online")
    assert set(asked[0]) == {"config.json", "preprocessor_config.json", "pytorch_model.bin", "sentencepiece.bpe.model"}
    with pytest.raises(ConversionErrorType(), match="transformers repo \\(an AltCLIP\\), which holds no safety checker"):
        convert("BAAI/AltCLIP-m9", tmp_path / "checker", safety_checker=True)
    assert len(asked) == 1  # refused before anything was fetched
    monkeypatch.undo()
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--BAAI--AltCLIP-m9"
    shutil.copytree(altclip_layout, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    convert("BAAI/AltCLIP-m9", tmp_path / "offline")
    for out in ("online", "offline"):
        ours = read_altclip(tmp_path / out)
        assert all(torch.equal(v, ours.state_dict()[k]) for k, v in read_altclip(tmp_path / "online").state_dict().items())


def ConversionErrorType():
    from weights_convert.rules import ConversionError

    return ConversionError


def test_altclip_configs_in_every_form_transformers_reads():
    """Keys left out take transformers' defaults (AltCLIPTextConfig's are m9's XLM-R; the vision
    tower's CLIP ViT-B/32's), and an older file's *_config_dict wins as it does there."""
    from transformers import AltCLIPConfig as HFAltCLIPConfig

    assert config_from_hf({}) == config_from_hf(HFAltCLIPConfig().to_dict())
    assert config_from_hf({}).text == TextEncoderConfig()
    older = {**M9_ALTCLIP, "vision_config": {**M9_ALTCLIP["vision_config"], "patch_size": 32},
             "vision_config_dict": {"patch_size": 14, "hidden_size": 1024, "intermediate_size": 4096,
                                    "num_hidden_layers": 24, "num_attention_heads": 16}}
    assert config_from_hf(older) == AltCLIPConfig()


def test_full_altclip_m9_key_sets_on_meta():
    """AltCLIP-m9's every tensor converts, in transformers 5's names and in the hub file's (4.x: encoder.layer.N)."""
    from transformers import AltCLIPConfig as HFAltCLIPConfig
    from transformers import AltCLIPModel

    with torch.device("meta"):
        ref = AltCLIPModel(HFAltCLIPConfig(**M9_ALTCLIP))
    state = ref.state_dict()
    hub = {k.replace(".encoder.layers.", ".encoder.layer.") if k.startswith("text_model.") else k: v for k, v in state.items()}
    cfg = config_from_hf(ref.config.to_dict())
    assert cfg == AltCLIPConfig()
    for source in (state, hub):
        ours, report = load(source, cfg)
        assert report.converted == len(ours.state_dict())
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
