"""The web page's Edit tab (apps/ui.py builds the page): upload a picture, describe it (the source
prompt), give the edited prompt (the target); the page shows the reconstruction and the edited picture.

The work is `altdiff-min edit`'s (apps/edit.py): check_edit first (every field, the words' alignment
included, one line on the page before any model work), then edit_picture (null-text or DDIM inversion,
then prompt-to-prompt). Every request passes its own settings; nothing is kept between requests. The
pictures carry their records (the "edit" entry included), so `altdiff-min edit --replay PICTURE`
makes them again.
"""
from __future__ import annotations

import os

from ..errors import AltDiffError, BadValue
from .edit import INVERSIONS, check_edit, cross_windows, edit_defaults, edit_picture, parse_weights, records


def edit_request(model, image, source, target, mode="swap", cross_replace_steps=None, self_replace_steps=None,
                 steps=25, scale=7.5, inversion="null-text", weights="", value_replace_steps=None, null_text_steps=None,
                 word_windows="", model_folder: dict | None = None, progress: bool = False):
    """What the tab's button calls (without Gradio): image, the uploaded file's path; weights, "word=c,
    word=c" (blank: none); word_windows, "word=f, …": target words with their own cross-attention window
    (`edit --word-replace-steps`); a blank target is the source (reweight). → (reconstruction, edited, settings):
    PIL pictures with their records in .info (provenance.text_chunks, which Gradio's PNG files keep)
    and the settings as JSON."""
    from ..storage.folder import fingerprint
    from ..storage.pictures import read_picture_argument
    from ..storage.provenance import DTYPE_NAMES, environment, text_chunks
    from .generate import file_digest

    if image is None:
        raise BadValue("edit: upload the picture to edit")
    if not isinstance(source, str) or not source.strip():
        raise BadValue("edit: give the source prompt, which describes the picture (not empty or blank)")
    picture = read_picture_argument(image, "picture")
    entries = lambda text: [w.strip() for w in (text or "").split(",") if w.strip()]  # "word=x, word=x"
    steps = int(steps) if isinstance(steps, float) and steps.is_integer() else steps  # the page's sliders send 25.0
    cross = cross_windows(cross_replace_steps, entries(word_windows), "word windows")
    checked = check_edit(model.shape, model.tokenizer, picture, source, target or None, mode, steps, scale, inversion,
                         cross, self_replace_steps, parse_weights(entries(weights)),
                         value_replace_steps=value_replace_steps, null_text_steps=null_text_steps)
    reconstruction, edited = edit_picture(model, picture, checked, progress=progress)
    weight = model.unet.conv_in.weight
    made = records(model, checked, {"path": os.path.abspath(image), "sha256": file_digest(image, "picture")},
                   fingerprint(model.path) if model_folder is None else model_folder, environment(weight.device, weight.dtype))
    for shows, result in (("reconstruction", reconstruction), ("edited", edited)):
        result.info.update(text_chunks(made[shows]))
    settings = {**checked, "model": model.path, "device": str(weight.device), "dtype": DTYPE_NAMES[weight.dtype]}
    return reconstruction, edited, settings


def edit_tab(gr, model, model_folder: dict, concurrency: int) -> None:
    """The Edit tab, inside the page's Blocks; its runs share the page's `concurrency` model runs."""
    from ..research.prompt_to_prompt import MODES

    defaults = edit_defaults()  # the paper's windows

    def run(image, source, target, mode, cross, own, steps, scale, inversion, weights, values, null, windows,
            progress=gr.Progress(track_tqdm=True)):
        try:
            return edit_request(model, image, source, target, mode, cross, own, steps, scale, inversion, weights,
                                values, null, windows, model_folder, progress=True)
        except AltDiffError as e:  # one line on the page, as the other tabs
            raise gr.Error(str(e), print_exception=False) from None

    with gr.Tab("Edit"):
        with gr.Row():
            image = gr.Image(type="filepath", image_mode=None, label="picture to edit", height=256, elem_id="picture-edit")
            with gr.Column():
                source = gr.Textbox(label="source prompt (the picture as it is)", elem_id="source-edit",
                                    placeholder="a red circle · un cercle rouge · 一个红色的圆")
                target = gr.Textbox(label="target prompt (the edit)", elem_id="target-edit",
                                    placeholder="swap: a blue circle · refine: a big red circle · reweight: blank")
                weights = gr.Textbox("", label="word weights (optional)", placeholder="blue=2, circle=0.5",
                                     elem_id="weights-edit")
                windows = gr.Textbox("", label="word windows (optional)", placeholder="square=0.4",
                                     elem_id="windows-edit", info="target words with their own cross replace steps")
        with gr.Row():
            mode = gr.Dropdown(list(MODES), value="swap", label="mode", elem_id="mode-edit")
            inversion = gr.Dropdown(list(INVERSIONS), value="null-text", label="inversion", elem_id="inversion-edit")
            cross = gr.Slider(0, 1, value=defaults["cross_replace_steps"], step=0.05, label="cross replace steps", elem_id="cross-edit",
                              info="the first fraction of the steps that take the source's word maps")
            own = gr.Slider(0, 1, value=defaults["self_replace_steps"], step=0.05, label="self replace steps", elem_id="self-edit",
                            info="… that take the source's self-attention (the layout)")
        with gr.Row():
            values = gr.Slider(0, 1, value=defaults["value_replace_steps"], step=0.05, label="value replace steps",
                               elem_id="values-edit", info="… in which the target's other words read the source's "
                               "values (XLM-R spreads the swapped word over every token: docs/editing.md)")
            null = gr.Slider(0, 1, value=defaults["null_text_steps"], step=0.05, label="null-text steps",
                             elem_id="null-edit", info="… in which the edit reads the fitted null-text contexts "
                             "(they hold the picture's colour; the empty prompt's after)")
        with gr.Row():
            steps = gr.Slider(1, 150, value=25, step=1, precision=0, label="steps", elem_id="steps-edit")
            scale = gr.Slider(0, 20, value=7.5, step=0.5, label="guidance scale", elem_id="scale-edit")
        button = gr.Button("Edit", variant="primary", elem_id="edit")
        with gr.Row():
            shown = [gr.Image(type="pil", format="png", label=label, interactive=False, elem_id=f"{name}-edit")
                     for name, label in (("reconstruction", "reconstruction"), ("edited", "edited"))]
        with gr.Accordion("settings", open=False):
            settings = gr.JSON(label="settings", elem_id="settings-edit")
    button.click(run, [image, source, target, mode, cross, own, steps, scale, inversion, weights, values, null, windows],
                 [*shown, settings], api_name="edit", concurrency_limit=concurrency, concurrency_id="model")
