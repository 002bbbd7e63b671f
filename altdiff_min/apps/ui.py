"""`altdiff-min ui`: a web page (Gradio) for text-to-image, image-to-image and editing with one loaded model.

    altdiff-min ui [--model toy] [--host 127.0.0.1] [--port 7860] [--device cpu] [--dtype fp32] [--lora-dir DIR]

The model is loaded once; every request passes its own settings to `model.generate`, which reads no
global state, so two requests can run at once (CONCURRENCY) without affecting each other. With each
picture the page shows its seed, and for the batch the settings and the `altdiff-min generate`
command line that makes the same pictures again. The pictures it serves are PNG files carrying their
record (provenance.picture_record), as generate's do: `altdiff-min generate --replay PICTURE`.

LoRAs: with --lora-dir, the *.safetensors files in DIR (read when the server starts, checked before
the model loads) are offered by name beside a scale slider. They are all attached at scale 0; a request
weighs the one it chose for its own call only (research/lora.py lora_scales), so concurrent requests
keep their own. The page names a file, never a path: a client cannot make the server read a file.

Gradio is an optional dependency (`pip install -e .[ui]`): it is imported here only, inside the
functions, so that the rest of the package never needs it and a missing gradio is one clear line.
"""
from __future__ import annotations

import errno
import json
import os
import secrets
import shlex
import socket
from typing import Any, Callable

import torch

from ..arguments import check_device
from ..errors import AltDiffError, BadValue
from ..model.tokenizer import check_prompt
from ..pipeline import AltDiffusion, load
from ..sampling.samplers import SAMPLERS
from ..sampling.schedule import timesteps
from ..storage.folder import fingerprint, read_config

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Two model runs at once: a request is not held up by a long one in another tab, and since each run
# already uses every core, more would only share them thinner. Further requests wait in the queue.
CONCURRENCY = 2
# What one request may hold up: requests waiting for a model run (more are refused at once, "queue is
# full", rather than held in memory), and the size of an uploaded file (a picture; larger ones are
# refused before they are written). A prompt's length is bounded where every prompt is checked
# (tokenizer.check_prompt, MAX_PROMPT_CHARS).
QUEUE_SIZE = 16
MAX_FILE_SIZE = 20 * 1024 * 1024
# The body of every other HTTP request (an API call's JSON, the page's queue/join) is bounded before it
# is read (BodyLimit), or a 60 MB prompt would be read and parsed whole before check_prompt sees it. The
# largest legitimate body is an image-to-image call: prompt and negative prompt of MAX_PROMPT_CHARS
# (10,000) characters each, as JSON with \u escapes, at most 12 bytes a character (a surrogate pair,
# \ud83d\udc36, for one character beyond U+FFFF), so 240,000 bytes; then the numbers, and two file
# references (path, URL and name: a few kB even escaped) and Gradio's own fields. 1 MiB holds four times
# that and still costs the server little to parse. Files themselves go to Gradio's upload route,
# bounded by MAX_FILE_SIZE instead (gradio.route_utils.API_PREFIX + routes.py's "/upload").
MAX_BODY_SIZE = 1024 * 1024
UPLOAD_ROUTE = "/gradio_api/upload"
NO_LORA = "none"  # the LoRA field's first choice
SEED_RANGE = 2**32  # random seeds stay within what the page's number field holds exactly (2**53)
TITLE = "altdiff-min: multilingual Stable Diffusion (AltDiffusion-m9)"


def require_gradio():
    """The gradio module, or one line saying how to install it."""
    try:
        import gradio
    except ImportError as e:
        raise AltDiffError(f"the web UI needs gradio ({e.name or e} is missing): pip install -e .[ui]") from None
    return gradio


# Turning what the page sends into generate's arguments, and the arguments into a recipe: no gradio here.

