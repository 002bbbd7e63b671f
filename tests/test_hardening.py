"""Issue 12's reproductions, each now a test: nothing lost, nothing silently wrong.

Numbers refer to the issue's list: 1 --force, 2 interrupted writes, 3 unbounded work, 4 NaN, 6 errors,
7 permissions, 8 a new user's gaps, 9 no wall-clock limits (tests/test_notebooks.py). 5, the
tokenizer, is in tests/test_tokenizer.py."""
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
from helpers import edit_json, small_configs, write_json

import altdiff_min.storage.folder as folder
from altdiff_min.apps.cli import main
from altdiff_min.errors import AltDiffError, BadFile, BadType, BadValue, Busy, NotFinite
from altdiff_min.storage.files import locked
from altdiff_min.pipeline import load
from altdiff_min.arguments import Limits
from weights_convert.convert import convert
from weights_convert.rules import ConversionError

HW = dict(height=64, width=96, steps=2, progress=False)


@pytest.fixture
def src(hub_layout, tmp_path):
    """A private copy of the small model in the hub layout, to break."""
    root = tmp_path / "src"
    shutil.copytree(hub_layout, root)
    return root


@pytest.fixture
def model(small_model_dir, tmp_path):
    """A private copy of the small converted model folder, to break."""
    root = tmp_path / "model"
    shutil.copytree(small_model_dir, root)
    return root


def no_weights_read(monkeypatch):
    import weights_convert.convert as conversion

    monkeypatch.setattr(conversion, "read_component", lambda *a: pytest.fail("weights were read"))
    monkeypatch.setattr(folder, "load_file", lambda *a, **k: pytest.fail("weights were read"))


# ---- 1. --force replaces only a model folder -----------------------------------------------------------

def test_force_never_deletes_what_is_not_a_model_folder(src, tmp_path, capsys):
    victim = tmp_path / "victim"
    (victim / "photos").mkdir(parents=True)
    (victim / "important.txt").write_text("precious")
    assert main(["convert", str(src), str(victim), "--force"]) == 2
    assert "--force replaces only a model folder" in capsys.readouterr().err
    assert (victim / "important.txt").read_text() == "precious" and (victim / "photos").is_dir()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert main(["convert", str(src), str(a_file), "--force"]) == 2 and a_file.read_text() == "mine"


def test_force_keeps_a_model_folder_holding_other_files(src, tmp_path):
    out = tmp_path / "m9"
    convert(src, out)
    (out / "notes.md").write_text("my notes")
    with pytest.raises(FileExistsError, match=r"holds files altdiff-min did not write \(notes.md\)"):
        convert(src, out, force=True)
    assert (out / "notes.md").read_text() == "my notes"
    (out / "notes.md").unlink()
    convert(src, out, force=True, dtype="fp16")  # a model folder it wrote: replaced
    assert load(out).unet.conv_in.weight.dtype == torch.float16


def test_force_does_not_follow_a_symlink(src, tmp_path):
    out = tmp_path / "m9"
    convert(src, out)
    (tmp_path / "link").symlink_to(out)
    with pytest.raises(FileExistsError, match="is a symbolic link"):
        convert(src, tmp_path / "link", force=True)


# ---- 2. interrupted writes: recovered or cleaned on the next run; fsync; one writer at a time ----------

KILL_BETWEEN_RENAMES = """
import os, sys
calls = []
real = os.replace
def replace(a, b):
    calls.append((a, b))
    if len(calls) == 2:  # the new folder is about to take the old one's place
        os._exit(9)
    real(a, b)
os.replace = replace
from weights_convert.convert import convert
convert(sys.argv[1], sys.argv[2], force=True)
"""


def test_a_kill_between_the_renames_loses_nothing(src, tmp_path):
    out = tmp_path / "m9"
    convert(src, out)
    before = (out / "model.safetensors").read_bytes()
    killed = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, str(src), str(out)], timeout=300)
    assert killed.returncode == 9
    left = sorted(os.listdir(tmp_path))
    assert "m9" not in left and any(e.startswith(".m9.old-") for e in left) and any(e.startswith(".m9.partial-") for e in left)
    with pytest.raises(FileExistsError):  # the next run puts the old model back first
        convert(src, out)
    assert (out / "model.safetensors").read_bytes() == before and sorted(os.listdir(tmp_path)) == ["m9", "src"]
    load(out)


