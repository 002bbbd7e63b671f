"""`altdiff-min ui` (altdiff_min/apps/ui.py): the Gradio app served in-process on 127.0.0.1, asked through
gradio_client and through a real headless Chromium (Selenium); every picture compared pixel for pixel
with what `model.generate` makes from the same arguments, and with what the command line shown makes."""
from __future__ import annotations

import base64
import io
import json
import os
import select
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from altdiff_min import load
from altdiff_min.apps import ui
from altdiff_min.apps.cli import main
from altdiff_min.errors import AltDiffError
from altdiff_min.model.tokenizer import MAX_PROMPT_CHARS
from altdiff_min.sampling.samplers import SAMPLERS
from altdiff_min.sampling.schedule import timesteps
from altdiff_min.toy import caption, render

# The handlers' positional order: prompt, negative prompt, sampler, steps, scale, seed, width, height, n.
FIELDS = ("prompt", "negative_prompt", "sampler", "steps", "scale", "seed", "width", "height", "n_samples")
# gradio's queue (6.31) calls pandas in ways pandas 3 deprecates: its business, not this project's.
pytestmark = [pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]
ARTIFACTS = os.environ.get("ALTDIFF_ARTIFACTS") or os.path.join(os.path.dirname(__file__), "artifacts")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pixels(picture) -> np.ndarray:
    """A picture (path, bytes or PIL image) as an (H, W, 3) uint8 array."""
    if isinstance(picture, bytes):
        picture = io.BytesIO(picture)
    image = picture if isinstance(picture, Image.Image) else Image.open(picture)
    return np.asarray(image.convert("RGB"))


def assert_same_pictures(returned: list, made: list) -> None:
    assert len(returned) == len(made)
    for got, want in zip(returned, made):
        np.testing.assert_array_equal(pixels(got), pixels(want))


def direct(model, asked: dict, **extra) -> list:
    """What model.generate makes from the settings the page sends."""
    return model.generate(**asked, progress=False, **extra)


def ask(client, asked: dict, api_name: str = "/txt2img", *extra):
    return client.predict(*(asked[k] for k in FIELDS), *extra, api_name=api_name)


def remake(recipe: str, outdir) -> list:
    """The pictures the command line shown makes, in order."""
    words = shlex.split(recipe)
    assert words[:2] == ["altdiff-min", "generate"]
    assert main(["generate", "--outdir", str(outdir), "--skip-grid", *words[2:]]) == 0
    return sorted((outdir / "samples").iterdir())


@pytest.fixture(scope="module")
def model():
    return load("toy")


@pytest.fixture(scope="module")
def server(model):
    """The app for the toy model, served on 127.0.0.1 at a free port; its URL."""
    app = ui.build_app(model)
    _, url, _ = ui.launch(app, "127.0.0.1", free_port(), block=False)
    yield url
    app.close()


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    from gradio_client import Client

    return Client(server, verbose=False, analytics_enabled=False, download_files=str(tmp_path_factory.mktemp("client")))


def settings(prompt: str = "un cercle rouge", sampler: str = "dpm++2m", seed: int = 5, n_samples: int = 2,
             steps: int = 3, **more) -> dict:
    return {"prompt": prompt, "negative_prompt": "", "sampler": sampler, "steps": steps, "scale": 7.5, "seed": seed,
            "width": 64, "height": 64, "n_samples": n_samples, **more}


def test_the_page_offers_every_sampler_and_the_models_size(client, model):
    params = {p["parameter_name"]: p for p in client.view_api(return_format="dict", print_info=False)
              ["named_endpoints"]["/txt2img"]["parameters"]}
    assert list(params) == list(FIELDS)
    assert set(params["sampler"]["type"]["enum"]) == set(SAMPLERS)
    assert params["width"]["parameter_default"] == params["height"]["parameter_default"] == model.image_size
    assert params["seed"]["parameter_default"] == -1


def test_a_request_returns_the_pictures_generate_makes(client, model):
    asked = settings()
    gallery, recipe, shown = ask(client, asked)
    assert_same_pictures([item["image"] for item in gallery], direct(model, asked))
    assert [item["caption"] for item in gallery] == ["seed 5 · picture 1 of 2", "seed 5 · picture 2 of 2"]
    assert {k: shown[k] for k in asked} == asked
    assert shown["model"] == model.path and (shown["device"], shown["dtype"]) == ("cpu", "fp32")
    assert recipe == ui.command_line(model, asked)


