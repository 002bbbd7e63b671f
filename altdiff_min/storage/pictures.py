"""Pictures a user hands in, read and converted: every picture file is opened here (open_picture:
its size is bounded before anything is decoded, PIL's guard against decompression bombs), any PIL mode
becomes 8-bit RGB the way the references do it, and the pictures of image to image and inpainting
become the tensors the VAE reads (prepare_image, prepare_mask: diffusers' VaeImageProcessor).
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ..errors import BadFile, BadType, BadValue, Missing, NotFinite, TooManyPixels


def eight_bit(image: Image.Image) -> Image.Image:
    """16- and 32-bit integer images scaled down to 8-bit grey ("L"), not clipped (PIL's convert clips
    them at 255: a 16-bit picture would come out white); float images ("F", 0–255 as PIL reads them)
    rounded. Other modes unchanged."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grayscale PNGs and TIFFs
        levels = np.asarray(image, dtype=np.float64)
        grey = Image.fromarray((levels / 257.0).clip(0, 255).round().astype(np.uint8), "L")
        if isinstance(image.info.get("transparency"), int):  # a PNG's tRNS level: keep it as alpha
            alpha = np.where(levels == image.info["transparency"], 0, 255).astype(np.uint8)
            return Image.merge("LA", (grey, Image.fromarray(alpha, "L")))
        return grey
    if image.mode == "F":
        return Image.fromarray(np.asarray(image, dtype=np.float64).clip(0, 255).round().astype(np.uint8), "L")
    return image


def rgb_over_white(image: Image.Image) -> Image.Image:
    """Any PIL mode → RGB, as transformers' convert_to_rgb does: transparency (an alpha band, or a
    palette's transparent index) is composited onto white, so transparent areas do not show
    whatever colour they happen to store. Training data is read through it too (to_rgb)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image → 8-bit RGB: the EXIF orientation applied, 16- and 32-bit integer images scaled
    down (not clipped), then transparency composited over white (rgb_over_white: a transparent
    background is usually meant to be blank, not black)."""
    return rgb_over_white(eight_bit(ImageOps.exif_transpose(image)))


def pixel_limit_reason() -> str:
    return f"more pixels than PIL opens (Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS})"


def open_picture(path: str | os.PathLike, where: str = "") -> Image.Image:
    """A user's picture file opened lazily: only its header is read. One with more pixels than
    Image.MAX_IMAGE_PIXELS (PIL's guard against decompression bombs; None: no bound) is refused here,
    before decoding: PIL itself only warns up to twice the bound and decodes (a 195 KB 1-bit PNG of
    12000 × 12000 is 1.1 GB decoded). `where` prefixes each error (a flag, a manifest line)."""
    path = os.fspath(path)
    try:
        with warnings.catch_warnings():  # PIL's warning of a picture under twice its bound: refused below instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except FileNotFoundError:
        raise Missing(f"{where}picture not found: {path}") from None
    except Image.DecompressionBombError:
        raise TooManyPixels(f"{where}{path} has {pixel_limit_reason()[:-1]}, its guard against decompression bombs); "
                            f"not decoded") from None
    except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError is an OSError
        raise BadFile(f"{where}{path} is not a picture PIL can read ({type(e).__name__})") from None
    limit = Image.MAX_IMAGE_PIXELS
    w, h = image.size
    if limit is not None and w * h > limit:
        image.close()
        raise TooManyPixels(f"{where}{path} has {pixel_limit_reason()[:-1]}, its guard against decompression bombs): "
                            f"{w} × {h} = {w * h} pixels; not decoded")
    return image


def read_picture(path: str | os.PathLike, convert: str = "rgb", where: str = "") -> Image.Image:
    """Every picture a user hands in (training data, generate's --init-img and --mask, score's
    pictures, the UI's) is read here: open_picture's bound on its pixels before anything is decoded,
    then decoded in full and converted. convert "rgb": 8-bit RGB (to_rgb); "mask": its own mode, 8-bit,
    EXIF orientation applied (img2img.prepare_mask reads its grey levels). A file that does not decode
    is one line naming it, prefixed with `where`."""
    if convert not in ("rgb", "mask"):
        raise BadValue(f"convert must be 'rgb' or 'mask', got {convert!r}")
    with open_picture(path, where) as image:
        try:
            image.load()
            return to_rgb(image) if convert == "rgb" else eight_bit(ImageOps.exif_transpose(image))
        except (OSError, SyntaxError, ValueError) as e:
            raise BadFile(f"{where}{os.fspath(path)} is not a picture PIL can read ({type(e).__name__})") from None


def size_of(image) -> tuple[int, int]:
    """(width, height) of a PIL picture or an image tensor."""
    return image.size if isinstance(image, Image.Image) else (image.shape[-1], image.shape[-2])


