"""Training data (altdiff_min/training/dataset.py): captioned folders in both conventions, every kind of bad
picture or caption found before the first step (an error naming it, or a skip counted and reported),
and the conversion of any image mode to the RGB the VAE reads."""
import io
import json
import os

import numpy as np
import pytest
import torch
from helpers import write_pictures
from PIL import Image

from altdiff_min.errors import BadFile, BadValue, Missing
from altdiff_min.storage.pictures import to_rgb
from altdiff_min.toy.world import ToyWorld
from altdiff_min.training.dataset import CaptionedFolder, center_crop, open_data


def test_both_caption_conventions_read_the_same_examples(tmp_path):
    texts = write_pictures(tmp_path / "jsonl", 5, "jsonl")
    assert write_pictures(tmp_path / "txt", 5, "txt") == texts
    a, b = CaptionedFolder(str(tmp_path / "jsonl"), 64), CaptionedFolder(str(tmp_path / "txt"), 64)
    assert (a.source, b.source) == ("metadata.jsonl", ".txt files")
    assert a.files == b.files == [f"{i:03}.png" for i in range(5)] and not a.skipped and not b.skipped
    assert [a.texts(i) for i in range(5)] == [b.texts(i) for i in range(5)] == [(t,) for t in texts]
    pixels = a.pixels(1)  # 72 × 104 (w × h): shorter side to 64, centre 64 × 64 crop
    assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.float32 and -1 <= pixels.min() < pixels.max() <= 1
    assert torch.equal(pixels, b.pixels(1))


def test_metadata_may_give_several_captions_and_subfolders(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (80, 64), (10, 20, 30)).save(tmp_path / "sub" / "x.jpg")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "sub/x.jpg", "text": ["un chat", "一只猫"]}) + "\n\n")
    data = CaptionedFolder(str(tmp_path), 64)
    assert data.files == [os.path.join("sub", "x.jpg")] and data.texts(0) == ("un chat", "一只猫")


def bad_folder(root) -> str:
    """Two good pictures and one of every kind that is skipped."""
    write_pictures(root, 2, "txt")
    Image.new("RGB", (64, 64)).save(root / "no_caption.png")
    (root / "no_image.txt").write_text("a caption whose picture is missing")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a picture")
    (root / "corrupt.txt").write_text("corrupt")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "truncated.txt").write_text("truncated")
    Image.new("RGB", (100, 40)).save(root / "small.png")  # 40 px on its shorter side
    (root / "small.txt").write_text("too small")
    return str(root)


def test_bad_pictures_and_captions_are_skipped_counted_and_reported(tmp_path):
    data = CaptionedFolder(bad_folder(tmp_path), 64)
    assert data.files == ["000.png", "001.png"]
    assert data.skipped == {"image without a caption": ["no_caption.png"], "caption without an image": ["no_image.txt"],
                            "corrupt, truncated or not an image": ["corrupt.png", "truncated.jpg"],
                            "smaller than the resolution (64 px)": ["small.png"]}
    assert data.report().startswith("5 (") and "truncated.jpg" in data.report()
    assert data.describe()["skipped"] == {k: len(v) for k, v in data.skipped.items()}


def test_empty_captions_shared_caption_files_and_big_pictures_are_skipped_with_their_reason(tmp_path, monkeypatch):
    txt = tmp_path / "txt"
    write_pictures(txt, 2, "txt")
    for stem in ("blank", "twin"):
        Image.new("RGB", (64, 64)).save(txt / f"{stem}.png")
    Image.new("RGB", (64, 64)).save(txt / "twin.jpg")
    (txt / "blank.txt").write_text("  \n")
    (txt / "twin.txt").write_text("which picture?")
    Image.new("RGB", (64, 64)).save(txt / "upper.png")
    (txt / "upper.TXT").write_text("a caption in a .TXT file")
    Image.new("RGB", (300, 300)).save(txt / "huge.png")
    (txt / "huge.txt").write_text("too many pixels")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # 300² is over twice that: PIL refuses it
    data = CaptionedFolder(str(txt), 64)
    assert data.files == ["000.png", "001.png", "upper.png"]
    assert data.skipped == {"one caption file for several images (twin.txt)": ["twin.jpg", "twin.png"],
                            "empty caption": ["blank.png"], "more pixels than PIL opens (Image.MAX_IMAGE_PIXELS = 20000)": ["huge.png"]}
    jsonl = tmp_path / "jsonl"
    write_pictures(jsonl, 2, "jsonl")
    Image.new("RGB", (64, 64)).save(jsonl / "blank.png")
    Image.new("RGB", (64, 64)).save(jsonl / "half.png")
    with open(jsonl / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "blank.png", "text": ""}) + "\n")
        f.write(json.dumps({"file_name": "half.png", "text": ["", "un chien"]}) + "\n")
    data = CaptionedFolder(str(jsonl), 64)
    assert data.skipped == {"empty caption": ["blank.png"]} and data.texts(data.files.index("half.png")) == ("un chien",)


