"""Model folders: how a model is stored, self-described, never needing the network.

    config.json               every module's config, the tokenizer length; for a diffusion model also
                              the noise schedule and the image size
    model.safetensors         every tensor under altdiff-min's names, prefixed by its module's name
    sentencepiece.bpe.model   the XLM-R tokenizer
    checksums.json            the SHA-256, size and mtime of model.safetensors as written (`fingerprint`
                              trusts it while size and mtime match); folders written before it had none

A folder holds the modules its config.json names (MODULES): an AltDiffusion is text_encoder, unet
and vae (DIFFUSION), with a safety_checker beside them or not; an AltCLIP folder holds altclip.
Written by `altdiff-min convert`, by `altdiff-min train-toy` and by `AltDiffusion.save`.
"""
from __future__ import annotations

import dataclasses
import json
import mmap
import os
import shutil
import time
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..checks import IMAGE_SIZE, check_int
from ..errors import AltDiffError, BadFile, BadType, BadValue, Busy, Exists, Missing, NotFinite, io_error
from ..model.text_encoder import TextEncoder, TextEncoderConfig
from ..model.tokenizer import Tokenizer
from ..model.unet import UNet, UNetConfig
from ..model.vae import VAE, VAEConfig
from ..sampling.schedule import ScheduleConfig
from .checksums import CHECKSUMS, sha256_of, write_checksums
from .files import (fsync_path, leftovers, locked, make_folder, parse_json, put_in_place, read_json, safetensors_os_error,
                    sibling)

FORMAT, VERSION = "altdiff-min", 1
CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "sentencepiece.bpe.model"
# Every module a folder may hold: its name (the key of its config in config.json and the prefix of its
# tensors) → (module class, config class). The diffusion modules are written here; the others register
# themselves from their own files (vision/safety.py: safety_checker, vision/altclip.py: altclip), which
# the package imports, so this file needs none of them.
MODULES = {"text_encoder": (TextEncoder, TextEncoderConfig), "unet": (UNet, UNetConfig), "vae": (VAE, VAEConfig)}
DIFFUSION = ("text_encoder", "unet", "vae")  # what `load` needs; the safety checker is optional beside them
NAMED: dict[str, str] = {}  # model folders known by a name (the toy registers "toy": toy/__init__.py)


def register_module(name: str, module_class: type, config_class: type) -> None:
    """A module model folders may hold beside the diffusion ones, under `name`."""
    MODULES[name] = (module_class, config_class)


def register_folder(name: str, path: str) -> None:
    """A model folder `load(name)` and every command's --model find by its name."""
    NAMED[name] = path


@contextmanager
def empty_modules():
    """Build modules as skeletons: parameters on the meta device (no memory, no values), since every
    tensor is about to be replaced by a checkpoint's. torch.nn's initialisation still runs, on meta
    tensors (~50 ms for m9's three modules): switching it off would mean patching torch.nn's classes
    for the whole process, which another thread building a model at the same moment would feel."""
    with torch.device("meta"):
        yield


