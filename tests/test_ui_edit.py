"""The web page's Edit tab (altdiff_min/apps/ui_edit.py): the function its button calls, on the toy, without a
server; the page offers it; its pictures carry records that `altdiff-min edit --replay` makes again."""
import json

import numpy as np
import pytest
from PIL import Image

from altdiff_min import load
from altdiff_min.apps.cli import main
from altdiff_min.apps.edit import check_edit, edit_picture
from altdiff_min.apps.ui_edit import edit_request
from altdiff_min.errors import BadValue
from altdiff_min.storage.provenance import RECORD_CHUNK, png_bytes
from altdiff_min.toy import render


@pytest.fixture(scope="module")
def toy():
    return load("toy")


@pytest.fixture(scope="module")
def upload(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("upload") / "circle.png"
    Image.fromarray(render("circle", "red", size=30, center=(32, 32))).save(path)
    return str(path)


def test_the_tabs_handler_is_the_edit_and_its_pictures_replay(toy, upload, tmp_path):
    reconstruction, edited, settings = edit_request(toy, upload, "a red circle", "a blue circle", "swap", 0.6, 0.2,
                                                    steps=3, weights="blue=1.5", value_replace_steps=0.8, null_text_steps=0.5,
                                                    word_windows="blue=0.3")
    windows = {"default_": 0.6, "blue": 0.3}
    checked = check_edit(toy.shape, toy.tokenizer, Image.open(upload).convert("RGB"), "a red circle", "a blue circle",
                         steps=3, cross_replace_steps=windows, self_replace_steps=0.2, weights={"blue": 1.5},
                         value_replace_steps=0.8, null_text_steps=0.5)
    want = edit_picture(toy, Image.open(upload).convert("RGB"), checked, progress=False)
    for got, made in zip((reconstruction, edited), want):
        assert got.size == (64, 64) and got.tobytes() == made.tobytes()
    assert (settings["source"], settings["target"], settings["weights"]) == ("a red circle", "a blue circle", {"blue": 1.5})
    assert (settings["value_replace_steps"], settings["null_text_steps"]) == (0.8, 0.5)
    assert settings["cross_replace_steps"] == windows
    record = json.loads(edited.info[RECORD_CHUNK])
    assert record["edit"]["shows"] == "edited" and record["prompt"] == "a blue circle"
    assert json.loads(reconstruction.info[RECORD_CHUNK])["edit"]["shows"] == "reconstruction"
    served = tmp_path / "edited.png"  # as the page serves it: the PNG with its text chunks
    served.write_bytes(png_bytes(edited, record))
    assert main(["edit", "--replay", str(served), "-o", str(tmp_path / "again"), "--device", "cpu"]) == 0
    again = Image.open(tmp_path / "again" / "samples" / "00000.png").convert("RGB")
    np.testing.assert_array_equal(np.asarray(again), np.asarray(edited.convert("RGB")))


@pytest.mark.parametrize("image, source, target, windows, message", [
    (None, "a red circle", "a blue circle", "", "upload the picture"),
    ("UPLOAD", "  ", "a blue circle", "", "give the source prompt"),
    ("UPLOAD", "a red circle", "a big blue circle", "", "a word swap replaces words one for one"),
    ("UPLOAD", "a red circle", "a blue circle", "blue", "word windows 'blue': give WORD=F"),
    ("UPLOAD", "a red circle", "a blue circle", "green=0.4", "names the word 'green', which no target prompt holds"),
    ("UPLOAD", "a red circle", "a blue circle", "blue=1.5", "cross_replace_steps"),
])
def test_bad_fields_are_one_line_before_any_model_work(toy, upload, monkeypatch, image, source, target, windows, message):
    import altdiff_min.inversion as inversion

    monkeypatch.setattr(inversion, "picture_latents", lambda *a, **k: pytest.fail("inversion began"))
    with pytest.raises(BadValue, match=message):
        edit_request(toy, upload if image == "UPLOAD" else image, source, target, steps=3, word_windows=windows)


def test_the_page_has_the_edit_tab(toy):
    pytest.importorskip("gradio")
    from altdiff_min.apps import ui

    app = ui.build_app(toy)
    assert "edit" in [d.get("api_name") for d in app.config["dependencies"]]
