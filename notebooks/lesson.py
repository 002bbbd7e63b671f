"""Small display helpers shared by the lessons (matplotlib comes with the [notebooks] extra)."""
from __future__ import annotations

import atexit
import shutil
import tempfile

import matplotlib.pyplot as plt
import torch


def show(images, titles=None, rows: int = 1, size: float = 1.6, suptitle: str | None = None):
    """A row (or grid) of images: (n, 3, H, W) / (n, H, W) tensors in [0, 1], or PIL images."""
    images = list(images)
    cols = -(-len(images) // rows)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows + (0.3 if suptitle else 0)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (ax, im) in enumerate(zip(axes.flat, images)):
        if isinstance(im, torch.Tensor):
            im = im.detach().float().cpu()
            im = im.permute(1, 2, 0).numpy() if im.ndim == 3 and im.shape[0] == 3 else im.numpy()
        ax.imshow(im, cmap="inferno" if getattr(im, "ndim", 3) == 2 else None, vmin=0, vmax=1)
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    plt.tight_layout()
    plt.show()


def scratch_folder() -> str:
    """A new temporary folder for a lesson's files, removed when the notebook's kernel stops (to keep
    what a lesson writes, use a folder of your own instead)."""
    folder = tempfile.mkdtemp(prefix="altdiff-lesson-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Latents in the sampler's (scaled) space → images in [0, 1]."""
    with torch.no_grad():
        return pipe.decode_latents(latents)


def word_tokens(pipe, prompt: str, word: str, nth: int = 0) -> list[int]:
    """The positions (in the 77) of the pieces that spell the `nth` occurrence of `word` in `prompt`:
    a word may be one piece or several ("正方形" can be 正 方 形), and a piece may start mid-word."""
    pieces = pipe.tokenizer.pieces(prompt)[1:-1]  # without <s> and </s>
    text = "".join(p.replace("\u2581", " ") for p in pieces)
    start = -1
    for _ in range(nth + 1):
        start = text.find(word, start + 1)
    if start < 0:
        raise ValueError(f"{word!r} is not in {prompt!r}")
    positions, at = [], 0
    for i, piece in enumerate(pieces, start=1):
        end = at + len(piece)
        if at < start + len(word) and end > start and piece.strip("\u2581"):
            positions.append(i)
        at = end
    return positions


def word_map(maps, positions: list[int], size=(64, 64), **kwargs) -> torch.Tensor:
    """One word's heat map, (pictures, H, W): its pieces' maps averaged (each scaled to [0, 1] on its own)."""
    return torch.stack([maps.heatmap(p, size, **kwargs) for p in positions]).mean(dim=0)
