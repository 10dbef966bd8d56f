"""Scenes of the shapes world: object geometry, layout sampling and anti-aliased rendering.

A scene is a list of :class:`Obj` in normalised coordinates (the unit square, y downwards), so the
same scene renders at any size. Shapes are drawn 4× supersampled and box-filtered down, which gives
clean anti-aliased edges whose bytes depend only on the scene and the size.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

from blip3o.eval.rules import relative_position
from blip3o.world.spec import BACKGROUND, COLORS, SHAPES, check_size

SUPERSAMPLE = 4
#: Object extents (the longer side of the shape's box) as a fraction of the image side.
MIN_EXTENT, MAX_EXTENT = 0.24, 0.36
#: Smallest gap between two objects' boxes, as a fraction of the image side.
GAP = 0.05
#: Objects keep this distance from the image border.
BORDER = 0.03
#: Sampled position scenes satisfy their relation with this normalised offset (GenEval needs > 0.5).
RELATION_SLACK = 0.75


def _regular(n: int, radius: float, phase: float) -> list[tuple[float, float]]:
    return [
        (radius * math.cos(phase + 2 * math.pi * k / n), radius * math.sin(phase + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    out = []
    for k in range(2 * points):
        r = 0.5 if k % 2 == 0 else 0.5 * inner
        a = -math.pi / 2 + math.pi * k / points
        out.append((r * math.cos(a), r * math.sin(a)))
    return out


def _cross(arm: float = 1 / 3) -> list[tuple[float, float]]:
    a, h = arm / 2, 0.5
    return [
        (-a, -h),
        (a, -h),
        (a, -a),
        (h, -a),
        (h, a),
        (a, a),
        (a, h),
        (-a, h),
        (-a, a),
        (-h, a),
        (-h, -a),
        (-a, -a),
    ]


def _normalise(poly: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """Scale a polygon so its longer box side is 1 and centre its box on the origin."""
    xs, ys = [p[0] for p in poly], [p[1] for p in poly]
    cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
    extent = max(max(xs) - min(xs), max(ys) - min(ys))
    return tuple(((x - cx) / extent, (y - cy) / extent) for x, y in poly)


#: Unit polygons (longer side 1, box centred on the origin, y downwards). The circle is drawn as an ellipse.
POLYGONS: dict[str, tuple[tuple[float, float], ...]] = {
    "square": _normalise([(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)]),
    "triangle": _normalise(_regular(3, 0.5, -math.pi / 2)),
    "star": _normalise(_star()),
    "hexagon": _normalise(_regular(6, 0.5, 0.0)),
    "cross": _normalise(_cross()),
}


def unit_extent(shape: str) -> tuple[float, float]:
    """(width, height) of a shape whose longer side is 1."""
    if shape == "circle":
        return 1.0, 1.0
    poly = POLYGONS[shape]
    xs, ys = [p[0] for p in poly], [p[1] for p in poly]
    return max(xs) - min(xs), max(ys) - min(ys)


@dataclass(frozen=True)
class Obj:
    """One object: class, colour name, box centre (cx, cy) and extent s, all in unit-square coordinates."""

    shape: str
    color: str
    cx: float
    cy: float
    s: float

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; allowed: {', '.join(SHAPES)}")
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; allowed: {', '.join(COLORS)}")

    @property
    def unit_box(self) -> tuple[float, float, float, float]:
        w, h = unit_extent(self.shape)
        return (
            self.cx - w * self.s / 2,
            self.cy - h * self.s / 2,
            self.cx + w * self.s / 2,
            self.cy + h * self.s / 2,
        )

    def box(self, size: int) -> tuple[float, float, float, float]:
        """The object's box in pixels of a ``size``-px image."""
        return tuple(round(v * size, 2) for v in self.unit_box)  # type: ignore[return-value]

    def to_json(self, size: int) -> dict:
        return {
            "class": self.shape,
            "color": self.color,
            "box": list(self.box(size)),
            "cx": round(self.cx, 6),
            "cy": round(self.cy, 6),
            "s": round(self.s, 6),
        }

    @classmethod
    def from_json(cls, d: dict) -> Obj:
        return cls(shape=d["class"], color=d["color"], cx=d["cx"], cy=d["cy"], s=d["s"])