def whole(name: str, value, blank: Any = ...) -> int | None:
    """A number field's value as an int: the page's fields send floats (7.0) or None when emptied."""
    if value is None or value == "":
        if blank is ...:
            raise BadValue(f"{name}: give a whole number")
        return blank
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise BadValue(f"{name} must be a whole number, got {value!r}")
    return int(value)


def request(prompt, negative_prompt, sampler, steps, scale, seed, width, height, n_samples,
            picture_size: bool = False) -> dict[str, Any]:
    """generate's keyword arguments for one request, checked as far as the page's fields go (generate
    checks the rest: sizes, limits, sampler). A seed of -1 (or none) draws a random one, kept in the
    result so that the pictures can be made again. picture_size (image to image): a width or height
    of 0 (or none) is the init picture's, which generate takes from the picture (None)."""
    if not isinstance(prompt, str):
        raise BadValue("give a prompt (not empty or blank)")
    check_prompt(prompt)  # its length first: before any work on the text
    if not prompt.strip():
        raise BadValue("give a prompt (not empty or blank)")
    if isinstance(negative_prompt, str):  # anything else: generate says what it should be
        check_prompt(negative_prompt, "negative prompt")
    seed = whole("seed", seed, -1)
    if seed == -1:
        seed = secrets.randbelow(SEED_RANGE)
    return {"prompt": prompt, "negative_prompt": negative_prompt or "", "sampler": sampler,
            "steps": whole("steps", steps), "scale": scale, "seed": seed,
            "height": None if picture_size and not height else whole("height", height),
            "width": None if picture_size and not width else whole("width", width),
            "n_samples": whole("number of pictures", n_samples)}


def precision(model: AltDiffusion) -> tuple[str, str]:
    """The model's device and dtype as the command line spells them."""
    weight = model.unet.conv_in.weight
    return str(weight.device), next(name for name, dtype in DTYPES.items() if dtype == weight.dtype)


def command_line(model: AltDiffusion, kwargs: dict[str, Any], lora: dict | None = None) -> str:
    """The `altdiff-min generate` command that makes the same pictures (samples/NNNNN.png, in order);
    with an init picture, it names the uploaded files where the server keeps them."""
    device, dtype = precision(model)
    prompt, negative = kwargs["prompt"], kwargs["negative_prompt"]
    # "--flag=value" and "-- prompt": a prompt or negative prompt starting with "-" would read as an option.
    flags = [f"--negative-prompt={negative}"] if negative else []
    flags += ["--sampler", kwargs["sampler"], "--steps", kwargs["steps"], "--scale", kwargs["scale"], "--seed", kwargs["seed"]]
    for flag, name in (("--H", "height"), ("--W", "width")):
        if kwargs[name] is not None:  # None (image to image): the init picture's size, the command's default too
            flags += [flag, kwargs[name]]
    flags += ["--n-samples", kwargs["n_samples"], "--model", model.path, "--device", device, "--dtype", dtype]
    if "image" in kwargs:
        flags += [f"--init-img={kwargs['image']}", "--strength", kwargs["strength"]]
        if kwargs["mask"] is not None:
            flags += [f"--mask={kwargs['mask']}"] + ["--paste-unmasked"] * kwargs["paste_unmasked"]
    if lora:
        flags += [f"--lora={lora['path']}:{lora['scale']!r}"]
    words = ["altdiff-min", "generate", *flags, "--", prompt] if prompt.startswith("-") else \
        ["altdiff-min", "generate", prompt, *flags]
    return shlex.join(str(w) for w in words)


def settings_record(model: AltDiffusion, kwargs: dict[str, Any], lora: dict | None = None) -> dict[str, Any]:
    """What the page shows as JSON: every argument (pictures by their path), the model and precision,
    the LoRA (path, SHA-256, scale) if one was chosen."""
    device, dtype = precision(model)
    # "file", not "path": Gradio takes a JSON object with a "path" for a file to serve
    shown = {"lora": {"file": lora["path"], "sha256": lora["sha256"], "scale": lora["scale"]}} if lora else {}
    return {**kwargs, "model": model.path, "device": device, "dtype": dtype, **shown}