def test_the_command_line_shown_makes_the_same_pictures(client, tmp_path):
    # Prompts that start with "-" must not read as options.
    gallery, recipe, _ = ask(client, settings(prompt="-un carré bleu", negative_prompt="-rouge", sampler="euler_a", seed=11))
    assert_same_pictures([item["image"] for item in gallery], remake(recipe, tmp_path))


def test_a_random_seed_is_shown_and_makes_the_picture_again(client, model):
    asked = settings(seed=-1, n_samples=1)
    gallery, _, shown = ask(client, asked)
    assert 0 <= shown["seed"] < ui.SEED_RANGE
    assert gallery[0]["caption"] == f"seed {shown['seed']} · picture 1 of 1"
    assert_same_pictures([gallery[0]["image"]], direct(model, {**asked, "seed": shown["seed"]}))


def test_two_requests_run_at_once_and_keep_their_own_settings(client, model):
    """Each request's first UNet call waits at a barrier for the other's: both get past it only if the
    server runs them at the same time (serialised, the barrier's timeout breaks it and both fail)."""
    barrier, arrived = threading.Barrier(2, timeout=120), set()

    def meet(module, args):
        if threading.get_ident() not in arrived:
            arrived.add(threading.get_ident())
            barrier.wait()

    one = settings(prompt="a red circle", sampler="ddim", seed=1, n_samples=1, steps=4)
    two = settings(prompt=caption("square", "blue", "zh"), sampler="euler_a", seed=2, n_samples=2, steps=3)
    hook = model.unet.register_forward_pre_hook(meet)
    try:
        jobs = [client.submit(*(asked[k] for k in FIELDS), api_name="/txt2img") for asked in (one, two)]
        results = [job.result(timeout=300) for job in jobs]
    finally:
        hook.remove()
    assert len(arrived) == 2
    for asked, (gallery, _, shown) in zip((one, two), results):
        assert shown["prompt"] == asked["prompt"] and shown["sampler"] == asked["sampler"]
        assert_same_pictures([item["image"] for item in gallery], direct(model, asked))


def test_progress_follows_the_samplers_steps(model):
    asked = ui.request(*(settings(sampler="plms", steps=4)[k] for k in FIELDS))
    calls = []
    gallery, _, _ = ui.make(model, asked, lambda i, total: calls.append((i, total)))
    total = len(timesteps("plms", 4, model.schedule))
    assert calls == [(i, total) for i in range(1, total + 1)] and len(gallery) == 2


def expected_error(model, asked: dict) -> str:
    """The one line altdiff-min raises for these settings, found by the calls the page makes."""
    with pytest.raises(AltDiffError) as e:
        direct(model, ui.request(*(asked[k] for k in FIELDS)))
    return str(e.value)


@pytest.mark.parametrize("bad", [{"prompt": "   "}, {"width": 65}, {"height": 8192}, {"seed": -5}],
                         ids=["blank prompt", "width not a multiple", "height over the limit", "negative seed"])
def test_bad_input_is_the_one_line_error(client, model, bad):
    from gradio_client.exceptions import AppError

    asked = settings(**bad)
    message = expected_error(model, asked)
    with pytest.raises(AppError) as e:
        ask(client, asked)
    assert str(e.value) == message and "\n" not in message


# Bounds: what one request may cost the server.

