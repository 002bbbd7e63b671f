"""altdiff_min.storage.folder and storage.checksums: writing a model folder (--force, interrupted and
concurrent writes, fsync, one writer at a time, permissions, a full disk), reading one (configs and weights
checked before and at load, every error one line naming the file), its fingerprint and checksum record."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import edit_json, no_weights_read, put_in

import altdiff_min.storage.folder as folder
from altdiff_min.apps.cli import main
from altdiff_min.errors import AltDiffError, BadFile, BadType, Busy, NotFinite
from altdiff_min.pipeline import load
from altdiff_min.storage.files import locked
from weights_convert.convert import convert
from weights_convert.rules import ConversionError


# ---- --force replaces only a model folder -------------------------------------------------------------

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


# ---- interrupted writes recovered or cleaned; a load during a replacement; fsync; one writer ----------

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
    for module in (folder, files):  # the files, in folder.write_locked; the parent, in files.put_in_place
        monkeypatch.setattr(module, "fsync_path", lambda p: synced.append(os.path.basename(p.rstrip("/"))) or real(p))
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


# ---- permissions: a written folder is readable by others, as the user's own folders are ---------------

def test_converted_folders_follow_the_umask(src, tmp_path):
    old = os.umask(0o022)
    try:
        convert(src, tmp_path / "m9")
    finally:
        os.umask(old)
    assert (tmp_path / "m9").stat().st_mode & 0o777 == 0o755
    assert {(f.stat().st_mode & 0o777) for f in (tmp_path / "m9").iterdir()} == {0o644}


# ---- a full disk: one line, and the old folder kept whole ---------------------------------------------

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


# ---- configs: unbounded work and bad numbers refused before any weight is read ------------------------

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


# ---- reading a model folder: every error is one line naming the file ----------------------------------

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


def test_model_paths_that_are_not_model_folders(hub_layout, tmp_path, capsys):
    for path, message in [(str(tmp_path), "not an altdiff-min model folder"),
                          (hub_layout, "is a diffusers folder, not an altdiff-min model folder: convert it")]:
        assert main(["generate", "a dog", "--model", path, "--outdir", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert message in err and f"convert SRC {path}" not in err  # never suggests converting into it


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])  # memory-mapped; read tensor by tensor to be cast
@pytest.mark.parametrize("cut", [0.3, 0.999])  # inside the header or the data; inside the last tensor
def test_truncated_weights_are_a_bad_file_however_they_are_read(model, dtype, cut):
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(BadFile, match="model.safetensors is not a readable safetensors file"):
        load(model, dtype=dtype)


# ---- weights checked at load: NaN and inf refused, naming the tensor ----------------------------------

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


# ---- the fingerprint and the checksum record ----------------------------------------------------------

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
