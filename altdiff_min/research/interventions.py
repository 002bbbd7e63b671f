"""The door into the model: change what the UNet's attention computes, per call.

    class Swap(Controller):                                   a controller overrides any of three hooks,
        def probs(self, site, when, probs): …                 each returning a changed value or None
    images = pipe.generate("…", controllers=[Swap()])         only this call is changed

Every attention of the UNet's transformer blocks is a `Site` (part "down"/"mid"/"up", level, block,
kind "self" or "cross"), labelled when the UNet is built. While a sampling run has controllers, each
such attention asks them, in order, at three places (Vaswani et al. 2017, eq. 1):

    qkv(site, when, q, k, v)   the projected queries, keys and values (B, L, C) → (q, k, v) or None
    probs(site, when, p)       softmax(QKᵀ/√d), (B, heads, Lq, Lk) → changed probabilities or None;
                               a controller that has this hook makes that site take the explicit path
    output(site, when, out)    the layer's output after its out-projection (B, Lq, C) → changed or None

Two more hooks reach outside the attention (research/skipping.py's speed paths use them):

    tokens(site, when, x)      a transformer block's input tokens (B, L, C), before its first norm, told
                               the block's site (its self-attention's) → changed or None
    block(when, depth, block, compute)
                               each block of the UNet's walk (res block, transformer, resampler, in
                               order), at `depth` (UNet.forward: how many skips lie above it) → its
                               output: `compute()` runs it as written, or return something else

`when` is a `Moment`: which UNet evaluation of the run (call, from 0: the step for DDIM, DPM-Solver
and Euler), its timestep t, whether the batch is a guidance batch (unconditional rows first, then
the conditional ones), and the latents' (height, width), from which a site's grid is
(height // site.scale, width // site.scale).

Free when unused: with no controller an attention reads one ContextVar and takes the fused SDPA path,
as before. Per call, never process-wide: the state lives in a ContextVar (this thread, this call), so
two web requests on one model may use different controllers. A compiled UNet has no Python in its
graph: `check_controllers` refuses controllers for it in one line.

Latent hooks: generate's `callback(i, t, x, x0)` may return changed latents; the sampler continues
from them. A controller's fourth hook, `latents(step, x)`, is called before each step's first UNet
evaluation (before step 0 on x_T, then after step i's callback for step i + 1) and may return the
latents that step starts from: latent guidance such as Attend-and-Excite (research/attend_excite.py),
which differentiates through `step.unet`, a conditional UNet evaluation at the step's timestep, run
inside `alone` so that the run's attention controllers neither see nor count it. `check(sampler, prompts)` lets a controller
refuse a call before any model work. Guidance rules (how ε(x, ∅) and ε(x, c) combine) are
altdiff_min.sampling.guidance's.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..errors import BadType, BadValue
from ..model.attention import attention, attention_probs
from ..model.door import RUN, Site, active  # noqa: F401  (Site and active: the door's, read here too)
from ..model.layers import checkpointed


@dataclass(frozen=True)
class Moment:
    """When an attention runs: the UNet evaluation of this run (from 0), its timestep, whether the
    batch is a guidance batch (unconditional rows first), and the latents' (height, width)."""
    call: int
    t: float
    guided: bool
    size: tuple[int, int]


@dataclass(frozen=True)
class Step:
    """Before step i of a run of `steps` (0 the noisiest), at timestep t, by `sampler`. unet(x): the
    UNet's output at t for latents x with the prompts' contexts (the conditional rows, x's batch);
    autograd follows it where grad is enabled. The run's controllers see it as one more UNet call
    unless the hook calls it inside `alone(...)`."""
    i: int
    t: float
    steps: int
    sampler: str
    unet: Callable[[torch.Tensor], torch.Tensor]


