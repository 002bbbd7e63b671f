"""weights_convert end to end: the hub's diffusers layout and single ldm/FlagAI files → a model folder
→ altdiff_min.load, each module compared with the diffusers/transformers reference it came from."""
import json
import math
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
from helpers import (HW, M9_TEXT, M9_UNET, M9_VAE, SCHEDULER, SCHEDULERS, edit_json, no_weights_read, rel_err,
                     small_configs, write_json)
from safetensors.torch import save_file

from altdiff_min.apps.cli import main
from altdiff_min.errors import NotFinite
from altdiff_min.pipeline import load
from weights_convert.convert import convert
from weights_convert.rules import ConversionError

def assert_modules_match(model, reference, tol=1e-5):
    """Each loaded module against its reference, on random non-square inputs with batch 2."""
    g = torch.Generator().manual_seed(0)
    ids, mask = model.tokenizer(["一只戴着帽子的小狗", "un cercle rouge sur un fond blanc"])
    latents = torch.randn(2, 4, 8, 12, generator=g)
    context = torch.randn(2, 77, 32, generator=g)
    images = torch.rand(2, 3, 32, 48, generator=g) * 2 - 1
    with torch.no_grad():
        ref_text = reference["text_encoder"](input_ids=ids, attention_mask=mask).projection_state
        assert rel_err(model.text_encoder(ids, mask), ref_text) < tol
        ref_eps = reference["unet"](latents, torch.tensor([10, 900]), context).sample
        assert rel_err(model.unet(latents, torch.tensor([10, 900]), context), ref_eps) < tol
        assert rel_err(model.vae.decode(latents), reference["vae"].decode(latents).sample) < tol
        dist = reference["vae"].encode(images).latent_dist
        mean, logvar = model.vae.encode(images)
        assert rel_err(mean, dist.mean) < tol and rel_err(logvar, dist.logvar) < tol


def test_hub_layout_converts_and_matches(hub_layout, reference, tmp_path):
    reports = convert(hub_layout, tmp_path / "m9")
    assert sorted(os.listdir(tmp_path / "m9")) == ["checksums.json", "config.json", "model.safetensors",
                                                   "sentencepiece.bpe.model"]
    assert "pooler" in str(reports["text_encoder"])  # dropped, and said so
    config = json.loads((tmp_path / "m9" / "config.json").read_text())
    assert config["tokenizer"]["max_length"] == 77  # not the hub tokenizer config's 512
    assert config["schedule"]["num_train_timesteps"] == 1000
    model = load(tmp_path / "m9")
    assert model.tokenizer.max_length == 77
    assert_modules_match(model, reference)


def test_fp16_output_and_dtype_on_load(hub_layout, reference, tmp_path):
    convert(hub_layout, tmp_path / "half", dtype="fp16")
    model = load(tmp_path / "half")
    assert {p.dtype for m in (model.text_encoder, model.unet, model.vae) for p in m.parameters()} == {torch.float16}
    upcast = load(tmp_path / "half", dtype=torch.float32)
    assert next(upcast.unet.parameters()).dtype == torch.float32


def test_safetensors_and_fp16_variant_files(hub_layout, reference, tmp_path):
    """Newer mirrors: .safetensors files, and `.fp16.` variants picked only for --dtype fp16."""
    import shutil

    root = tmp_path / "mirror"
    shutil.copytree(hub_layout, root)
    for name, stem in [("text_encoder", "model"), ("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model")]:
        for f in (root / name).glob("*.bin"):
            f.unlink()
        state = {k: v.contiguous() for k, v in reference[name].state_dict().items()}
        save_file(state, root / name / f"{stem}.safetensors")
        save_file({k: v.half() for k, v in state.items()}, root / name / f"{stem}.fp16.safetensors")
    convert(root, tmp_path / "full")
    assert_modules_match(load(tmp_path / "full"), reference)
    convert(root, tmp_path / "half", dtype="fp16")
    half = load(tmp_path / "half", dtype=torch.float32)
    ids, mask = half.tokenizer(["a dog"])
    with torch.no_grad():
        expected = reference["text_encoder"](input_ids=ids, attention_mask=mask).projection_state
        assert 0 < rel_err(half.text_encoder(ids, mask), expected) < 5e-3  # from the fp16 files: close, not equal


def test_sharded_weights_and_their_fp16_variant_as_diffusers_names_them(hub_layout, reference, tmp_path):
    """save_pretrained's shards: `….safetensors.index.json`, and for a variant `….safetensors.index.fp16.json`."""
    import copy
    import shutil

    root = tmp_path / "sharded"
    shutil.copytree(hub_layout, root)
    for f in (root / "unet").glob("*.bin"):
        f.unlink()
    reference["unet"].save_pretrained(root / "unet", max_shard_size="100KB")
    copy.deepcopy(reference["unet"]).half().save_pretrained(root / "unet", variant="fp16", max_shard_size="100KB")
    names = sorted(f.name for f in (root / "unet").iterdir())
    assert {"diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.fp16.json"} <= set(names)
    assert len(names) > 6  # several shards of each
    convert(root, tmp_path / "full")
    assert_modules_match(load(tmp_path / "full"), reference)  # exactly the fp32 shards
    convert(root, tmp_path / "half", dtype="fp16")
    g = torch.Generator().manual_seed(1)
    latents, context = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        expected = reference["unet"](latents, torch.tensor([10, 900]), context).sample
        got = load(tmp_path / "half", dtype=torch.float32).unet(latents, torch.tensor([10, 900]), context)
    assert 0 < rel_err(got, expected) < 5e-3  # from the fp16 shards: close, not equal


