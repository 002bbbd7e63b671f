"""DreamBooth's prior preservation (Ruiz et al. 2023, §3.3): `--class-prompt TEXT --class-images N`.

Before training, the *base* model draws N pictures of the class prompt (DDIM, --class-steps, guidance
7.5, picture K from seed K, at the training resolution) into OUT_DIR/class_images/: 00000.png …, each
carrying its record (prompt, seed, steps, the base model: provenance.picture_record), and a
metadata.jsonl captioning each with the class prompt, so the folder is ordinary training data. Only
rank 0 draws; a resumed run finds them there and draws only what is missing (none, after a run that
started). run.json records the prompt, count and settings; --resume refuses another prompt, count or
step count (config.SAME_ON_RESUME). As diffusers' train_dreambooth, the pictures are not screened by a
safety checker: they are training data of the prompt the user chose, not pictures shown.

Each step pairs every instance example (place j of the global batch) with a class example from the
class pictures' own stream (epoch permutations seeded by (seed, 2)) at the same position, drawn
with its own generator (seed, 2, step, j); the micro-batch is the B instance examples then their B
class examples, one UNet call, and the loss is instance loss + λ · class loss, each a mean over its
half (objectives.reduce), as diffusers' train_dreambooth concatenates and chunks its batch.
diffusers pairs instance i mod n with class i mod N over a shuffled range of max(n, N); here the two
streams are independent: each half's examples are drawn as often, and the loss, a sum of two
separate means, does not depend on which class example sits beside which instance.
"""
from __future__ import annotations

import json
import os

import torch
from tqdm import tqdm

from ..errors import BadFile
from ..storage.files import atomic_file, clean_partials, fsync_path, make_folder

CLASS_IMAGES = "class_images"
SCALE = 7.5  # generate's default guidance, as diffusers' pipeline default that train_dreambooth draws with


def record(cfg, resolution: int) -> dict:
    """run.json's "class_images": what drew them."""
    return {"folder": CLASS_IMAGES, "prompt": cfg.class_prompt, "count": cfg.class_images, "sampler": "ddim",
            "steps": cfg.class_steps, "scale": SCALE, "seeds": f"0…{cfg.class_images - 1}", "resolution": resolution}


def picture_names(cfg) -> list[str]:
    """Class picture k's file name, for k < cfg.class_images."""
    return [f"{k:05d}.png" for k in range(cfg.class_images)]


def class_folder(out_dir: str) -> str:
    """OUT_DIR/class_images, made if missing, a killed write's leftovers removed (rank 0, before any draws)."""
    folder = os.path.join(out_dir, CLASS_IMAGES)
    if os.path.islink(folder):
        raise BadFile(f"{folder} is a symbolic link; altdiff-min does not write a run's files through links (remove it)")
    make_folder(folder, "class_images")
    clean_partials(folder)  # a picture whose write a kill interrupted: drawn again
    return folder


def draw_class_images(model, out_dir: str, cfg, resolution: int, model_folder: dict, progress: bool = True,
                      rank: int = 0, processes: int = 1) -> str:
    """The class pictures OUT_DIR/class_images (class_folder) lacks, drawn with `model` (the base model:
    call this before training), each written atomically; under torchrun each process draws those k with
    k % processes == rank (picture k is seed k's whoever draws it), so none waits on another for long.
    Returns the folder; write_metadata follows, once all have drawn."""
    from ..storage.provenance import environment, picture_record, png_bytes

    folder = os.path.join(out_dir, CLASS_IMAGES)
    names = picture_names(cfg)
    missing = [k for k, name in enumerate(names) if k % processes == rank and not os.path.isfile(os.path.join(folder, name))]
    made_in = environment(model.unet.conv_in.weight.device, model.unet.conv_in.weight.dtype)
    for k in tqdm(missing, desc="class images", disable=not (progress and rank == 0)):
        asked = {"steps": cfg.class_steps, "scale": SCALE, "seed": k, "height": resolution, "width": resolution}
        image = model.generate(cfg.class_prompt, progress=False, safety_checker=False, **asked)[0]
        kept = picture_record(model, cfg.class_prompt, 0, asked, image.size, model_folder, made_in,
                              class_image={"run": os.path.abspath(out_dir), "index": k})
        with atomic_file(os.path.join(folder, names[k])) as tmp, open(tmp, "wb") as f:
            f.write(png_bytes(image, kept))
    return folder


def write_metadata(folder: str, cfg) -> str:
    """The class pictures' captions (metadata.jsonl: each the class prompt), once every picture is drawn."""
    names = picture_names(cfg)
    with atomic_file(os.path.join(folder, "metadata.jsonl")) as tmp, open(tmp, "w") as f:
        f.writelines(json.dumps({"file_name": name, "text": cfg.class_prompt}, ensure_ascii=False) + "\n" for name in names)
    fsync_path(folder)
    return folder


class WithClasses:
    """The instance data (len, pixels, texts, order as it has them) and, after its n examples, the class
    pictures: index n + c is class picture c. class_order(seed)[p]: position p's class example."""

    def __init__(self, data, classes):
        self.data, self.classes, self.resolution = data, classes, data.resolution

    def __len__(self) -> int:
        return len(self.data)

    def pixels(self, i: int) -> torch.Tensor:
        return self.data.pixels(i) if i < len(self.data) else self.classes.pixels(i - len(self.data))

    def texts(self, i: int) -> tuple[str, ...]:
        return self.data.texts(i) if i < len(self.data) else self.classes.texts(i - len(self.data))

    def order(self, seed: int):
        from .train import Stream

        return self.data.order(seed) if hasattr(self.data, "order") else Stream(len(self.data), seed)

    def class_order(self, seed: int):
        from .train import Stream

        stream, n = Stream(len(self.classes), seed, key=(2,)), len(self.data)
        return _Shifted(stream, n)

    def describe(self) -> dict:
        return self.data.describe()


class _Shifted:
    def __init__(self, stream, offset: int):
        self.stream, self.offset = stream, offset

    def __getitem__(self, p: int) -> int:
        return self.offset + self.stream[p]
