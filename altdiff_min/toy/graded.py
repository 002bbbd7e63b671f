"""Graded scores: how near a toy picture comes to what its prompt asked, beside detect.py's right or wrong.

    delta_e(mean_rgb, "red")              → CIEDE2000 between a colour and the palette's red (0: the same)
    shape_iou(region, "circle")           → 1.0 for a rendered circle; about 0.86 for a square, 0.56 for a triangle
    relation_error(box_a, box_b, "above") → 0.0 when a reads as above b, else how many pixels it is from that
    grade_objects(pixels, found, asked)   → {"delta_e", "iou", "position"}: detect.grade reads `found`

The detector's verdicts saturate: the shipped toys draw one object's colour and shape 100% of the time,
so settings that draw them better or worse look alike. These scores are continuous and exact on
rendered pictures (0, 1, 0); a picture with nothing to score has None (left out of means, and counted).

Colour: CIEDE2000 (Sharma, Wu & Dalal 2005, eqs. 1–25; ISO/CIE 11664-6), not CIE76 (the Euclidean
distance in L*a*b*): the palette is saturated (C* 60–100), where CIE76 counts a chroma difference
about 1 + 0.045 C* ≈ 4–5 times what it is worth against a lightness one (CIEDE2000's S_C), and chroma
is what a model loses (toy-one's colours are paler than asked: docs/toy.md, Graded scores).
"""
from __future__ import annotations

import itertools

import numpy as np

from .data import COLOURS, mask

SCORES = ("delta_e", "iou", "position")
FORMATS = {"delta_e": "{:.2f}", "iou": "{:.3f}", "position": "{:.1f}"}  # how format_table prints them (and pair_…)

# sRGB (IEC 61966-2-1:1999): the linear RGB → CIE XYZ matrix of its D65 primaries; the white point is
# its row sums, so that sRGB white is L* = 100, a* = b* = 0 exactly.
SRGB_TO_XYZ = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
WHITE_XYZ = SRGB_TO_XYZ.sum(axis=1)
EPSILON = (6 / 29) ** 3  # CIE 15:2004 eq. 8.5's cube-root knee