def lora_folder(folder: str) -> dict[str, dict]:
    """--lora-dir: {name: {"path", "sha256"}} of the *.safetensors files in `folder` (not its subfolders),
    each checked as generate --lora checks it, before the model loads."""
    from weights_convert.lora import check_lora_files, default_name

    from .generate import file_digest

    if not os.path.isdir(folder):
        raise BadValue(f"--lora-dir: {folder} is not a folder")
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                   if f.endswith(".safetensors") and os.path.isfile(os.path.join(folder, f)))
    if not files:
        raise BadValue(f"--lora-dir: {folder} holds no .safetensors files")
    check_lora_files(files, "--lora-dir")
    return {default_name(f): {"path": os.path.abspath(f), "sha256": file_digest(f, "--lora-dir")} for f in files}


def chosen_lora(loras: dict[str, dict], name, scale) -> dict | None:
    """The page's LoRA field and slider → {"name", "path", "sha256", "scale"}, or None for "none"."""
    from ..research.lora import finite

    if name in (None, "", NO_LORA):
        return None
    if name not in loras:
        raise BadValue(f"LoRA {name!r} is not one of this server's ({', '.join(loras) or 'none'})")
    return {"name": name, **loras[name], "scale": finite(scale, "scale")}


def make(model: AltDiffusion, kwargs: dict[str, Any], on_step: Callable[[int, int | None], None],
         model_folder: dict | None = None, lora: dict | None = None):
    """Run generate for one request: (pictures with their captions, the recipe, the settings). Each
    picture carries its record (provenance.picture_record) in its .info, as the PNG text chunks of
    provenance.text_chunks, which the page's PNG files keep (Gradio copies .info's text into them), so
    `altdiff-min generate --replay PICTURE` makes it again. model_folder: the model folder's
    fingerprint (folder.fingerprint; None: taken now). lora: chosen_lora's, weighed for this call only."""
    from ..research.lora import lora_scales
    from ..storage.provenance import environment, picture_record, text_chunks
    from .generate import file_digest

    # The steps strength leaves of the route are generate's business: image to image counts without a total.
    total = None if "image" in kwargs else len(timesteps(kwargs["sampler"], kwargs["steps"], model.schedule))

    def callback(i: int, t, x, x0) -> None:  # returns None: a callback's return value would replace the latents
        on_step(i + 1, total)

    pictures = {}
    if "image" in kwargs:
        # Read as `generate --init-img/--mask` reads them (EXIF orientation, transparency over white),
        # so that the command line shown makes the same pictures.
        from ..storage.pictures import read_picture_argument as read_picture

        pictures["image"] = read_picture(kwargs["image"], "init picture")
        pictures["mask"] = read_picture(kwargs["mask"], "mask") if kwargs["mask"] is not None else None
    with lora_scales(model, {lora["name"]: lora["scale"]} if lora else {}):
        images = model.generate(**{**kwargs, **pictures}, progress=False, callback=callback)
    lora = lora and {k: lora[k] for k in ("path", "sha256", "scale")}  # as generate --lora records it
    n = len(images)
    arguments = {k: v for k, v in kwargs.items() if k not in ("prompt", "image", "strength", "mask", "paste_unmasked")}
    picture = {} if "image" not in kwargs else {  # as `generate --init-img` records it
        "init_img": {"path": os.path.abspath(kwargs["image"]), "sha256": file_digest(kwargs["image"], "init picture")},
        "strength": kwargs["strength"], "paste_unmasked": kwargs["paste_unmasked"],
        "mask": {"path": os.path.abspath(kwargs["mask"]), "sha256": file_digest(kwargs["mask"], "mask")}
        if kwargs["mask"] is not None else None}
    picture |= {"lora": [lora]} if lora else {}
    model_folder = fingerprint(model.path) if model_folder is None else model_folder
    made_in = environment(*precision(model))
    for k, image in enumerate(images):
        image.info.update(text_chunks(picture_record(model, kwargs["prompt"], k, arguments, image.size, model_folder,
                                                     made_in, **picture)))
    gallery = [(image, f"seed {kwargs['seed']} · picture {k + 1} of {n}") for k, image in enumerate(images)]
    return gallery, command_line(model, kwargs, lora), settings_record(model, kwargs, lora)