def two_versions(model, tmp_path):
    """The model folder as `live`, and another version of it (other image size, other weights)."""
    a, b = load(model), load(model)
    b.image_size = 128
    with torch.no_grad():
        b.unet.conv_in.weight.add_(1.0)
    a.save(tmp_path / "live")
    return tmp_path / "live", a, b


def test_a_load_while_a_force_replacement_swaps_the_folder_reads_one_folder_whole(model, tmp_path, monkeypatch):
    """load opens config.json, the tokenizer and the weights one by one by path, without the write
    lock: a replacement between the first and the last must not give one version's config with the
    other's weights. The read is done again, whole, from the new folder."""
    live, a, b = two_versions(model, tmp_path)
    real, calls = folder.read_modules, []

    def replaced_meanwhile(*args, **kwargs):
        if not calls:  # a's config is read; now the folder is replaced before its weights are
            b.save(live, force=True)
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(folder, "read_modules", replaced_meanwhile)
    got = load(live)
    assert len(calls) == 2 and got.image_size == 128 and torch.equal(got.unet.conv_in.weight, b.unet.conv_in.weight)


def test_a_load_between_the_two_renames_of_a_replacement_waits_for_the_new_folder(model, tmp_path, monkeypatch):
    """write_locked renames the old folder aside, then the new one into place: a load in between finds
    no folder, and must not report an interrupted replacement while one is under way."""
    live, a, b = two_versions(model, tmp_path)
    b.save(tmp_path / "new")
    os.replace(live, tmp_path / ".live.old-0123456789ab")  # the first rename
    slept = []

    def second_rename(seconds):
        if not slept:
            os.replace(tmp_path / "new", live)
        slept.append(seconds)

    monkeypatch.setattr(folder.time, "sleep", second_rename)
    got = load(live)
    assert slept and got.image_size == 128 and torch.equal(got.unet.conv_in.weight, b.unet.conv_in.weight)


def test_leftovers_of_interrupted_writes_are_removed(src, tmp_path):
    out = tmp_path / "m9"
    convert(src, out)
    (tmp_path / ".m9.partial-0123456789ab").mkdir()  # a write killed halfway
    (tmp_path / ".m9.old-0123456789ab").mkdir()  # a replacement killed after its second rename
    convert(src, out, force=True)
    assert sorted(os.listdir(tmp_path)) == ["m9", "src"]


def test_files_and_folders_are_fsynced(src, tmp_path, monkeypatch):
    import altdiff_min.storage.files as files

    synced = []
    real = files.fsync_path
    monkeypatch.setattr(folder, "fsync_path", lambda p: synced.append(os.path.basename(p.rstrip("/"))) or real(p))
    out = tmp_path / "m9"
    convert(src, out)
    assert {"model.safetensors", "sentencepiece.bpe.model", "config.json"} <= set(synced)
    assert synced[-1] == tmp_path.name  # the parent, after the rename


def test_one_writer_at_a_time(src, tmp_path):
    out = tmp_path / "m9"
    with locked(str(out)):
        with pytest.raises(Busy, match="another process is writing"):
            convert(src, out)
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["src"]  # and the lock file is gone
    convert(src, out)


# ---- 3. unbounded work from small inputs: refused up front -------------------------------------------

def test_huge_config_values_are_refused_before_any_work(src, model, monkeypatch):
    no_weights_read(monkeypatch)
    edit_json(src / "unet" / "config.json", layers_per_block=1_000_000)
    with pytest.raises(ConversionError, match=r"unet/config.json: UNetConfig.layers must be in \[1, 64\], got 1000000"):
        convert(src, src.parent / "out")
    edit_json(model / "config.json", unet__layers=1_000_000)
    with pytest.raises(BadFile, match=r"config.json: UNetConfig.layers must be in \[1, 64\]"):
        load(model)