@pytest.mark.parametrize("field, name", [("prompt", "prompt"), ("negative_prompt", "negative prompt")])
def test_a_huge_prompt_is_refused_in_one_line_and_the_server_answers_the_next_request(client, model, field, name):
    from gradio_client.exceptions import AppError

    # Over MAX_PROMPT_CHARS, within MAX_BODY_SIZE: a larger body is refused before it is read (below).
    huge = "a red circle " * (MAX_PROMPT_CHARS // 10)
    assert MAX_PROMPT_CHARS < len(huge) < ui.MAX_BODY_SIZE // 12
    with pytest.raises(AppError) as e:
        ask(client, settings(**{field: huge}))
    assert str(e.value) == (f"{name} is {len(huge):,} characters; at most {MAX_PROMPT_CHARS:,} are accepted "
                            "(only the first 77 tokens are used)")
    asked = settings(n_samples=1)
    gallery, _, _ = ask(client, asked)
    assert_same_pictures([item["image"] for item in gallery], direct(model, asked))


def call(server: str, data: list | None = None, event: str | None = None) -> tuple[int, str]:
    """Gradio's REST API: POST /call/txt2img with `data` (→ {"event_id"} once the request is in the
    queue, or an error status), or GET /call/txt2img/EVENT (→ its event stream, to the end): status, body."""
    url = f"{server.rstrip('/')}/gradio_api/call/txt2img" + (f"/{event}" if event else "")
    sent = urllib.request.Request(url, method="GET") if event else \
        urllib.request.Request(url, data=json.dumps({"data": data}).encode(), method="POST",
                               headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(sent, timeout=300) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_the_queue_takes_queue_size_requests_and_refuses_the_next_at_once():
    """Both model runs (CONCURRENCY) are held in the UNet until released, so the requests posted
    next wait in the queue: QUEUE_SIZE of them are taken, the next is refused at once with Gradio's
    "queue is full" (HTTP 503). Released, every request taken completes, and the next is taken. No
    timing: the runs are known to be held when the hook has counted them, and a POST is answered
    once its request is in the queue."""
    model = load("toy")  # its own model and server: the hook must not hold the other tests' requests
    app = ui.build_app(model)
    _, server, _ = ui.launch(app, "127.0.0.1", free_port(), block=False)
    release, arrived, held = threading.Event(), threading.Condition(), []

    def hold(module, args):
        with arrived:
            held.append(threading.get_ident())
            arrived.notify_all()
        release.wait(300)  # a deadlock guard only: the test releases it

    request = ["un cercle rouge", "", "ddim", 1, 7.5, 0, 64, 64, 1]
    hook = model.unet.register_forward_pre_hook(hold)
    try:
        running = [call(server, request) for _ in range(ui.CONCURRENCY)]
        with arrived:
            assert arrived.wait_for(lambda: len(held) == ui.CONCURRENCY, timeout=300), "the runs did not start"
        waiting = [call(server, request) for _ in range(ui.QUEUE_SIZE)]
        assert [status for status, _ in running + waiting] == [200] * (ui.CONCURRENCY + ui.QUEUE_SIZE)
        assert len(held) == ui.CONCURRENCY  # the queued requests wait: no third run began
        status, body = call(server, request)
        assert status == 503
        assert json.loads(body)["detail"] == f"Queue is full. Max size is {ui.QUEUE_SIZE} and size is {ui.QUEUE_SIZE}."
    finally:
        release.set()
        hook.remove()
    try:
        for _, body in running + waiting:
            status, stream = call(server, event=json.loads(body)["event_id"])
            assert status == 200 and "event: complete" in stream, stream[-500:]
        status, body = call(server, request)  # the queue is empty again
        assert status == 200 and "event: complete" in call(server, event=json.loads(body)["event_id"])[1]
    finally:
        app.close()


def test_every_field_but_the_prompt_has_a_default(client, model):
    """The API can be called with the prompt alone: the page's defaults fill in the rest."""
    gallery, _, shown = client.predict(prompt="un cercle rouge", api_name="/txt2img")
    defaults = {"negative_prompt": "", "sampler": "ddim", "steps": 25, "scale": 7.5, "width": model.image_size,
                "height": model.image_size, "n_samples": 1}
    assert {k: shown[k] for k in defaults} == defaults
    assert_same_pictures([item["image"] for item in gallery],
                         direct(model, {"prompt": "un cercle rouge", **defaults, "seed": shown["seed"]}))


def upload(server: str, size: int) -> int:
    """POST a file of `size` bytes to the page's upload route, as the page uploads a picture: the status."""
    boundary = "altdiff-min-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + b"\0" * size + f"\r\n--{boundary}--\r\n".encode()
    sent = urllib.request.Request(f"{server.rstrip('/')}/gradio_api/upload", data=body, method="POST",
                                  headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(sent, timeout=120) as answer:
            return answer.status
    except urllib.error.HTTPError as e:
        return e.code


def test_an_upload_over_the_limit_is_refused(server, client, model):
    assert upload(server, ui.MAX_FILE_SIZE) == 200
    assert upload(server, ui.MAX_FILE_SIZE + 1) == 413  # Request Entity Too Large
    asked = settings(n_samples=1)
    gallery, _, _ = ask(client, asked)
    assert_same_pictures([item["image"] for item in gallery], direct(model, asked))


def post_body(server: str, body, **headers) -> tuple[int, str]:
    """POST `body` to /call/txt2img as it is: bytes (sent with their Content-Length) or an iterator of
    bytes (sent chunked, without one). The status and the answer's text."""
    import httpx

    with httpx.Client(timeout=120) as http:
        answer = http.post(f"{server.rstrip('/')}/gradio_api/call/txt2img", content=body,
                           headers={"Content-Type": "application/json", **headers})
        assert ("content-length" in answer.request.headers) == isinstance(body, bytes)  # chunked otherwise
        return answer.status_code, answer.text


REQUEST = ["un cercle rouge", "", "ddim", 1, 7.5, 0, 64, 64, 1]  # prompt, negative prompt, sampler, ... (FIELDS)


def json_of_size(size: int) -> bytes:
    """A txt2img request of exactly `size` bytes: its prompt "aaa…" fills it."""
    start, end = json.dumps({"data": ["", *REQUEST[1:]]}).encode().split(b'""', 1)
    return start + b'"' + b"a" * (size - len(start) - len(end) - 2) + b'"' + end


def assert_answers_a_request(server: str) -> None:
    status, body = call(server, REQUEST)
    assert status == 200, body
    assert "event: complete" in call(server, event=json.loads(body)["event_id"])[1]


TOO_LARGE = (f"request body too large: at most {ui.MAX_BODY_SIZE:,} bytes are accepted "
             f"(files go to {ui.UPLOAD_ROUTE})")


def test_a_body_over_the_limit_is_refused_before_it_is_read(server):
    """Its Content-Length says so: 413 and one line naming the limit. One byte less is read (and its
    prompt then refused by the prompt check, in the event stream); the server answers the next request."""
    status, body = post_body(server, json_of_size(ui.MAX_BODY_SIZE + 1))
    assert (status, json.loads(body)) == (413, {"detail": TOO_LARGE}) and "\n" not in body
    assert_answers_a_request(server)
    body = json_of_size(ui.MAX_BODY_SIZE)
    assert len(body) == ui.MAX_BODY_SIZE and json.loads(body)["data"][1:] == REQUEST[1:]
    status, answer = post_body(server, body)
    assert status == 200, answer[:500]
    stream = call(server, event=json.loads(answer)["event_id"])[1]
    assert "event: error" in stream and f"at most {MAX_PROMPT_CHARS:,} are accepted" in stream, stream[-500:]


def test_a_chunked_body_over_the_limit_is_refused_as_it_arrives(server):
    """No Content-Length: the bytes are counted as they come, and the chunk that passes the limit is refused."""
    body, chunk = json_of_size(ui.MAX_BODY_SIZE + 1), 64 * 1024
    status, answer = post_body(server, (body[i:i + chunk] for i in range(0, len(body), chunk)))
    assert (status, json.loads(answer)) == (413, {"detail": TOO_LARGE})
    assert_answers_a_request(server)


def test_the_longest_prompts_in_escaped_json_are_not_refused_by_the_body_limit(server):
    """MAX_PROMPT_CHARS characters in each prompt, every one \\u-escaped (6 bytes; 12 for one beyond U+FFFF):
    within MAX_BODY_SIZE, the request reaches the page and makes its picture."""
    request = ["狗" * MAX_PROMPT_CHARS, "🐶" * MAX_PROMPT_CHARS, *REQUEST[2:]]
    body = json.dumps({"data": request}, ensure_ascii=True).encode()
    assert len(body) > 18 * MAX_PROMPT_CHARS
    status, answer = post_body(server, body)
    assert status == 200, answer
    assert "event: complete" in call(server, event=json.loads(answer)["event_id"])[1]


# Image to image.

TRIANGLE = render("triangle", "green", size=40, center=(32, 32))


@pytest.fixture(scope="module")
def uploads(tmp_path_factory):
    """PNG files: the init picture, a green triangle whose background is transparent black (read as
    the command line reads pictures, it is white: TRIANGLE), and a mask whose right half is white (repaint)."""
    folder = tmp_path_factory.mktemp("uploads")
    background = (TRIANGLE == 255).all(axis=2)
    rgba = np.dstack([np.where(background[..., None], 0, TRIANGLE), np.where(background, 0, 255)]).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(folder / "init.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    return folder


@pytest.mark.parametrize("masked", [False, True], ids=["image to image", "inpainting"])
def test_an_image_request_returns_the_pictures_generate_and_the_command_make(client, model, uploads, masked, tmp_path):
    from gradio_client import handle_file

    asked = settings(prompt="un cercle rouge", sampler="ddim", seed=3, steps=4, width=0, height=0)  # 0: the picture's
    mask = Image.open(uploads / "mask.png").convert("L") if masked else None
    gallery, recipe, shown = ask(client, asked, "/img2img", handle_file(str(uploads / "init.png")), 0.6,
                                 handle_file(str(uploads / "mask.png")) if masked else None, masked)
    made = direct(model, {**asked, "width": None, "height": None}, image=Image.fromarray(TRIANGLE), strength=0.6,
                  mask=mask, paste_unmasked=masked)
    assert_same_pictures([item["image"] for item in gallery], made)
    assert shown["strength"] == 0.6 and shown["paste_unmasked"] is masked and shown["width"] is None
    assert os.path.basename(shown["image"]) == "init.png" and (shown["mask"] is not None) is masked
    # The command line names the uploads where the server keeps them, and makes the same pictures from them.
    assert_same_pictures([item["image"] for item in gallery], remake(recipe, tmp_path))


def sha256(path) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def replayed(picture: str, outdir) -> str:
    """The picture `altdiff-min generate --replay PICTURE` makes from the record a picture carries."""
    assert main(["generate", "--replay", picture, "--outdir", str(outdir)]) == 0
    return str(outdir / "samples" / "00000.png")


def test_the_pictures_the_page_serves_carry_their_record_and_replay(client, model, tmp_path):
    """The PNG files the page serves carry the web UIs' "parameters" text and the altdiff-min record
    (Gradio writes a returned picture's .info text into its PNG); `generate --replay` of a downloaded
    picture makes it again, with the same record."""
    from altdiff_min.storage.folder import fingerprint
    from altdiff_min.storage.provenance import environment, record_of_png

    asked = settings(prompt="un carré bleu", negative_prompt="flou", sampler="euler", seed=9, n_samples=2)
    gallery, _, _ = ask(client, asked)
    for k, item in enumerate(gallery):
        picture = item["image"]
        assert record_of_png(picture) == {
            "prompt": "un carré bleu", "sample": k, "negative_prompt": "flou", "seed": 9, "n_samples": 2,
            "sampler": "euler", "steps": 3, "scale": 7.5, "guidance": "cfg", "eta": 0.0, "height": 64, "width": 64,
            "dtype": "fp32", "model": fingerprint(model.path), "safety_checker": False,
            "environment": environment("cpu", "fp32")}
        lines = Image.open(picture).info["parameters"].splitlines()
        assert lines[:2] == ["un carré bleu", "Negative prompt: flou"]
        assert lines[2].startswith("Steps: 3, Sampler: Euler, CFG scale: 7.5, Seed: 9, Size: 64x64, Model hash: ")
        assert f"Batch size: 2, Batch pos: {k}, Precision: fp32" in lines[2]
        again = replayed(picture, tmp_path / str(k))
        assert_same_pictures([again], [picture])
        assert record_of_png(again) == record_of_png(picture)


def test_a_picture_made_from_a_picture_records_the_uploads_and_replays(client, uploads, tmp_path):
    from gradio_client import handle_file

    from altdiff_min.storage.provenance import record_of_png

    asked = settings(sampler="ddim", seed=3, steps=4, n_samples=1, width=0, height=0)
    gallery, _, shown = ask(client, asked, "/img2img", handle_file(str(uploads / "init.png")), 0.6,
                            handle_file(str(uploads / "mask.png")), True)
    picture = gallery[0]["image"]
    carried = record_of_png(picture)
    assert carried["init_img"] == {"path": os.path.abspath(shown["image"]), "sha256": sha256(uploads / "init.png")}
    assert carried["mask"] == {"path": os.path.abspath(shown["mask"]), "sha256": sha256(uploads / "mask.png")}
    assert (carried["strength"], carried["paste_unmasked"], carried["width"], carried["height"]) == (0.6, True, 64, 64)
    assert "Denoising strength: 0.6" in Image.open(picture).info["parameters"]
    assert_same_pictures([replayed(picture, tmp_path)], [picture])


def test_an_image_request_without_a_picture_is_an_error(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="^image to image: upload an init picture$"):
        ask(client, settings(), "/img2img", None, 0.8, None, False)


# The command.

@pytest.mark.parametrize("argv, error", [
    (["--port", "70000"], "--port must be in [1, 65535], got 70000"),
    (["--port", "0"], "--port must be in [1, 65535], got 0"),
    (["--model", "{tmp}/nope"], "model folder not found: {tmp}/nope"),
    (["--port", "{busy}"], "cannot listen on 127.0.0.1:{busy}: in use (another server?)"),
    (["--device", "cuda:7"], "device 'cuda:7'"),
    (["--lora-dir", "{tmp}/nope"], "--lora-dir: {tmp}/nope is not a folder"),
    (["--lora-dir", "{tmp}"], "--lora-dir: {tmp} holds no .safetensors files"),
], ids=["port too high", "port 0", "no model folder", "port in use", "no such device", "no lora dir", "no lora files"])
def test_the_command_checks_its_arguments_before_loading(argv, error, tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        where = {"tmp": str(tmp_path), "busy": busy.getsockname()[1]}
        argv = [a.format(**where) for a in argv]
        assert main(["ui", "--port", str(free_port()), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"altdiff-min ui: error: {error.format(**where)}") and err.count("\n") == 1


def test_gradio_is_imported_by_the_ui_alone_and_its_absence_is_one_line():
    """In a fresh interpreter: every other module of the package imports without gradio; with gradio
    unimportable (None in sys.modules), `altdiff-min ui` says how to install it."""
    code = """
import importlib, pkgutil, sys
import altdiff_min
for m in pkgutil.walk_packages(altdiff_min.__path__, "altdiff_min."):
    if m.name != "altdiff_min.apps.ui":
        importlib.import_module(m.name)
assert "gradio" not in sys.modules, "imported gradio"
sys.modules["gradio"] = None
from altdiff_min.apps.cli import main
sys.exit(main(["ui"]))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr == "altdiff-min ui: error: the web UI needs gradio (gradio is missing): pip install -e .[ui]\n"


def listening(port: int) -> list[str]:
    """The local addresses (hex, as /proc/net/tcp writes them) that listen on `port`."""
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return [row[1].split(":")[0] for row in rows if int(row[1].split(":")[1], 16) == port and row[3] == "0A"]


def test_the_command_serves_the_page_on_127_0_0_1_by_default():
    """`altdiff-min ui --port P` as a user runs it: it serves the page, listening on the loopback only."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "altdiff_min", "ui", "--port", str(port), "--device", "cpu"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert select.select([server.stdout], [], [], 120)[0], "altdiff-min ui said nothing in 2 minutes"
        said = server.stdout.readline()
        assert said.startswith("altdiff-min ui: ") and said.rstrip().endswith(f" http://127.0.0.1:{port}"), said
        for _ in range(240):  # until the server answers: at most 2 minutes
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as page:
                    assert ui.TITLE in page.read().decode()
                break
            except urllib.error.URLError:
                assert server.poll() is None, server.stdout.read()
                time.sleep(0.5)
        else:
            pytest.fail(f"altdiff-min ui --port {port} did not answer")
        assert listening(port) == ["0100007F"]  # 127.0.0.1, not 0.0.0.0
    finally:
        server.terminate()
        server.wait(timeout=60)


# A real browser.

def browser():
    """A headless Chromium under Selenium, or a failure that says what to install."""
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("ALTDIFF_NO_BROWSER") == "1":
            pytest.skip("ALTDIFF_NO_BROWSER=1: the browser test is skipped")
        pytest.fail("no Chromium and chromedriver on PATH: apt-get install chromium chromium-driver "
                    "(`bash .ci/run` installs them), or set ALTDIFF_NO_BROWSER=1 to skip this test")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # --no-sandbox: Chromium's sandbox refuses to start as root (CI runs as root);
    # --disable-dev-shm-usage: containers' /dev/shm is often too small for the renderer.
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(flag)
    # The driver's path is given, so Selenium Manager never tries to download one.
    return webdriver.Chrome(options=options, service=Service(driver))


def screenshot(page, path: str) -> None:
    """The whole page as a PNG at `path`, beyond the window's height (Chrome DevTools' own capture:
    resizing the window to the page's height instead makes Gradio's layout grow with it)."""
    width, height = page.execute_script("return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
    shot = page.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                           "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(base64.b64decode(shot["data"]))


def test_a_browser_makes_pictures_from_a_chinese_prompt_and_from_a_picture(server, model, uploads):
    """Both tabs as a person uses them: type (and upload), press Generate, see the pictures; they are
    generate's, and the page's screenshots are kept in ARTIFACTS."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    prompt, seed, n = caption("square", "blue", "zh"), 7, 4  # 一个蓝色的正方形
    page = browser()
    try:
        page.get(server)
        wait = WebDriverWait(page, 120)

        def fill(tab: str, **fields) -> None:
            wait.until(lambda p: p.find_element(By.CSS_SELECTOR, f"#prompt-{tab} textarea")).send_keys(fields["prompt"])
            for name, value in fields.items():
                if name != "prompt":  # a number field: all of it replaced, then Tab to leave it
                    box = page.find_element(By.CSS_SELECTOR, f"#{name}-{tab} input[type=number]")
                    box.send_keys(Keys.CONTROL, "a")
                    box.send_keys(str(value), Keys.TAB)

        def results(tab: str, button: str, count: int) -> tuple[list[bytes], str]:
            page.find_element(By.ID, button).click()
            shown = wait.until(lambda p: len(found := p.find_elements(By.CSS_SELECTOR, f"#gallery-{tab} img")) == count
                               and found)
            box = page.find_element(By.CSS_SELECTOR, f"#recipe-{tab} textarea")
            recipe = wait.until(lambda p: (text := box.get_attribute("value")) and text)
            screenshot(page, os.path.join(ARTIFACTS, f"ui-{tab}.png"))
            return [urllib.request.urlopen(img.get_attribute("src"), timeout=60).read() for img in shown], recipe

        fill("txt2img", prompt=prompt, seed=seed, **{"n-samples": n})
        text_pictures, text_recipe = results("txt2img", "generate", n)
        next(tab for tab in page.find_elements(By.CSS_SELECTOR, "button[role=tab]") if tab.text == "Image to image").click()
        fill("img2img", prompt=caption("circle", "red", "fr"), seed=seed)
        page.find_element(By.CSS_SELECTOR, "#init-img2img input[type=file]").send_keys(str(uploads / "init.png"))
        wait.until(lambda p: p.find_elements(By.CSS_SELECTOR, "#init-img2img img"))  # uploaded and shown
        image_pictures, image_recipe = results("img2img", "generate-img2img", 1)
    finally:
        page.quit()
    assert prompt in text_recipe and f"--seed {seed}" in text_recipe and f"--n-samples {n}" in text_recipe
    assert_same_pictures(text_pictures, model.generate(prompt, n_samples=n, steps=25, seed=seed, height=64, width=64,
                                                       progress=False))
    assert "--init-img=" in image_recipe and "--strength 0.8" in image_recipe and "--H" not in image_recipe
    assert_same_pictures(image_pictures, model.generate(caption("circle", "red", "fr"), steps=25, seed=seed,
                                                        image=Image.fromarray(TRIANGLE), progress=False))


# LoRAs: --lora-dir's files offered by name, each request weighing its own.

@pytest.fixture(scope="module")
def lora_server(tmp_path_factory):
    """The toy model with two LoRAs (style, ink) from a --lora-dir, served; (client, loras, URL)."""
    from gradio_client import Client
    from helpers import lora_file

    folder = tmp_path_factory.mktemp("loras")
    lora_file(folder, name="style.safetensors", seed=0)
    lora_file(folder, name="ink.safetensors", seed=1, r=3)
    (folder / "notes.txt").write_text("not a LoRA: not offered")
    loras = ui.lora_folder(str(folder))
    app = ui.build_app(load("toy", lora=[(f["path"], 0.0) for f in loras.values()]), loras)
    _, url, _ = ui.launch(app, "127.0.0.1", free_port(), block=False)
    yield Client(url, verbose=False, analytics_enabled=False, download_files=str(tmp_path_factory.mktemp("c"))), loras
    app.close()


def test_a_lora_chosen_on_the_page_is_the_picture_generate_makes_and_is_recorded(lora_server, tmp_path):
    """The LoRA field offers the folder's files by name; a request at style 1.5 is load(toy, lora=[(style,
    1.5)])'s picture, "none" the plain one; the PNG records the file (path, SHA-256, scale) as generate
    --lora does, and the command line shown (with --lora) makes the same pictures."""
    from altdiff_min.storage.provenance import record_of_png

    client, loras = lora_server
    params = {p["parameter_name"]: p for p in client.view_api(return_format="dict", print_info=False)
              ["named_endpoints"]["/txt2img"]["parameters"]}
    assert list(params) == [*FIELDS, "lora", "lora_scale"] and params["lora"]["parameter_default"] == "none"
    assert set(params["lora"]["type"]["enum"]) == {"none", "ink", "style"}
    asked = settings(n_samples=1)
    plain = direct(load("toy"), asked)
    strong = direct(load("toy", lora=[(loras["style"]["path"], 1.5)]), asked)
    gallery, recipe, shown = ask(client, asked, "/txt2img", "style", 1.5)
    assert_same_pictures([gallery[0]["image"]], strong)
    assert not np.array_equal(pixels(strong[0]), pixels(plain[0]))
    assert shown["lora"] == {"file": loras["style"]["path"], "sha256": loras["style"]["sha256"], "scale": 1.5}
    assert record_of_png(gallery[0]["image"])["lora"] == [{"path": loras["style"]["path"], "sha256": loras["style"]["sha256"],
                                                           "scale": 1.5}]
    assert "<lora:style:1.5>" in Image.open(gallery[0]["image"]).info["parameters"]
    assert f"--lora={loras['style']['path']}:1.5" in recipe
    assert_same_pictures([gallery[0]["image"]], remake(recipe, tmp_path))
    gallery, _, shown = ask(client, asked, "/txt2img", "none", 1.5)
    assert_same_pictures([gallery[0]["image"]], plain)
    assert "lora" not in shown and "lora" not in record_of_png(gallery[0]["image"])


def test_two_requests_with_different_loras_at_once_keep_their_own(lora_server):
    """The scale is the request's (a ContextVar per call), not the shared model's."""
    client, loras = lora_server
    asked = settings(n_samples=1, steps=4, sampler="ddim")
    jobs = [client.submit(*(asked[k] for k in FIELDS), name, scale, api_name="/txt2img")
            for name, scale in (("style", 1.5), ("ink", -1.0), ("none", 1.0))]
    results = [job.result(timeout=300) for job in jobs]
    for (name, scale), (gallery, _, _) in zip((("style", 1.5), ("ink", -1.0), ("none", 1.0)), results):
        model = load("toy", lora=[(loras[name]["path"], scale)] if name != "none" else ())
        assert_same_pictures([gallery[0]["image"]], direct(model, asked))


def test_a_lora_the_server_does_not_offer_is_one_line(lora_server):
    """A client names one of the server's LoRAs, never a path (Gradio checks the choice; chosen_lora, behind
    the page, checks it again, and the scale)."""
    from gradio_client.exceptions import AppError

    client, loras = lora_server
    with pytest.raises(AppError) as e:
        ask(client, settings(n_samples=1), "/txt2img", "/etc/passwd", 1.0)
    assert str(e.value) == "Value: /etc/passwd is not in the list of choices: ['none', 'ink', 'style']"
    with pytest.raises(AltDiffError, match="^LoRA '/etc/passwd' is not one of this server's \\(ink, style\\)$"):
        ui.chosen_lora(loras, "/etc/passwd", 1.0)
    with pytest.raises(AltDiffError, match="^LoRA scale must be a finite number, not nan$"):
        ui.chosen_lora(loras, "style", float("nan"))