# The page.

def build_app(model: AltDiffusion, loras: dict[str, dict] | None = None):
    """The Gradio app for `model` (not launched): text-to-image, image-to-image and edit (apps/ui_edit.py)
    tabs. loras: lora_folder's, attached to the model (at scale 0): a LoRA field and a scale slider on
    the first two tabs."""
    from .ui_edit import edit_tab

    gr = require_gradio()
    model_folder = fingerprint(model.path)  # the folder as it was loaded: every picture's record names it
    loras = loras or {}

    def run_request(kwargs_of: Callable[[], dict[str, Any]], progress, lora_name=NO_LORA, lora_scale=1.0) -> tuple:
        try:
            kwargs, lora = kwargs_of(), chosen_lora(loras, lora_name, lora_scale)
            return make(model, kwargs, lambda i, total: progress((i, total), desc=kwargs["sampler"], unit="steps"),
                        model_folder, lora)
        except AltDiffError as e:  # an expected failure: its one line on the page, no traceback in the log
            raise gr.Error(str(e), print_exception=False) from None

    def txt2img(prompt, negative_prompt, sampler, steps, scale, seed, width, height, n_samples, lora=NO_LORA,
                lora_scale=1.0, progress=gr.Progress()):
        return run_request(lambda: request(prompt, negative_prompt, sampler, steps, scale, seed, width, height,
                                           n_samples), progress, lora, lora_scale)

    def img2img(prompt, negative_prompt, sampler, steps, scale, seed, width, height, n_samples, image, strength,
                mask, paste_unmasked, lora=NO_LORA, lora_scale=1.0, progress=gr.Progress()):
        def kwargs():
            if image is None:
                raise BadValue("image to image: upload an init picture")
            return {**request(prompt, negative_prompt, sampler, steps, scale, seed, width, height, n_samples,
                              picture_size=True),
                    "image": image, "strength": strength, "mask": mask, "paste_unmasked": bool(paste_unmasked)}

        return run_request(kwargs, progress, lora, lora_scale)

    size = model.image_size
    multiple = check_multiple(model)

    def settings(tab: str) -> list:
        """The fields both tabs share, in the order the handlers take them; element ids end in the tab's name."""
        image_tab = tab == "img2img"
        # The page's number fields cannot be left blank (they send 0): 0 stands for the picture's size.
        blank = "0: the init picture's, rounded down to a multiple of " + str(multiple) if image_tab else None
        prompt = gr.Textbox(label="prompt", lines=2, elem_id=f"prompt-{tab}",
                            placeholder="any of nine languages: a red circle · un cercle rouge · 一个蓝色的正方形")
        # value "": the API's negative prompt may be left out (every field but the prompt has a default).
        negative = gr.Textbox("", label="negative prompt", lines=1, elem_id=f"negative-{tab}")
        with gr.Row():
            sampler = gr.Dropdown(list(SAMPLERS), value="ddim", label="sampler", elem_id=f"sampler-{tab}")
            steps = gr.Slider(1, 150, value=25, step=1, precision=0, label="steps", elem_id=f"steps-{tab}")
            scale = gr.Slider(0, 20, value=7.5, step=0.5, label="guidance scale", elem_id=f"scale-{tab}")
        with gr.Row():
            seed = gr.Number(-1, precision=0, label="seed", info="-1: a random one (shown with each picture)",
                             elem_id=f"seed-{tab}")
            width = gr.Number(0 if image_tab else size, precision=0, step=multiple, label="width", info=blank,
                              elem_id=f"width-{tab}")
            height = gr.Number(0 if image_tab else size, precision=0, step=multiple, label="height", info=blank,
                               elem_id=f"height-{tab}")
            n_samples = gr.Slider(1, 8, value=1, step=1, precision=0, label="number of pictures",
                                  elem_id=f"n-samples-{tab}")
        return [prompt, negative, sampler, steps, scale, seed, width, height, n_samples]

    def lora_fields(tab: str) -> list:
        """With --lora-dir: the LoRA (by its file's name) and its scale, last in the handlers' order."""
        if not loras:
            return []
        with gr.Row():
            return [gr.Dropdown([NO_LORA, *loras], value=NO_LORA, label="LoRA", elem_id=f"lora-{tab}"),
                    gr.Slider(-2, 2, value=1.0, step=0.05, label="LoRA scale", elem_id=f"lora-scale-{tab}")]

    def results(name: str) -> tuple:
        # PNG, not Gradio's default WebP: the pictures come back lossless, pixel for pixel what generate made.
        gallery = gr.Gallery(label="pictures", format="png", columns=4, fit_columns=False, height="auto", object_fit="contain",
                             elem_id=f"gallery-{name}")
        recipe = gr.Textbox(label="make them again", lines=1, max_lines=12, interactive=False, buttons=["copy"],
                            elem_id=f"recipe-{name}", elem_classes=["recipe"])
        with gr.Accordion("settings", open=False):
            record = gr.JSON(label="settings", elem_id=f"settings-{name}")
        return gallery, recipe, record

    # The pictures reach the page as files in Gradio's cache: every hour those older than a day are
    # deleted, so a server left running does not fill the disk. No analytics: nothing leaves the machine.
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 86400)) as app:
        gr.Markdown(f"## {TITLE}\nModel: `{model.path}` ({', '.join(precision(model))}); "
                    f"trained at {size}×{size}, sizes in multiples of {multiple}.")
        with gr.Tab("Text to image"):
            inputs = settings("txt2img") + lora_fields("txt2img")
            button = gr.Button("Generate", variant="primary", elem_id="generate")
            outputs = results("txt2img")
        button.click(txt2img, inputs, outputs, api_name="txt2img", concurrency_limit=CONCURRENCY,
                     concurrency_id="model")
        with gr.Tab("Image to image"):
            inputs = settings("img2img")
            with gr.Row():
                # The files as uploaded (filepath, image_mode None: Gradio hands them over untouched), for
                # make() to read as the command line does.
                image = gr.Image(type="filepath", image_mode=None, label="init picture", height=256, elem_id="init-img2img")
                mask = gr.Image(type="filepath", image_mode=None, label="mask (optional; white: repaint)", height=256,
                                elem_id="mask-img2img")
            with gr.Row():
                strength = gr.Slider(0.05, 1, value=0.8, step=0.05, label="strength",
                                     info="small: close to the picture; 1: from the picture drowned in noise "
                                          "(with a mask: the masked part from pure noise)")
                paste = gr.Checkbox(False, label="keep the unmasked pixels exactly (paste them back)")
            extra = lora_fields("img2img")
            button = gr.Button("Generate", variant="primary", elem_id="generate-img2img")
            outputs = results("img2img")
        # One concurrency_id: every tab shares the CONCURRENCY model runs.
        button.click(img2img, [*inputs, image, strength, mask, paste, *extra], outputs, api_name="img2img",
                     concurrency_limit=CONCURRENCY, concurrency_id="model")
        edit_tab(gr, model, model_folder, CONCURRENCY)  # a picture edited by editing its prompt
    return app


