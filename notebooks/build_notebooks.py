"""The source of the four lessons: `python notebooks/build_notebooks.py --execute` writes them as
notebooks with their outputs; tests/test_notebooks.py runs every notebook again in CI."""
import os
import sys
import time

import nbformat as nbf

SETUP = """import time
import torch
import altdiff_min
from altdiff_min.toy import data, detect
from lesson import show, decode

torch.manual_seed(0)
pipe = altdiff_min.load("toy")                       # the small model shipped with the package
print(pipe.unet.cfg, pipe.vae.cfg, sep="\\n")"""


def notebook(cells):
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbf.v4.new_markdown_cell(c[3:]) if c.startswith("md:") else nbf.v4.new_code_cell(c) for c in cells]
    return nb


LESSONS = {}

LESSONS["01_prompt_to_pixels"] = [
    """md:# 1 · From a prompt to pixels

AltDiffusion turns text into an image in four stages: the **tokenizer** cuts the prompt into pieces,
the **text encoder** (XLM-RoBERTa plus a projection) turns them into a context the UNet can read,
the **sampler** starts from noise and asks the **UNet** for the noise ε at each step, and the
**VAE decoder** turns the final latents into pixels. This lesson walks through each stage on the
small `toy` model shipped with altdiff-min (trained on coloured shapes, captions in nine languages);
the real AltDiffusion-m9 has the same code with bigger configs.""",
    SETUP,
    """md:## 1. Tokens
XLM-R's sentencepiece pieces, with fairseq's ids: `<s>`=0, `<pad>`=1, `</s>`=2, then piece id + 1.
Every prompt becomes 77 ids, padded.""",
    """prompt = data.caption("circle", "red", "fr")
ids, mask = pipe.tokenizer([prompt])
print(prompt)
print(list(zip(pipe.tokenizer.pieces(prompt), ids[0].tolist())))
print("ids", tuple(ids.shape), "real tokens:", int(mask.sum()))""",
    """md:## 2. The context
The text encoder gives one vector per position: (batch, 77, context_dim). The UNet attends to all
77, padding included, as AltDiffusion does. Because the encoder is multilingual, one sentence in
nine languages lands in one place: below, the cosine similarity of the mean context vectors of
"a red circle" (first nine rows) and "a blue square" (last nine), each in en zh es fr ru ja ko ar it.
Two bright blocks: meaning, not language, decides where a prompt lands.""",
    """langs = data.LANGUAGES
prompts = [data.caption("circle", "red", lang) for lang in langs] + [data.caption("square", "blue", lang) for lang in langs]
contexts = pipe.encode(prompts)
means = torch.nn.functional.normalize(contexts.mean(dim=1), dim=-1)
similar = means @ means.T
print("context", tuple(contexts.shape))
show([similar.clamp(0, 1)], size=3.5, suptitle="cosine similarity: red circle ×9 languages, blue square ×9")
print(f"same sentence, other language: {similar[:9, :9].mean():.2f};  other sentence: {similar[:9, 9:].mean():.2f}")""",
    """md:## 3. One UNet step
Training noises clean latents z₀ to x_t = √ᾱ_t·z₀ + √(1−ᾱ_t)·ε (Ho et al. 2020, eq. 4) and teaches
the UNet to predict ε. One line of algebra then gives the model's guess of the clean latents:
x̂₀ = (x_t − √(1−ᾱ_t)·ε̂) / √ᾱ_t (Song et al. 2021, eq. 12). Here a rendered red circle is encoded
by the VAE, noised to four timesteps, and denoised in one UNet call: at small t the guess is nearly
exact; at t = 999 almost nothing of the picture is left, and one call can only guess a blur: that
is why sampling takes many small steps.""",
    """from altdiff_min.schedule import add_noise, alphas_cumprod
a = alphas_cumprod(pipe.schedule)
picture = torch.from_numpy(data.render("circle", "red", size=40, center=(32, 32))).permute(2, 0, 1)[None] / 127.5 - 1
with torch.no_grad():
    z0 = pipe.vae.encode(picture)[0] * pipe.vae.cfg.scaling_factor  # the clean latents (1, C, 8, 8), in the sampler's scale
noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1))
images, titles = [], []
for t in (100, 400, 700, 999):
    x_t = add_noise(z0, noise, t, pipe.schedule)  # √ᾱ_t·z₀ + √(1−ᾱ_t)·ε
    with torch.no_grad():
        eps = pipe.unet(x_t, t, contexts[:1])  # contexts[0]: "a red circle"
    x0 = (x_t - (1 - a[t]).sqrt() * eps) / a[t].sqrt()
    images += [decode(pipe, x_t)[0], decode(pipe, x0)[0]]
    titles += [f"x_t, t={t}", "x̂₀, one UNet call"]
show(images, titles, size=1.4)""",
    """md:## 4. The sampler loop
DDIM repeats that step 25 times, moving x_t towards its x̂₀ a little each time. The callback sees
the latents and the predicted x̂₀ after every step.""",
    """frames = []
start = time.perf_counter()
image = pipe.generate(prompt, steps=25, seed=0, output="tensor", progress=False,
                      callback=lambda i, t, x, x0: frames.append((t, x0.clone())) if i % 5 == 0 or i == 24 else None)
print(f"25 steps in {time.perf_counter() - start:.2f} s")
show([decode(pipe, x0)[0] for _, x0 in frames], [f"x̂₀ at t={t}" for t, _ in frames])""",
    """md:## 5. The VAE decode
The sampler works in latents 8× smaller per side (here 8×8×4 for a 64×64 picture); the decoder
turns them into pixels. The detector used by the tests reads what the picture shows.""",
    """show(image, [prompt], size=2.5)
print("detected:", detect(image[0]))""",
]