def test_linked_sub_folders_are_read_once_and_loops_reported(tmp_path):
    data, shared = tmp_path / "data", tmp_path / "shared"
    write_pictures(data, 1, "txt")
    write_pictures(shared, 2, "txt")
    (data / "linked").symlink_to(shared)  # data on shared storage, linked in
    (data / "again").symlink_to(shared)  # a second way into it
    (shared / "loop").symlink_to(shared)  # and a loop
    folder = CaptionedFolder(str(data), 64)
    assert folder.files == ["000.png", os.path.join("again", "000.png"), os.path.join("again", "001.png")]
    assert folder.skipped == {"folder reached a second time (a link)": ["linked", os.path.join("again", "loop")]}


def test_a_folder_named_toy_is_not_taken_for_the_toy_world(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_pictures(tmp_path / "toy", 2, "txt")
    with pytest.raises(BadValue, match="pass ./toy for the folder"):
        open_data("toy", 64)
    assert open_data("./toy", 64).files == ["000.png", "001.png"]


def test_the_command_reports_the_skips_before_training(small_model_dir, tmp_path, capsys):
    from altdiff_min.apps.cli import main

    assert main(["train", small_model_dir, bad_folder(tmp_path / "data"), str(tmp_path / "out"), "--max-steps", "1",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "data: 2 examples; skipped 5 (" in out and "1 image without a caption: no_caption.png" in out
    assert json.loads((tmp_path / "out" / "run.json").read_text())["data"]["skipped"]["corrupt, truncated or not an image"] == 2


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "1"])
def test_every_image_mode_becomes_rgb(tmp_path, mode):
    """Grayscale, palette, transparent, CMYK, 16-bit and 1-bit pictures: 8-bit RGB, transparency over
    white, 16-bit scaled (not clipped)."""
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (40, 48), dtype=np.uint8)
    image = {"L": lambda: Image.fromarray(grey), "1": lambda: Image.fromarray(grey).convert("1"),
             "P": lambda: Image.fromarray(grey).convert("P"), "CMYK": lambda: Image.fromarray(grey).convert("CMYK"),
             "LA": lambda: Image.fromarray(np.stack([grey, np.full_like(grey, 0)], -1), "LA"),
             "RGBA": lambda: Image.fromarray(np.dstack([grey, grey, grey, np.zeros_like(grey)]), "RGBA"),
             "I;16": lambda: Image.fromarray(grey.astype(np.uint16) * 257),
             "I": lambda: Image.fromarray(grey.astype(np.int32) * 257)}[mode]()
    file = tmp_path / ("x.tif" if mode in ("CMYK", "I") else "x.png")  # through a file, as training reads it
    image.save(file)
    with Image.open(file) as reread:
        rgb = np.asarray(to_rgb(reread))
    assert rgb.shape == (40, 48, 3) and rgb.dtype == np.uint8
    if mode in ("LA", "RGBA"):
        assert (rgb == 255).all()  # fully transparent: white, not black
    elif mode in ("L", "P", "I;16", "I"):
        assert np.abs(rgb[..., 0].astype(int) - grey).max() <= 1 and (rgb[..., 0] == rgb[..., 2]).all()
    else:
        assert rgb.std() > 0


def test_a_16_bit_png_with_a_transparent_level_is_over_white(tmp_path):
    levels = np.full((40, 48), 20000, dtype=np.uint16)
    levels[:, :10] = 0
    image = Image.fromarray(levels)
    image.save(tmp_path / "x.png", transparency=0)
    with Image.open(tmp_path / "x.png") as reread:
        assert reread.mode.startswith("I") and reread.info.get("transparency") == 0
        rgb = np.asarray(to_rgb(reread))
    assert (rgb[:, :10] == 255).all() and (np.abs(rgb[:, 10:].astype(int) - round(20000 / 257)) <= 1).all()


