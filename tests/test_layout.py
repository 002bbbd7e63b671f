"""The house's rules, read from the code: which folder may import which (arrows only run down), no
import circle between files, a small prompt-to-pixels core, no file a reader cannot hold, and every
third-party module the package imports declared in pyproject.toml.

Every import is read, at module level or inside a function, relative or absolute: a function-level
import is still an arrow (the circle __main__ ↔ ui ran through one)."""
import ast
import io
import os
import sys
import tokenize

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "altdiff_min")

# The floors, lowest first: a room imports only rooms on lower floors (and itself). model/ and
# sampling/ share a floor, so neither imports the other: they stand on the base alone.
FLOORS = [
    {"errors"},                          # the base: error types,
    {"checks"},                          # and config checks
    {"model", "sampling"},               # the maths: modules and samplers (the core, with pipeline.py)
    {"storage", "research"},             # model folders, files, pictures; the intervention API, speed paths
    {"arguments"},                       # generate's checks, on a model's shape
    {"pipeline", "inversion"},           # load + the stages (the core's top); the stages run backward: a picture to its noise
    {"training"},                        # the one training loop, data, run folders, processes
    {"vision"},                          # the CLIP tower, AltCLIP, the safety checker, the CLIP score
    {"toy"},                             # the toy world, its detector, its recipe
    {"apps"},                            # the command line, the web page, sweeps, the demo
    {"__init__", "__main__"},            # the package's face
]
CORE = ("model", "sampling", "pipeline")  # prompt to pixels
CORE_LINES = 1200  # code lines, without docstrings and comments
FILE_LINES = 450


def modules() -> dict[str, str]:
    """altdiff_min.x.y → its file."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                found[name.removesuffix(".__init__")] = path
    return found


def imports(name: str, path: str, known: dict[str, str]) -> set[str]:
    """The altdiff_min modules `name` imports, anywhere in its file."""
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "altdiff_min"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "altdiff_min":
                base = node.module
            else:
                continue
            for a in node.names:  # `from . import x` names a module; `from .m import f` names m
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in found if m in known and m != name}


def room(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def floor(name: str) -> int:
    r = room(name)
    return next(i for i, rooms in enumerate(FLOORS) if r in rooms)


GRAPH = {name: imports(name, path, modules()) for name, path in modules().items()}


def test_every_file_has_a_floor():
    assert not [name for name in GRAPH if not any(room(name) in rooms for rooms in FLOORS)]


def test_arrows_only_run_down():
    """A room imports itself or rooms below it: model/ and sampling/ nothing but the base, the
    pipeline only the core, the intervention API, storage (what load builds) and the checks."""
    up = sorted(f"{a} -> {b}" for a, targets in GRAPH.items() for b in targets
                if room(a) != room(b) and floor(b) >= floor(a))
    assert not up


def converter_reach() -> dict[str, set[str]]:
    """weights_convert.x → the altdiff_min modules it reaches, through the converter's own imports too."""
    folder = os.path.join(REPO, "weights_convert")
    direct = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".py"):
            found = set()
            for node in ast.walk(ast.parse(open(os.path.join(folder, f), encoding="utf-8").read())):
                if isinstance(node, ast.ImportFrom):
                    base = ".".join(["weights_convert"] * bool(node.level) + [node.module] * bool(node.module))
                    found |= {base} | {f"{base}.{a.name}" for a in node.names}
                elif isinstance(node, ast.Import):
                    found |= {a.name for a in node.names}
            direct[f"weights_convert.{f[:-3]}"] = found
    reach = {}
    for name in direct:
        seen, todo = set(), [name]
        while todo:
            for m in direct.get(todo.pop(), ()):
                if m not in seen:
                    seen.add(m)
                    todo.append(m)
        reach[name] = {m for m in seen if m in GRAPH}
    return reach


def test_what_the_converter_brings_runs_down_too():
    """altdiff_min's files that import the converter (the pipeline reads LoRA files by its rules) reach,
    through it, only rooms below their own: the converter is no back door for an up-arrow."""
    reach = converter_reach()
    up = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("weights_convert"):
                up += [f"{name} -> {node.module} -> {b}" for b in reach.get(node.module, ())
                       if room(b) != room(name) and floor(b) >= floor(name)]
    assert not up


