"""Edit sweeps (apps/sweep.py): one real picture edited many ways, a table of the edits.

    model = "toy"
    prompts = ["a blue circle", "a green circle"]     # the TARGET prompts: one column each
    metrics = ["toy"]
    [edit]
    picture = "circle.png"                            # beside the spec
    source = "a red circle"                           # the prompt that describes it
    [fixed]
    steps = 25
    [axes]                                            # any of EDIT_ARGUMENTS
    cross_replace_steps = [0.2, 0.5, 0.8]
    self_replace_steps = [0.0, 0.4]

Every cell (setting × target) is `altdiff-min edit PICTURE --prompt SOURCE --target TARGET` with the
setting's arguments (apps/edit.py check_edit, edit_picture): its edited picture, recorded as `edit`
records it (`altdiff-min edit --replay` makes it again). The picture is inverted once per (inversion,
steps, scale) of the sweep and the inversion reused by the cells that share them. Seeds do not apply
(x_T is the picture's inversion): a spec with 'edit' gives none. spec.json records the picture's
SHA-256: a changed picture is another sweep.
"""
from __future__ import annotations

import os

from ..errors import AltDiffError, BadValue

EDIT_ARGUMENTS = {"steps", "scale", "mode", "inversion", "cross_replace_steps", "self_replace_steps",
                  "value_replace_steps", "null_text_steps", "weights", "local_blend"}  # check_edit's keyword arguments


def read_edit_entry(path: str, raw: dict) -> dict | None:
    """The spec's 'edit' table → {"picture": its absolute path, "sha256", "source"}, the picture read
    (pictures.read_picture_argument) and the source checked; None without one."""
    from ..model.tokenizer import check_prompt
    from ..storage.pictures import read_picture_argument
    from .generate import file_digest

    entry = raw.get("edit")
    if entry is None:
        return None
    if not isinstance(entry, dict) or set(entry) != {"picture", "source"} or not all(isinstance(v, str) for v in entry.values()):
        raise BadValue(f"{path}: 'edit' must be a table of two strings, picture (a file beside the spec) and source "
                       f"(the prompt that describes it); the target prompts are 'prompts'")
    for key in ("seeds", "lora"):
        if key in raw:
            raise BadValue(f"{path}: an edit sweep starts from the picture's inversion, with the model as it is: "
                           f"give no {key!r}")
    picture = os.path.join(os.path.dirname(os.path.abspath(path)), entry["picture"])
    try:
        read_picture_argument(picture, "'edit' picture")
        check_prompt(entry["source"], "'edit' source")
    except AltDiffError as e:
        raise type(e)(f"{path}: {e}") from None
    return {"picture": picture, "sha256": file_digest(picture, "'edit' picture"), "source": entry["source"]}


def edit_arguments(spec, setting: dict, target: str, shape, tokenizer, picture) -> dict:
    """One cell's checked arguments (apps/edit.py check_edit)."""
    from .edit import check_edit

    return check_edit(shape, tokenizer, picture, spec.edit["source"], target, **{**spec.fixed, **setting})


def check_edit_cells(spec, model) -> None:
    """Every setting × target checked (the words' alignment included) before any picture is made."""
    from ..storage.pictures import read_picture_argument

    picture = read_picture_argument(spec.edit["picture"], "'edit' picture")
    for setting in spec.settings:
        for target in spec.prompts:
            edit_arguments(spec, setting, target, model.shape, model.tokenizer, picture)


def make_edit_cell(spec, model, setting: dict, target: str, inverted: dict, model_folder: dict, made_in: dict):
    """One cell's edited picture and its record; `inverted` caches the picture's inversions."""
    from ..storage.pictures import read_picture_argument
    from .edit import edit_picture, records

    picture = read_picture_argument(spec.edit["picture"], "'edit' picture")
    checked = edit_arguments(spec, setting, target, model.shape, model.tokenizer, picture)
    _, edited = edit_picture(model, picture, checked, progress=False, inverted=inverted)
    shown = {"path": spec.edit["picture"], "sha256": spec.edit["sha256"]}
    return edited, records(model, checked, shown, model_folder, made_in)["edited"]