def render(objects: Sequence[Obj], size: int, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """Draw a scene as an RGB image of side ``size``."""
    check_size(size)
    big = size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            x0, y0, x1, y1 = (v * big for v in obj.unit_box)
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        else:
            pts = [((obj.cx + x * obj.s) * big, (obj.cy + y * obj.s) * big) for x, y in POLYGONS[obj.shape]]
            draw.polygon(pts, fill=fill)
    return canvas.resize((size, size), Image.Resampling.BOX)


def _separated(a: Obj, b: Obj, gap: float) -> bool:
    ax0, ay0, ax1, ay1 = a.unit_box
    bx0, by0, bx1, by1 = b.unit_box
    return ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0


def place(
    rng: random.Random,
    shape: str,
    color: str,
    others: Sequence[Obj],
    *,
    accept: Callable[[Obj], bool] = lambda _: True,
    extent: tuple[float, float] = (MIN_EXTENT, MAX_EXTENT),
    tries: int = 400,
) -> Obj | None:
    """Sample a position and extent for a new object that keeps clear of ``others``; None if none found."""
    for _ in range(tries):
        s = rng.uniform(*extent)
        w, h = unit_extent(shape)
        cx = rng.uniform(BORDER + w * s / 2, 1 - BORDER - w * s / 2)
        cy = rng.uniform(BORDER + h * s / 2, 1 - BORDER - h * s / 2)
        obj = Obj(shape, color, cx, cy, s)
        if all(_separated(obj, o, GAP) for o in others) and accept(obj):
            return obj
    return None


def relation_holds(a: Obj, b: Obj, relation: str, slack: float = RELATION_SLACK) -> bool:
    """True when A is ``relation`` B by GenEval's rule, with a normalised offset beyond ``slack``."""
    if relation not in relative_position(a.unit_box, b.unit_box):
        return False
    # Require the stricter slack so that small detection errors cannot flip the verdict.
    ax0, ay0, ax1, ay1 = a.unit_box
    bx0, by0, bx1, by1 = b.unit_box
    ox, oy = (ax0 + ax1 - bx0 - bx1) / 2, (ay0 + ay1 - by0 - by1) / 2
    main = ox if relation in ("left of", "right of") else oy
    return abs(main) / math.hypot(ox, oy) > slack


def _relation_check(placed: Sequence[Obj], k: int, relation: tuple[int, str, int] | None) -> Callable[[Obj], bool]:
    """The acceptance test for object k: the relation, once its second object is being placed."""
    if relation is None or k != max(relation[0], relation[2]):
        return lambda _: True
    i, rel, j = relation
    other = placed[min(i, j)]
    if k == i:
        return lambda o: relation_holds(o, other, rel)
    return lambda o: relation_holds(other, o, rel)


def layout(
    rng: random.Random,
    specs: Sequence[tuple[str, str]],
    relation: tuple[int, str, int] | None = None,
    extent: tuple[float, float] = (MIN_EXTENT, MAX_EXTENT),
) -> list[Obj]:
    """Place objects given as (shape, colour) pairs; ``relation=(i, rel, j)`` makes object i ``rel`` object j.

    Restarts from scratch until every object fits (the world's object counts always fit).
    """
    for _ in range(200):
        objects: list[Obj] = []
        for k, (shape, color) in enumerate(specs):
            obj = place(rng, shape, color, objects, accept=_relation_check(objects, k, relation), extent=extent)
            if obj is None:
                break
            objects.append(obj)
        else:
            return objects
    raise RuntimeError(f"could not lay out {specs} with relation {relation}")


def scene_to_json(objects: Sequence[Obj], size: int) -> list[dict]:
    return [o.to_json(size) for o in objects]


__all__ = [
    "POLYGONS",
    "Obj",
    "layout",
    "place",
    "relation_holds",
    "render",
    "scene_to_json",
]