LESSONS["02_samplers"] = [
    """md:# 2 · Samplers compared: DDIM, PLMS, DPM-Solver++, Euler

All of them integrate the same reverse process from the same noise; they differ in how they use the
UNet's ε. **DDIM** (Song et al. 2021) takes a first-order step towards the predicted x̂₀. **PLMS**
(Liu et al. 2022) extrapolates ε from the last steps (Adams–Bashforth, orders 2–4), after a warm-up
step that calls the model twice. **DPM-Solver++(2M)** (Lu et al. 2022) integrates the data
prediction in log-SNR time with a second-order multistep update; **dpm++2m-karras** is the same
solver over the noise levels of Karras et al. 2022, which crowd the steps at low noise. **Euler**
(Karras et al. 2022, k-diffusion) steps the probability-flow ODE dx/dσ = ε in the noise level σ;
**Euler ancestral** steps further down and adds fresh noise each time, so it never settles on one
path. Fewer steps is where they differ, and on this small model, how smooth the guided ε is decides
which of them works.""",
    SETUP,
    """md:## The routes
Each sampler runs over an explicit list of timesteps, `samplers.timesteps(name, steps, schedule)`:
what diffusers' scheduler of that kind gives for the same config. The spacing comes from the
model's scheduler config (`timestep_spacing`), or, as for m9 whose config names none, from each
sampler's own default. `ts[k:]` starts part-way down (image-to-image does).""",
    """from altdiff_min.samplers import SAMPLERS
from altdiff_min.schedule import timesteps
print("schedule:", pipe.schedule)
for name in SAMPLERS:
    ts = timesteps(name, 10, pipe.schedule)
    print(f"{name:15}", " ".join(f"{t:4.0f}" for t in ts), f"   σ {ts.sigmas[0]:5.2f} … {ts.sigmas[-2]:.3f} → {ts.sigmas[-1]:.3f}")""",
    """prompt = data.caption("triangle", "purple", "es")
print(prompt, "· guidance 7.5, seed 4")
results, titles = [], []
for sampler in SAMPLERS:
    for steps in (3, 6, 12, 25, 50):
        start = time.perf_counter()
        results.append(pipe.generate(prompt, sampler=sampler, steps=steps, seed=4, output="tensor", progress=False)[0])
        titles.append(f"{sampler}\\n{steps} steps, {time.perf_counter() - start:.2f}s")
show(results, titles, rows=len(SAMPLERS))""",
    """md:DDIM has the purple triangle by 12 steps, Euler and DPM-Solver++ on either schedule by 25 (Euler's
12-step triangle is still blue). Euler ancestral draws fresh noise at every step, so each step count
is another random path and another picture, not a finer version of the same one. PLMS never draws
the triangle on this model at guidance 7.5: each step count up to 25 gives another picture, and 25
and 50 steps leave a blue sliver. The x̂₀ trajectories show it step by step
(`return_trajectory=True` gives the latents and x̂₀ of every step; decoded here).""",
    """for sampler in SAMPLERS:
    _, trajectory = pipe.generate(prompt, sampler=sampler, steps=8, seed=4, output="tensor", progress=False,
                                  return_trajectory=True)
    show([decode(pipe, s["x0"])[0] for s in trajectory], [f"t={s['t']:.0f}" for s in trajectory], size=1.2, suptitle=sampler)""",
    """md:## Why PLMS fails here
PLMS replaces ε by an extrapolation, e.g. (55ε − 59ε₋₁ + 37ε₋₂ − 9ε₋₃)/24 at order 4: the
coefficients add up to 1, but their sizes add up to 160/24 ≈ 6.7, so where ε jumps from one step to
the next the extrapolation overshoots, and the next ε is computed at the wrong place. Guidance makes
the jumps larger: ε∅ + s·(ε_c − ε∅) multiplies the conditional change by s. The toy model, trained
for minutes on a tiny world, decides colour and shape within a few steps, so its guided ε jumps.
Below: the largest step-to-step change of ε along DDIM's path, and, over 72 prompts (four
languages × six colours × three shapes), how often each sampler's 25-step picture shows what was asked.""",
    """from altdiff_min.pipeline import guided_eps
from altdiff_min.samplers import ddim

context = pipe.encode(["", prompt])
for scale in (3.0, 7.5):
    seen = []
    eps = guided_eps(pipe.unet, context, scale)
    start = torch.randn(1, pipe.unet.cfg.in_channels, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ddim(lambda x, t: seen.append(eps(x, t)) or seen[-1], start, timesteps("ddim", 25, pipe.schedule), pipe.schedule)
    jumps = [((b - a).norm() / b.norm()).item() for a, b in zip(seen, seen[1:-1])]  # the last step is the final denoise
    print(f"guidance {scale}: ε changes by up to {max(jumps):.0%} per step")

asks = [(lang, shape, colour) for lang in ("en", "zh", "ru", "ar") for colour in data.COLOURS for shape in data.SHAPES]
captions = [data.caption(shape, colour, lang) for lang, shape, colour in asks]
print(f"{'':16}{'guidance 3':>12}{'guidance 7.5':>14}")
for sampler in SAMPLERS:
    right = []
    for scale in (3.0, 7.5):
        images = pipe.generate(captions, sampler=sampler, steps=25, scale=scale, seed=0, output="tensor", progress=False)
        right.append(sum(detect(im) == (s, c) for im, (_, s, c) in zip(images, asks)) / len(asks))
    print(f"{sampler:16}{right[0]:12.0%}{right[1]:14.0%}")""",
    """md:DDIM and Euler, both first order, are the robust ones. DPM-Solver++'s second-order step
tolerates the jumps at moderate guidance; over Karras' levels, which put more of its 25 steps at
low noise (the routes above), it got every prompt right at 7.5 too, against 93% with its default
spacing. Euler ancestral's fresh noise costs it two prompts in five at 7.5. PLMS's extrapolation
does not tolerate the jumps, and the larger jumps at 7.5 make it much worse. With a model whose ε
varies smoothly the higher orders pay off in fewer steps; which model that is, is an experiment
this code makes easy: every sampler is a plain function over any `eps(x, t)` and a list of timesteps.""",
]