def test_a_16_bit_png_trains(tmp_path):
    Image.fromarray((np.arange(64 * 80, dtype=np.uint16).reshape(64, 80) * 12)).save(tmp_path / "deep.png")
    (tmp_path / "deep.txt").write_text("a gradient")
    data = CaptionedFolder(str(tmp_path), 64)
    pixels = data.pixels(0)
    assert data.files == ["deep.png"] and pixels.min() < -0.9 and pixels.max() > 0.5  # the whole range, not saturated


def test_center_crop_takes_the_middle():
    image = Image.new("RGB", (300, 100), (0, 0, 0))
    image.paste((255, 255, 255), (100, 0, 200, 100))  # a white middle third
    pixels = center_crop(image, 32)
    assert pixels.shape == (3, 32, 32) and (pixels[..., 1:-1] > 0.9).all()  # the edge columns blend (bicubic)


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2 is not valid JSON"),
    ('["a list"]', "line 2: expected an object"),
    ('{"file_name": "001.png"}', "line 2: expected an object"),
    ('{"file_name": 3, "text": "x"}', "line 2: expected an object"),
    ('{"file_name": "001.png", "text": 5}', "must be a string or a non-empty list"),
    ('{"file_name": "../outside.png", "text": "x"}', "outside the data folder"),
    ('{"file_name": "000.png", "text": "again"}', "listed twice"),
    ("[" * 100000, "line 2 nests JSON deeper than 64 levels"),  # not a RecursionError
])
def test_a_malformed_metadata_line_is_an_error_naming_it(tmp_path, line, message):
    write_pictures(tmp_path, 2, "jsonl")
    rows = (tmp_path / "metadata.jsonl").read_text().splitlines()
    (tmp_path / "metadata.jsonl").write_text("\n".join([rows[0], line]) + "\n")
    with pytest.raises(BadFile, match=message) as e:
        CaptionedFolder(str(tmp_path), 64)
    assert "metadata.jsonl line 2" in str(e.value) and "\n" not in str(e.value)


def test_no_usable_example_is_an_error(tmp_path):
    with pytest.raises(BadValue, match="no usable example: 0 image"):
        CaptionedFolder(str(tmp_path), 64)  # empty
    Image.new("RGB", (20, 20)).save(tmp_path / "tiny.png")
    (tmp_path / "tiny.txt").write_text("small")
    with pytest.raises(BadValue, match="smaller than the resolution"):
        CaptionedFolder(str(tmp_path), 64)
    with pytest.raises(Missing, match="data folder not found"):
        CaptionedFolder(str(tmp_path / "nowhere"), 64)


def test_toy_world_is_fixed_by_seed_and_index():
    world = ToyWorld(36, seed=2)
    assert len(world) == 36 and world.resolution == 64
    assert torch.equal(world.pixels(7), ToyWorld(36, seed=2).pixels(7))
    assert not torch.equal(world.pixels(7), ToyWorld(36, seed=3).pixels(7))
    assert len(world.texts(0)) == 27 and world.texts(0) == world.texts(18)  # 9 languages × 3 phrasings, same label
    with pytest.raises(BadValue, match="64 px"):
        open_data("toy", 128)


