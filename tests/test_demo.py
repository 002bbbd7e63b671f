"""`make demo` runs text-to-image end to end with the shipped toy model and writes the pictures it names."""
from PIL import Image

from altdiff_min.apps.demo import SCENES, run
from altdiff_min.toy import detect, detect_scene
from altdiff_min.toy.detect import judge_pair


def test_demo_draws_what_each_language_asks_for(tmp_path, capsys):
    asks = (("zh", "circle", "red"), ("ar", "triangle", "green"))
    paths = run(outdir=str(tmp_path), asks=asks)
    out = capsys.readouterr().out
    for path, (lang, shape, colour) in zip(paths, asks):
        assert path == str(tmp_path / f"{lang}-000.png") and path in out
        image = Image.open(path)
        assert image.size == (64, 64) and detect(image) == (shape, colour)
    (lang, scene), = SCENES  # then two objects: both right, in the asked relation
    assert paths[2:] == [str(tmp_path / f"scene-{lang}-000.png")] and paths[2] in out
    assert judge_pair(detect_scene(Image.open(paths[2])), scene) == (True, True)
    again = run(outdir=str(tmp_path), asks=asks[:1], scenes=(), seed=1)  # a rerun adds pictures, never overwrites
    assert again == [str(tmp_path / "zh-001.png")] and Image.open(paths[0]).size == (64, 64)


def test_demo_refuses_bad_arguments_before_loading(tmp_path, monkeypatch):
    import pytest

    import altdiff_min.apps.demo as demo

    monkeypatch.setattr(demo, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="--seed must be an int"):
        run(seed=-1, outdir=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="exists and is not a folder"):
        run(outdir=str(tmp_path / "file"))
