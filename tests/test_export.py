"""weights_convert/export.py: a model folder → the diffusers layout (loaded by diffusers' own
AltDiffusionPipeline.from_pretrained: the same tensors, the same picture for the same seed) and the
ldm single file (read back by our converter bit-exact, and by diffusers' ldm conversion into the
reference modules); a diffusers/peft LoRA file → the kohya form (read by ours and by diffusers' kohya
conversion: the same UNet output). Also the configs' round trips and the one-line refusals."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from helpers import UNET, randomize_, rel_diff, rel_err, small_configs
from safetensors import safe_open
from safetensors.torch import load_file

from altdiff_min.apps.cli import main
from altdiff_min.errors import BadFile, BadValue, Exists, Missing
from altdiff_min.pipeline import load
from altdiff_min.storage.folder import read_config
from weights_convert import lora as lora_files
from weights_convert import schedule, text_encoder, unet, vae
from weights_convert.convert import convert
from weights_convert.export import export

PROMPT, NEGATIVE = "一只戴着帽子的小狗", "模糊"


@pytest.fixture(scope="module")
def exported(small_model_dir, tmp_path_factory) -> str:
    return export(small_model_dir, tmp_path_factory.mktemp("export") / "AltDiffusion", to="diffusers")


def from_pretrained(folder):
    """diffusers' own loading of the folder. Since the pipeline moved to deprecated/ no model_index.json
    entry names the text encoder's class in a way diffusers 0.42 resolves (the hub's m9 neither), so it
    is loaded from the folder's text_encoder/ by its class and passed (weights_convert/export.py)."""
    from diffusers.pipelines.deprecated.alt_diffusion import (
        AltDiffusionPipeline,
        RobertaSeriesModelWithTransformation,
    )

    text = RobertaSeriesModelWithTransformation.from_pretrained(os.path.join(folder, "text_encoder"))
    return AltDiffusionPipeline.from_pretrained(folder, text_encoder=text)