def srgb_to_lab(rgb) -> np.ndarray:
    """(..., 3) sRGB in 0–255 → (..., 3) CIE L*a*b* (D65). The sRGB decoding (IEC 61966-2-1 eq. 4: linear
    below 0.04045, else ((c + 0.055) / 1.055)^2.4), the matrix above, then CIE 15:2004 eqs. 8.3–8.5:
    L* = 116 f(Y/Yn) − 16, a* = 500 (f(X/Xn) − f(Y/Yn)), b* = 200 (f(Y/Yn) − f(Z/Zn)), f(t) = t^(1/3)
    above (6/29)³, t / (3 (6/29)²) + 4/29 below."""
    c = np.asarray(rgb, dtype=np.float64) / 255
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    t = linear @ SRGB_TO_XYZ.T / WHITE_XYZ
    f = np.where(t > EPSILON, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def ciede2000(lab1, lab2) -> np.ndarray:
    """ΔE00 between (..., 3) L*a*b* colours, k_L = k_C = k_H = 1: Sharma, Wu & Dalal 2005, eqs. 1–25 (their
    Table 1's 34 pairs are tests/test_toy_graded.py's check). Angles in degrees, as the paper writes them."""
    (l1, a1, b1), (l2, a2, b2) = (np.moveaxis(np.asarray(lab, np.float64), -1, 0) for lab in (lab1, lab2))
    c_bar7 = ((np.hypot(a1, b1) + np.hypot(a2, b2)) / 2) ** 7
    g = 0.5 * (1 - np.sqrt(c_bar7 / (c_bar7 + 25.0**7)))  # eq. 4: a* stretched near the neutral axis
    a1, a2 = (1 + g) * a1, (1 + g) * a2
    c1, c2 = np.hypot(a1, b1), np.hypot(a2, b2)
    h1, h2 = np.degrees(np.arctan2(b1, a1)) % 360, np.degrees(np.arctan2(b2, a2)) % 360  # eq. 7 (atan2(0, 0) = 0)
    chromatic = c1 * c2 != 0
    dh = h2 - h1
    dh = np.where(chromatic, np.where(dh > 180, dh - 360, np.where(dh < -180, dh + 360, dh)), 0)  # eq. 10
    d_l, d_c, d_h = l2 - l1, c2 - c1, 2 * np.sqrt(c1 * c2) * np.sin(np.radians(dh) / 2)  # eqs. 8, 9, 11
    l_bar, c_bar = (l1 + l2) / 2, (c1 + c2) / 2
    h_sum = h1 + h2
    h_bar = np.where(~chromatic, h_sum, np.where(np.abs(h1 - h2) <= 180, h_sum / 2,
                                                 np.where(h_sum < 360, (h_sum + 360) / 2, (h_sum - 360) / 2)))  # eq. 14
    t = (1 - 0.17 * np.cos(np.radians(h_bar - 30)) + 0.24 * np.cos(np.radians(2 * h_bar))
         + 0.32 * np.cos(np.radians(3 * h_bar + 6)) - 0.20 * np.cos(np.radians(4 * h_bar - 63)))  # eq. 15
    d_theta = 30 * np.exp(-(((h_bar - 275) / 25) ** 2))  # eq. 16
    r_c = 2 * np.sqrt(c_bar**7 / (c_bar**7 + 25.0**7))  # eq. 17
    s_l = 1 + 0.015 * (l_bar - 50) ** 2 / np.sqrt(20 + (l_bar - 50) ** 2)  # eq. 18
    s_c, s_h = 1 + 0.045 * c_bar, 1 + 0.015 * c_bar * t  # eqs. 19, 20
    r_t = -np.sin(np.radians(2 * d_theta)) * r_c  # eq. 21
    return np.sqrt((d_l / s_l) ** 2 + (d_c / s_c) ** 2 + (d_h / s_h) ** 2 + r_t * (d_c / s_c) * (d_h / s_h))  # eq. 22


def delta_e(rgb, colour: str) -> float:
    """CIEDE2000 between an sRGB colour (0–255, e.g. an object's mean) and the palette colour `colour` renders."""
    return float(ciede2000(srgb_to_lab(rgb), srgb_to_lab(COLOURS[colour])))


QUARTERS = np.arange(-2, 3) / 4  # the centres tried: a ¼-pixel grid within half a pixel of the box's centre


def shape_iou(region: np.ndarray, shape: str) -> float:
    """IoU of a (H, W) bool region with the ideal `shape` as data.render draws it at the region's place and
    size: the best over sides within a pixel of the region's box side and centres on a ¼-pixel grid within
    half a pixel of the box's centre. Rendering decides each pixel on the ideal's edge by where its centre
    falls, which a fitted centre only knows to a fraction of a pixel, so the edge is given to the region:
    the pixels inside the ideal one pixel larger (side + 1) and outside it one pixel smaller (side − 1)
    count as the region has them, IoU = |region ∩ ideal₊₁| / |region ∪ ideal₋₁|. A rendered shape scores
    exactly 1 (at its own side and a centre within a quarter pixel of its own); its edge alone may not
    lower it, a wrong shape does (a circle for a square: about 0.86)."""
    ys, xs = np.nonzero(region)
    side = max(xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min())
    cx = ((xs.min() + xs.max() + 1) / 2 + QUARTERS)[None, :, None, None]  # (1, 5, 1, 1) × (5, 1, 1, 1): 25 centres
    cy = ((ys.min() + ys.max() + 1) / 2 + QUARTERS)[:, None, None, None]
    best = 0.0
    for s in (side - 1, side, side + 1):
        inner, outer = (mask(shape, max(s + d, 1), (cx, cy), region.shape) for d in (-1, 1))
        best = max(best, float(((outer & region).sum((-2, -1)) / (inner | region).sum((-2, -1))).max()))
    return best


TOWARDS = {"left of": (1, 0), "right of": (-1, 0), "above": (0, 1), "below": (0, -1)}  # from the first to the second (y down)


def relation_error(box_a, box_b, relation: str) -> float:
    """Pixels from box a being `relation` box b (boxes (x0, y0, x1, y1), ends excluded): 0 when it reads so
    (detect.relation: the centres further apart along the relation's axis, the right way round), else the
    distance of the centres' offset b − a from that cone, along ≥ |across|: how far the second object
    must move for the pair to read right ((|across| − along) / √2 beside the cone; its length when the
    pair is the other way round)."""
    u = np.array(TOWARDS[relation], dtype=np.float64)
    d = (np.add(box_b[2:], box_b[:2]) - np.add(box_a[2:], box_a[:2])) / 2
    along, across = float(d @ u), abs(float(d @ u[::-1]))
    if along >= across:
        return 0.0
    return float(np.hypot(along, across)) if along <= -across else (across - along) / np.sqrt(2)


def grade_objects(pixels: np.ndarray, found: list, asked) -> dict[str, float | None]:
    """The scores of a picture ((H, W, 3) float RGB 0–255) whose objects are `found`, [(Obj or None, box,
    region)], against the data.Scene `asked`. One object asked: `found` is the one object (ΔE and IoU;
    "position" None: the toy places a lone object anywhere). Two: exactly two found (else all None), each
    matched to the asked object it agrees with most (shape and colour as detected), then to the nearer
    colour; ΔE and IoU are the two's means, "position" the pair's relation_error."""
    if len(found) != len(asked.objects):
        return dict.fromkeys(SCORES)

    def agreement(pairs) -> int:  # how many of the asked shapes and colours the detector read on the matched objects
        return sum(seen is not None and (seen.colour == want.colour) + (seen.shape == want.shape) for want, (seen, _, _) in pairs)

    def colour_errors(pairs) -> list[float]:
        return [delta_e(pixels[region].mean(axis=0), want.colour) for want, (_, _, region) in pairs]

    pairs = min((list(zip(asked.objects, order)) for order in itertools.permutations(found)),
                key=lambda pairs: (-agreement(pairs), sum(colour_errors(pairs))))
    ious = [shape_iou(region, want.shape) for want, (_, _, region) in pairs]
    position = None if asked.second is None else relation_error(pairs[0][1][1], pairs[1][1][1], asked.relation)
    return {"delta_e": float(np.mean(colour_errors(pairs))), "iou": float(np.mean(ious)), "position": position}


def means(rows: list[dict], keys=SCORES, prefix: str = "") -> dict[str, float | None]:
    """The mean of each score over the pictures that have one (None when none has)."""
    values = {k: [r[k] for r in rows if r[k] is not None] for k in keys}
    return {prefix + k: float(np.mean(v)) if v else None for k, v in values.items()}