def test_huge_tokenizer_length_is_refused(model, monkeypatch):
    no_weights_read(monkeypatch)
    edit_json(model / "config.json", tokenizer__max_length=1_000_000_000)
    with pytest.raises(BadFile, match=r"tokenizer.max_length must be an integer in \[2, 512\]"):
        load(model)


def test_a_unet_that_does_not_take_the_vaes_latents_is_refused_at_load(model, monkeypatch):
    """An inpainting UNet (9 input channels) beside a 4-channel VAE would sample to the end and fail
    only at decoding."""
    no_weights_read(monkeypatch)
    edit_json(model / "config.json", unet__in_channels=9)
    with pytest.raises(BadFile, match="the UNet takes 9 and predicts 4 latent channels, but the VAE's latents have 4"):
        load(model)


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "folder"])
def test_config_that_is_not_a_regular_file(src, model, kind):
    for path in (model / "config.json", src / "unet" / "config.json"):
        path.unlink()
        if kind == "dev-zero":
            path.symlink_to("/dev/zero")
        elif kind == "fifo":
            os.mkfifo(path)
        else:
            path.mkdir()
    with pytest.raises(BadFile, match="missing unet/config.json" if kind == "folder" else "is not a regular file"):
        convert(src, src.parent / "out")
    with pytest.raises(AltDiffError, match="config.json"):
        load(model)


@pytest.mark.parametrize("args,message", [
    (["--H", "100000", "--W", "100000"], "--H = 100000 is over the limit of 4096"),
    (["--n-samples", "100000"], "--n-samples = 100000 is over the limit of 256"),
    (["--n-samples", "200", "--H", "1024", "--W", "2048"], "--n-samples × --H × --W pixels = 419430400 is over the limit"),
])
def test_huge_requests_on_the_command_line(small_model_dir, tmp_path, monkeypatch, capsys, args, message):
    import altdiff_min.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["generate", "a dog", "--model", small_model_dir, "--outdir", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "--no-limits" in err


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_samples=10**9), "over the limit of 256"),
    (dict(height=100_000), "over the limit of 4096"),
    (dict(n_samples=200, height=1024, width=2048), "over the limit of 268435456"),
])
def test_huge_requests_to_generate(small_model_dir, monkeypatch, kwargs, match):
    pipe = load(small_model_dir)
    monkeypatch.setattr(pipe.text_encoder, "forward", lambda *a, **k: pytest.fail("the model ran"))
    with pytest.raises(BadValue, match=match):
        pipe.generate("a dog", **{**HW, **kwargs})


def test_limits_can_be_raised(small_model_dir):
    pipe = load(small_model_dir, limits=Limits(max_batch=2))
    with pytest.raises(BadValue, match="over the limit of 2"):
        pipe.generate("a", n_samples=3, **HW)
    assert pipe.generate("a", n_samples=2, output="tensor", **HW).shape == (2, 3, 64, 96)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(callback=3), BadType, "callback must be a function"),
    (dict(text_layer="a"), BadValue, r"text_layer must be an int in \[0, 2\]"),
    (dict(text_layer=True), BadValue, r"text_layer must be an int in \[0, 2\]"),
    (dict(sampler=["ddim"]), BadValue, r"unknown sampler \['ddim'\]"),
    (dict(image=torch.full((1, 3, 64, 96), 255.0)), BadValue, r"image tensor must be in \[0, 1\], got values in \[255, 255\]"),
])
def test_wrong_arguments_to_generate_fail_before_the_model_runs(small_model_dir, monkeypatch, kwargs, error, match):
    pipe = load(small_model_dir)
    monkeypatch.setattr(pipe.text_encoder, "forward", lambda *a, **k: pytest.fail("the model ran"))
    monkeypatch.setattr(pipe.vae, "encode", lambda *a, **k: pytest.fail("the model ran"))
    with pytest.raises(error, match=match) as e:
        pipe.generate("a dog", **{**HW, **kwargs})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("returned,match", [
    (lambda x: x[..., :2], r"latents of shape \(1, 4, 2, 3\), got \(1, 4, 2, 2\)"),
    (lambda x: "x", "got str"),
    (lambda x: x.double(), "as it got them, torch.float32 on cpu, got torch.float64 on cpu"),
])
def test_what_a_callback_returns_is_checked(returned, match):
    from altdiff_min.sampling.samplers import after_step

    x = torch.randn(1, 4, 2, 3)
    assert after_step(lambda i, t, x, x0: None, 0, 999.0, x, x) is x
    with pytest.raises(BadValue, match=match) as e:
        after_step(lambda i, t, x, x0: returned(x), 0, 999.0, x, x)
    assert "\n" not in str(e.value)