def test_diffusers_export_loads_in_alt_diffusion_pipeline_with_the_same_tensors(exported, reference):
    assert sorted(os.listdir(exported)) == ["model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    pipe = from_pretrained(exported)
    assert pipe.safety_checker is None and pipe.tokenizer.model_max_length == 77
    for name in ("unet", "vae"):
        got, want = pipe.components[name].state_dict(), reference[name].state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    got, want = pipe.text_encoder.state_dict(), reference["text_encoder"].state_dict()
    # the pooler (XLM-R's CLS head) is dropped by convert and unused by the pipeline: only it may differ
    assert {k for k in want if k not in got or not torch.equal(got[k], want[k])} == {
        k for k in want if k.startswith("roberta.pooler.")}


@pytest.mark.parametrize("sampler", ["DDIMScheduler", "DPMSolverMultistepScheduler"])
def test_diffusers_export_makes_the_same_pictures_for_the_same_seed(exported, small_model_dir, sampler):
    import diffusers

    pipe = from_pretrained(exported)
    pipe.scheduler = getattr(diffusers, sampler).from_config(pipe.scheduler.config)  # as the model card does
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = pipe(PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=2, num_inference_steps=6, height=64,
                      width=96, output_type="pt", generator=torch.Generator("cpu").manual_seed(42)).images
    ours = load(small_model_dir).generate(PROMPT, negative_prompt=NEGATIVE, n_samples=2, steps=6, height=64, width=96,
                                          seed=42, output="tensor", progress=False,
                                          sampler={"DDIMScheduler": "ddim", "DPMSolverMultistepScheduler": "dpm++2m"}[sampler])
    assert (ours[0] - ours[1]).abs().mean() > 1e-2
    assert rel_err(ours, theirs) < 1e-4


def test_export_then_convert_gives_the_folder_back(exported, small_model_dir, tmp_path):
    """diffusers layout → convert → the same tensors and configs as the folder exported."""
    convert(exported, tmp_path / "back")
    before, after = read_config(small_model_dir), read_config(tmp_path / "back")
    assert all(before[k] == after[k] for k in ("text_encoder", "unet", "vae", "schedule", "image_size", "tokenizer"))
    a, b = load_file(os.path.join(small_model_dir, "model.safetensors")), load_file(tmp_path / "back" / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_configs_come_back(small_model_dir):
    config = read_config(small_model_dir)
    assert text_encoder.config_from_hf(text_encoder.config_to_hf(config["text_encoder"])) == config["text_encoder"]
    assert unet.config_from_hf(unet.config_to_hf(config["unet"], 8)) == config["unet"]
    assert vae.config_from_hf(vae.config_to_hf(config["vae"], 64)) == config["vae"]
    for cfg in (config["schedule"], schedule.ScheduleConfig(set_alpha_to_one=None, timestep_spacing="trailing")):
        assert schedule.config_from_hf(schedule.config_to_hf(cfg)) == cfg
    from altdiff_min.vision.tower import VisionConfig
    from weights_convert import vision

    for cfg in (VisionConfig(), VisionConfig(hidden=48, layers=2, heads=4, mlp=96, patch=8, image_size=64, project_dim=16)):
        assert vision.safety_config_from_hf(vision.safety_config_to_hf(cfg)) == cfg
        vision.check_preprocessor(vision.preprocessor_to_hf(cfg), cfg)  # raises if it asked for other preprocessing


@pytest.mark.parametrize("dtype,torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_dtype(small_model_dir, tmp_path, dtype, torch_dtype):
    out = export(small_model_dir, tmp_path / "half", dtype=dtype)
    weights = load_file(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch_dtype}
    single = load_file(export(small_model_dir, tmp_path / "half.safetensors", to="single-file", dtype=dtype))
    assert {v.dtype for k, v in single.items() if k.startswith("model.")} == {torch_dtype}


# ---- the ldm single file ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def single(small_model_dir, tmp_path_factory) -> str:
    return export(small_model_dir, tmp_path_factory.mktemp("single") / "model.safetensors", to="single-file")


def test_single_file_reads_back_bit_exact(single, small_model_dir, reference, spm_dir, tmp_path):
    reports = convert(single, tmp_path / "back", tokenizer=os.path.join(spm_dir, "sentencepiece.bpe.model"),
                      configs=small_configs(reference))
    assert "noise-schedule" in str(reports["other"])  # the file carries ldm's schedule buffers, checked and dropped
    a, b = load_file(os.path.join(small_model_dir, "model.safetensors")), load_file(tmp_path / "back" / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_single_file_is_what_diffusers_ldm_conversion_reads(single, reference):
    """diffusers' own ldm → diffusers conversion recovers every reference tensor from our file: the
    CompVis names are the real ones, not merely ones our reader accepts."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    sd = load_file(single)
    assert {k.split(".")[0] for k in sd} == {"model", "first_stage_model", "cond_stage_model", "betas", "alphas_cumprod"}
    for name, recover in [("unet", convert_ldm_unet_checkpoint), ("vae", convert_ldm_vae_checkpoint)]:
        back, original = recover(dict(sd), dict(reference[name].config)), reference[name].state_dict()
        assert set(back) == set(original)
        assert all(torch.equal(back[k].reshape(original[k].shape), original[k]) for k in original)
    text = {k.removeprefix("cond_stage_model."): v for k, v in sd.items() if k.startswith("cond_stage_model.")}
    original = {k: v for k, v in reference["text_encoder"].state_dict().items() if not k.startswith("roberta.pooler.")}
    assert set(text) == set(original) and all(torch.equal(text[k], original[k]) for k in original)


def test_single_file_refuses_what_it_cannot_record(model, tmp_path):
    config = json.loads((model / "config.json").read_text())
    config["schedule"]["beta_end"] = 0.02
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(BadValue, match="noise schedule is not m9's"):
        export(model, tmp_path / "x.safetensors", to="single-file")
    with pytest.raises(BadValue, match=r"\.safetensors"):
        export(model, tmp_path / "x.ckpt", to="single-file")
    assert os.listdir(tmp_path) == ["model"]


def test_a_v_prediction_model_exports_its_prediction_type(model, tmp_path):
    """The diffusers scheduler config says v_prediction (diffusers' pipeline then reads the UNet as v);
    a single file cannot say it, so it is refused rather than silently read as ε."""
    config = json.loads((model / "config.json").read_text())
    config["schedule"]["prediction_type"] = "v_prediction"
    (model / "config.json").write_text(json.dumps(config))
    out = export(model, tmp_path / "v", to="diffusers")
    assert json.loads((tmp_path / "v" / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == \
        "v_prediction"
    convert(str(out), str(tmp_path / "back"))
    assert read_config(str(tmp_path / "back"))["schedule"].prediction_type == "v_prediction"
    with pytest.raises(BadValue, match="v_prediction"):
        export(model, tmp_path / "v.safetensors", to="single-file")
    assert sorted(os.listdir(tmp_path)) == ["back", "model", "v"]


# ---- refusals and --force --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,error,message", [
    ({"to": "onnx"}, BadValue, "--to must be one of"),
    ({"dtype": "fp8"}, BadValue, "--dtype must be one of"),
])
def test_bad_arguments(small_model_dir, tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        export(small_model_dir, tmp_path / "out", **kwargs)
    assert os.listdir(tmp_path) == []


def test_not_a_model_folder(hub_layout, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    for src, error, message in [(hub_layout, BadFile, "diffusers folder, not an altdiff-min model folder"),
                                (tmp_path / "notes", BadFile, "not an altdiff-min model folder"),
                                (tmp_path / "missing", Missing, "model folder not found")]:
        with pytest.raises(error, match=message):
            export(src, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["notes"]


def test_force_replaces_only_an_export(small_model_dir, model, tmp_path, monkeypatch):
    out = export(small_model_dir, tmp_path / "d")
    with pytest.raises(Exists, match="pass --force"):
        export(small_model_dir, out)
    before = os.stat(os.path.join(out, "model_index.json")).st_ino
    export(small_model_dir, out, force=True)  # an export: replaced
    assert os.stat(os.path.join(out, "model_index.json")).st_ino != before
    for victim in (model, tmp_path / "d" / "unet"):  # a model folder; a folder export did not write
        with pytest.raises(Exists, match="replaces only what altdiff-min export wrote"):
            export(small_model_dir, victim, force=True)
    (tmp_path / "mine.safetensors").write_bytes(b"not ours")
    with pytest.raises(Exists, match="replaces only what altdiff-min export wrote"):
        export(small_model_dir, tmp_path / "mine.safetensors", to="single-file", force=True)
    assert (tmp_path / "mine.safetensors").read_bytes() == b"not ours"
    first = export(small_model_dir, tmp_path / "s.safetensors", to="single-file")
    export(small_model_dir, first, to="single-file", force=True)
    # a failure while writing leaves the previous export in place, and no leftovers beside it
    import weights_convert.export as module

    monkeypatch.setattr(module, "write_json", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(Exception, match="No space left"):
        export(small_model_dir, out, force=True)
    assert min(os.listdir(out)) == "model_index.json"
    assert sorted(os.listdir(tmp_path)) == ["d", "mine.safetensors", "model", "s.safetensors"]


def test_cli(small_model_dir, tmp_path, capsys):
    assert main(["export", small_model_dir, str(tmp_path / "d"), "--to", "diffusers"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["export", small_model_dir, str(tmp_path / "d"), "--to", "diffusers"]) == 2
    assert main(["export", small_model_dir, str(tmp_path / "e"), "--to", "diffusers", "--dtype", "fp64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("altdiff-min export: error: ") for line in err)
    assert sorted(os.listdir(tmp_path)) == ["d"]


# ---- LoRA files → the kohya form -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    """A diffusers/peft LoRA file written by us (save_lora) for the small UNet: r 4, alpha 8, B random."""
    from altdiff_min.research.lora import add_lora

    torch.manual_seed(0)
    ours, _ = unet.load(randomize_(_diffusers_unet(), 2).state_dict(), unet.config_from_hf(UNET))
    add_lora(ours, 4, alpha=8.0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return lora_files.save_lora(ours, str(tmp_path_factory.mktemp("lora")))


def _diffusers_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**UNET).eval()


def test_kohya_export_same_output_in_ours_and_in_diffusers(lora_file, tmp_path):
    from diffusers import StableDiffusionPipeline

    kohya = export(lora_file, tmp_path / "kohya.safetensors", to="kohya")
    keys = list(load_file(kohya))
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    with safe_open(kohya, "pt") as f:
        assert f.metadata()["ss_network_dim"] == "4" and f.metadata()["ss_network_alpha"] == "8"
    base = randomize_(_diffusers_unet(), 2)
    g = torch.Generator().manual_seed(1)
    x, t, context = torch.randn(2, 4, 16, 24, generator=g), torch.tensor([999, 1]), torch.randn(2, 77, 32, generator=g)
    outputs = []
    for path in (lora_file, kohya):
        ours, _ = unet.load({k: v.clone() for k, v in base.state_dict().items()}, unet.config_from_hf(UNET))
        lora_files.load_lora(ours, path)
        with torch.no_grad():
            outputs.append(ours(x, t, context))
    ref = copy.deepcopy(base)
    state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(kohya, return_lora_metadata=True)
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=ref, metadata=metadata)
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=context).sample
        assert rel_diff(expected, base(x, t, encoder_hidden_states=context).sample) > 1e-3  # the LoRA changes it
    assert rel_err(outputs[1], expected) <= 1e-5 and rel_err(outputs[0], expected) <= 1e-5


def test_kohya_export_refusals(lora_file, tmp_path):
    kohya = export(lora_file, tmp_path / "k.safetensors", to="kohya")
    with pytest.raises(Exists, match="pass --force"):
        export(lora_file, kohya, to="kohya")
    export(lora_file, kohya, to="kohya", force=True)
    with pytest.raises(BadFile, match="kohya form already"):
        export(kohya, tmp_path / "again.safetensors", to="kohya")
    (tmp_path / "other.safetensors").write_bytes(b"x")
    with pytest.raises(Exists, match="replaces only what altdiff-min export wrote"):
        export(lora_file, tmp_path / "other.safetensors", to="kohya", force=True)
    with pytest.raises(BadFile, match="not found"):
        export(tmp_path / "none.safetensors", tmp_path / "n.safetensors", to="kohya")
    assert sorted(os.listdir(tmp_path)) == ["k.safetensors", "other.safetensors"]


# ---- the rules read backwards ----------------------------------------------------------------------------------

def test_m9_names_backwards_are_diffusers_own():
    """At m9's size (on the meta device): every UNet and VAE name export writes is one diffusers' own
    modules have, and diffusers' ldm conversion reads the ldm names export writes into all of them."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from helpers import M9_UNET, M9_VAE

    from altdiff_min.model.unet import UNet, UNetConfig
    from altdiff_min.model.vae import VAE, VAEConfig
    from weights_convert import ldm
    from weights_convert.rules import rename_back

    with torch.device("meta"):
        ours = {"unet": UNet(UNetConfig()).state_dict(), "vae": VAE(VAEConfig()).state_dict()}
        theirs = {"unet": UNet2DConditionModel.from_config(M9_UNET).state_dict(), "vae": AutoencoderKL.from_config(M9_VAE).state_dict()}
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    configs = {"unet": M9_UNET, "vae": M9_VAE}
    for name, rules, ldm_rules, recover in [
            ("unet", unet.RULES, ldm.unet_rules(UNetConfig()), convert_ldm_unet_checkpoint),
            ("vae", vae.RULES, ldm.vae_rules(VAEConfig()), convert_ldm_vae_checkpoint)]:
        assert set(rename_back(list(ours[name]), rules, name).values()) == set(theirs[name])
        prefix = ldm.PREFIXES[name]
        names = rename_back(list(ours[name]), ldm_rules, name)
        single = {prefix + names[k]: ldm.as_conv(names[k], v) if name == "vae" else v for k, v in ours[name].items()}
        assert set(recover(single, configs[name])) == set(theirs[name])


@pytest.mark.parametrize("rule,error", [
    ((r"^a\.(\d+)\.", lambda m: "b."), TypeError),  # computed
    ((r"^a\.\d+\.", "b."), ValueError),  # a class outside a group: which digits to write back?
    ((r"^a\.(\d+)\.", "b."), ValueError),  # a group dropped
    ((r"^a\.", ""), ValueError),  # nothing written: nothing to find backwards
])
def test_rules_that_do_not_invert_are_refused(rule, error):
    from weights_convert.rules import invert

    with pytest.raises(error):
        invert([rule])


def test_weights_beyond_fp16_are_refused(model, tmp_path):
    from helpers import put_in

    put_in(model, "unet.conv_in.weight", lambda t: t.view(-1)[0].fill_(1e6))
    with pytest.raises(BadValue, match="do not fit float16"):
        export(model, tmp_path / "half", dtype="fp16")
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_exports_follow_the_umask(small_model_dir, lora_file, tmp_path):
    old = os.umask(0o022)
    try:
        folder = export(small_model_dir, tmp_path / "d")
        files = [export(small_model_dir, tmp_path / "s.safetensors", to="single-file"),
                 export(lora_file, tmp_path / "k.safetensors", to="kohya")]
    finally:
        os.umask(old)
    for parent, dirs, names in os.walk(folder):
        assert os.stat(parent).st_mode & 0o777 == 0o755
        files += [os.path.join(parent, n) for n in names]
    assert {os.stat(f).st_mode & 0o777 for f in files} == {0o644}


def test_the_safety_checker_goes_along(checker_model_dir, checker_reference, tmp_path):
    """A folder with a safety checker: safety_checker/ and feature_extractor/ as the hub has them, which
    diffusers loads into the reference checker's tensors and convert --with-safety-checker reads back."""
    out = export(checker_model_dir, tmp_path / "d")
    assert {"safety_checker", "feature_extractor"} <= set(os.listdir(out))
    pipe = from_pretrained(out)
    got, want = pipe.safety_checker.state_dict(), checker_reference.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert pipe.feature_extractor.crop_size == {"height": 64, "width": 64}
    convert(out, tmp_path / "back", safety_checker=True)
    a, b = load_file(os.path.join(checker_model_dir, "model.safetensors")), load_file(tmp_path / "back" / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    single = load_file(export(checker_model_dir, tmp_path / "s.safetensors", to="single-file"))
    assert not any("concept" in k or "visual_projection" in k for k in single)  # not part of an ldm file
