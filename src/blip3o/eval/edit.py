"""Scoring of image edits in the shapes world: did the instructed change happen, and did nothing else change?

A world sample's metadata holds the source scene (``meta["objects"]``) and an edit triplet
(``meta["edit"]``: ``type``, ``instruction``, ``subject`` such as ``"red circle"``, the type's own keys and
the target scene), made by :func:`blip3o.world.samples.edit`. :class:`EditScorer` runs the shapes detector
on an edited image and gives two verdicts:

- ``edit_ok``, the instructed change is present:

  ==========  ==================================================================================
  recolor     the subject's class is detected in the new colour, and none in the old colour remains
  add         an object of the added colour and class is detected
  remove      no object of the subject's colour and class is detected
  move        the subject is detected and stands ``relation`` to the reference, by GenEval's rule
              (:func:`blip3o.eval.rules.relative_position` on the two boxes, as its position check)
  ==========  ==================================================================================

  The subject's checks look only at detections left over once the untouched objects are matched, and
  use the most confident one, as GenEval does for a count of one. A move is not checked against the
  source (the source may already meet the relation by GenEval's rule; the world only avoids it with slack).

- ``consistent``, the edit touched nothing else: every source object except the subject is detected with
  the same class and colour, its box centre within :data:`POSITION_TOLERANCE` of its source centre.
  Extra detections are reported (``extra``) but do not count against consistency.

Expected objects are matched to detections greedily: among pairs of the same class and colour, the pair
with the nearest centres is taken first, and each detection and each object is matched at most once.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from blip3o.eval.detector import Detection, Detector, ShapesDetector
from blip3o.eval.rules import relative_position
from blip3o.world.scene import Obj

#: Edit types, in the order the summary lists them.
EDIT_TYPES: tuple[str, ...] = ("recolor", "add", "remove", "move")
#: Largest distance between an untouched object's detected and source box centres, as a fraction of the image
#: side (x by width, y by height). Objects span 0.24-0.36 of the side and sit at least 0.05 apart, so 0.1 forgives
#: a generator's small drift but not an object moved to another place.
POSITION_TOLERANCE = 0.1


def _split_name(name: str) -> tuple[str, str]:
    """``"red circle"`` -> ``("red", "circle")``: the world's colours and classes are single words."""
    color, _, shape = name.partition(" ")
    if not color or not shape:
        raise ValueError(f"expected an object name 'colour class', got {name!r}")
    return color, shape


def _target_name(triplet: dict[str, Any]) -> tuple[str, str]:
    """The subject's (colour, class) in the target scene: the recolour's new colour, else unchanged."""
    color, shape = _split_name(triplet["subject"])
    return (triplet["color"], shape) if triplet["type"] == "recolor" else (color, shape)


def _centre(det: Detection, width: int, height: int) -> tuple[float, float]:
    x0, y0, x1, y1 = det.box
    return (x0 + x1) / 2 / width, (y0 + y1) / 2 / height


def match_objects(
    expected: Sequence[Obj], detections: Sequence[Detection], width: int, height: int
) -> dict[int, tuple[int, float]]:
    """Greedy matching of expected objects to detections of the same class and colour, nearest centres first.

    Returns ``{object index: (detection index, centre distance)}`` with distances in fractions of the image side.
    """
    pairs = []
    for i, obj in enumerate(expected):
        for j, det in enumerate(detections):
            if det.label == obj.shape and det.color == obj.color:
                cx, cy = _centre(det, width, height)
                pairs.append((math.hypot(cx - obj.cx, cy - obj.cy), i, j))
    matched: dict[int, tuple[int, float]] = {}
    used: set[int] = set()
    for dist, i, j in sorted(pairs):
        if i not in matched and j not in used:
            matched[i] = (j, dist)
            used.add(j)
    return matched


def _det_json(det: Detection, width: int, height: int) -> dict[str, Any]:
    cx, cy = _centre(det, width, height)
    return {
        "class": det.label,
        "color": det.color,
        "score": round(det.score, 3),
        "box": [round(v, 1) for v in det.box],
        "cx": round(cx, 4),
        "cy": round(cy, 4),
    }


