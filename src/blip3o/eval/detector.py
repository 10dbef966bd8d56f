"""Detectors for the GenEval scorer, and the deterministic detector of the shapes world.

A detector maps an RGB image to :class:`Detection` objects (class, confidence, box, colour). The
scorer only sees that interface, so a real-photo detector (Mask2Former plus a CLIP colour
classifier, as in GenEval) plugs in by implementing :class:`Detector`.

:class:`ShapesDetector` needs no training and no weights:

1. *Colour segmentation.* The background colour is the median of the border pixels. Each pixel p
   is explained as a mix ``bg + α·(c − bg)`` of the background and each palette colour c; the
   colour with the smallest residual wins and α is its coverage. Anti-aliased or blurred edges
   are thus partial coverage of the right colour, not a neighbouring palette colour.
2. *Connected components* of each colour's ``α ≥ 0.5`` mask; specks under ``min_area`` are dropped.
3. *Shape classification.* Each component's soft mask is moved into a canonical frame
   (centroid at the centre, √area fixed) and compared by soft IoU with templates of the six shapes
   at all rotations; the best IoU is the class and the confidence. Matching up to rotation and
   scale makes the detector indifferent to how another renderer orients or proportions a shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Protocol

import cv2
import numpy as np
from PIL import Image, ImageDraw

from blip3o.world.scene import POLYGONS
from blip3o.world.spec import COLOR_NAMES, COLORS, SHAPES

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Detection:
    """One detected object: class, confidence in [0, 1], box (x0, y0, x1, y1) in pixels, colour name."""

    label: str
    score: float
    box: Box
    color: str


class Detector(Protocol):
    """What the GenEval scorer needs of a detector."""

    classes: Sequence[str]

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Detections in an (H, W, 3) uint8 RGB image, in any order."""
        ...


# Canonical frame for shape matching: side FRAME px, objects scaled to √area = SQRT_AREA px.
FRAME, SQRT_AREA = 48, 16.0
#: Rotational symmetry period (degrees) of each polygon; templates cover one period.
PERIODS = {"square": 90, "triangle": 120, "star": 72, "hexagon": 60, "cross": 90}
ROTATION_STEP = 3
#: Gaussian blurs (σ in frame pixels) applied to the templates, so blurred objects match blurred shapes.
TEMPLATE_BLURS = (0.0, 1.0, 2.0, 3.0)


