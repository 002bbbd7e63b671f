"""The toy model's world: one flat-coloured shape on a white 64×64 canvas, captioned in nine languages.

    render("triangle", "blue")           → (64, 64, 3) uint8: white, plus a blue triangle of random size and place
    caption("triangle", "blue", "fr")    → "un triangle bleu"

Pixels are exact: every pixel is white or exactly the palette colour (no anti-aliasing), so the
detector (detect.py) is exact on rendered images and measuring a trained model measures the model alone.
"""
from __future__ import annotations

import numpy as np

SIZE = 64  # image side in pixels; the VAE turns it into 8×8 latents
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 70, 220),
           "yellow": (235, 200, 20), "purple": (140, 50, 180), "orange": (245, 130, 20)}
LANGUAGES = ("en", "zh", "es", "fr", "ru", "ja", "ko", "ar", "it")  # AltDiffusion-m9's nine
WHITE = (255, 255, 255)
MIN_SIZE, MAX_SIZE = 24, 48  # shape side (circle: diameter) in pixels; a 24-pixel shape is 3 latent cells wide


def render(shape: str, colour: str, size: int | None = None, center: tuple[float, float] | None = None,
           rng: np.random.Generator | None = None) -> np.ndarray:
    """A (64, 64, 3) uint8 picture: `shape` in `colour` on white. `Image.fromarray(...)` makes it a PIL image.

    size: side of the shape's bounding square, MIN_SIZE..MAX_SIZE (random if None); center: (x, y) in
    pixels (random if None, always such that the whole shape is in the frame). The square is upright;
    the triangle has its base at the bottom and its apex at the top middle (half its bounding box).
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; choose one of {tuple(COLOURS)}")
    rng = rng if rng is not None else np.random.default_rng()
    size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1)) if size is None else size
    if not 2 <= size <= SIZE - 2:
        raise ValueError(f"size must be in [2, {SIZE - 2}] pixels, got {size}")
    half = size / 2
    if center is None:
        center = tuple(rng.uniform(half + 1, SIZE - half - 1, size=2))
    cx, cy = center
    if not (half <= cx <= SIZE - half and half <= cy <= SIZE - half):
        raise ValueError(f"a {size}-pixel {shape} centred at {center} would leave the {SIZE}×{SIZE} frame")

    y, x = np.mgrid[0:SIZE, 0:SIZE] + 0.5  # pixel centres
    dx, dy = x - cx, y - cy
    if shape == "circle":
        inside = dx**2 + dy**2 <= half**2
    elif shape == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    else:  # the half-width narrows linearly from `half` at the base (dy = +half) to 0 at the apex (dy = −half)
        inside = (np.abs(dy) <= half) & (np.abs(dx) <= (dy + half) / 2)
    image = np.full((SIZE, SIZE, 3), WHITE, dtype=np.uint8)
    image[inside] = COLOURS[colour]
    return image


# ---- captions ---------------------------------------------------------------------------------------
# Each language: its shape nouns, its colour adjectives, and phrasings built from them. In es, fr, it
# and ru all three nouns are masculine, so the adjectives take their masculine forms; es, fr, it put
# them after the noun. Arabic puts them after the noun too and agrees in gender: دائرة (circle) is
# feminine, مربع and مثلث masculine. Russian needs the genitive for "a picture of …". zh, ja and ko put
# the colour first; ja's 赤い/青い/黄色い are i-adjectives, the rest take の.
SHAPE_WORDS = {
    "en": {"circle": "circle", "square": "square", "triangle": "triangle"},
    "zh": {"circle": "圆形", "square": "正方形", "triangle": "三角形"},
    "es": {"circle": "círculo", "square": "cuadrado", "triangle": "triángulo"},
    "fr": {"circle": "cercle", "square": "carré", "triangle": "triangle"},
    "ru": {"circle": ("круг", "круга"), "square": ("квадрат", "квадрата"),
           "triangle": ("треугольник", "треугольника")},  # (nominative, genitive)
    "ja": {"circle": "円", "square": "正方形", "triangle": "三角形"},
    "ko": {"circle": "원", "square": "정사각형", "triangle": "삼각형"},
    "ar": {"circle": "دائرة", "square": "مربع", "triangle": "مثلث"},
    "it": {"circle": "cerchio", "square": "quadrato", "triangle": "triangolo"},
}
COLOUR_WORDS = {
    "en": {"red": "red", "green": "green", "blue": "blue", "yellow": "yellow", "purple": "purple", "orange": "orange"},
    "zh": {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "orange": "橙色"},
    "es": {"red": "rojo", "green": "verde", "blue": "azul", "yellow": "amarillo", "purple": "morado",
           "orange": "naranja"},
    "fr": {"red": "rouge", "green": "vert", "blue": "bleu", "yellow": "jaune", "purple": "violet", "orange": "orange"},
    "ru": {"red": ("красный", "красного"), "green": ("зелёный", "зелёного"), "blue": ("синий", "синего"),
           "yellow": ("жёлтый", "жёлтого"), "purple": ("фиолетовый", "фиолетового"),
           "orange": ("оранжевый", "оранжевого")},  # masculine (nominative, genitive)
    "ja": {"red": "赤い", "green": "緑の", "blue": "青い", "yellow": "黄色い", "purple": "紫の", "orange": "オレンジ色の"},
    "ko": {"red": "빨간", "green": "초록색", "blue": "파란", "yellow": "노란", "purple": "보라색", "orange": "주황색"},
    "ar": {"red": ("أحمر", "حمراء"), "green": ("أخضر", "خضراء"), "blue": ("أزرق", "زرقاء"),
           "yellow": ("أصفر", "صفراء"), "purple": ("بنفسجي", "بنفسجية"),
           "orange": ("برتقالي", "برتقالية")},  # (masculine, feminine)
    "it": {"red": "rosso", "green": "verde", "blue": "blu", "yellow": "giallo", "purple": "viola",
           "orange": "arancione"},
}
# "a red circle", "a red circle on a white background", "a picture of a red circle", in each language.
PHRASINGS = {
    "en": ("{a} {colour} {shape}", "{a} {colour} {shape} on a white background", "a picture of {a} {colour} {shape}"),
    "zh": ("一个{colour}的{shape}", "白色背景上的{colour}{shape}", "一张{colour}{shape}的图片"),
    "es": ("un {shape} {colour}", "un {shape} {colour} sobre un fondo blanco", "una imagen de un {shape} {colour}"),
    "fr": ("un {shape} {colour}", "un {shape} {colour} sur un fond blanc", "une image d'un {shape} {colour}"),
    "ru": ("{colour} {shape}", "{colour} {shape} на белом фоне", "изображение {colour_gen} {shape_gen}"),
    "ja": ("{colour}{shape}", "白い背景に{colour}{shape}", "{colour}{shape}の絵"),
    "ko": ("{colour} {shape}", "흰색 배경 위의 {colour} {shape}", "{colour} {shape} 그림"),
    "ar": ("{shape} {colour}", "{shape} {colour} على خلفية بيضاء", "صورة ل{shape} {colour}"),
    "it": ("un {shape} {colour}", "un {shape} {colour} su uno sfondo bianco", "un'immagine di un {shape} {colour}"),
}
FEMININE = {("ar", "circle")}  # the shape nouns whose adjectives take the feminine form


def caption(shape: str, colour: str, lang: str, phrasing: int | np.random.Generator | None = None) -> str:
    """The caption of a `colour` `shape` in `lang`: phrasing i of PHRASINGS[lang], a random one when
    given a numpy Generator, the plainest ("a red circle") when None."""
    if lang not in LANGUAGES:
        raise ValueError(f"unknown language {lang!r}; choose one of {LANGUAGES}")
    if shape not in SHAPES or colour not in COLOURS:
        raise ValueError(f"unknown shape or colour {shape!r}, {colour!r}; choose from {SHAPES} and {tuple(COLOURS)}")
    phrasings = PHRASINGS[lang]
    if isinstance(phrasing, np.random.Generator):
        phrasing = int(phrasing.integers(len(phrasings)))
    phrasing = phrasing or 0
    if not 0 <= phrasing < len(phrasings):
        raise ValueError(f"phrasing must be in [0, {len(phrasings)}), got {phrasing}")
    shape_word, colour_word = SHAPE_WORDS[lang][shape], COLOUR_WORDS[lang][colour]
    words = {"a": "an" if colour_word[0] in "aeiou" else "a"}  # English only: "an orange square"
    if lang == "ru":
        (words["shape"], words["shape_gen"]), (words["colour"], words["colour_gen"]) = shape_word, colour_word
    elif lang == "ar":
        words["shape"], words["colour"] = shape_word, colour_word[(lang, shape) in FEMININE]
    else:
        words["shape"], words["colour"] = shape_word, colour_word
    return phrasings[phrasing].format(**words)


def all_captions() -> list[str]:
    """Every caption there is: 9 languages × 3 phrasings × 6 colours × 3 shapes (the tokenizer's corpus)."""
    return [caption(s, c, lang, p) for lang in LANGUAGES for p in range(len(PHRASINGS[lang]))
            for c in COLOURS for s in SHAPES]
