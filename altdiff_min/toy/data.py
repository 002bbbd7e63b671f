"""The toy model's world: one or two flat-coloured shapes on a white 64×64 canvas, captioned in nine languages.

    render("triangle", "blue")           → (64, 64, 3) uint8: white, plus a blue triangle of random size and place
    caption("triangle", "blue", "fr")    → "un triangle bleu"
    caption("triangle", "blue", "fr", size="small")  → "un petit triangle bleu"

    scene = Scene(Obj("circle", "red", "small"), "left of", Obj("square", "blue"))
    render_scene(scene, rng)             → the small red circle to the left of a blue square
    caption_scene(scene, "ru", 0)        → "маленький красный круг слева от синего квадрата"

Pixels are exact: every pixel is white or exactly a palette colour (no anti-aliasing), so the
detector (detect.py) is exact on rendered images and measuring a trained model measures the model alone.
The first world is one object, no size word (`render`, `caption`: toy-one learnt it); `Scene`s add
size words and a second object with its relation, and `SceneWorld`, the shipped toy's training data, both.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np

from ..errors import BadValue

SIZE = 64  # image side in pixels; the VAE turns it into 8×8 latents
SHAPES = ("circle", "square", "triangle")  # the toys' shapes
RING = "ring"  # a shape the toys never saw: what the fine-tuning lesson teaches one
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 70, 220),
           "yellow": (235, 200, 20), "purple": (140, 50, 180), "orange": (245, 130, 20)}
LANGUAGES = ("en", "zh", "es", "fr", "ru", "ja", "ko", "ar", "it")  # AltDiffusion-m9's nine
WHITE = (255, 255, 255)
MIN_SIZE, MAX_SIZE = 24, 48  # shape side (circle: diameter) in pixels; a 24-pixel shape is 3 latent cells wide
# A ring is a disc with a hole of 0.4 its diameter, 34–48 pixels across: its band is 10–14 pixels wide, which the
# shipped VAE gives back in the right colour (59 of 60 rings; at a hole of 0.5, 47 of 60: thin bands blend with white).
RING_HOLE, RING_SIDES = 0.4, (34, 48)

SIZE_CHOICES = (None, "small", "big")  # an object's size word: none, or one of two
RELATIONS = ("left of", "right of", "above", "below")  # where a scene's first object is, relative to its second
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# Sides in pixels (inclusive ranges) by size word, in a picture of one object and of two. Size words
# are relative, as in speech: two big objects must fit side by side (28 + 6 + 28 ≤ 62), so a big one
# of a pair is smaller than a big one alone. Within each, small and big are ≥ 1.5× apart. Unsized
# lone objects keep the first world's 24–48; the smallest (14 px) is under two latent cells.
SIDES = {1: {None: (MIN_SIZE, MAX_SIZE), "small": (14, 20), "big": (32, 46)},
         2: {None: (20, 24), "small": (15, 18), "big": (27, 28)}}
GAP = 6  # the least distance in pixels between two objects' boxes along their relation's axis


def mask(shape: str, size: float, center: tuple[float, float], frame: tuple[int, int] = (SIZE, SIZE)) -> np.ndarray:
    """(64, 64) bool (frame: (height, width)): the pixels whose centres lie inside a `size`-pixel `shape`
    centred at (x, y). The square is upright; the triangle has its base at the bottom and its apex at the
    top middle. x and y may be arrays that broadcast (…, 1, 1): one mask per centre (graded.py's fit)."""
    y, x = np.mgrid[0:frame[0], 0:frame[1]] + 0.5  # pixel centres
    dx, dy, half = x - center[0], y - center[1], size / 2
    if shape == "circle":
        return dx**2 + dy**2 <= half**2
    if shape == RING:
        return (dx**2 + dy**2 <= half**2) & (dx**2 + dy**2 > (RING_HOLE * half) ** 2)
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    # the half-width narrows linearly from `half` at the base (dy = +half) to 0 at the apex (dy = −half)
    return (np.abs(dy) <= half) & (np.abs(dx) <= (dy + half) / 2)


def check_object(shape: str, colour: str) -> None:
    if shape not in SHAPES + (RING,):
        raise BadValue(f"unknown shape {shape!r}; choose one of {SHAPES + (RING,)}")
    if colour not in COLOURS:
        raise BadValue(f"unknown colour {colour!r}; choose one of {tuple(COLOURS)}")


def render(shape: str, colour: str, size: int | None = None, center: tuple[float, float] | None = None,
           rng: np.random.Generator | None = None) -> np.ndarray:
    """A (64, 64, 3) uint8 picture: `shape` in `colour` on white. `Image.fromarray(...)` makes it a PIL image.

    size: side of the shape's bounding square, MIN_SIZE..MAX_SIZE (a ring: RING_SIDES; random if None); center: (x, y) in
    pixels (random if None, always such that the whole shape is in the frame).
    """
    check_object(shape, colour)
    rng = rng if rng is not None else np.random.default_rng()
    lo, hi = RING_SIDES if shape == RING else (MIN_SIZE, MAX_SIZE)
    size = int(rng.integers(lo, hi + 1)) if size is None else size
    if not 2 <= size <= SIZE - 2:
        raise BadValue(f"size must be in [2, {SIZE - 2}] pixels, got {size}")
    half = size / 2
    if center is None:
        center = tuple(rng.uniform(half + 1, SIZE - half - 1, size=2))
    cx, cy = center
    if not (half <= cx <= SIZE - half and half <= cy <= SIZE - half):
        raise BadValue(f"a {size}-pixel {shape} centred at {center} would leave the {SIZE}×{SIZE} frame")
    image = np.full((SIZE, SIZE, 3), WHITE, dtype=np.uint8)
    image[mask(shape, size, center)] = COLOURS[colour]
    return image


# ---- scenes: one object, or two and where the first is ------------------------------------------------
@dataclass(frozen=True)
class Obj:
    """One object of a scene: "circle", "red", and a size word (None, "small" or "big")."""
    shape: str
    colour: str
    size: str | None = None

    def __post_init__(self):
        check_object(self.shape, self.colour)
        if self.size not in SIZE_CHOICES:
            raise BadValue(f"unknown size word {self.size!r}; choose one of {SIZE_CHOICES}")


@dataclass(frozen=True)
class Scene:
    """`first` alone, or `first` `relation` `second`: Scene(Obj("circle", "red"), "left of", Obj("square", "blue"))."""
    first: Obj
    relation: str | None = None
    second: Obj | None = None

    def __post_init__(self):
        if (self.relation is None) != (self.second is None):
            raise BadValue("a scene of two objects needs both a relation and a second object; of one, neither")
        if self.relation is not None and self.relation not in RELATIONS:
            raise BadValue(f"unknown relation {self.relation!r}; choose one of {RELATIONS}")
        if not all(isinstance(o, Obj) for o in self.objects):
            raise BadValue(f"a scene's objects must be Obj(...), got {self.objects!r}")

    @property
    def objects(self) -> tuple[Obj, ...]:
        return (self.first,) if self.second is None else (self.first, self.second)

    def flipped(self) -> Scene:
        """The same picture told the other way round: B right of A for A left of B (itself for one object)."""
        return self if self.second is None else Scene(self.second, INVERSE[self.relation], self.first)


def random_scene(rng: np.random.Generator, objects: int) -> Scene:
    """A scene of 1 or 2 objects, uniform over shapes, colours and relations. A lone object has each
    size word (none, small, big) a third of the time; each of a pair has none half the time (the plain
    captions whose colour binding the evaluation measures), small or big a quarter each. The two of a
    pair differ in shape or colour, so that a caption says which is which."""
    def draw(size_p) -> Obj:
        return Obj(SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))],
                   SIZE_CHOICES[rng.choice(3, p=size_p)])
    if objects == 1:
        return Scene(draw([1 / 3, 1 / 3, 1 / 3]))
    if objects != 2:
        raise BadValue(f"a scene holds 1 or 2 objects, not {objects}")
    first = draw([0.5, 0.25, 0.25])
    second = draw([0.5, 0.25, 0.25])
    while (second.shape, second.colour) == (first.shape, first.colour):
        second = draw([0.5, 0.25, 0.25])
    return Scene(first, RELATIONS[rng.integers(len(RELATIONS))], second)


