"""The toy: a miniature AltDiffusion trained from scratch, on CPU, with altdiff-min's own modules.

Its world is flat-coloured shapes (circle, square, triangle; six colours) on a white 64×64 picture,
captioned in all nine m9 languages: one object, or two (`Scene`s) with size words (small, big) and
relations (left of, right of, above, below). It ships trained in `TOY_MODEL` ("toy", made by `train-toy
--world scenes`), so everything in altdiff-min can be run and looked into without the 8 GB real weights:

    from altdiff_min import load
    from altdiff_min.toy import TOY_MODEL, caption, detect

    model = load(TOY_MODEL)                                  # or load("toy")
    image = model.generate(caption("triangle", "blue", "ru"), steps=25, seed=0)[0]
    detect(image)                                            # ("triangle", "blue")

The first toy, trained on one object a picture (`train-toy`), ships too, as `TOY_ONE` ("toy-one"): the
docs whose numbers were measured on it name it.

data.py     the pictures (`render`, `render_scene`) and captions (`caption`, `caption_scene`); SHAPES,
            COLOURS, LANGUAGES, RELATIONS; RING, the shape the fine-tuning lesson teaches
world.py    the worlds as training data: `ToyWorld` (DATA "toy" of `altdiff-min train`), `SceneWorld`,
            `RingWorld` (DATA "toy-ring", and "toy-<ring>" captioned with a new token)
detect.py   what a picture shows (`detect`, `detect_scene`), how near it is to what was asked (`grade`:
            graded.py's ΔE, IoU, position), and a model's accuracy and graded scores per language
            (`evaluate`; `evaluate_scenes` for compositions; `evaluate_rings`)
train.py    `train_toy` / `altdiff-min train-toy OUT_DIR [--world scenes]`: how the shipped models were made
binding.py  which words bind in a caption (each colour to its shape), for A&E and the binding loss
"""
import os

from ..storage.folder import register_folder
from .data import COLOURS, LANGUAGES, RELATIONS, SHAPES, Obj, Scene, caption, caption_scene, render, render_scene
from .detect import detect, detect_scene, evaluate, evaluate_scenes, format_table, grade
from .world import SceneWorld, ToyWorld

TOY_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model")
register_folder("toy", TOY_MODEL)  # load("toy"), --model toy: one or two objects, sizes, relations
TOY_ONE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "one_object_model")
register_folder("toy-one", TOY_ONE)  # load("toy-one"), --model toy-one: the first toy, one object

__all__ = ["TOY_MODEL", "TOY_ONE", "SHAPES", "COLOURS", "LANGUAGES", "RELATIONS", "Obj", "Scene", "render", "render_scene",
           "caption", "caption_scene", "detect", "detect_scene", "grade", "evaluate", "evaluate_scenes", "format_table", "ToyWorld", "SceneWorld"]