@pytest.mark.parametrize("make, args, message", [
    ("empty", [], "no usable example"),
    ("jsonl", ["--resolution", "48"], "multiples of 32"),
    ("broken", [], "line 1 is not valid JSON"),
    ("jsonl", ["--batch-size", "0"], "batch_size must be an int >= 1"),
])
def test_bad_data_stops_the_command_before_the_model_loads(small_model_dir, tmp_path, capsys, monkeypatch, make, args,
                                                           message):
    import altdiff_min.pipeline
    from altdiff_min.apps.cli import main

    monkeypatch.setattr(altdiff_min.pipeline, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    data = tmp_path / "data"
    data.mkdir()
    if make == "jsonl":
        write_pictures(data, 2)
    elif make == "broken":
        (data / "metadata.jsonl").write_text("{oops\n")
    assert main(["train", small_model_dir, str(data), str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_an_existing_out_dir_is_kept_without_force(small_model_dir, tmp_path, capsys):
    from altdiff_min.apps.cli import main

    data = tmp_path / "data"
    write_pictures(data, 2)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for flags in ([], ["--force"], ["--resume"]):
        assert main(["train", small_model_dir, str(data), str(mine), "--max-steps", "1", *flags]) == 2
    err = capsys.readouterr().err
    assert "--force" in err and "replaces only a run folder" in err and "not a training run folder" in err
    assert (mine / "notes.txt").read_text() == "keep me"
    run = tmp_path / "run"
    assert main(["train", small_model_dir, str(data), str(run), "--max-steps", "1", "--no-progress"]) == 0
    assert main(["train", small_model_dir, str(data), str(run), "--max-steps", "1", "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    (run / "loss.jsonl").write_text("")
    assert main(["train", small_model_dir, str(data), str(run), "--max-steps", "1", "--no-progress", "--force"]) == 0
    assert (run / "loss.jsonl").read_text().count("\n") == 1  # started again


def test_a_byte_order_mark_is_not_part_of_the_first_caption(tmp_path):
    """Editors on Windows start UTF-8 files with U+FEFF; json.loads would refuse line 1 because of it."""
    write_pictures(tmp_path / "a", 2, "jsonl")
    write_pictures(tmp_path / "b", 2, "txt")
    meta = tmp_path / "a" / "metadata.jsonl"
    meta.write_bytes(b"\xef\xbb\xbf" + meta.read_bytes())
    (tmp_path / "b" / "000.txt").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "b" / "000.txt").read_bytes())
    a, b = CaptionedFolder(str(tmp_path / "a"), 64), CaptionedFolder(str(tmp_path / "b"), 64)
    assert a.texts(0) == b.texts(0) == ("un cercle rouge 0",)


def test_a_decompression_bomb_is_refused_from_its_header_before_anything_decodes(tmp_path, monkeypatch, capsys):
    """A 12000² 1-bit PNG is ~20 KB on disk and 144 M pixels: over PIL's 89 M bound but under twice it,
    where PIL only warns and decodes (1.1 GB). Every reader of a user's picture refuses it unread."""
    from helpers import bomb_png
    from PIL import ImageFile

    import altdiff_min.storage.pictures as pictures
    from altdiff_min.errors import TooManyPixels
    from altdiff_min.storage.pictures import read_picture
    from altdiff_min.vision.score import Scorer, check_picture_file

    bomb = tmp_path / "data" / "bomb.png"
    bomb.parent.mkdir()
    assert bomb_png(bomb) < 200_000
    with Image.open(bomb) as image:  # the header alone
        assert image.size == (12000, 12000) and Image.MAX_IMAGE_PIXELS < 12000 ** 2 < 2 * Image.MAX_IMAGE_PIXELS
    write_pictures(tmp_path / "data", 1, "txt")
    (tmp_path / "data" / "bomb.txt").write_text("a bomb")

    def decoded(*a, **k):
        pytest.fail("the picture was decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", decoded)
    monkeypatch.setattr(Image.Image, "load", decoded)
    monkeypatch.setattr(Image.Image, "verify", decoded)
    for convert in ("rgb", "mask"):
        with pytest.raises(TooManyPixels, match=r"^x: .*bomb.png has more pixels than PIL opens \(Image.MAX_IMAGE_PIXELS = "
                                                 r"89478485, .*\): 12000 × 12000 = 144000000 pixels; not decoded$"):
            read_picture(bomb, convert, where="x: ")
    with pytest.raises(TooManyPixels, match="^--mask .*bomb.png has more pixels"):
        pictures.read_picture_argument(str(bomb), "--mask", mask=True)
    with pytest.raises(TooManyPixels, match="^line 2: .*bomb.png has more pixels"):
        check_picture_file(str(bomb), "line 2: ")
    with pytest.raises(TooManyPixels, match="bomb.png has more pixels"):
        Scorer(None, None, "").score([str(bomb)], ["a bomb"])
    monkeypatch.undo()  # the good picture decodes; the bomb is skipped with its reason
    monkeypatch.setattr(Image, "open", lambda *a, _open=Image.open, **k: _checked(_open(*a, **k), decoded))
    data = CaptionedFolder(str(tmp_path / "data"), 64)
    assert data.files == ["000.png"]
    assert data.skipped == {"more pixels than PIL opens (Image.MAX_IMAGE_PIXELS = 89478485)": ["bomb.png"]}


def _checked(image, fail):
    """`image`, failing the test if it is a 12000² picture and gets decoded."""
    if image.size == (12000, 12000):
        image.load = fail
    return image
