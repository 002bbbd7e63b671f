"""A sweep's contact sheet: one labelled row per setting, one column per prompt × seed (apps/sweep.py)."""
from __future__ import annotations

import os

from ..storage.files import atomic_file


def label(setting: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in setting.items()) or "(fixed)"


def shortened(draw, text: str, width: float) -> str:
    """`text` cut (with "…") to fit `width` pixels in draw's font."""
    if draw.textlength(text) <= width:
        return text
    while text and draw.textlength(text + "…") > width:
        text = text[:-1]
    return text.rstrip() + "…"


SHEET_LEFT, SHEET_TOP, SHEET_GAP = 220, 30, 2  # the settings' labels, the columns' two-line heads, between pictures


def contact_sheet(out: str, spec, pictures: list) -> None:
    """One row per setting, labelled; one column per prompt × seed, headed by the prompt (shortened to
    the column's width) over the seed. spec: sweep.Spec; pictures: the cells' pictures, in spec.cells() order."""
    from PIL import Image, ImageDraw

    w, h = max(p.size[0] for p in pictures), max(p.size[1] for p in pictures)  # an axis may change the size
    columns = len(spec.prompts) * len(spec.seeds)
    left, top, gap = SHEET_LEFT, SHEET_TOP, SHEET_GAP
    sheet = Image.new("RGB", (left + columns * (w + gap), top + len(spec.settings) * (h + gap)), "white")
    draw = ImageDraw.Draw(sheet)
    for c in range(columns):
        p, k = divmod(c, len(spec.seeds))
        x = left + c * (w + gap) + 2
        draw.text((x, 2), shortened(draw, spec.prompts[p], w - 4), fill="black")
        draw.text((x, 15), shortened(draw, f"seed {spec.seeds[k]}", w - 4), fill="black")
    for i, picture in enumerate(pictures):
        s, c = divmod(i, columns)
        sheet.paste(picture, (left + c * (w + gap), top + s * (h + gap)))
        if c == 0:
            draw.text((4, top + s * (h + gap) + h // 2 - 6), label(spec.settings[s])[:34], fill="black")
    with atomic_file(os.path.join(out, "contact_sheet.png")) as tmp:
        sheet.save(tmp, format="PNG")