def _polygon_area_centroid(pts: np.ndarray) -> tuple[float, np.ndarray]:
    x, y = pts[:, 0], pts[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    area = cross.sum() / 2
    centroid = np.array([((x + xn) * cross).sum(), ((y + yn) * cross).sum()]) / (6 * area)
    return abs(area), centroid


def _draw(mask_fn) -> np.ndarray:
    ss = 4
    canvas = Image.new("L", (FRAME * ss, FRAME * ss), 0)
    mask_fn(ImageDraw.Draw(canvas), ss)
    return np.asarray(canvas.resize((FRAME, FRAME), Image.Resampling.BOX), dtype=np.float32) / 255.0


@cache
def templates() -> tuple[np.ndarray, tuple[str, ...]]:
    """Soft masks (N, FRAME, FRAME) of every shape at every rotation and blur, with their class names."""
    masks, names = [], []
    centre = FRAME / 2
    r = SQRT_AREA / math.sqrt(math.pi)
    masks.append(
        _draw(
            lambda d, ss: d.ellipse(
                ((centre - r) * ss, (centre - r) * ss, (centre + r) * ss, (centre + r) * ss), fill=255
            )
        )
    )
    names.append("circle")
    for shape, period in PERIODS.items():
        pts = np.array(POLYGONS[shape], dtype=np.float64)
        area, centroid = _polygon_area_centroid(pts)
        pts = (pts - centroid) * (SQRT_AREA / math.sqrt(area))
        for deg in range(0, period, ROTATION_STEP):
            a = math.radians(deg)
            rot = pts @ np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
            poly = [((x + centre) * 4, (y + centre) * 4) for x, y in rot]
            masks.append(_draw(lambda d, ss, poly=poly: d.polygon(poly, fill=255)))
            names.append(shape)
    blurred = [cv2.GaussianBlur(m, (0, 0), sigma) if sigma else m for sigma in TEMPLATE_BLURS for m in masks]
    return np.stack(blurred), tuple(names) * len(TEMPLATE_BLURS)


def palette_coverage(image: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel, the best-explaining palette colour index and its coverage α, both (H, W).

    Pixels that no colour explains with α > 0.15 get label -1.
    """
    p = image.astype(np.float32) - background  # (H, W, 3)
    d = np.array(list(COLORS.values()), dtype=np.float32) - background  # (C, 3)
    norm2 = np.maximum((d * d).sum(-1), 1.0)  # (C,)
    alpha = np.clip(p @ d.T / norm2, 0.0, 1.0)  # (H, W, C)
    resid = ((p[..., None, :] - alpha[..., None] * d) ** 2).sum(-1)  # (H, W, C)
    resid = np.where(alpha > 0.15, resid, np.inf)
    label = resid.argmin(-1)
    best_alpha = np.take_along_axis(alpha, label[..., None], -1)[..., 0]
    label = np.where(np.isfinite(resid.min(-1)), label, -1)
    return label, np.where(label >= 0, best_alpha, 0.0)


class ShapesDetector:
    """Deterministic detector of the world's six shapes and ten colours (see the module docstring).

    Args:
        threshold: minimum template IoU for a component to be reported (the scorer applies its own, higher,
            thresholds on top).
        min_area: smallest component, as a fraction of the image area.
        work_size: images larger than this are area-downsampled to it first (boxes are mapped back).
        max_per_class: GenEval keeps at most 16 objects per class.
        noise_level: a 3×3 median filter runs first when the border's pixel noise (std, 0–255) exceeds this;
            clean images skip it, since it would erase thin parts of small shapes.
    """

    classes: Sequence[str] = SHAPES

    def __init__(
        self,
        threshold: float = 0.3,
        min_area: float = 0.003,
        work_size: int = 128,
        max_per_class: int = 16,
        noise_level: float = 4.0,
    ) -> None:
        self.threshold, self.min_area, self.work_size = threshold, min_area, work_size
        self.max_per_class, self.noise_level = max_per_class, noise_level

    def detect(self, image: np.ndarray) -> list[Detection]:
        image = _as_rgb(image)
        h, w = image.shape[:2]
        scale = 1.0
        if max(h, w) > self.work_size:
            scale = self.work_size / max(h, w)
            image = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        if _border_noise(image) > self.noise_level:
            image = cv2.medianBlur(image, 3)
        label, alpha = palette_coverage(image, _border_median(image))
        min_pixels = self.min_area * image.shape[0] * image.shape[1]
        found: list[Detection] = []
        for c, color in enumerate(COLOR_NAMES):
            fg = ((label == c) & (alpha >= 0.5)).astype(np.uint8)
            n, comp, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
            for k in range(1, n):
                if stats[k, cv2.CC_STAT_AREA] < min_pixels:
                    continue
                det = self._classify(comp == k, stats[k], alpha, label, c, color, scale)
                if det is not None:
                    found.append(det)
        found.sort(key=lambda d: -d.score)
        per_class: dict[str, int] = {}
        kept = []
        for det in found:
            per_class[det.label] = per_class.get(det.label, 0) + 1
            if per_class[det.label] <= self.max_per_class:
                kept.append(det)
        return kept

    def _classify(
        self,
        comp: np.ndarray,
        stat: np.ndarray,
        alpha: np.ndarray,
        label: np.ndarray,
        c: int,
        color: str,
        scale: float,
    ) -> Detection | None:
        region = cv2.dilate(comp.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=2).astype(bool)
        soft = np.where(region & ((label == c) | (label < 0)), alpha, 0.0).astype(np.float32)
        area = float(soft.sum())
        ys, xs = np.nonzero(soft)
        weights = soft[ys, xs]
        mx, my = float((xs * weights).sum() / area), float((ys * weights).sum() / area)
        k = SQRT_AREA / math.sqrt(area)
        # Pixel index i covers [i, i + 1); the templates' centre FRAME / 2 is index FRAME / 2 - 0.5.
        affine = np.array([[k, 0, FRAME / 2 - 0.5 - k * mx], [0, k, FRAME / 2 - 0.5 - k * my]], dtype=np.float32)
        canon = cv2.warpAffine(soft, affine, (FRAME, FRAME), flags=cv2.INTER_LINEAR)
        masks, names = templates()
        inter = np.minimum(masks, canon).sum((1, 2))
        union = np.maximum(masks, canon).sum((1, 2))
        iou = inter / np.maximum(union, 1e-6)
        best = int(iou.argmax())
        if iou[best] < self.threshold:
            return None
        x, y, bw, bh = (int(v) for v in stat[:4])
        box = (x / scale, y / scale, (x + bw) / scale, (y + bh) / scale)
        return Detection(label=names[best], score=float(iou[best]), box=box, color=color)


def _as_rgb(image: np.ndarray | Image.Image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
    return np.ascontiguousarray(image)


def _border_noise(image: np.ndarray) -> float:
    """Pixel noise of the background: std of the border pixels' differences to their neighbours."""
    rows = np.concatenate([image[0], image[-1]]).astype(np.float32)
    return float(np.median(np.abs(np.diff(rows, axis=0))) * 1.4826 / math.sqrt(2))


def _border_median(image: np.ndarray) -> np.ndarray:
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    return np.median(border, axis=0).astype(np.float32)
