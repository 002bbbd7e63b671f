"""`make demo` runs text-to-image end to end with the shipped toy model and writes the pictures it names."""
from PIL import Image

from altdiff_min.demo import run
from altdiff_min.toy import detect


def test_demo_draws_what_each_language_asks_for(tmp_path, capsys):
    asks = (("zh", "circle", "red"), ("ar", "triangle", "green"))
    paths = run(outdir=str(tmp_path), asks=asks)
    out = capsys.readouterr().out
    for path, (lang, shape, colour) in zip(paths, asks):
        assert path == str(tmp_path / f"{lang}.png") and path in out
        image = Image.open(path)
        assert image.size == (64, 64) and detect(image) == (shape, colour)