# ---- the single-file ldm / FlagAI layout -------------------------------------------------------------

def diffusers_to_ldm_unet(name: str, cfg: dict) -> str:
    """The CompVis name of a diffusers UNet tensor (written from the ldm code's structure; proved
    against diffusers' own ldm→diffusers conversion below)."""
    per = cfg["layers_per_block"] + 1
    levels = len(cfg["block_out_channels"])
    attn_up = [t.startswith("CrossAttn") for t in cfg["up_block_types"]]
    outer = [
        (r"^conv_in\.", lambda m: "input_blocks.0.0."),
        (r"^time_embedding\.linear_(\d)\.", lambda m: f"time_embed.{2 * int(m[1]) - 2}."),
        (r"^down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.0."),
        (r"^down_blocks\.(\d+)\.attentions\.(\d+)\.", lambda m: f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.1."),
        (r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.", lambda m: f"input_blocks.{(int(m[1]) + 1) * per}.0.op."),
        (r"^mid_block\.resnets\.0\.", lambda m: "middle_block.0."), (r"^mid_block\.attentions\.0\.", lambda m: "middle_block.1."),
        (r"^mid_block\.resnets\.1\.", lambda m: "middle_block.2."),
        (r"^up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"output_blocks.{int(m[1]) * per + int(m[2])}.0."),
        (r"^up_blocks\.(\d+)\.attentions\.(\d+)\.", lambda m: f"output_blocks.{int(m[1]) * per + int(m[2])}.1."),
        (r"^up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"output_blocks.{int(m[1]) * per + per - 1}.{2 if attn_up[int(m[1])] else 1}."),
        (r"^conv_norm_out\.", lambda m: "out.0."), (r"^conv_out\.", lambda m: "out.2."),
    ]
    inner = [(".norm1.", ".in_layers.0."), (".conv1.", ".in_layers.2."), (".time_emb_proj.", ".emb_layers.1."),
             (".norm2.", ".out_layers.0."), (".conv2.", ".out_layers.3."), (".conv_shortcut.", ".skip_connection.")]
    assert levels == len(attn_up)
    for pattern, fn in outer:
        if m := re.match(pattern, name):
            name = fn(m) + name[m.end():]
            break
    if ".transformer_blocks." not in name:
        for theirs, ours in inner:
            name = name.replace(theirs, ours)
    return name


def diffusers_to_ldm_vae(name: str, levels: int) -> str:
    name = re.sub(r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.", name)
    for theirs, ours in [("mid_block.resnets.0.", "mid.block_1."), ("mid_block.resnets.1.", "mid.block_2."),
                         ("mid_block.attentions.0.", "mid.attn_1."), ("down_blocks.", "down."), (".resnets.", ".block."),
                         ("downsamplers.0.", "downsample."), ("upsamplers.0.", "upsample."),
                         ("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                         ("to_out.0.", "proj_out."), ("conv_norm_out.", "norm_out."), ("conv_shortcut.", "nin_shortcut.")]:
        name = name.replace(theirs, ours)
    return name


def ldm_checkpoint(reference) -> dict:
    """One FlagAI-style state dict of all three modules, with the extras real files carry."""
    unet_cfg, vae_cfg = dict(reference["unet"].config), dict(reference["vae"].config)
    sd = {"model.diffusion_model." + diffusers_to_ldm_unet(k, unet_cfg): v for k, v in reference["unet"].state_dict().items()}
    for k, v in reference["vae"].state_dict().items():
        ldm = diffusers_to_ldm_vae(k, len(vae_cfg["block_out_channels"]))
        sd["first_stage_model." + ldm] = v[:, :, None, None] if ".mid.attn_1." in ldm and v.ndim == 2 else v  # 1×1 convs
    sd.update({"cond_stage_model." + k: v for k, v in reference["text_encoder"].state_dict().items()})
    hidden = reference["text_encoder"].config.hidden_size
    sd["cond_stage_model.pre_LN.weight"], sd["cond_stage_model.pre_LN.bias"] = torch.ones(hidden), torch.zeros(hidden)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # as FlagAI: float64,
    sd["betas"], sd["alphas_cumprod"] = betas.float(), torch.cumprod(1 - betas, 0).float()  # stored float32
    sd["model_ema.decay"], sd["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(1000)
    return sd


def test_ldm_naming_map_is_what_diffusers_reads(reference):
    """The test's ldm file is only trustworthy if diffusers' ldm→diffusers conversion recovers the
    original modules from it, every tensor and nothing else."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    sd = ldm_checkpoint(reference)
    for name, recover in [("unet", convert_ldm_unet_checkpoint), ("vae", convert_ldm_vae_checkpoint)]:
        back = recover(dict(sd), dict(reference[name].config))
        original = reference[name].state_dict()
        assert set(back) == set(original)
        assert all(torch.equal(back[k].reshape(original[k].shape), original[k]) for k in original)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_single_file_converts_and_matches(reference, spm_dir, tmp_path, suffix):
    sd = ldm_checkpoint(reference)
    path = tmp_path / f"Alt-Diffusion-M9{suffix}"
    if suffix == ".ckpt":
        torch.save({"state_dict": sd, "global_step": 1}, path)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    # Single files carry no configs: the converter assumes m9's unless told otherwise, as here.
    reports = convert(path, tmp_path / "m9", tokenizer=os.path.join(spm_dir, "sentencepiece.bpe.model"),
                      configs=small_configs(reference))
    dropped = str(reports["other"]) + str(reports["text_encoder"])
    assert "noise-schedule" in dropped and "EMA" in dropped and "pre_LN" in dropped
    assert_modules_match(load(tmp_path / "m9"), reference)


def test_single_file_configs_not_given_are_m9s(reference, spm_dir, tmp_path):
    path = tmp_path / "small.safetensors"
    save_file({k: v.contiguous() for k, v in ldm_checkpoint(reference).items()}, path)
    spm, small = os.path.join(spm_dir, "sentencepiece.bpe.model"), small_configs(reference)
    with pytest.raises(ConversionError, match="the text encoder embeds 250002"):  # m9's, not a KeyError
        convert(path, tmp_path / "out", tokenizer=spm, configs={"unet": small["unet"]})
    with pytest.raises(ValueError, match="a single file holds \\['text_encoder', 'unet', 'vae'\\], not \\['altclip'\\]"):
        convert(path, tmp_path / "out", tokenizer=spm, configs={**small, "altclip": None})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change,message", [
    ({"betas": torch.linspace(1e-4, 2e-2, 1000)}, "its betas differs from scaled_linear β 0.00085–0.012 over 1000 steps by"),
    ({"alphas_cumprod": torch.cumprod(1 - torch.linspace(1e-4, 2e-2, 1000), 0)}, "its alphas_cumprod differs"),
    ({"alphas_cumprod": torch.ones(500)}, "alphas_cumprod of shape \\(500,\\), not the \\(1000,\\)"),
])
def test_single_file_with_another_noise_schedule_is_refused(reference, spm_dir, tmp_path, change, message):
    """Such files carry no schedule config: the buffers they keep must be the schedule we sample with."""
    path = tmp_path / "other-schedule.safetensors"
    save_file({k: v.contiguous() for k, v in {**ldm_checkpoint(reference), **change}.items()}, path)
    with pytest.raises(ConversionError, match="the checkpoint's noise schedule .*" + message):
        convert(path, tmp_path / "m9", tokenizer=os.path.join(spm_dir, "sentencepiece.bpe.model"),
                configs=small_configs(reference))
    assert not (tmp_path / "m9").exists()


# ---- the hub: huggingface_hub's own cache resolution, offline -----------------------------------------

def run_cli(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "altdiff_min", *args], capture_output=True, text=True, env=env, timeout=600)


def test_hub_id_from_the_cache_offline(hub_layout, reference, tmp_path):
    """A hub id whose files sit in the HF cache (HF_HOME) converts with HF_HUB_OFFLINE=1."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--BAAI--AltDiffusion-m9"
    shutil.copytree(hub_layout, repo / "snapshots" / commit, ignore=shutil.ignore_patterns("safety_checker"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    out = run_cli("convert", "BAAI/AltDiffusion-m9", str(tmp_path / "m9"),
                  env_extra={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert "wrote" in out.stdout and "pooler" in out.stdout
    assert_modules_match(load(tmp_path / "m9"), reference)


def test_hub_id_not_cached_offline_says_how_to_get_it(tmp_path):
    out = run_cli("convert", "BAAI/AltDiffusion-m9", str(tmp_path / "m9"),
                  env_extra={"HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2
    assert "not in the Hugging Face cache" in out.stderr and "hf download BAAI/AltDiffusion-m9 --include" in out.stderr
    assert "hf download BAAI/AltCLIP-m9" in out.stderr  # the AltCLIP's own repo, not the diffusion one again
    assert "huggingface-cli" not in out.stderr  # huggingface_hub ≥ 1.0 no longer ships it
    assert not (tmp_path / "m9").exists()
    out = run_cli("convert", "BAAI/AltCLIP-m9", str(tmp_path / "clip"),
                  env_extra={"HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2 and "\n  hf download BAAI/AltCLIP-m9\n" in out.stderr and "AltDiffusion" not in out.stderr


def test_online_fetch_asks_only_for_what_it_needs(hub_layout, monkeypatch, tmp_path):
    """Online, the repo listing decides: configs, tokenizer and one precision of the three modules'
    weights; the safety checker's only when asked. (The hub is unreachable here: its two calls are stood in for.)"""
    import huggingface_hub

    listing = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/sentencepiece.bpe.model",
               "tokenizer/tokenizer_config.json", "safety_checker/pytorch_model.bin", "feature_extractor/preprocessor_config.json",
               "text_encoder/config.json", "text_encoder/pytorch_model.bin", "text_encoder/model.fp16.safetensors",
               "unet/config.json", "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.bin",
               "vae/config.json", "vae/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.safetensors"]
    asked = []
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, revision=None: listing)
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, revision=None, allow_patterns=None, **kw: asked.append(allow_patterns) or hub_layout)
    from weights_convert.sources import hub_folder

    assert hub_folder("BAAI/AltDiffusion-m9", None, fp16=False) == hub_layout
    assert set(asked[0]) == {"model_index.json", "scheduler/scheduler_config.json", "tokenizer/sentencepiece.bpe.model",
                             "tokenizer/tokenizer_config.json", "text_encoder/config.json", "unet/config.json",
                             "vae/config.json", "text_encoder/pytorch_model.bin", "unet/diffusion_pytorch_model.bin",
                             "vae/diffusion_pytorch_model.safetensors"}
    hub_folder("BAAI/AltDiffusion-m9", "fp16", fp16=True)
    assert {"text_encoder/model.fp16.safetensors", "unet/diffusion_pytorch_model.fp16.bin"} <= set(asked[1])
    listing.append("safety_checker/config.json")
    hub_folder("BAAI/AltDiffusion-m9", None, fp16=False, safety_checker=True)  # --with-safety-checker
    assert set(asked[2]) - set(asked[0]) == {"safety_checker/config.json", "safety_checker/pytorch_model.bin",
                                             "feature_extractor/preprocessor_config.json"}


def test_text_encoder_file_with_an_unused_pre_ln(reference):
    """A file saved from FlagAI's model carries pre_LN even for m9 (no second head): dropped, with its
    reason; the rest converts as before."""
    from weights_convert import text_encoder

    ref = reference["text_encoder"]
    state = dict(ref.state_dict())
    hidden = ref.config.hidden_size
    state["pre_LN.weight"], state["pre_LN.bias"] = torch.ones(hidden), torch.zeros(hidden)
    cfg = text_encoder.config_from_hf(ref.config.to_dict())
    model, report = text_encoder.load(state, cfg)
    assert report.dropped[text_encoder.PRE_LN_DROP[1]] == 2
    assert report.converted == len(model.state_dict())


# ---- bad input: a clear error, and no OUT_DIR ----------------------------------------------------------

class NotATensor:  # pickled into a checkpoint: torch.load(weights_only=True) must refuse to build it
    pass


# State dicts torch.load(weights_only=True) reads that are not names → dense real float tensors.
ODD_TENSORS = {
    "int-key": lambda state: state.update({7: torch.zeros(1)}),
    "sparse": lambda state: state.update({"conv_in.weight": state["conv_in.weight"].to_sparse()}),
    "int64": lambda state: state.update({"conv_in.weight": state["conv_in.weight"].long()}),
    "complex": lambda state: state.update({"conv_in.bias": state["conv_in.bias"].to(torch.complex64)}),
    "float64": lambda state: state.update({"conv_in.weight": state["conv_in.weight"].double()}),
}


def corrupt(root, how):
    path = root / "unet" / "diffusion_pytorch_model.bin"
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(os.urandom(4096))
    elif how == "code":
        torch.save({"conv_in.weight": NotATensor()}, path)
    elif how == "raw-pickle":  # pickle.dump, not torch.save: opcodes the weights-only unpickler refuses
        import pickle

        with open(path, "wb") as f:
            pickle.dump({"conv_in.weight": NotATensor()}, f, protocol=4)
    elif how == "missing-config":
        (root / "vae" / "config.json").unlink()
    elif how == "wrong-tensor":
        state = torch.load(path, weights_only=True)
        state["conv_in.weight"] = state["conv_in.weight"][:, :3]
        torch.save(state, path)
    elif how in ODD_TENSORS:
        state = torch.load(path, weights_only=True)
        ODD_TENSORS[how](state)
        torch.save(state, path)
    elif how == "beyond-fp16":  # finite in float32, infinite once written as fp16
        state = torch.load(path, weights_only=True)
        state["conv_in.weight"][0, 0, 0, 0] = 1e5
        torch.save(state, path)


@pytest.mark.parametrize("how,message", [
    ("truncated", "not a readable PyTorch checkpoint"),
    ("garbage", "not a readable PyTorch checkpoint"),
    ("code", "never executes code"),
    ("raw-pickle", "is a pickle that torch.load\\(weights_only=True\\) cannot read safely .* never executes code"),
    ("missing-config", "missing vae/config.json"),
    ("wrong-tensor", "conv_in.weight"),
    ("int-key", "unet state dict has a key that is not a name: 7"),
    ("sparse", "tensors of the wrong kind.*\n.*conv_in.weight: torch.float32 sparse_coo, but conv_in.weight holds real floats"),
    ("int64", "tensors of the wrong kind.*\n.*conv_in.weight: torch.int64 strided"),
    ("complex", "tensors of the wrong kind.*\n.*conv_in.bias: torch.complex64"),
])
def test_bad_diffusers_folder_fails_clearly_and_leaves_nothing(hub_layout, tmp_path, how, message):
    import shutil

    root = tmp_path / "src"
    shutil.copytree(hub_layout, root)
    corrupt(root, how)
    with pytest.raises(ConversionError, match=message):
        convert(root, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["src"]  # no OUT_DIR, no partial folder


@pytest.mark.parametrize("content,message", [
    (lambda: {"state_dict": {"model.weird.weight": torch.zeros(2)}}, "not an AltDiffusion checkpoint"),
    (lambda: {"first_stage_model.encoder.conv_in.weight": torch.zeros(2)}, "no tensors under"),
    (lambda: [1, 2, 3], "does not hold a state dict"),
])
def test_wrong_single_files_fail_clearly(reference, spm_dir, tmp_path, content, message):
    spm, configs = os.path.join(spm_dir, "sentencepiece.bpe.model"), small_configs(reference)
    torch.save(content(), tmp_path / "x.ckpt")
    with pytest.raises(ConversionError, match=message):
        convert(tmp_path / "x.ckpt", tmp_path / "out", tokenizer=spm, configs=configs)
    (tmp_path / "y.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ConversionError, match="not a readable safetensors"):
        convert(tmp_path / "y.safetensors", tmp_path / "out", tokenizer=spm, configs=configs)
    assert not (tmp_path / "out").exists()


def test_argument_errors_come_first(hub_layout, tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        convert(hub_layout, tmp_path / "a", dtype="bf8")
    with pytest.raises(FileNotFoundError, match="neither a file, a folder, nor a hub repo id"):
        convert(str(tmp_path / "nowhere" / "x"), tmp_path / "a")
    torch.save({}, tmp_path / "m.ckpt")
    with pytest.raises(ValueError, match="--tokenizer"):
        convert(tmp_path / "m.ckpt", tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        convert(tmp_path / "m.ckpt", tmp_path / "a", tokenizer=tmp_path / "none.model")
    with pytest.raises(ValueError, match="not an altdiff-min model folder"):
        load(tmp_path)
    with pytest.raises(ValueError, match="m.ckpt is a file, not a model folder: convert a single checkpoint first"):
        load(tmp_path / "m.ckpt")


def test_existing_out_dir_needs_force_and_failures_keep_it(hub_layout, tmp_path, monkeypatch):
    out = tmp_path / "m9"
    convert(hub_layout, out)
    before = (out / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="--force"):
        convert(hub_layout, out)
    import altdiff_min.storage.folder as module

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(hub_layout, out, force=True)
    assert (out / "model.safetensors").stat().st_mtime_ns == before  # the old folder is untouched
    assert sorted(os.listdir(tmp_path)) == ["m9"]  # and the partial one is gone
    monkeypatch.undo()
    convert(hub_layout, out, force=True, dtype="fp16")
    assert load(out).unet.conv_in.weight.dtype == torch.float16 and sorted(os.listdir(tmp_path)) == ["m9"]


def test_float64_weights_are_written_as_float32_even_with_keep(hub_layout, tmp_path):
    import shutil

    root = tmp_path / "src"
    shutil.copytree(hub_layout, root)
    corrupt(root, "float64")
    convert(root, tmp_path / "kept", dtype="keep")
    model = load(tmp_path / "kept")
    assert model.unet.conv_in.weight.dtype == torch.float32
    with torch.no_grad():
        assert model.unet(torch.randn(2, 4, 8, 12), torch.tensor([1, 500]), torch.randn(2, 77, 32)).isfinite().all()


@pytest.mark.parametrize("component", ["vae", "text_encoder"])
def test_a_missing_weight_file_is_named_before_any_weights_are_read(hub_layout, tmp_path, monkeypatch, component):
    import shutil

    import weights_convert.convert as conversion

    root = tmp_path / "src"
    shutil.copytree(hub_layout, root)
    for f in (root / component).glob("*.bin"):
        f.unlink()
    monkeypatch.setattr(conversion, "read_component", lambda *a: pytest.fail("weights were read"))
    with pytest.raises(ConversionError, match=f"no {component} weights found"):
        convert(root, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_a_missing_shard_is_named_before_any_weights_are_read(hub_layout, reference, tmp_path, monkeypatch):
    import shutil

    import weights_convert.convert as conversion

    root = tmp_path / "src"
    shutil.copytree(hub_layout, root)
    for f in (root / "vae").glob("*.bin"):
        f.unlink()
    reference["vae"].save_pretrained(root / "vae", max_shard_size="50KB")
    shard = sorted((root / "vae").glob("*-of-*.safetensors"))[1]
    shard.unlink()
    monkeypatch.setattr(conversion, "read_component", lambda *a: pytest.fail("weights were read"))
    with pytest.raises(ConversionError, match=f"weight file\\(s\\) not found in .*: vae/{shard.name}"):
        convert(root, tmp_path / "out")


def test_weights_beyond_fp16_are_refused_not_written_as_infinities(hub_layout, tmp_path):
    import shutil

    root = tmp_path / "src"
    shutil.copytree(hub_layout, root)
    corrupt(root, "beyond-fp16")
    with pytest.raises(ValueError, match="1 tensor\\(s\\) do not fit float16 .* e.g. unet.conv_in.weight: write them in float32"):
        convert(root, tmp_path / "half", dtype="fp16")
    assert sorted(os.listdir(tmp_path)) == ["src"]
    convert(root, tmp_path / "full")  # float32 holds it
    assert load(tmp_path / "full").unet.conv_in.weight[0, 0, 0, 0] == 1e5


def test_bad_numbers_at_conversion(src, monkeypatch):
    no_weights_read(monkeypatch)
    edit_json(src / "vae" / "config.json", sample_size=-64)
    with pytest.raises(ConversionError, match=r"vae/config.json: sample_size must be an integer in \[8, 16384\]"):
        convert(src, src.parent / "out")
    edit_json(src / "vae" / "config.json", sample_size=64)
    write_json(src / "scheduler" / "scheduler_config.json", {**json.loads((src / "scheduler" / "scheduler_config.json").read_text()),
                                                            "beta_start": math.nan})
    with pytest.raises(ConversionError, match="beta_start must be a finite number"):
        convert(src, src.parent / "out")


def test_nan_weights(src, model, tmp_path):
    path = src / "unet" / "diffusion_pytorch_model.bin"
    state = torch.load(path, weights_only=True)
    state["conv_in.weight"][0, 0, 0, 0] = math.nan
    torch.save(state, path)
    with pytest.raises(ConversionError, match=r"hold NaN or infinite values, e.g. unet.conv_in.weight"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # A model folder with NaN weights (written by other means): the picture is refused, not saved black.
    from safetensors.torch import load_file, save_file

    tensors = load_file(model / "model.safetensors")
    tensors["unet.conv_in.weight"][0, 0, 0, 0] = math.nan
    save_file(tensors, model / "model.safetensors")
    with pytest.raises(NotFinite, match=r"tensor 'unet.conv_in.weight' has 1 NaN/inf value"):
        load(model)  # refused at load, not after sampling to the end
    # Read anyway (check_finite=False): the picture is refused, not saved black.
    with pytest.raises(NotFinite, match=r"picture\(s\) \[0\] of 1 came out NaN"):
        load(model, check_finite=False).generate("a dog", **HW)


def test_a_flipped_byte_in_a_pickled_checkpoint(src, tmp_path):
    path = src / "unet" / "diffusion_pytorch_model.bin"
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)  # the largest tensor's storage
    data = bytearray(path.read_bytes())
    data[info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 100] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(ConversionError, match="fails its CRC check"):
        convert(src, tmp_path / "out")


class RunsACommand:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/altdiff-min-pwned",))


@pytest.mark.parametrize("breakage,message", [
    ("os.system", "never executes code"),
    ("not-json", "unet/config.json is not valid JSON"),
    ("a-list", "unet/config.json: a config must be a JSON object"),
    ("deep", "unet/config.json nests JSON deeper than 64 levels"),
    ("string-channels", "UNetConfig.channels[0] must be an integer, got '32'"),
    ("heads-0", "UNetConfig.heads must be in [1, 256], got 0"),
    ("missing-key", "text_encoder/config.json has no 'project_dim' entry"),
    ("symlinked-component", None),
])
def test_conversion_errors_name_the_file(src, tmp_path, capsys, breakage, message):
    unet = src / "unet"
    if breakage == "os.system":
        torch.save({"conv_in.weight": RunsACommand()}, unet / "diffusion_pytorch_model.bin")
    elif breakage == "not-json":
        (unet / "config.json").write_text("{'in_channels': 4,")
    elif breakage == "a-list":
        (unet / "config.json").write_text("[1, 2]")
    elif breakage == "deep":  # a RecursionError traceback before the one JSON reader
        (unet / "config.json").write_text("[" * 100000)
    elif breakage == "string-channels":
        edit_json(unet / "config.json", block_out_channels=["32", "64", "64"])
    elif breakage == "heads-0":
        edit_json(unet / "config.json", attention_head_dim=0)
    elif breakage == "missing-key":
        edit_json(src / "text_encoder" / "config.json", project_dim=KeyError)
    else:
        shutil.move(unet, tmp_path / "elsewhere")
        unet.symlink_to(tmp_path / "elsewhere")
    code = main(["convert", str(src), str(tmp_path / "out")])
    err = capsys.readouterr().err
    if message is None:
        assert code == 0, err
        return
    last = err.strip().splitlines()[-1]  # after the progress bar, if conversion had started
    assert code == 2 and last.startswith("altdiff-min convert: error: ") and message in last
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    assert not os.path.exists("/tmp/altdiff-min-pwned")


def test_conversion_gaps(src, spm_dir, reference, tmp_path, monkeypatch, capsys):
    junk = tmp_path / "junk.ckpt"
    junk.write_text("this is not a checkpoint\n" * 10)
    with pytest.raises(ConversionError, match="not a readable PyTorch checkpoint"):
        convert(junk, tmp_path / "a", tokenizer=os.path.join(spm_dir, "sentencepiece.bpe.model"),
                configs=small_configs(reference))
    monkeypatch.chdir(tmp_path)
    assert main(["convert", "./nosuch", "out"]) == 2
    assert "neither a file, a folder, nor a hub repo id" in capsys.readouterr().err
    # transformers 5 saves tokenizer.json only: say that --tokenizer solves it
    (src / "tokenizer" / "sentencepiece.bpe.model").unlink()
    assert main(["convert", str(src), str(tmp_path / "b")]) == 2
    assert "pass --tokenizer" in capsys.readouterr().err
    # a wrong --tokenizer is refused before any module is converted
    no_weights_read(monkeypatch)
    other = tmp_path / "other.model"
    from helpers import train_sentencepiece

    train_sentencepiece(str(other), ["a small other vocabulary", "nothing like the model's"] * 20, vocab_size=40)
    assert main(["convert", str(src), str(tmp_path / "b"), "--tokenizer", str(other)]) == 2
    assert "do not belong together" in capsys.readouterr().err


# ---- the full m9 architecture: every key and shape of both layouts, on the meta device ---------------



def test_full_m9_key_sets_and_shapes_on_meta():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from diffusers.pipelines.deprecated.alt_diffusion.modeling_roberta_series import (
        RobertaSeriesConfig, RobertaSeriesModelWithTransformation)

    from altdiff_min import TextEncoderConfig
    from altdiff_min.model.unet import UNetConfig
    from altdiff_min.model.vae import VAEConfig
    from weights_convert import ldm, text_encoder, unet, vae

    with torch.device("meta"):
        ref = {"text_encoder": RobertaSeriesModelWithTransformation(RobertaSeriesConfig(**M9_TEXT)),
               "unet": UNet2DConditionModel.from_config(M9_UNET), "vae": AutoencoderKL.from_config(M9_VAE)}
    converters = {"text_encoder": text_encoder, "unet": unet, "vae": vae}
    cfgs = {name: converters[name].config_from_hf(ref[name].config.to_dict() if name == "text_encoder" else dict(ref[name].config))
            for name in ref}
    assert cfgs == {"text_encoder": TextEncoderConfig(), "unet": UNetConfig(), "vae": VAEConfig()} == ldm.DEFAULT_CONFIGS
    params = 0
    for name, module in ref.items():  # the diffusers layout
        model, report = converters[name].load(module.state_dict(), cfgs[name])
        assert report.converted == len(model.state_dict())
        params += sum(p.numel() for p in model.parameters())
    assert 1.45e9 < params < 1.55e9  # ~560 M + ~860 M + ~84 M
    # The ldm layout, built by the test's map and proved against diffusers' converter at full size too.
    sd = {"model.diffusion_model." + diffusers_to_ldm_unet(k, dict(ref["unet"].config)): v for k, v in ref["unet"].state_dict().items()}
    sd.update({"first_stage_model." + diffusers_to_ldm_vae(k, 4): (v[:, :, None, None] if "attentions" in k and v.ndim == 2 else v)
               for k, v in ref["vae"].state_dict().items()})
    sd.update({"cond_stage_model." + k: v for k, v in ref["text_encoder"].state_dict().items()})
    assert set(convert_ldm_unet_checkpoint(dict(sd), dict(ref["unet"].config))) == set(ref["unet"].state_dict())
    assert set(convert_ldm_vae_checkpoint(dict(sd), dict(ref["vae"].config))) == set(ref["vae"].state_dict())
    parts, _ = ldm.split(sd)
    for name in ref:
        model, report = ldm.load(name, parts[name], cfgs[name])
        assert report.converted == len(model.state_dict())


def test_empty_modules_builds_skeletons_and_leaves_torch_nn_alone():
    """Loading builds modules on the meta device; torch.nn itself is not touched, so a module built
    meanwhile elsewhere (another thread) is initialised as usual."""
    from altdiff_min.storage.folder import empty_modules

    before = {cls: cls.__dict__.get("reset_parameters") for cls in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm)}
    with empty_modules():
        skeleton = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4))
        assert {cls: cls.__dict__.get("reset_parameters") for cls in before} == before
    assert all(p.is_meta for p in skeleton.parameters())
    fresh = torch.nn.Conv2d(3, 4, 3)
    assert fresh.weight.std() > 0 and not fresh.weight.is_meta


# ---- the scheduler config: carried as diffusers' from_config reads it, or refused ---------------------

def saved_by_diffusers(scheduler_cls, tmp_path, **changes) -> dict:
    """scheduler_config.json as current diffusers writes it: every option stated, timestep_spacing too."""
    from diffusers import DDIMScheduler

    scheduler_cls.from_config(DDIMScheduler.from_config(SCHEDULER).config, **changes).save_config(tmp_path / "saved")
    return json.loads((tmp_path / "saved" / "scheduler_config.json").read_text())


def with_scheduler_config(hub_layout, tmp_path, scheduler_config: dict):
    import shutil

    root = tmp_path / "src"
    shutil.copytree(hub_layout, root)
    write_json(root / "scheduler" / "scheduler_config.json", scheduler_config)
    return root


@pytest.mark.parametrize("source,expected", [
    ("hub", dict(timestep_spacing=None, set_alpha_to_one=False, steps_offset=1)),
    ("DDIMScheduler", dict(timestep_spacing="leading", set_alpha_to_one=False, steps_offset=1)),
    ("PNDMScheduler", dict(timestep_spacing="leading", set_alpha_to_one=False, steps_offset=1)),
    ("DPMSolverMultistepScheduler", dict(timestep_spacing="linspace", set_alpha_to_one=False, steps_offset=1)),
    ("EulerDiscreteScheduler", dict(timestep_spacing="linspace", set_alpha_to_one=None, steps_offset=1)),
    ("trailing", dict(timestep_spacing="trailing", set_alpha_to_one=False, steps_offset=1)),
    ("v_prediction", {"prediction_type": "v_prediction", "timestep_spacing": "leading"}),
])
def test_scheduler_config_is_carried(hub_layout, tmp_path, source, expected):
    """A stated timestep_spacing is kept (it then applies to every sampler); an absent one is None.
    diffusers keeps options a class does not use when it re-targets (DPM's config states set_alpha_to_one);
    an Euler scheduler made afresh states none: None, each sampler's default."""
    import diffusers

    if source == "hub":
        hf = SCHEDULER
    elif source == "EulerDiscreteScheduler":
        m9 = {k: SCHEDULER[k] for k in ("beta_start", "beta_end", "beta_schedule", "steps_offset")}
        diffusers.EulerDiscreteScheduler(**m9).save_config(tmp_path / "saved")
        hf = json.loads((tmp_path / "saved" / "scheduler_config.json").read_text())
        assert "set_alpha_to_one" not in hf
    elif source in ("trailing", "v_prediction"):
        hf = saved_by_diffusers(diffusers.DDIMScheduler, tmp_path, **{"trailing": {"timestep_spacing": "trailing"},
                                                                       "v_prediction": {"prediction_type": "v_prediction"}}[source])
    else:  # PNDM as the model card re-targets it: without its Runge–Kutta steps (refused otherwise, above)
        hf = saved_by_diffusers(getattr(diffusers, source), tmp_path, **(SCHEDULERS["plms"][1] if source == "PNDMScheduler" else {}))
    out = tmp_path / "out"
    convert(with_scheduler_config(hub_layout, tmp_path, hf), out)
    schedule = load(out).schedule
    assert {k: getattr(schedule, k) for k in expected} == expected
    assert (schedule.beta_start, schedule.beta_end, schedule.num_train_timesteps) == (0.00085, 0.012, 1000)


@pytest.mark.parametrize("change,message", [
    (dict(timestep_spacing="cosine"), "timestep_spacing='cosine' is not one of leading, linspace, trailing"),
    ({"prediction_type": "sample"}, "ScheduleConfig.prediction_type must be one of 'epsilon', 'v_prediction', got 'sample'"),
    (dict(use_karras_sigmas=True), "use_karras_sigmas=True is not implemented.*use the sampler 'dpm\\+\\+2m-karras'"),
    (dict(solver_order=3), "solver_order=3 is not implemented"),
    (dict(my_new_option=0.5), "scheduler option 'my_new_option' \\(= 0.5\\) is not implemented"),
    (dict(beta_schedule=None), "beta_schedule='linear' \\(not stated, so diffusers' default for DDIMScheduler\\) is not implemented"),
    (dict(clip_sample=None), "clip_sample=True \\(not stated, so diffusers' default for DDIMScheduler\\) is not implemented"),
    (dict(_class_name="PNDMScheduler"), "skip_prk_steps=False \\(not stated, so diffusers' default for PNDMScheduler"),
    (dict(_class_name="PNDMScheduler", skip_prk_steps=False), "skip_prk_steps=False is not implemented"),
    (dict(_class_name="MyScheduler"), "scheduler class 'MyScheduler' is not one whose defaults altdiff-min knows"),
])
def test_scheduler_config_we_cannot_honour_is_refused_first(hub_layout, tmp_path, monkeypatch, change, message):
    import weights_convert.convert as conversion

    hf = {k: v for k, v in {**SCHEDULER, **change}.items() if v is not None}
    src = with_scheduler_config(hub_layout, tmp_path, hf)
    monkeypatch.setattr(conversion, "read_component", lambda *a: pytest.fail("weights were read"))
    with pytest.raises(ConversionError, match="scheduler_config.json: " + message):
        convert(src, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_unstated_options_take_the_defaults_of_the_class_that_wrote_the_file():
    """Every diffusers scheduler class is either refused or read with its own __init__ defaults for
    every option altdiff-min checks, carries or assumes."""
    import inspect

    import diffusers

    from weights_convert.schedule import ABSENT, IMPLEMENTED, defaults

    checked = (set(ABSENT) | set(IMPLEMENTED)) - {"set_alpha_to_one", "timestep_spacing"}  # None: each sampler's own
    read = []
    for class_name in [n for n in dir(diffusers) if n.endswith("Scheduler") and not n.startswith("Flax")]:
        try:
            ours = defaults(class_name)
        except ConversionError:
            continue
        params = inspect.signature(getattr(diffusers, class_name).__init__).parameters
        theirs = {k: p.default for k, p in params.items() if k in checked and p.default is not inspect.Parameter.empty}
        assert {k: ours.get(k, IMPLEMENTED.get(k)) for k in theirs} == theirs, class_name
        read.append(class_name)
    assert {"DDIMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
            "EulerAncestralDiscreteScheduler"} <= set(read)


def test_options_listed_as_defaults_count_as_unstated():
    """A config dumped from a loaded scheduler names the options it never stated in _use_default_values."""
    from weights_convert.schedule import config_from_hf

    dumped = {**SCHEDULER, "timestep_spacing": "leading", "_use_default_values": ["timestep_spacing"]}
    assert config_from_hf(dumped).timestep_spacing is None