def check_picture(image, what: str = "image") -> None:
    """A PIL picture, or a float tensor (3, H, W) / (1, 3, H, W) in [0, 1] (what generate(output="tensor") gives)."""
    if isinstance(image, Image.Image):
        if 0 in image.size:
            raise BadValue(f"{what} is {image.size[0]}×{image.size[1]} pixels: empty")
        return
    if not isinstance(image, torch.Tensor):
        raise BadType(f"{what} must be a PIL image or a float tensor (1, 3, H, W) in [0, 1], got {type(image).__name__}")
    if not image.is_floating_point() or image.ndim not in (3, 4) or image.shape[-3] != 3 or \
            (image.ndim == 4 and image.shape[0] != 1) or 0 in image.shape:
        raise BadValue(f"{what} tensor must be floats (1, 3, H, W) or (3, H, W) in [0, 1], got {image.dtype} {tuple(image.shape)}")
    if not torch.isfinite(image).all():
        raise NotFinite(f"{what} holds NaN or infinite values")
    if image.min() < 0 or image.max() > 1:
        raise BadValue(f"{what} tensor must be in [0, 1], got values in [{image.min():g}, {image.max():g}] "
                       f"(a 0–255 picture: divide it by 255)")


def rounded_size(image, multiple: int) -> tuple[int, int]:
    """The picture's (width, height) rounded down to a multiple of `multiple` (diffusers rounds to 8;
    a model whose UNet halves the latents k times takes multiples of 8·2^k: m9's 64)."""
    w, h = size_of(image)
    size = (w - w % multiple, h - h % multiple)
    if 0 in size:
        raise BadValue(f"the picture is {w}×{h} pixels: this model takes sides that are multiples of {multiple}, "
                       f"and rounding down leaves nothing; give a picture at least {multiple}×{multiple}")
    return size


def prepare_image(image, size: tuple[int, int]) -> torch.Tensor:
    """A picture → (1, 3, height, width) float32 in [−1, 1], as diffusers' VaeImageProcessor.preprocess:
    a PIL picture resized (when its size differs) with PIL's Lanczos filter, then /255; a tensor in
    [0, 1] resized with F.interpolate's default (nearest). Then 2x − 1. Pictures that are not RGB
    are composited over white first (diffusers would pass their other channel counts to the VAE), and
    16-bit ones scaled to 8 bits (eight_bit; PIL's convert would clip them white)."""
    w, h = size
    if isinstance(image, Image.Image):
        image = rgb_over_white(eight_bit(image))
        if image.size != (w, h):
            image = image.resize((w, h), Image.Resampling.LANCZOS)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    else:
        pixels = image.float().cpu().reshape(1, 3, *image.shape[-2:])
        if tuple(pixels.shape[-2:]) != (h, w):
            pixels = F.interpolate(pixels, size=(h, w))
    return 2.0 * pixels - 1.0


def prepare_mask(mask, image, size: tuple[int, int]) -> torch.Tensor:
    """A mask the size of `image` (PIL, any mode; or a float tensor (H, W), (1, H, W) or (1, 1, H, W)
    in [0, 1]) → (1, 1, height, width) of 0 and 1 at the prepared picture's size: 1 (white, ≥ 0.5
    after resizing) = repaint, 0 = keep.

    A PIL mask is read as diffusers' mask processor reads it: resized in its own mode, then its grey
    levels (convert("L")), so an alpha band is ignored: white strokes painted on a layer that is
    transparent black elsewhere repaint the strokes only (composited over white, as pictures are,
    the whole layer would be repainted). 16-bit masks are scaled to 8 bits first (eight_bit)."""
    if isinstance(mask, Image.Image):
        if mask.size != size_of(image):
            raise BadValue(f"the mask is {mask.size[0]}×{mask.size[1]} pixels but the picture is "
                           f"{size_of(image)[0]}×{size_of(image)[1]}: they must be the same size")
        grey = eight_bit(mask)
        if grey.size != size:
            grey = grey.resize(size, Image.Resampling.LANCZOS)
        m = torch.from_numpy(np.asarray(grey.convert("L"), dtype=np.float32) / 255.0)[None, None]
    elif isinstance(mask, torch.Tensor):
        if not mask.is_floating_point() or mask.ndim < 2 or mask.ndim > 4 or mask[..., 0, 0].numel() != 1:
            raise BadValue(f"a mask tensor must be floats (H, W), (1, H, W) or (1, 1, H, W) in [0, 1], "
                           f"got {mask.dtype} {tuple(mask.shape)}")
        if (mask.shape[-1], mask.shape[-2]) != size_of(image):
            raise BadValue(f"the mask is {mask.shape[-1]}×{mask.shape[-2]} pixels but the picture is "
                           f"{size_of(image)[0]}×{size_of(image)[1]}: they must be the same size")
        if not torch.isfinite(mask).all():
            raise NotFinite("the mask holds NaN or infinite values")
        m = mask.float().cpu().reshape(1, 1, *mask.shape[-2:])
        if (m.shape[-1], m.shape[-2]) != size:
            m = F.interpolate(m, size=(size[1], size[0]))
    else:
        raise BadType(f"mask must be a PIL image or a float tensor in [0, 1], got {type(mask).__name__}")
    return (m >= 0.5).float()


def read_picture_argument(path: str, flag: str, mask: bool = False):
    """A picture file given to `flag` (--init-img, a page's field), read by read_picture (its bound on
    pixels before decoding; 8-bit RGB, or with mask=True its own mode, 8-bit), or a clear error naming the flag."""
    if not os.path.isfile(path):
        raise Missing(f"{flag} {path}: no such file")
    return read_picture(path, "mask" if mask else "rgb", where=f"{flag} ")