# ---- 4. NaN never passes silently ---------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,error,match", [
    (dict(latents=torch.full((1, 4, 8, 12), math.nan)), NotFinite, "latents hold NaN"),
    (dict(latents=torch.full((1, 4, 8, 12), math.inf)), NotFinite, "latents hold NaN"),
    (dict(scale=math.nan), BadValue, "scale must be finite"),
    (dict(eta=math.nan), BadValue, r"eta must be in \[0, 1\]"),
    (dict(eta=1.5), BadValue, r"eta must be in \[0, 1\]"),
    (dict(prompt_embeds=torch.full((1, 77, 32), math.nan)), NotFinite, "prompt_embeds"),
])
def test_non_finite_arguments(small_model_dir, kwargs, error, match):
    pipe = load(small_model_dir)
    prompt = None if "prompt_embeds" in kwargs else "a dog"
    with pytest.raises(error, match=match):
        pipe.generate(prompt, **{**HW, **kwargs})


@pytest.mark.parametrize("where,value,match", [
    ("schedule__beta_start", math.nan, "ScheduleConfig.beta_start must be a finite number"),
    ("schedule__num_train_timesteps", -5, r"ScheduleConfig.num_train_timesteps must be in \[2, 100000\]"),
    ("vae__scaling_factor", math.inf, "VAEConfig.scaling_factor must be a finite number"),
    ("image_size", -64, r"image_size must be an integer in \[8, 16384\]"),
    ("version", 99, "has version 99; this altdiff-min reads version 1"),
])
def test_bad_numbers_in_a_model_folder(model, monkeypatch, where, value, match):
    no_weights_read(monkeypatch)
    edit_json(model / "config.json", **{where: value})  # json writes NaN as the non-standard NaN
    with pytest.raises(BadFile, match=match):
        load(model)


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
        load(model)  # refused at load (issue 30), not after sampling to the end
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


# ---- 6. every expected failure is one line naming the file and the problem ----------------------------

class RunsACommand:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/altdiff-min-pwned",))