class Controller:
    """Base of attention controllers: override any of the hooks; None leaves the value as it is."""

    def check(self, sampler: str, prompts: list[str]) -> None:
        """Raise a one-line errors.BadValue if this controller cannot run a generate call with this
        sampler and these prompts (prompt_embeds: one "" each); generate asks before any model work."""

    def qkv(self, site: Site, when: Moment, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        return None

    def probs(self, site: Site, when: Moment, probs: torch.Tensor) -> torch.Tensor | None:
        return None

    def output(self, site: Site, when: Moment, out: torch.Tensor) -> torch.Tensor | None:
        return None

    def tokens(self, site: Site, when: Moment, x: torch.Tensor) -> torch.Tensor | None:
        return None

    def block(self, when: Moment, depth: int, block: torch.nn.Module, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        return compute()

    def latents(self, step: Step, x: torch.Tensor) -> torch.Tensor | None:
        """Latent guidance: the latents x_t step.i is about to read → the latents it reads instead, or None."""
        return None


def overrides(controller: Controller, hook: str) -> bool:
    return getattr(type(controller), hook) is not getattr(Controller, hook)


class Run:
    """The controllers of one sampling run and where it is (`when`), set by the guided ε before each
    UNet evaluation (`at`)."""

    def __init__(self, controllers: Sequence[Controller]):
        self.controllers = tuple(controllers)
        self.hooks = {h: [c for c in self.controllers if overrides(c, h)] for h in ("qkv", "probs", "output", "tokens", "block")}
        self.calls, self.when = 0, Moment(0, 0.0, False, (0, 0))

    @contextmanager
    def at(self, t: float, guided: bool, size: tuple[int, int]):
        self.when = Moment(self.calls, float(t), guided, tuple(size))
        try:
            yield
        finally:
            self.calls += 1

    def attend(self, site: Site, q, k, v, heads: int, mask, out_proj) -> torch.Tensor:
        when = self.when
        for c in self.hooks["qkv"]:
            if (changed := c.qkv(site, when, q, k, v)) is not None:
                q, k, v = changed
        if self.hooks["probs"]:
            probs, v_heads = attention_probs(q, k, v, heads, mask)
            for c in self.hooks["probs"]:
                if (changed := c.probs(site, when, probs)) is not None:
                    probs = changed.to(v_heads.dtype)
            b, h, lq, _ = probs.shape
            out = (probs @ v_heads).transpose(1, 2).reshape(b, lq, -1)
        else:
            out = attention(q, k, v, heads, mask)
        out = out_proj(out)
        for c in self.hooks["output"]:
            if (changed := c.output(site, when, out)) is not None:
                out = changed
        return out

    def tokens(self, site: Site, x: torch.Tensor) -> torch.Tensor:
        """A transformer block's input, through the controllers' `tokens` hooks in order."""
        for c in self.hooks["tokens"]:
            if (changed := c.tokens(site, self.when, x)) is not None:
                x = changed
        return x

    def block(self, block: torch.nn.Module, depth: int, ckpt: bool, *args) -> torch.Tensor:
        """One block of the UNet's walk: the first controller with a `block` hook decides, its `compute`
        asks the next one, and the last one's runs the block as written (checkpointed while training)."""
        def compute(i: int = 0) -> torch.Tensor:
            if i == len(self.hooks["block"]):
                return checkpointed(ckpt, block, *args)
            return self.hooks["block"][i].block(self.when, depth, block, lambda: compute(i + 1))
        return compute()


@contextmanager
def intervene(controllers: Sequence[Controller] | None):
    """Run the enclosed sampling with `controllers` (None or empty: nothing changes, nothing is set),
    after those of an enclosing `intervene` (instruments.capture_attention is one). Yields the Run
    (None without controllers); the guided ε moves it from call to call."""
    outer = RUN.get()
    if not controllers:
        yield outer
        return
    token = RUN.set(Run((*(outer.controllers if outer else ()), *controllers)))
    try:
        yield RUN.get()
    finally:
        RUN.reset(token)


@contextmanager
def alone(controllers: Sequence[Controller]):
    """Run the enclosed UNet evaluations with `controllers` only, not those of the run around them (a
    latent hook's own evaluations: the run's controllers count and read the sampling's calls)."""
    token = RUN.set(Run(controllers) if controllers else None)
    try:
        yield RUN.get()
    finally:
        RUN.reset(token)


def latent_steps(run: Run | None, denoise, context: torch.Tensor | None, ts, sampler: str
                 ) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """before(i, x): the latents step i starts from, after each `latents` hook of the run's controllers
    in turn; x itself past the last step or without such a hook. context: the run's (negative rows
    first when guided), of which step.unet reads the last len(x) rows, the prompts'."""
    steering = [c for c in (run.controllers if run is not None else ()) if overrides(c, "latents")]

    def before(i: int, x: torch.Tensor) -> torch.Tensor:
        if not steering or i >= len(ts):
            return x
        t, cond = ts[i], None if context is None else context[-len(x):]
        step = Step(i, float(t), len(ts), sampler, lambda z: denoise(z, t, cond, False))
        for c in steering:
            if (changed := c.latents(step, x)) is not None:
                x = changed
        return x
    return before


@contextmanager
def evaluation(t: float, guided: bool, size: tuple[int, int]):
    """Around one UNet evaluation: the active run (if any) learns its moment."""
    run = RUN.get()
    if run is None:
        yield
        return
    with run.at(t, guided, size):
        yield


def check_controllers(controllers, compiled: bool = False, sampler: str | None = None,
                      prompts: list[str] | None = None) -> tuple[Controller, ...]:
    """A list of Controller instances (None: none); refused for a compiled UNet, whose graph runs no hook;
    with `sampler` and `prompts` (generate's), each controller's own `check` of them."""
    if controllers is None:
        return ()
    if isinstance(controllers, Controller):
        controllers = [controllers]
    if not isinstance(controllers, (list, tuple)) or not all(isinstance(c, Controller) for c in controllers):
        raise BadType(f"controllers must be a list of interventions.Controller, got {controllers!r}")
    if controllers and compiled:
        raise BadValue("attention controllers need the UNet as written, and this one is compiled "
                       "(load(..., compile=True)): load the model without compile to change its attention")
    for c in controllers if sampler is not None else ():
        c.check(sampler, list(prompts or []))
    return tuple(controllers)


class CrossAttentionSwitch(Controller):
    """The cross-attention ablation: the levels not in `reads` (UNet.text_parts names) add nothing
    from the text, as if the transformer skipped its cross-attention (x + 0 is x, bit for bit)."""

    def __init__(self, reads: Collection[str]):
        self.reads = frozenset(reads)

    def output(self, site, when, out):
        return torch.zeros_like(out) if site.kind == "cross" and site.layer not in self.reads else None