def test_no_import_circle():
    state, path, circles = {}, [], []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == "open":
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = "done"

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)
    assert not circles


def code_lines(path: str) -> int:
    """Lines holding code: no docstring, no comment, no blank."""
    source = open(path, encoding="utf-8").read()
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body and \
                isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines = set()
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in skip:
            lines.update(n for n in range(tok.start[0], tok.end[0] + 1) if n not in docstrings)
    return len(lines)


def test_the_core_is_small():
    core = {name: path for name, path in modules().items() if room(name) in CORE}
    counted = sum(code_lines(path) for path in core.values())
    print(f"core: {counted} code lines in {len(core)} files")
    assert counted <= CORE_LINES, {os.path.relpath(p, REPO): code_lines(p) for p in core.values()}


@pytest.mark.parametrize("top", ["altdiff_min", "weights_convert"])
def test_no_file_over_the_limit(top):
    long = {}
    for folder, _, files in os.walk(os.path.join(REPO, top)):
        for f in files:
            if f.endswith(".py") and (n := len(open(os.path.join(folder, f), encoding="utf-8").read().splitlines())) > FILE_LINES:
                long[os.path.relpath(os.path.join(folder, f), REPO)] = n
    assert not long


def test_the_rules_see_arrows():
    """The reader is not blind: the pipeline's known arrows are found (a broken reader passes every rule)."""
    assert {"altdiff_min.model.unet", "altdiff_min.sampling.samplers", "altdiff_min.storage.folder",
            "altdiff_min.research.interventions", "altdiff_min.arguments"} <= GRAPH["altdiff_min.pipeline"]
    assert "altdiff_min.apps.generate" in GRAPH["altdiff_min.apps.cli"]  # a function-level import


def test_optional_modules_and_named_things_are_registered_not_imported():
    """storage.folder and training.dataset name no vision or toy module; the registries are filled by
    those modules, which the package imports."""
    import altdiff_min  # noqa: F401
    from altdiff_min.storage.folder import MODULES, NAMED
    from altdiff_min.training.dataset import NAMED as DATA

    assert {"safety_checker", "altclip"} <= set(MODULES) and "toy" in NAMED and "toy" in DATA
    for name in ("altdiff_min.storage.folder", "altdiff_min.training.dataset", "altdiff_min.pipeline"):
        assert not {m for m in GRAPH[name] if room(m) in ("vision", "toy", "apps")}


def test_every_runtime_import_is_declared():
    """tqdm came only through huggingface-hub; every third-party module the package imports must be declared."""
    import ast
    import tomllib

    root = os.path.join(os.path.dirname(__file__), "..")
    def name(requirement: str) -> str:
        return requirement.split(">")[0].split("=")[0].split("[")[0].split("<")[0].strip().lower().replace("-", "_")

    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    declared = {name(d) for d in project["dependencies"]}
    # the optional extras (the web UI's gradio, the notebooks'), imported only by the modules that need them
    extras = {name(d) for extra, deps in project["optional-dependencies"].items() if extra != "test" for d in deps}
    names = {"PIL": "pillow", "safetensors": "safetensors", "huggingface_hub": "huggingface_hub"}
    imported = set()
    for package in ("altdiff_min", "weights_convert"):
        for dirpath, _, files in os.walk(os.path.join(root, package)):
            for name in files:
                if name.endswith(".py"):
                    tree = ast.parse(open(os.path.join(dirpath, name), encoding="utf-8").read())
                    for node in ast.walk(tree):
                        if isinstance(node, ast.Import):
                            imported |= {a.name.split(".")[0] for a in node.names}
                        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                            imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m not in ("altdiff_min", "weights_convert")}
    optional = {"nbformat", "nbclient", "matplotlib", "IPython"}  # the notebooks' (through jupyter), where they are used
    assert {names.get(m, m).lower() for m in third_party - optional} <= declared | extras
