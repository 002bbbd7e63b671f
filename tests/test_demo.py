"""`make demo` runs text-to-image end to end and writes the pictures it names."""
from PIL import Image

from altdiff_min.demo import run


def test_demo_writes_one_picture_per_language(tmp_path, capsys):
    run(outdir=str(tmp_path), langs=("zh", "ar"))
    out = capsys.readouterr().out
    for lang in ("zh", "ar"):
        assert str(tmp_path / f"{lang}.png") in out
        assert Image.open(tmp_path / f"{lang}.png").size == (64, 64)