def check_multiple(model: AltDiffusion) -> int:
    """The pixels a width or height must be a multiple of (the VAE's downsampling × the UNet's)."""
    return 2 ** (len(model.vae.cfg.channels) - 1) * model.unet.cfg.size_multiple


class BodyLimit:
    """A pure ASGI middleware: an HTTP request whose body is over `limit` bytes, but for those to the paths
    in `exempt`, is answered 413 with one line of JSON, {"detail": ...}, naming the limit. A Content-Length
    over it is refused before the body is read; a body without one (chunked) is counted as it arrives and
    refused at the chunk that passes the limit, so no more than `limit` bytes reach the app. The app is
    then told the client left (http.disconnect) and what it answers is dropped: the 413 is the answer.
    Nothing is buffered here; the server (uvicorn) discards the rest of a refused body as it comes."""

    def __init__(self, app, limit: int = MAX_BODY_SIZE, exempt: tuple[str, ...] = (UPLOAD_ROUTE,)):
        self.app, self.limit, self.exempt = app, limit, frozenset(exempt)

    def message(self) -> str:
        return f"request body too large: at most {self.limit:,} bytes are accepted (files go to {UPLOAD_ROUTE})"

    async def refuse(self, send) -> None:
        body = json.dumps({"detail": self.message()}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send) -> None:
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):  # the server's scope path includes its root_path
            path = path[len(root):]
        if scope["type"] != "http" or path in self.exempt:
            return await self.app(scope, receive, send)
        lengths = [value for name, value in scope["headers"] if name.lower() == b"content-length"]
        if lengths and lengths[0].strip().isdigit() and int(lengths[0]) > self.limit:
            return await self.refuse(send)
        received, started, answered = 0, False, False

        async def counted():
            nonlocal received, answered
            if received > self.limit:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    if not started:  # else too late for a 413: the app sees the client leave
                        answered = True
                        await self.refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def watched(message) -> None:
            nonlocal started
            if answered:  # the app's answer to a body cut short: the 413 was the answer
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except Exception:
            if not answered:  # after a 413, whatever the cut body made the app raise is answered already
                raise