LESSONS["03_cross_attention"] = [
    """md:# 3 · Cross-attention maps, one sentence in several languages

The UNet reads the text only through cross-attention: every pixel of every transformer block
attends over the 77 context vectors. `capture_attention` records those probabilities (it switches
the layers to the explicit softmax path while recording), and `heatmap` turns one token's
attention into a map over the image, one per picture (the prompt's rows of the batch; with guidance
the batch also holds the unconditional branch, which `branch="unconditional"` or `"both"` gives).
The same seed and the same sentence in four languages: one picture, and where does each word look?""",
    SETUP,
    """from altdiff_min.instruments import capture_attention

def maps_for(lang, shape="circle", colour="green", seed=7):
    prompt = data.caption(shape, colour, lang)
    with capture_attention(pipe.unet) as maps:
        image = pipe.generate(prompt, steps=25, seed=seed, output="tensor", progress=False)
    pieces = pipe.tokenizer.pieces(prompt)
    heat = [maps.heatmap(token=i, size=(64, 64))[0] for i in range(len(pieces))]  # one picture: one map each
    # Where the attention goes: the prompt's row (the last; the unconditional one is first), averaged
    # over layers, heads, pixels and steps: one share per position of the 77.
    share = torch.stack([maps.mean(name)[-1].mean(dim=(0, 1)) for name in maps.sums]).mean(dim=0)
    return prompt, image[0], pieces, heat, share

for lang in ("en", "fr", "ru", "ar"):
    prompt, image, pieces, heat, share = maps_for(lang)
    n = len(pieces)
    print(lang, prompt, f"· attention to <s> {share[0]:.0%}, the words {share[1:n - 1].sum():.0%}, "
          f"</s> {share[n - 1]:.0%}, padding {share[n:].sum():.0%}")
    show([image] + heat[1:-1], ["image"] + [repr(p) for p in pieces[1:-1]], size=1.3)""",
    """md:**Reading the maps.** Each map is scaled to [0, 1] on its own: bright is where that word is
read most, dark where least, so compare places within one map, not brightness across words. Only the
words are drawn: the maps of `<s>`, `</s>` and the padding are left out. Yet the UNet's
cross-attention is unmasked (as AltDiffusion's), so those positions take their share of every
pixel's attention, and most of it: in the lines above about three quarters (74–77%) goes to the
padding and only 10–16% to the words. A word's map is its share out of all 77 positions, not
renormalised over the words.

The same seed gives the same green circle in every language. The maps (averaged over layers,
heads and steps) differ: some words' attention gathers on the shape (ru "зелёный" most clearly, fr
"vert" and "un"), others' spreads over the picture (fr "cercle", ru "круг", en "green", both Arabic
words). The text encoder is bidirectional, so every
position's vector already mixes the whole sentence: which position the UNet reads the meaning from
is the encoder's choice, not the word's. (matplotlib draws Arabic letters unjoined.)""",
    """md:## Per layer
The latents are 8×8 here, so the levels see 8×8, 4×4 and 2×2 positions. The coarse layers (2×2:
down.2, the middle, up.0) can only say "this half" or "this quarter"; at 8×8 on the way up, up.2.attn.0
draws a frame around the square (the word is read at the shape's edges, not inside it), and the last
layer's map is patchy. One token, "square", every layer, each map scaled on its own:""",
    """prompt = data.caption("square", "orange", "en")
with capture_attention(pipe.unet) as maps:
    image = pipe.generate(prompt, steps=25, seed=3, output="tensor", progress=False)
pieces = pipe.tokenizer.pieces(prompt)
token = next(i for i, p in enumerate(pieces) if "square" in p)
names = list(maps.sums)
show([image[0]] + [maps.heatmap(token, (64, 64), layers=[n])[0] for n in names],
     ["image"] + [n.replace(".block.cross_attn", "") for n in names], size=1.2, rows=2)""",
]