def place_pair(sides: tuple[int, int], relation: str, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Centres (x, y) of two objects of these sides with the first `relation` the second: along the
    relation's axis their boxes are ≥ GAP pixels apart and inside the frame with a pixel to spare;
    across it their centres differ by at most half their distance along it, so the relation is plain."""
    along = 0 if relation in ("left of", "right of") else 1  # x or y (y grows downwards)
    order = (0, 1) if relation in ("left of", "above") else (1, 0)  # which comes first along the axis
    a, b = sides[order[0]], sides[order[1]]
    slack = SIZE - 2 - a - b - GAP
    if slack < 0:
        raise BadValue(f"objects of {a} and {b} pixels do not fit {GAP} pixels apart in {SIZE}")
    lo, hi = np.sort(rng.uniform(0, slack, 2))  # margin before the first, and extra gap, split the slack
    along_a, along_b = 1 + lo + a / 2, 1 + a + GAP + hi + b / 2
    distance = along_b - along_a
    across_a = rng.uniform(a / 2 + 1, SIZE - a / 2 - 1)
    across_b = rng.uniform(max(b / 2 + 1, across_a - distance / 2), min(SIZE - b / 2 - 1, across_a + distance / 2))
    centres = [(along_a, across_a), (along_b, across_b)] if along == 0 else [(across_a, along_a), (across_b, along_b)]
    return [centres[order.index(0)], centres[order.index(1)]]


def render_scene(scene: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
    """A (64, 64, 3) uint8 picture of `scene`: each object's side drawn from SIDES by its size word and
    the number of objects; a lone object placed as `render` places it (an unsized one is drawn exactly
    as render(shape, colour, rng=rng) draws it), a pair by `place_pair`: never touching, relation plain."""
    rng = rng if rng is not None else np.random.default_rng()
    ranges = SIDES[len(scene.objects)]
    sides = [int(rng.integers(ranges[o.size][0], ranges[o.size][1] + 1)) for o in scene.objects]
    if scene.second is None:
        return render(scene.first.shape, scene.first.colour, size=sides[0], rng=rng)
    image = np.full((SIZE, SIZE, 3), WHITE, dtype=np.uint8)
    for obj, side, centre in zip(scene.objects, sides, place_pair(sides, scene.relation, rng)):
        image[mask(obj.shape, side, centre)] = COLOURS[obj.colour]
    return image


# ---- captions ---------------------------------------------------------------------------------------
# Each language: its shape nouns, its colour and size adjectives, and phrasings built from them. In es,
# fr, it and ru all three nouns are masculine, so the adjectives take their masculine forms; es, it put
# colour and size after the noun, fr the colour after and petit/grand before it. Arabic puts them after
# the noun too and agrees in gender: دائرة (circle) is feminine, مربع and مثلث masculine. Russian needs
# the genitive for "a picture of …" and after слева/справа от, the instrumental after над/под. zh, ja
# and ko put the adjectives first; ja's 赤い/青い/黄色い are i-adjectives, the rest take の; zh's size
# binds to the noun (红色小圆形: 大红色 would read "scarlet").
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
# The ring is kept out of SHAPE_WORDS: the shipped world never names it, so its words are in neither the toy
# tokenizer's corpus nor its vocabulary (`all_captions`, `vocabulary`), as a new word would not be.
RING_WORDS = {"en": "ring", "zh": "圆环", "es": "anillo", "fr": "anneau", "ru": ("кольцо", "кольца"), "ja": "輪",
              "ko": "고리", "ar": "حلقة", "it": "anello"}
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
SIZE_WORDS = {  # forms as in the tables above: ru (nominative, genitive), ar (masculine, feminine)
    "en": {"small": "small", "big": "big"}, "zh": {"small": "小", "big": "大"},
    "es": {"small": "pequeño", "big": "grande"}, "fr": {"small": "petit", "big": "grand"},
    "ru": {"small": ("маленький", "маленького"), "big": ("большой", "большого")},
    "ja": {"small": "小さな", "big": "大きな"}, "ko": {"small": "작은", "big": "큰"},
    "ar": {"small": ("صغير", "صغيرة"), "big": ("كبير", "كبيرة")}, "it": {"small": "piccolo", "big": "grande"},
}
RU_INSTRUMENTAL = {  # the masculine instrumental (над/под + instrumental) of each nominative above
    "круг": "кругом", "квадрат": "квадратом", "треугольник": "треугольником", "красный": "красным",
    "зелёный": "зелёным", "синий": "синим", "жёлтый": "жёлтым", "фиолетовый": "фиолетовым",
    "оранжевый": "оранжевым", "маленький": "маленьким", "большой": "большим"}
# кольцо (ring) is neuter: its adjectives' nominative ends in -ое/-ее (the genitive and instrumental are the masculine's)
RU_NEUTER = {"красный": "красное", "зелёный": "зелёное", "синий": "синее", "жёлтый": "жёлтое",
             "фиолетовый": "фиолетовое", "оранжевый": "оранжевое", "маленький": "маленькое", "большой": "большое"}
# One object, phrased as "a (small) red circle", "… on a white background", "a picture of …". An empty
# {size} leaves two spaces, which `squash` closes: without a size word these are the first world's captions.
PHRASINGS = {
    "en": ("{a} {size} {colour} {shape}", "{a} {size} {colour} {shape} on a white background",
           "a picture of {a} {size} {colour} {shape}"),
    "zh": ("一个{colour}的{size}{shape}", "白色背景上的{colour}{size}{shape}", "一张{colour}{size}{shape}的图片"),
    "es": ("un {shape} {colour} {size}", "un {shape} {colour} {size} sobre un fondo blanco",
           "una imagen de un {shape} {colour} {size}"),
    "fr": ("un {size} {shape} {colour}", "un {size} {shape} {colour} sur un fond blanc",
           "une image d'un {size} {shape} {colour}"),
    "ru": ("{size} {colour} {shape}", "{size} {colour} {shape} на белом фоне",
           "изображение {size_gen} {colour_gen} {shape_gen}"),
    "ja": ("{size}{colour}{shape}", "白い背景に{size}{colour}{shape}", "{size}{colour}{shape}の絵"),
    "ko": ("{size} {colour} {shape}", "흰색 배경 위의 {size} {colour} {shape}", "{size} {colour} {shape} 그림"),
    "ar": ("{shape} {colour} {size}", "{shape} {colour} {size} على خلفية بيضاء", "صورة ل{shape} {colour} {size}"),
    "it": ("un {shape} {colour} {size}", "un {shape} {colour} {size} su uno sfondo bianco",
           "un'immagine di un {shape} {colour} {size}"),
}
FEMININE = {("ar", "circle"), ("ar", "ring")}  # the shape nouns whose adjectives take the feminine form
# Two objects. An object as a noun phrase (with its article, where the language has one):
OBJECT = {"en": "{a} {size} {colour} {shape}", "zh": "{colour}{size}{shape}", "es": "un {shape} {colour} {size}",
          "fr": "un {size} {shape} {colour}", "ru": "{size} {colour} {shape}", "ja": "{size}{colour}{shape}",
          "ko": "{size} {colour} {shape}", "ar": "{shape} {colour} {size}", "it": "un {shape} {colour} {size}"}
# {where}: where the first object A is, relative to the second B ({B_gen}, {B_ins}: B in that case).
WHERE = {
    "en": ("to the left of {B}", "to the right of {B}", "above {B}", "below {B}"),
    "zh": ("{B}左边", "{B}右边", "{B}上方", "{B}下方"),
    "es": ("a la izquierda de {B}", "a la derecha de {B}", "encima de {B}", "debajo de {B}"),
    "fr": ("à gauche d'{B}", "à droite d'{B}", "au-dessus d'{B}", "en dessous d'{B}"),  # d'un: B starts with un
    "ru": ("слева от {B_gen}", "справа от {B_gen}", "над {B_ins}", "под {B_ins}"),
    "ja": ("{B}の左", "{B}の右", "{B}の上", "{B}の下"),
    "ko": ("{B} 왼쪽", "{B} 오른쪽", "{B} 위", "{B} 아래"),
    "ar": ("على يسار {B}", "على يمين {B}", "فوق {B}", "تحت {B}"),
    "it": ("a sinistra di {B}", "a destra di {B}", "sopra {B}", "sotto {B}"),
}
# {beside}: the same, said of B with a pronoun ("with A to its left"); ar: (after a masculine B, a feminine B).
BESIDE = {
    "en": ("to its left", "to its right", "above it", "below it"),
    "es": ("a su izquierda", "a su derecha", "encima", "debajo"),
    "fr": ("à sa gauche", "à sa droite", "au-dessus", "en dessous"),
    "ru": ("слева от него", "справа от него", "над ним", "под ним"),  # него/ним: B is masculine
    "ar": (("على يساره", "على يسارها"), ("على يمينه", "على يمينها"), ("فوقه", "فوقها"), ("تحته", "تحتها")),
    "it": ("alla sua sinistra", "alla sua destra", "sopra", "sotto"),
}
# Four phrasings: "A left of B", "… on a white background", "a picture of …", and one in the other
# order: B first in en/es/fr/ru/ar/it ("B with A to its left"), A first in zh/ja/ko (whose first three
# name B first: "蓝色正方形左边的红色圆形"). {ka}: ko's subject particle after A (이 after a consonant).
SCENE_PHRASINGS = {
    "en": ("{A} {where}", "{A} {where} on a white background", "a picture of {A} {where}", "{B} with {A} {beside}"),
    "zh": ("{where}的{A}", "白色背景上，{A}在{where}", "一张{where}有{A}的图片", "{A}在{where}"),
    "es": ("{A} {where}", "{A} {where} sobre un fondo blanco", "una imagen de {A} {where}", "{B} con {A} {beside}"),
    "fr": ("{A} {where}", "{A} {where} sur un fond blanc", "une image d'{A} {where}", "{B} avec {A} {beside}"),
    "ru": ("{A} {where}", "{A} {where} на белом фоне", "изображение {A_gen} {where}", "{B}, {beside} {A}"),
    "ja": ("{where}に{A}", "白い背景で、{A}が{where}にある", "{where}に{A}がある絵", "{A}が{where}にある"),
    "ko": ("{where}에 {A}", "흰색 배경에 {A}{ka} {where}에 있다", "{where}에 {A}{ka} 있는 그림", "{A}{ka} {where}에 있다"),
    "ar": ("{A} {where}", "{A} {where} على خلفية بيضاء", "صورة ل{A} {where}", "{B} و{beside} {A}"),
    "it": ("{A} {where}", "{A} {where} su uno sfondo bianco", "un'immagine di {A} {where}", "{B} con {A} {beside}"),
}


def squash(text: str) -> str:
    """Close the double spaces an empty slot leaves."""
    return " ".join(text.split())


def choose(phrasing: int | np.random.Generator | None, count: int) -> int:
    """Phrasing i, a random one when given a numpy Generator, the first when None."""
    if isinstance(phrasing, np.random.Generator):
        return int(phrasing.integers(count))
    phrasing = phrasing or 0
    if not 0 <= phrasing < count:
        raise BadValue(f"phrasing must be in [0, {count}), got {phrasing}")
    return phrasing


def words(obj: Obj, lang: str, case: str = "nom", noun: str | None = None) -> dict[str, str]:
    """The words of one object in `lang`: {"a", "size", "colour", "shape"}, in `case` for ru ("nom",
    "gen" or "ins"), agreeing with the noun's gender for ar and ru; "size" is "" for an unsized object.
    noun: a word said in place of the shape's (a textual-inversion token: "<ring>"), in every case."""
    shape = RING_WORDS[lang] if obj.shape == RING else SHAPE_WORDS[lang][obj.shape]
    colour, size = COLOUR_WORDS[lang][obj.colour], SIZE_WORDS[lang][obj.size] if obj.size else ""
    if lang == "ru":
        form = {"nom": 0, "gen": 1, "ins": 0}[case]
        shape, colour, size = (w[form] if w else w for w in (shape, colour, size))
        if case == "ins":
            shape, colour, size = (RU_INSTRUMENTAL.get(w, w) for w in (shape, colour, size))
        if case == "nom" and obj.shape == RING:
            colour, size = RU_NEUTER[colour], RU_NEUTER.get(size, size)
    elif lang == "ar":
        feminine = (lang, obj.shape) in FEMININE
        colour, size = colour[feminine], size[feminine] if size else size
    shape = shape if noun is None else noun
    first = size or colour
    return {"a": "an" if first[0] in "aeiou" else "a", "size": size, "colour": colour, "shape": shape}  # en's a/an


def caption(shape: str, colour: str, lang: str, phrasing: int | np.random.Generator | None = None,
            size: str | None = None, noun: str | None = None) -> str:
    """The caption of a `colour` `shape` in `lang`: phrasing i of PHRASINGS[lang], a random one when
    given a numpy Generator, the plainest ("a red circle") when None. size: None, "small" or "big";
    noun: a word in place of the shape's ("a red <ring>": a new token's captions)."""
    if lang not in LANGUAGES:
        raise BadValue(f"unknown language {lang!r}; choose one of {LANGUAGES}")
    obj = Obj(shape, colour, size)
    template = PHRASINGS[lang][choose(phrasing, len(PHRASINGS[lang]))]
    genitive = {f"{k}_gen": v for k, v in words(obj, lang, "gen", noun).items()}
    return squash(template.format(**words(obj, lang, noun=noun), **genitive))


def caption_scene(scene: Scene, lang: str, phrasing: int | np.random.Generator | None = None) -> str:
    """The caption of `scene` in `lang`. One object: `caption` (3 phrasings). Two: phrasing i of
    SCENE_PHRASINGS[lang] (4), a random one when given a numpy Generator, the first when None."""
    if scene.second is None:
        return caption(scene.first.shape, scene.first.colour, lang, phrasing, scene.first.size)
    if lang not in LANGUAGES:
        raise BadValue(f"unknown language {lang!r}; choose one of {LANGUAGES}")
    template = SCENE_PHRASINGS[lang][choose(phrasing, len(SCENE_PHRASINGS[lang]))]
    phrase = {f"{name}{suffix}": squash(OBJECT[lang].format(**words(obj, lang, case)))
              for name, obj in (("A", scene.first), ("B", scene.second))
              for suffix, case in (("", "nom"), ("_gen", "gen"), ("_ins", "ins"))}
    r = RELATIONS.index(scene.relation)
    beside = BESIDE.get(lang, ("",) * 4)[r]
    if isinstance(beside, tuple):  # ar: the pronoun agrees with B
        beside = beside[(lang, scene.second.shape) in FEMININE]
    ka = "이" if (ord(phrase["A"][-1]) - 0xAC00) % 28 else "가"  # ko: a final consonant (batchim) takes 이
    return template.format(where=WHERE[lang][r].format(**phrase), beside=beside, ka=ka, **phrase)


def scene_captions(scene: Scene) -> tuple[str, ...]:
    """Every caption of `scene`: each language, each phrasing."""
    count = len(PHRASINGS["en"]) if scene.second is None else len(SCENE_PHRASINGS["en"])
    return tuple(caption_scene(scene, lang, p) for lang in LANGUAGES for p in range(count))


def read_caption(text: str) -> Scene | None:
    """The scene a caption of this world describes, whatever its language and phrasing (the inverse
    of `caption_scene`); None when the text is no caption of it. The objects whose words all occur in
    the text are the candidates; the scenes they make are captioned every way and compared exactly."""
    text = squash(text)
    for lang in LANGUAGES:
        objects = [o for o, forms in said(lang) if any(all(w in text for w in words) for words in forms)]
        scenes = [Scene(o) for o in objects] + [Scene(a, r, b) for a in objects for b in objects
                                                if (a.shape, a.colour) != (b.shape, b.colour) for r in RELATIONS]
        for scene in scenes:
            count = len(PHRASINGS[lang]) if scene.second is None else len(SCENE_PHRASINGS[lang])
            if any(caption_scene(scene, lang, p) == text for p in range(count)):
                return scene
    return None


@functools.cache
def said(lang: str) -> tuple[tuple[Obj, tuple[tuple[str, str, str], ...]], ...]:
    """Every object of the world with its (shape, colour, size) words in `lang`, in each case."""
    def forms(o: Obj) -> tuple[tuple[str, str, str], ...]:
        return tuple((w["shape"], w["colour"], w["size"]) for w in (words(o, lang, case) for case in ("nom", "gen", "ins")))
    return tuple((o, forms(o)) for o in (Obj(s, c, z) for s in SHAPES for c in COLOURS for z in SIZE_CHOICES))


def all_captions() -> list[str]:
    """Every caption there is of the first world: 9 languages × 3 phrasings × 6 colours × 3 shapes (the
    shipped tokenizer's corpus)."""
    return [caption(s, c, lang, p) for lang in LANGUAGES for p in range(len(PHRASINGS[lang]))
            for c in COLOURS for s in SHAPES]


def scene_corpus(pairs: int = 600, seed: int = 0) -> list[str]:
    """The tokenizer's corpus for scenes: every caption of every lone object (each size word too), and
    every caption of `pairs` random two-object scenes (each relation, phrasing and word many times)."""
    rng = np.random.default_rng(seed)
    singles = [Scene(Obj(s, c, size)) for s in SHAPES for c in COLOURS for size in SIZE_CHOICES]
    return [text for scene in singles + [random_scene(rng, 2) for _ in range(pairs)] for text in scene_captions(scene)]


def vocabulary(world: str = "shapes") -> list[str]:
    """The words of the world's tables, language by language (repeats kept): what the tokenizer is
    shown on their own so that words, not whole phrases, become its pieces."""
    def forms(entry) -> list[str]:  # a word, or a tuple of its forms
        return [entry] if isinstance(entry, str) else list(entry)

    scenes = world == "scenes"
    found = []
    for lang in LANGUAGES:
        for table in (SHAPE_WORDS, COLOUR_WORDS) + ((SIZE_WORDS,) if scenes else ()):
            found += [w for entry in table[lang].values() for w in forms(entry)]
        for table in (WHERE, BESIDE) if scenes else ():  # the relations' words, without their slots
            found += [w for entry in table.get(lang, ()) for phrase in forms(entry)
                      for w in re.sub(r"\{\w+\}", " ", phrase).split()]
    return found + (list(RU_INSTRUMENTAL.values()) if scenes else [])