def config_to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(cls, d: dict[str, Any]):
    """A frozen config from its JSON form (checked by the config itself: altdiff_min/checks.py); JSON
    lists become the tuples the dataclass defaults use, and a field whose default is a config (the
    towers of AltCLIPConfig) is read as one. Fields a folder from an older altdiff-min lacks take
    their defaults."""
    if not isinstance(d, dict):
        raise BadType(f"{cls.__name__} must be a JSON object, got {d!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if unknown := set(d) - set(fields):
        raise BadValue(f"{cls.__name__} has no field(s) {sorted(unknown)}")

    def value(name: str, v):
        f = fields[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            return config_from_dict(type(default), v)
        return tuple(v) if isinstance(v, list) else v

    return cls(**{k: value(k, v) for k, v in d.items()})


def write_folder(path: str, configs: dict, states: dict, schedule: ScheduleConfig | None, tokenizer_file: str,
                 max_length: int = 77, force: bool = False, dtype: torch.dtype | None = None,
                 image_size: int | None = 512, **extra: Any) -> None:
    """Write a model folder atomically (see `destination` and `write_locked`): a failed or interrupted
    write never leaves a folder `load` accepts, and replaces nothing but a model folder (force=True).

    configs / states: module name (of MODULES) → config / state dict; dtype casts floating tensors
    (None keeps them). schedule and image_size belong to a diffusion model: None for a folder
    without a UNet (AltCLIP).
    """
    with destination(path, force) as path:
        write_locked(path, configs, states, schedule, tokenizer_file, max_length, dtype, image_size, **extra)


@contextmanager
def destination(path: str | os.PathLike, force: bool = False) -> Iterator[str]:
    """Hold the write lock on `path`, finish or undo what an interrupted write of it left, and check
    that it may be written: absent, or (force) a model folder. Yields the absolute path. The
    converter holds it from before reading any weights, so two conversions to one folder never mix."""
    path = os.path.abspath(os.fspath(path))
    make_folder(os.path.dirname(path), f"cannot write {path}")
    with locked(path):
        recover(path)
        if os.path.lexists(path):
            if not force:
                raise Exists(f"{path} already exists; pass --force (force=True) to replace it")
            if problem := not_a_model_folder(path):
                raise Exists(f"{path} {problem}; --force replaces only a model folder that altdiff-min wrote")
        yield path


def recover(path: str) -> None:
    """What a killed write of `path` left: a `.NAME.old-*` (the previous model, moved aside) comes back
    if `path` is missing (killed between the two renames) and is removed otherwise (killed after);
    `.NAME.partial-*` folders (unfinished writes) are removed."""
    for old in leftovers(path, "old"):
        if not os.path.lexists(path):
            os.replace(old, path)
            fsync_path(os.path.dirname(path))
        else:
            shutil.rmtree(old)
    for partial in leftovers(path, "partial"):
        shutil.rmtree(partial)


def not_a_model_folder(path: str) -> str | None:
    """Why `path` is not a model folder that may be replaced, or None."""
    if os.path.islink(path):
        return "is a symbolic link"
    if not os.path.isdir(path):
        return "is not a folder"
    if other := sorted(set(os.listdir(path)) - {CONFIG, WEIGHTS, TOKENIZER, CHECKSUMS}):
        return f"holds files altdiff-min did not write ({', '.join(other[:5])})"
    try:
        config = read_json(os.path.join(path, CONFIG))
    except AltDiffError:
        return "has no readable config.json"
    return None if isinstance(config, dict) and config.get("format") == FORMAT else "is not an altdiff-min model folder"


def write_locked(path: str, configs: dict, states: dict, schedule: ScheduleConfig | None, tokenizer_file: str,
                 max_length: int, dtype: torch.dtype | None, image_size: int | None, **extra: Any) -> None:
    """Write into a fresh `.NAME.partial-*` sibling, fsync its files and itself, then put it in place
    (files.put_in_place: any old folder moved aside, then removed). Call inside `destination(path)`."""
    tmp = sibling(path, "partial")
    if unknown := sorted(set(configs) - set(MODULES)):
        raise BadValue(f"a model folder holds {sorted(MODULES)}, not {unknown}")
    def written(v: torch.Tensor) -> torch.Tensor:  # dtype None keeps each float's precision, float64 excepted
        to = dtype or (torch.float32 if v.dtype == torch.float64 else None)
        return (v.to(to) if to is not None and v.is_floating_point() else v).contiguous()

    tensors = {f"{name}.{k}": written(v) for name, state in states.items() for k, v in state.items()}
    if dtype is not None and dtype.is_floating_point:
        if overflow := [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]:
            raise BadValue(f"{len(overflow)} tensor(s) do not fit {str(dtype).removeprefix('torch.')} (beyond "
                           f"±{torch.finfo(dtype).max:g}, or NaN), e.g. {', '.join(overflow[:3])}: write them in float32")
    try:
        os.mkdir(tmp)  # 0777 less the umask, as any folder the user makes
        try:
            save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
        except SafetensorError as e:  # safetensors' write errors (a full disk: "I/O error: No space left on device (os error 28)")
            raise io_error(os.path.join(path, WEIGHTS), safetensors_os_error(e)) from None  # named where it goes
        write_checksums(tmp, WEIGHTS)
        shutil.copyfile(tokenizer_file, os.path.join(tmp, TOKENIZER))
        config = {"format": FORMAT, "version": VERSION, **{name: config_to_dict(c) for name, c in configs.items()},
                  **({"schedule": config_to_dict(schedule)} if schedule is not None else {}),
                  "tokenizer": {"max_length": max_length},
                  **({"image_size": image_size} if image_size is not None else {}), **extra}
        with open(os.path.join(tmp, CONFIG), "w") as f:  # written last: a folder without it is not loadable
            json.dump(config, f, indent=2, ensure_ascii=False, allow_nan=False)
        mode = os.stat(tmp).st_mode & 0o666  # files as the umask makes them (safetensors writes 0600)
        for name in (WEIGHTS, CHECKSUMS, TOKENIZER, CONFIG, ""):
            if name:
                os.chmod(os.path.join(tmp, name), mode)
            fsync_path(os.path.join(tmp, name))
        put_in_place(tmp, path)
    except OSError as e:
        raise io_error(path, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve(path: str | os.PathLike) -> str:
    """A model folder's path; a registered name ("toy": the small model shipped with the package) is its folder."""
    return NAMED.get(path, os.fspath(path)) if isinstance(path, str) else os.fspath(path)


def fingerprint(path: str | os.PathLike, full: bool = False) -> dict[str, str]:
    """What a run or a picture records about the model folder it used: its absolute path, the SHA-256
    of its config.json (which names every module's shape and the schedule) and of its weights
    (checksums.sha256_of: from checksums.json while the file's size and mtime match it; full=True hashes
    the weights again in any case)."""
    import hashlib

    path = os.path.abspath(resolve(path))
    try:
        with open(os.path.join(path, CONFIG), "rb") as f:
            config = hashlib.sha256(f.read()).hexdigest()
    except OSError as e:
        raise Missing(f"model folder not found (or its {CONFIG} unreadable): {path} ({e.strerror})") from None
    return {"path": path, "config_sha256": config, "weights_sha256": sha256_of(path, WEIGHTS, full)}


def replacement_under_way(path: str) -> bool:
    """`path` is absent and the previous model lies beside it (`.NAME.old-*`): a --force replacement
    between its two renames, or one killed there."""
    parent = os.path.dirname(os.path.abspath(path))
    return not os.path.lexists(path) and os.path.isdir(parent) and bool(leftovers(os.path.abspath(path), "old"))


def read_config(path: str | os.PathLike, require: tuple[str, ...] = DIFFUSION) -> dict[str, Any]:
    """The config.json of a model folder, after checking the folder really is one and holds the
    modules `require` names, each config checked (altdiff_min/checks.py); the modules it holds are
    config["modules"]. Errors name the file."""
    path = resolve(path)
    if os.path.isfile(path):
        raise BadFile(f"{path} is a file, not a model folder: convert a single checkpoint first, "
                      f"`altdiff-min convert {path} OUT_DIR --tokenizer sentencepiece.bpe.model`, and pass OUT_DIR")
    if not os.path.isdir(path):
        hint = ""
        if os.path.isdir(os.path.join(path, "unet")) or os.path.isfile(os.path.join(path, "model_index.json")):
            hint = f"; it looks like a diffusers folder: convert it first, `altdiff-min convert {path} OUT_DIR`"
        if replacement_under_way(path):
            hint = "; an interrupted --force replacement left the previous model beside it: run the conversion again"
        raise Missing(f"model folder not found: {path}{hint}")
    missing = [f for f in (CONFIG, WEIGHTS, TOKENIZER) if not os.path.isfile(os.path.join(path, f))]
    if missing:
        if os.path.isfile(os.path.join(path, "model_index.json")):
            raise BadFile(f"{path} is a diffusers folder, not an altdiff-min model folder: convert it with "
                          f"`altdiff-min convert {path} OUT_DIR` and pass OUT_DIR")
        raise BadFile(f"{path} is not an altdiff-min model folder (missing {', '.join(missing)}); "
                      f"convert a checkpoint into a new folder with `altdiff-min convert SRC OUT_DIR`")
    file = os.path.join(path, CONFIG)
    config = read_json(file)
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise BadFile(f"{file} is not an altdiff-min config (format {config.get('format') if isinstance(config, dict) else None!r})")
    if config.get("version") != VERSION:
        raise BadFile(f"{file} has version {config.get('version')!r}; this altdiff-min reads version {VERSION}")
    config["modules"] = [name for name in MODULES if name in config]
    if missing := [name for name in require if name not in config]:
        what = " and ".join(config["modules"]) or "no module"
        hint = ("; pass an AltCLIP folder (`altdiff-min convert BAAI/AltCLIP-m9 OUT_DIR` writes one)" if "altclip" in missing
                else "; pass an AltDiffusion model folder" + (" (an AltCLIP folder is for `altdiff-min score --clip`)"
                                                              if "altclip" in config else ""))
        raise BadFile(f"{file} holds {what}, not {' and '.join(missing)}{hint}")
    try:
        for name in config["modules"]:
            config[name] = config_from_dict(MODULES[name][1], config[name])
        if "unet" in config:  # a diffusion model: its noise schedule and image size
            config["schedule"] = config_from_dict(ScheduleConfig, config["schedule"])
        check_folder_values(config)
    except KeyError as e:
        raise BadFile(f"{file} has no {e.args[0]!r} entry") from None
    except AltDiffError as e:
        raise BadFile(f"{file}: {e}") from None
    return config


def check_folder_values(config: dict[str, Any]) -> None:
    """The folder's own values: the tokenizer length fits the text tower's positions, the image size
    fits the VAE and UNet."""
    text = config["text_encoder"] if "text_encoder" in config else config["altclip"].text if "altclip" in config else None
    if text is not None:
        check_int("tokenizer.max_length", config["tokenizer"]["max_length"], 2, text.max_length)
    if "unet" in config:
        check_int("image_size", config.get("image_size", 512), *IMAGE_SIZE)
    if "unet" in config and "vae" in config:  # else sampling runs to the end and only decoding fails
        unet, latent = config["unet"], config["vae"].latent_channels
        if (unet.in_channels, unet.out_channels) != (latent, latent):
            raise BadValue(f"the UNet takes {unet.in_channels} and predicts {unet.out_channels} latent channels, but "
                           f"the VAE's latents have {latent}: the pipeline needs the two to agree")
    if "default_dtype" in config and config["default_dtype"] not in ("float32", "float16", "bfloat16"):
        raise BadValue(f"default_dtype must be float32, float16 or bfloat16, got {config['default_dtype']!r}")


# safetensors' dtype names → torch's (the format is little-endian, as torch is on every machine it runs on)
STORED = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
          "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_tensors(file: str, device: torch.device, dtype: torch.dtype | None, wanted: set[str],
                 known: set[str], check_finite: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of the modules `wanted` in `file`, on `device`, the floating ones in `dtype` (None: as
    stored). A file holding tensors of modules outside `known` is a BadFile; check_finite: one holding
    NaN or infinity (as read, after the cast) is NotFinite naming the tensor (see `nonfinite`).

    Where the stored tensors are what is wanted (on the CPU, no cast) they are memory-mapped: read as
    used, shared with the page cache. Otherwise each is cast and moved from the memory map on its own,
    and its pages are then dropped from this process (madvise DONTNEED; they stay in the page cache):
    every page touched would otherwise stay resident until the map closes, and m9 in bf16 from an
    fp32 file peaked at 1.36× diffusers' memory (fp32 pages beside the bf16 weights). (Reading each
    tensor with read() instead keeps the peak as low but loads 5× slower: fresh memory is zeroed and
    copied into.) On a GPU, casting there after moving peaked at 2.45×."""
    with safe_open(file, framework="pt") as f:  # checks the header against the file
        stored = {key: f.get_slice(key).get_dtype() for key in f.keys()}
    if stray := sorted({k.split(".")[0] for k in stored} - known):
        raise BadFile(f"{file} holds tensors of modules its {CONFIG} does not name: {stray}")
    keys = [k for k in stored if k.split(".")[0] in wanted]
    if unknown := sorted({stored[k] for k in keys} - set(STORED)):
        raise BadFile(f"{file} holds tensors of dtypes altdiff-min does not read: {unknown}")
    if device.type == "cpu" and (dtype is None or all(STORED[stored[k]] == dtype or not STORED[stored[k]].is_floating_point
                                                       for k in keys)):
        mapped = load_file(file, device="cpu")
        out = {k: mapped[k] for k in keys}
        if check_finite:
            refuse_nonfinite(file, out, {k: STORED[stored[k]] for k in keys})
        return out
    out, page = {}, mmap.PAGESIZE
    with open(file, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        header = parse_json(f.read(header_size), f"{file}'s header")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:  # private: writable, never written
            for key in keys:
                begin, end = (8 + header_size + offset for offset in header[key]["data_offsets"])
                kind, shape = STORED[stored[key]], header[key]["shape"]
                want = dtype if dtype is not None and kind.is_floating_point else kind
                if end == begin:  # no elements (frombuffer refuses a count of 0)
                    out[key] = torch.empty(shape, dtype=want, device=device)
                    continue
                stored_tensor = torch.frombuffer(mapped, dtype=torch.uint8, count=end - begin, offset=begin)
                out[key] = stored_tensor.view(kind).reshape(shape).to(device, want, copy=True)  # nothing may point into the map
                del stored_tensor
                if hasattr(mmap, "MADV_DONTNEED"):  # not on Windows
                    mapped.madvise(mmap.MADV_DONTNEED, begin // page * page, end - begin // page * page)
    if check_finite:
        refuse_nonfinite(file, out, {k: STORED[stored[k]] for k in keys})
    return out


def nonfinite(tensor: torch.Tensor) -> bool:
    """Whether a floating tensor holds a NaN or an infinity. One pass of aminmax (NaN propagates into
    min and max, an infinity is one of them): ~30× faster on the CPU than isfinite().all(), which
    writes a boolean per value first (64 M float32 values on 2 cores: 0.08 s against 2.7 s)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return False
    low, high = torch.aminmax(tensor)
    return not bool(torch.isfinite(low) & torch.isfinite(high))


def refuse_nonfinite(file: str, tensors: dict[str, torch.Tensor], stored: dict[str, torch.dtype]) -> None:
    """NotFinite naming the first tensor that holds NaN or infinity, how many values, and how many
    other tensors do: a model with one would sample to the end and only then come out NaN."""
    bad = [k for k, v in tensors.items() if nonfinite(v)]
    if bad:
        count = int((~torch.isfinite(tensors[bad[0]])).sum())
        kind = tensors[bad[0]].dtype
        cast = f" when read as {str(kind).removeprefix('torch.')}" if kind != stored[bad[0]] else ""
        more = f" (and {len(bad) - 1} more tensor(s): {', '.join(bad[1:4])}{', …' if len(bad) > 4 else ''})" if len(bad) > 1 else ""
        raise NotFinite(f"{file}: tensor {bad[0]!r} has {count} NaN/inf value(s){cast}{more}; the weights are "
                        f"corrupt (check_finite=False loads them anyway)")


def read_modules(path: str, config: dict[str, Any], device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, names: tuple[str, ...] | None = None,
                 check_finite: bool = True) -> dict[str, torch.nn.Module]:
    """The modules `names` of a model folder (None: every module it holds, config["modules"]; config:
    from read_config), built on the meta device (no random init) and filled strictly from
    model.safetensors; dtype None keeps the stored dtype. A file that is corrupt or does not fit the
    config is a BadFile naming it; check_finite: a tensor holding NaN or infinity is NotFinite naming it."""
    file = os.path.join(path, WEIGHTS)
    wanted = list(config["modules"]) if names is None else [n for n in config["modules"] if n in names]
    try:
        tensors = read_tensors(file, torch.device(device), dtype, set(wanted), set(config["modules"]), check_finite)
    except (SafetensorError, OSError, ValueError) as e:
        raise BadFile(f"{file} is not a readable safetensors file (corrupt or truncated?): {e}") from None
    except RuntimeError:  # safetensors' memory map of a file that was there a moment ago
        if os.path.isfile(file):
            raise
        raise Missing(f"{file} was removed while it was being read") from None
    modules = {}
    for name in wanted:
        model_cls = MODULES[name][0]
        with empty_modules():
            model = model_cls(config[name])
        prefix = name + "."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise BadFile(f"{file} does not fit the {name} config in {CONFIG}: {' '.join(first[1:3])[:300]}") from None
        modules[name] = model.eval().requires_grad_(False)
    return modules


REREADS = 20  # reads of a folder that a --force replacement keeps changing, before giving up


def identity(path: str) -> tuple[int, ...] | None:
    """What tells one folder at `path` from the next one renamed there; None: absent. The inode alone
    does not: a replacement removes the old folder, and the next one made may get its number again;
    its change time (set on creation and on the rename into place) then differs."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns, st.st_mtime_ns


def read_folder(path: str, require: tuple[str, ...], device: torch.device, dtype: torch.dtype | None,
                names: tuple[str, ...], check_finite: bool = True) -> tuple[dict[str, Any], Tokenizer, dict[str, nn.Module]]:
    """A model folder's config (read_config), tokenizer and modules `names` (read_modules; dtype None:
    the config's default_dtype, else as stored; check_finite: NaN or infinity in a weight is refused),
    all from one folder. Its files are opened one by one
    by path, without the write lock (a load never waits for a conversion), while a --force replacement
    may rename the old folder aside and the new one into place (write_locked): a read during which
    the folder changed (the config of one, the weights of the other) or vanished between the two
    renames is done again."""
    for attempt in range(REREADS):
        before = identity(path)
        try:
            config = read_config(path, require)
            tokenizer = Tokenizer(os.path.join(path, TOKENIZER), max_length=config["tokenizer"]["max_length"])
            want = getattr(torch, config["default_dtype"]) if dtype is None and "default_dtype" in config else dtype
            modules = read_modules(path, config, device, want, names, check_finite)
        except (AltDiffError, RuntimeError):  # RuntimeError: safetensors' map of a file renamed away meanwhile
            if attempt + 1 == REREADS or (identity(path) == before and not replacement_under_way(path)):
                raise
        else:
            if identity(path) == before:
                return config, tokenizer, modules
        time.sleep(0.02 * (attempt + 1))
    raise Busy(f"{path} was replaced {REREADS} times while it was being read; try again")