SWEEP_TEXT = """md:**Reading the table.** With cross-attention on, every picture shows the colour and
the shape asked for, at both scales (the 1.00s). Without it the prompt is never read: each seed
draws its own picture whatever the prompt (a blue circle from seed 0, a green square from seed 1),
and the detector finds what was asked only where that happens to match, a third of the time.
`results.csv` has one row per picture (setting, prompt, seed, file, colour, shape, and the
two-object columns objects and relation, empty for these one-object prompts), ready for a
spreadsheet or pandas; running the sweep again skips the cells already made."""

LESSONS["04_ablations"] = [
    """md:# 4 · Ablations: guidance, cross-attention, languages in between

Every switch here is an argument of `generate`, off by default (the defaults are the ones the
tests prove equal to diffusers). What each one shows is written under it.""",
    SETUP,
    """prompt = data.caption("circle", "blue", "it")
print(prompt)
scales = (0.0, 1.0, 2.0, 4.0, 7.5, 15.0)
images = [pipe.generate(prompt, scale=s, steps=25, seed=11, output="tensor", progress=False)[0] for s in scales]
show(images, [f"scale {s}" for s in scales])""",
    """md:**Guidance sweep.** Scale 0 is the unconditional model (the empty prompt): it draws whatever
this noise suggests to it, here a blue square. Scale 1 is the conditional model alone, and already
draws the blue circle asked for: on this small world the prompt is easy to follow. Larger scales
push ε further from the unconditional prediction (ε = ε∅ + s·(ε_c − ε∅)): the same blue circle in
the same place, whose outline starts to wobble at 7.5 and dents at 15.""",
    """schedules = {"constant 7.5": 7.5, "7.5 early, 1 late": lambda t: 7.5 if t > 500 else 1.0,
             "1 early, 7.5 late": lambda t: 1.0 if t > 500 else 7.5}
show([pipe.generate(prompt, scale=s, steps=25, seed=11, output="tensor", progress=False)[0] for s in schedules.values()],
     list(schedules))""",
    """md:**Guidance schedules.** All three put the same circle in the same place: here scale 1 already
gets the layout right, so guidance only changes the outline, and the outline is decided late.
Guidance in the late steps only gives the wobbly edge of constant 7.5; guidance in the early
(noisy) steps only gives the smooth circle of scale 1 (compare the sweep above). The early steps
decide the layout, the late ones the details.""",
    """images = [pipe.generate(data.caption(shape, "red", "en"), cross_attention=False, steps=25, seed=2,
                        output="tensor", progress=False)[0] for shape in data.SHAPES]
show(images, [f"no cross-attn: red {s}" for s in data.SHAPES])""",
    """md:**Cross-attention off.** With the UNet's cross-attention removed, the prompt is never read: the
three prompts give one and the same picture.""",
    """parts = {"everywhere": True, "mid off": ["down", "up"], "down only": ["down"], "up only": ["up"],
         "mid only": ["mid"], "nowhere": False}   # cross_attention=[parts that still read the text]
asks = [(shape, colour, lang) for lang in ("en", "zh", "ru", "ar") for colour in data.COLOURS for shape in data.SHAPES]
captions = [data.caption(*ask) for ask in asks]
print(f"{'cross-attention':16}{'colour':>8}{'shape':>8}   right, over {len(asks)} prompts in four languages")
shown = []
for name, on in parts.items():
    images = pipe.generate(captions, cross_attention=on, steps=25, seed=0, output="tensor", progress=False)
    found = [detect(image) for image in images]
    print(f"{name:16}{sum(f[1] == a[1] for f, a in zip(found, asks)) / len(asks):8.0%}"
          f"{sum(f[0] == a[0] for f, a in zip(found, asks)) / len(asks):8.0%}")
    shown += images[:6]
show(shown, [f"{name}\\n{text}" for name in parts for text in captions[:6]], rows=len(parts), size=1.3)""",
    """md:**Cross-attention per part.** `cross_attention` also takes the parts of the UNet that keep
reading the text, the others skipping their cross-attention: `"down"`, `"mid"`, `"up"`, or single
levels named as the modules are, such as `"up.1"` (`pipe.unet.text_parts()` lists them). On the toy,
the middle block's reading is redundant: without it every colour and shape is still right, and the
pictures look the same as with cross-attention everywhere. The way down alone mostly gets the shape
(94%) but seldom the colour (36%): a green square for "a red square", muddy mixtures for the circles.
The way up alone gets more colours (60%) and fewer shapes (86%). The middle block alone is hardly
better than no text at all: five of its six pictures above are the ones drawn with no cross-attention,
and its 17% of colours is chance (one in six). The colour needs both halves of the UNet.""",
    """a = pipe.encode([data.caption("square", "yellow", "en")])
b = pipe.encode([data.caption("triangle", "green", "zh")])
weights = [0.0, 0.25, 0.5, 0.75, 1.0]
noise = torch.randn(1, pipe.unet.cfg.in_channels, 8, 8, generator=torch.Generator().manual_seed(5)).expand(len(weights), -1, -1, -1)
mixes = pipe.generate(prompt_embeds=torch.cat([torch.lerp(a, b, w) for w in weights]), latents=noise, steps=25,
                      output="tensor", progress=False)
show(mixes, [f"en → zh, w={w}" for w in weights])""",
    """md:**Between two prompts, two languages.** Interpolating the contexts of "a yellow square" (en)
and "a green triangle" (zh) from the same noise. The shape flips half-way, while the colour passes
through orange and red, colours neither prompt asked for: the context space is not a mixing
palette, and the UNet reads a point between two meanings as a third.""",
    """layers = list(range(len(pipe.text_encoder.layers) + 1))
show([pipe.generate(prompt, text_layer=k, steps=25, seed=11, output="tensor", progress=False)[0] for k in layers],
     [f"text layer {k}" for k in layers])""",
    """md:**Which text-encoder layer.** The UNet was trained on the last layer's output; feeding it an
earlier one (0 = the embeddings alone) shows how much of the meaning the later layers add. Here the
embeddings alone give a green square, neither the colour nor the shape asked for; one layer of
attention over the words already gives the blue circle.""",
    """md:## An ablation as a table: `sweep`
The switches above, one picture at a time, are anecdotes. `altdiff-min sweep SPEC` (or `run_sweep`)
makes every combination of some `generate` arguments over prompts and seeds, measures every picture
(here with the toy detector: is the colour right, is the shape right) and writes a table and a
contact sheet. Two guidance scales × cross-attention on and off, three prompts in three languages,
two seeds:""",
    """import csv, json, tempfile
from PIL import Image
from altdiff_min.sweep import run_sweep

folder = tempfile.mkdtemp()
spec = {"model": "toy", "seeds": [0, 1], "metrics": ["toy"], "fixed": {"steps": 25},
        "prompts": [data.caption("circle", "red", "fr"), data.caption("square", "blue", "ja"),
                    data.caption("triangle", "green", "ar")],
        "axes": {"scale": [1.0, 7.5], "cross_attention": [True, False]}}
with open(f"{folder}/ablation.json", "w") as f:
    json.dump(spec, f, ensure_ascii=False)
rows = run_sweep(f"{folder}/ablation.json", progress=False)   # prints each setting's mean accuracy
show([Image.open(f"{folder}/ablation/contact_sheet.png")], size=7)
print(open(f"{folder}/ablation/results.csv", encoding="utf-8").read().splitlines()[:4])""",
    SWEEP_TEXT,
]


def main(argv: list[str]) -> None:
    """python build_notebooks.py [--execute] [NAME ...]: write the lessons next to this file; with
    --execute, run each on the toy model and keep its outputs (so they read well on a code host)."""
    execute = "--execute" in argv
    names = [a for a in argv if a != "--execute"] or list(LESSONS)
    here = os.path.dirname(os.path.abspath(__file__))
    for name in names:
        nb, path = notebook(LESSONS[name]), os.path.join(here, f"{name}.ipynb")
        if execute:
            from nbclient import NotebookClient

            start = time.perf_counter()
            NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": here}}).execute()
            print(f"ran {name} in {time.perf_counter() - start:.1f} s")
        nbf.write(nb, path)
        print("wrote", path)


if __name__ == "__main__":
    main(sys.argv[1:])