@pytest.mark.parametrize("breakage,message", [
    ("os.system", "never executes code"),
    ("not-json", "unet/config.json is not valid JSON"),
    ("a-list", "unet/config.json: a config must be a JSON object"),
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


@pytest.mark.parametrize("breakage,message", [
    ("corrupt-weights", "model.safetensors is not a readable safetensors file"),
    ("not-json", "config.json is not valid JSON"),
    ("a-list", "is not an altdiff-min config"),
    ("missing-key", "config.json holds text_encoder and vae, not unet"),
    ("string-channels", "UNetConfig.channels[0] must be an integer"),
])
def test_model_folder_errors_name_the_file(model, tmp_path, capsys, breakage, message):
    config = model / "config.json"
    if breakage == "corrupt-weights":
        data = (model / "model.safetensors").read_bytes()
        (model / "model.safetensors").write_bytes(data[: len(data) // 3])
    elif breakage == "not-json":
        config.write_text("{ nope")
    elif breakage == "a-list":
        config.write_text("[]")
    elif breakage == "missing-key":
        edit_json(config, unet=KeyError)
    else:
        edit_json(config, unet__channels=["32", "64", "64"])
    code = main(["generate", "a dog", "--model", str(model), "--outdir", str(tmp_path / "o"), "--H", "64", "--W", "64",
                 "--steps", "1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and str(model) in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])  # memory-mapped; read tensor by tensor to be cast
@pytest.mark.parametrize("cut", [0.3, 0.999])  # inside the header or the data; inside the last tensor
def test_truncated_weights_are_a_bad_file_however_they_are_read(model, dtype, cut):
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(BadFile, match="model.safetensors is not a readable safetensors file"):
        load(model, dtype=dtype)


@pytest.mark.parametrize("setup,message", [
    ("outdir-is-a-file", "exists and is not a folder"),
    ("samples-is-a-file", "samples exists and is not a folder"),
])
def test_output_folder_is_checked_before_the_model_loads(small_model_dir, tmp_path, monkeypatch, capsys, setup, message):
    import altdiff_min.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "o"
    if setup == "outdir-is-a-file":
        out.write_text("x")
    else:
        out.mkdir()
        (out / "samples").write_text("x")
    assert main(["generate", "a dog", "--model", small_model_dir, "--outdir", str(out)]) == 2
    assert message in capsys.readouterr().err


def test_a_full_disk_leaves_no_truncated_picture(small_model_dir, tmp_path, monkeypatch, capsys):
    import errno

    import altdiff_min.storage.files as files

    out = tmp_path / "o"
    args = ["generate", "a dog", "--model", small_model_dir, "--outdir", str(out), "--H", "64", "--W", "64",
            "--steps", "1", "--n-samples", "1", "--device", "cpu", "--skip-grid"]
    assert main(args) == 0
    real = files.fsync_path

    def disk_full(path):  # the bytes went to the page cache; the file system refuses them on sync
        if ".partial-" in os.path.basename(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path)

    monkeypatch.setattr(files, "fsync_path", disk_full)
    assert main(args) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(os.listdir(out / "samples")) == ["00000.png"]  # nothing half-written, nothing counted
    monkeypatch.setattr(files, "fsync_path", real)
    assert main(args) == 0 and sorted(os.listdir(out / "samples")) == ["00000.png", "00001.png"]


def test_a_read_only_folder_is_one_line(small_model_dir, tmp_path, monkeypatch, capsys):
    """As root, permissions do not stop writes here; the file system's refusal is simulated."""
    import errno

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "link", read_only)
    out = tmp_path / "o"
    assert main(["generate", "a dog", "--model", small_model_dir, "--outdir", str(out), "--H", "64", "--W", "64",
                 "--steps", "1", "--n-samples", "1", "--device", "cpu", "--skip-grid"]) == 2
    err = capsys.readouterr().err
    assert "Read-only file system" in err and str(out / "samples") in err and os.listdir(out / "samples") == []


def test_numbered_pictures_never_overwrite(tmp_path):
    from altdiff_min.storage.files import save_numbered

    (tmp_path / "00001.png").write_bytes(b"keep")  # a gap: one file, numbered 1
    written = [save_numbered(str(tmp_path), "{:05}.png", lambda p: open(p, "wb").write(b"new")) for _ in range(2)]
    assert [os.path.basename(p) for p in written] == ["00002.png", "00003.png"]
    assert (tmp_path / "00001.png").read_bytes() == b"keep"


# ---- 7. permissions: a converted folder is readable by others, as the user's own folders are ---------

def test_converted_folders_follow_the_umask(src, tmp_path):
    old = os.umask(0o022)
    try:
        convert(src, tmp_path / "m9")
    finally:
        os.umask(old)
    assert (tmp_path / "m9").stat().st_mode & 0o777 == 0o755
    assert {(f.stat().st_mode & 0o777) for f in (tmp_path / "m9").iterdir()} == {0o644}


# ---- 8. a new user's gaps ----------------------------------------------------------------------------

@pytest.mark.parametrize("device,message", [
    pytest.param("cuda", "this machine has no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")),
    ("tpu", "device 'tpu'"),
    ("cpu:banana", "is not a torch device"),
])
def test_devices_that_cannot_be_used(small_model_dir, tmp_path, capsys, device, message):
    assert main(["generate", "a dog", "--model", small_model_dir, "--outdir", str(tmp_path / "o"), "--device", device]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(dtype="fp16"), BadType, "dtype must be torch.float32, torch.float16, torch.bfloat16 or None, got 'fp16'"),
    (dict(dtype=torch.int8), BadValue, "dtype torch.int8 is not one a model computes in"),
    (dict(dtype=torch.complex64), BadValue, "dtype torch.complex64 is not one"),
    (dict(compile="no"), BadType, "compile must be True or False, got 'no'"),
    (dict(fast=1), BadType, "fast must be True or False"),
    (dict(safety_checker=None), BadType, "safety_checker must be True or False"),
    (dict(limits=None), BadType, "limits must be a Limits, got None"),
])
def test_load_arguments_are_checked_before_any_weight_is_read(small_model_dir, monkeypatch, kwargs, error, message):
    no_weights_read(monkeypatch)
    with pytest.raises(error, match=re.escape(message)) as e:
        load(small_model_dir, **kwargs)
    assert "\n" not in str(e.value)


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


def test_model_paths_that_are_not_model_folders(hub_layout, tmp_path, capsys):
    for path, message in [(str(tmp_path), "not an altdiff-min model folder"),
                          (hub_layout, "is a diffusers folder, not an altdiff-min model folder: convert it")]:
        assert main(["generate", "a dog", "--model", path, "--outdir", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert message in err and f"convert SRC {path}" not in err  # never suggests converting into it


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(prompt=None, prompt_embeds=torch.zeros(77, 32)), BadValue, r"prompt_embeds must be a \(P, 77, 32\) tensor"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 48)), BadValue, r"prompt_embeds must be a \(P, 77, 32\) tensor"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 20, 32)), BadValue, r"prompt_embeds must be a \(P, 77, 32\) tensor"),
    (dict(prompt_embeds=torch.zeros(1, 77, 32)), BadValue, "not both"),
    (dict(height=64.0), BadType, "height must be an int"),
    (dict(scale="7.5"), BadType, "scale must be a number"),
    (dict(n_samples=True), BadType, "n_samples must be an int"),
    (dict(seed=-1), BadValue, "seed must be an int"),
    (dict(prompt="a \ud800 dog"), BadValue, r"lone surrogate U\+D800 at position 2"),
    (dict(negative_prompt="a" * 10_001), BadValue,
     r"^negative_prompt is 10,001 characters; at most 10,000 are accepted \(only the first 77 tokens are used\)$"),
])
def test_generate_argument_gaps(small_model_dir, monkeypatch, kwargs, error, match):
    pipe = load(small_model_dir)
    monkeypatch.setattr(pipe.text_encoder, "forward", lambda *a, **k: pytest.fail("the model ran"))
    args = {"prompt": "a dog", **HW, **kwargs}
    with pytest.raises(error, match=match):
        pipe.generate(args.pop("prompt"), **args)