@dataclass
class EditScorer:
    """Judges an edited image against a world sample's edit triplet (see the module docstring).

    Args:
        detector: any :class:`~blip3o.eval.detector.Detector`; the shapes detector by default.
        threshold: minimum detection confidence kept (the GenEval-shapes scorer's default).
        tolerance: largest centre shift of an untouched object, as a fraction of the image side.
    """

    detector: Detector | None = None
    threshold: float = 0.5
    tolerance: float = POSITION_TOLERANCE

    def __post_init__(self) -> None:
        if self.detector is None:
            self.detector = ShapesDetector()
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if not 0.0 < self.tolerance <= 1.0:
            raise ValueError(f"tolerance must be in (0, 1], got {self.tolerance}")

    def score(self, image: Image.Image | np.ndarray, meta: dict[str, Any]) -> dict[str, Any]:
        """Verdicts for one edited image and its sample's ``meta`` (``objects`` and ``edit``).

        Returns ``type``, ``instruction``, ``edit_ok``, ``consistent``, ``kept`` (untouched objects found in
        place), ``untouched``, ``extra`` (detections that are neither an untouched object nor the edited subject),
        ``reason`` and ``detections``.
        """
        if "edit" not in meta or "objects" not in meta:
            raise ValueError("meta needs 'objects' (the source scene) and 'edit' (the triplet) of a scene sample")
        triplet = meta["edit"]
        kind = triplet["type"]
        if kind not in EDIT_TYPES:
            raise ValueError(f"unknown edit type {kind!r}; allowed: {', '.join(EDIT_TYPES)}")
        array = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else image
        height, width = array.shape[:2]
        dets = sorted(
            (d for d in self.detector.detect(array) if d.score >= self.threshold),
            key=lambda d: -d.score,
        )

        subject = _split_name(triplet["subject"])
        source = [Obj.from_json(o) for o in meta["objects"]]
        # The add's subject is new; any other edit touches the one source object of the subject's name.
        untouched = source if kind == "add" else [o for o in source if (o.color, o.shape) != subject]
        matched = match_objects(untouched, dets, width, height)
        reasons = []
        kept = 0
        for i, obj in enumerate(untouched):
            name = f"{obj.color} {obj.shape}"
            if i not in matched:
                reasons.append(f"untouched {name} not found")
            elif matched[i][1] > self.tolerance:
                reasons.append(f"untouched {name} moved by {matched[i][1]:.3f}")
            else:
                kept += 1
        used = {j for j, _ in matched.values()}
        rest = [d for j, d in enumerate(dets) if j not in used]
        by_name: dict[tuple[str, str], list[Detection]] = defaultdict(list)
        for det in rest:  # stays sorted by descending confidence
            by_name[(det.color, det.label)].append(det)

        color, shape = subject
        if kind == "recolor":
            edit_ok = bool(by_name[(triplet["color"], shape)]) and not by_name[subject]
            if not by_name[(triplet["color"], shape)]:
                reasons.append(f"no {triplet['color']} {shape} found")
            if by_name[subject]:
                reasons.append(f"{color} {shape} still present")
        elif kind == "add":
            edit_ok = bool(by_name[subject])
            if not edit_ok:
                reasons.append(f"added {color} {shape} not found")
        elif kind == "remove":
            edit_ok = not by_name[subject]
            if not edit_ok:
                reasons.append(f"removed {color} {shape} still present")
        else:
            edit_ok = self._moved(triplet, untouched, matched, dets, by_name[subject], reasons)
        return {
            "type": kind,
            "instruction": triplet["instruction"],
            "edit_ok": edit_ok,
            "consistent": kept == len(untouched),
            "kept": kept,
            "untouched": len(untouched),
            "extra": len(rest) - (kind != "remove" and bool(by_name[_target_name(triplet)])),
            "reason": "\n".join(reasons),
            "detections": [_det_json(d, width, height) for d in dets],
        }

    @staticmethod
    def _moved(
        triplet: dict[str, Any],
        untouched: Sequence[Obj],
        matched: dict[int, tuple[int, float]],
        dets: Sequence[Detection],
        subjects: Sequence[Detection],
        reasons: list[str],
    ) -> bool:
        """Is the most confident subject detection ``relation`` the reference's detection, by GenEval's rule?"""
        reference = _split_name(triplet["reference"])
        ref = next((i for i, o in enumerate(untouched) if (o.color, o.shape) == reference), None)
        if not subjects:
            reasons.append(f"moved {triplet['subject']} not found")
            return False
        if ref is None or ref not in matched:
            reasons.append(f"reference {triplet['reference']} not found")
            return False
        actual = relative_position(subjects[0].box, dets[matched[ref][0]].box)
        if triplet["relation"] not in actual:
            found = " and ".join(sorted(actual)) or "no relation to"
            reasons.append(f"expected {triplet['subject']} {triplet['relation']} {triplet['reference']}, found {found}")
            return False
        return True


def summarise_edits(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``n``, ``edit_accuracy`` and ``consistency`` over all results, and the same per edit type in ``types``."""

    def stats(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {
            "n": len(rows),
            "edit_accuracy": float(np.mean([r["edit_ok"] for r in rows])) if rows else 0.0,
            "consistency": float(np.mean([r["consistent"] for r in rows])) if rows else 0.0,
        }

    by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        by_type[r["type"]].append(r)
    order = [t for t in EDIT_TYPES if t in by_type] + sorted(t for t in by_type if t not in EDIT_TYPES)
    return {**stats(results), "types": {t: stats(by_type[t]) for t in order}}


def format_edit_table(summary: dict[str, Any]) -> str:
    """The summary as a fixed-width table: one row per edit type and an overall row."""
    lines = [f"{'type':<10}{'n':>6}{'edit acc':>10}{'consist':>10}"]
    rows = [*summary["types"].items(), ("overall", summary)]
    lines += [f"{t:<10}{s['n']:>6}{s['edit_accuracy']:>10.4f}{s['consistency']:>10.4f}" for t, s in rows]
    return "\n".join(lines)


__all__ = ["EDIT_TYPES", "POSITION_TOLERANCE", "EditScorer", "format_edit_table", "match_objects", "summarise_edits"]
