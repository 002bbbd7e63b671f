"""Small display helpers shared by the lessons (matplotlib comes with the [notebooks] extra)."""
from __future__ import annotations

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


def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Latents in the sampler's (scaled) space → images in [0, 1]."""
    with torch.no_grad():
        return pipe.decode_latents(latents)