def launch(app, host: str, port: int, block: bool = True):
    """Serve `app` on host:port; block=False returns at once (the server runs in a thread: app.close())."""
    gr = require_gradio()
    # The theme's fonts are the system's: the default theme fetches one from Google Fonts, which a
    # machine without internet (or a user who wants no third-party requests) waits on.
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    # app_kwargs go to Gradio's App, a FastAPI: its `middleware` list wraps this server's app only.
    from starlette.middleware import Middleware

    return app.queue(max_size=QUEUE_SIZE).launch(
        server_name=host, server_port=port, prevent_thread_lock=not block, theme=theme, max_file_size=MAX_FILE_SIZE,
        css=".recipe textarea {font-family: ui-monospace, monospace}", ssr_mode=False, quiet=not block,
        app_kwargs={"middleware": [Middleware(BodyLimit)]})


def check_port(host: str, port: int) -> None:
    """Raise BadValue unless host:port can be listened on now (before the model is loaded)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise BadValue(f"--port must be in [1, 65535], got {port!r}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except (socket.gaierror, UnicodeError) as e:
        raise BadValue(f"--host {host!r} is not an address of this machine ({e})") from None
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server's socket: a closed one's TIME_WAIT is no obstacle
        try:
            s.bind((host, port))
        except OSError as e:
            why = "in use (another server?)" if e.errno == errno.EADDRINUSE else e.strerror or str(e)
            raise BadValue(f"cannot listen on {host}:{port}: {why}") from None


def run(args) -> int:
    """`altdiff-min ui`: every argument is checked before the model loads; then it serves until Ctrl-C."""
    require_gradio()
    check_port(args.host, args.port)
    device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    read_config(args.model)
    loras = lora_folder(args.lora_dir) if args.lora_dir else {}
    model = load(args.model, device=device, dtype=DTYPES[args.dtype], lora=[(f["path"], 0.0) for f in loras.values()])
    print(f"altdiff-min ui: {model.path} on {device}, http://{args.host}:{args.port}", flush=True)
    launch(build_app(model, loras), args.host, args.port)
    return 0