def test_heatmap_with_nothing_captured():
    from altdiff_min.research.instruments import AttentionMaps

    with pytest.raises(BadValue, match="no attention maps were captured"):
        AttentionMaps().heatmap(token=1, size=(64, 64))


@pytest.mark.parametrize("args,message", [
    (["   "], "give a prompt (not empty or blank)"),
    ([""], "give a prompt (not empty or blank)"),
    (["a dog", "--from-file", "PROMPTS"], "give a prompt or --from-file, not both"),
    (["a \udcff dog"], "lone surrogate"),
    (["a" * 10_001], "error: prompt is 10,001 characters; at most 10,000 are accepted (only the first 77 tokens are used)\n"),
])
def test_command_line_prompt_gaps(small_model_dir, tmp_path, capsys, args, message):
    (tmp_path / "PROMPTS").write_text("a cat\n")
    args = [str(tmp_path / a) if a == "PROMPTS" else a for a in args]
    assert main(["generate", *args, "--model", small_model_dir, "--outdir", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_every_runtime_import_is_declared():
    """tqdm came only through huggingface-hub; every third-party module the package imports must be declared."""
    import ast
    import tomllib

    root = os.path.join(os.path.dirname(__file__), "..")
    def name(requirement: str) -> str:
        return requirement.split(">")[0].split("=")[0].split("[")[0].split("<")[0].strip().lower().replace("-", "_")

    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    declared = {name(d) for d in project["dependencies"]}
    # the optional extras (the web UI's gradio, the notebooks'), imported only by the modules that need them
    extras = {name(d) for extra, deps in project["optional-dependencies"].items() if extra != "test" for d in deps}
    names = {"PIL": "pillow", "safetensors": "safetensors", "huggingface_hub": "huggingface_hub"}
    imported = set()
    for package in ("altdiff_min", "weights_convert"):
        for dirpath, _, files in os.walk(os.path.join(root, package)):
            for name in files:
                if name.endswith(".py"):
                    tree = ast.parse(open(os.path.join(dirpath, name), encoding="utf-8").read())
                    for node in ast.walk(tree):
                        if isinstance(node, ast.Import):
                            imported |= {a.name.split(".")[0] for a in node.names}
                        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                            imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m not in ("altdiff_min", "weights_convert")}
    optional = {"nbformat", "nbclient", "matplotlib", "IPython"}  # the notebooks' (through jupyter), where they are used
    assert {names.get(m, m).lower() for m in third_party - optional} <= declared | extras


# ---- issue 30: weights checked at load, fingerprinted, and a full disk at conversion -----------------------

def put_in(model, name: str, change) -> None:
    """Rewrite model.safetensors with `change(tensor)` applied in place to the tensor `name`."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(model / "model.safetensors")
    change(tensors[name])
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])  # memory-mapped as stored; cast tensor by tensor
def test_nan_weights_are_refused_at_load_naming_the_tensor(model, dtype, capsys):
    name = "unet.down.0.attn.0.block.cross_attn.q.weight"
    put_in(model, name, lambda t: t.view(-1).index_copy_(0, torch.tensor([0, 5, 9]), torch.tensor([math.nan, math.inf, -math.inf])))
    with pytest.raises(NotFinite) as e:
        load(model, dtype=dtype)
    assert str(e.value).startswith(f"{model / 'model.safetensors'}: tensor '{name}' has 3 NaN/inf value(s)")
    assert "\n" not in str(e.value)
    assert main(["generate", "a dog", "--model", str(model), "--outdir", str(model.parent / "o"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert name in err and len(err.strip().splitlines()) == 1 and not list((model.parent / "o").rglob("*.png"))
    loaded = load(model, dtype=dtype, check_finite=False)  # skipped on request
    assert torch.isnan(loaded.unet.state_dict()["down.0.attn.0.block.cross_attn.q.weight"].view(-1)[0])


def test_weights_that_overflow_the_dtype_they_are_read_in_are_named(model):
    put_in(model, "vae.decoder.conv_out.bias", lambda t: t.fill_(1e6))  # finite in float32, not in float16
    load(model)
    with pytest.raises(NotFinite, match=r"tensor 'vae.decoder.conv_out.bias' has 3 NaN/inf value\(s\) when read as float16"):
        load(model, dtype=torch.float16)
    with pytest.raises(BadType, match="check_finite must be True or False"):
        load(model, check_finite="no")


def sha256_of(path) -> str:
    import hashlib

    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_the_fingerprint_sees_the_weights(model):
    record = json.loads((model / "checksums.json").read_text())["files"]["model.safetensors"]
    first = folder.fingerprint(model)
    assert first["weights_sha256"] == record["sha256"] == sha256_of(model / "model.safetensors")
    assert first["config_sha256"] == sha256_of(model / "config.json") and first["path"] == str(model)
    put_in(model, "unet.conv_out.bias", lambda t: t.add_(1e-3))  # one bias changed: same size, new mtime
    changed = folder.fingerprint(model)
    assert changed["weights_sha256"] == sha256_of(model / "model.safetensors") != first["weights_sha256"]
    assert changed["config_sha256"] == first["config_sha256"]


def test_the_cheap_fingerprint_trusts_size_and_mtime_and_full_hashes_again(model):
    """A change that keeps the size and puts the mtime back is not seen by the cheap check (it reads
    checksums.json while size and mtime match, by design); full=True hashes the file and sees it."""
    weights = model / "model.safetensors"
    recorded, info = folder.fingerprint(model)["weights_sha256"], os.stat(weights)
    put_in(model, "unet.conv_out.bias", lambda t: t.add_(1e-3))
    os.utime(weights, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert os.stat(weights).st_size == info.st_size
    assert folder.fingerprint(model)["weights_sha256"] == recorded  # trusted record
    assert folder.fingerprint(model, full=True)["weights_sha256"] == sha256_of(weights) != recorded


@pytest.mark.parametrize("record", ["absent", "not JSON", "wrong shape"])
def test_a_folder_without_a_checksum_record_is_hashed_on_demand(model, record):
    if record == "absent":
        os.unlink(model / "checksums.json")
    else:
        (model / "checksums.json").write_text("{" if record == "not JSON" else '{"files": {"model.safetensors": 5}}')
    assert folder.fingerprint(model)["weights_sha256"] == sha256_of(model / "model.safetensors")
    put_in(model, "unet.conv_out.bias", lambda t: t.add_(1e-3))
    assert folder.fingerprint(model)["weights_sha256"] == sha256_of(model / "model.safetensors")
    load(model)  # the record is no part of loading


def test_replay_refuses_changed_weights(model, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["generate", "a dog", "--model", str(model), "--steps", "1", "--n-samples", "1", "--H", "64", "--W", "64",
                 "--outdir", str(out), "--device", "cpu"]) == 0
    put_in(model, "unet.conv_out.bias", lambda t: t.add_(1e-3))
    assert main(["generate", "--replay", f"{out / 'manifest.jsonl'}:1", "--outdir", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err
    assert f"the weights of {model} changed since the picture was made" in err


def test_every_writer_records_the_weights_checksum(src, tmp_path):
    out = tmp_path / "m"
    convert(src, out)
    load(out).save(str(tmp_path / "saved"))
    for written in (out, tmp_path / "saved"):
        entry = json.loads((written / "checksums.json").read_text())["files"]["model.safetensors"]
        info = os.stat(written / "model.safetensors")
        assert (entry["sha256"], entry["size"], entry["mtime_ns"]) == (sha256_of(written / "model.safetensors"),
                                                                      info.st_size, info.st_mtime_ns)
    convert(src, out, force=True)  # a folder holding the record is still one --force replaces


def test_the_shipped_toy_has_its_checksum_record():
    toy = folder.resolve("toy")
    entry = json.loads(open(os.path.join(toy, "checksums.json")).read())["files"]["model.safetensors"]
    assert entry["sha256"] == sha256_of(os.path.join(toy, "model.safetensors")) == folder.fingerprint("toy", full=True)["weights_sha256"]
    assert entry["size"] == os.path.getsize(os.path.join(toy, "model.safetensors"))


def test_a_full_disk_at_conversion_is_one_line_and_keeps_the_old_folder(src, tmp_path):
    """RLIMIT_FSIZE makes every write past its size fail with EFBIG (SIGXFSZ ignored), as a full disk
    does with ENOSPC: safetensors' writer raised SafetensorError, a traceback."""
    out = tmp_path / "m9"
    convert(src, out)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    assert os.path.getsize(out / "model.safetensors") > 200_000

    def small_files():
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    run = subprocess.run([sys.executable, "-m", "altdiff_min", "convert", str(src), str(out), "--force"],
                         capture_output=True, text=True, preexec_fn=small_files, timeout=600,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    lines = [line for line in run.stderr.splitlines() if line.strip() and "%|" not in line]  # not the progress bar
    assert run.returncode == 2, run.stderr
    assert lines == [f"altdiff-min convert: error: cannot write {os.path.join(out, 'model.safetensors')}: File too large"], run.stderr
    assert "Traceback" not in run.stderr and "SafetensorError" not in run.stderr
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before  # the old folder, whole
    assert sorted(os.listdir(tmp_path)) == ["m9", "src"]  # no partial folder left
