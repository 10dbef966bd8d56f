"""The edit scorer: rendered world triplets pass, unedited or disturbed images fail, and the summary's means."""

from __future__ import annotations

import math
import random
from functools import cache

import numpy as np
import pytest

from blip3o.eval.detector import Detection
from blip3o.eval.edit import (
    EDIT_TYPES,
    POSITION_TOLERANCE,
    EditScorer,
    format_edit_table,
    match_objects,
    summarise_edits,
)
from blip3o.world import prompts as P
from blip3o.world.prompts import INVERSE
from blip3o.world.samples import Sample, scene_sample
from blip3o.world.scene import Obj, place, relation_holds, render, scene_to_json
from blip3o.world.spec import COLOR_NAMES

SIZES = (64, 128)
PER_TYPE = 2
SCORER = EditScorer()


@cache
def triplets(size: int) -> dict[str, list[Sample]]:
    """``PER_TYPE`` scene samples with an edit triplet of each type, from the first seeds that give them."""
    records = [r for tag in ("two_object", "counting", "color_attr", "position") for r in P.prompt_pool(tag)]
    found: dict[str, list[Sample]] = {t: [] for t in EDIT_TYPES}
    for i in range(1000):
        rng = random.Random(f"edit-test-{i}")
        sample = scene_sample(f"edit-{i}", rng.choice(records), size, rng)
        kind = sample.meta.get("edit", {}).get("type")
        if kind is not None and len(found[kind]) < PER_TYPE:
            found[kind].append(sample)
        if all(len(v) == PER_TYPE for v in found.values()):
            return found
    raise AssertionError(f"seeds gave too few triplets: { {k: len(v) for k, v in found.items()} }")


def _objects(objects_json: list[dict]) -> list[Obj]:
    return [Obj.from_json(o) for o in objects_json]


def _untouched(meta: dict) -> list[Obj]:
    source = _objects(meta["objects"])
    if meta["edit"]["type"] == "add":
        return source
    return [o for o in source if f"{o.color} {o.shape}" != meta["edit"]["subject"]]


# ---- real triplets -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", EDIT_TYPES)
def test_target_image_scores_edit_ok_and_consistent(size, kind):
    for sample in triplets(size)[kind]:
        result = SCORER.score(sample.edit_image, sample.meta)
        n_source = len(sample.meta["objects"])
        assert result["type"] == kind and result["instruction"] == sample.meta["edit"]["instruction"]
        assert result["edit_ok"] and result["consistent"], result["reason"]
        assert result["reason"] == ""
        assert result["untouched"] == (n_source if kind == "add" else n_source - 1)
        assert result["kept"] == result["untouched"]
        assert result["extra"] == 0
        # Every target object is detected once with its class and colour.
        target = sorted((o["class"], o["color"]) for o in sample.meta["edit"]["objects"])
        assert sorted((d["class"], d["color"]) for d in result["detections"]) == target


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", ["recolor", "add", "remove"])
def test_source_image_fails_the_edit_but_is_consistent(size, kind):
    for sample in triplets(size)[kind]:
        edit = sample.meta["edit"]
        result = SCORER.score(sample.image, sample.meta)
        assert not result["edit_ok"]
        assert result["consistent"] and result["kept"] == result["untouched"]
        shape = edit["subject"].split(" ")[1]
        expected = {
            "recolor": f"no {edit.get('color')} {shape} found\n{edit['subject']} still present",
            "add": f"added {edit['subject']} not found",
            "remove": f"removed {edit['subject']} still present",
        }[kind]
        assert result["reason"] == expected


def test_source_image_of_a_move_is_consistent():
    for sample in triplets(64)["move"]:
        result = SCORER.score(sample.image, sample.meta)
        assert result["consistent"] and result["kept"] == result["untouched"] == len(sample.meta["objects"]) - 1


def _disturbed_scenes(size: int, how: str):
    """(sample, image, changed object) with one untouched object of the target recoloured or moved far."""
    rng = random.Random(f"disturb-{how}-{size}")
    for kind in EDIT_TYPES:
        for sample in triplets(size)[kind]:
            target = _objects(sample.meta["edit"]["objects"])
            victim = _untouched(sample.meta)[0]
            k = target.index(victim)
            others = target[:k] + target[k + 1 :]
            if how == "recolor":
                taken = {(o.color, o.shape) for o in target}
                color = next(c for c in COLOR_NAMES if (c, victim.shape) not in taken)
                new = Obj(victim.shape, color, victim.cx, victim.cy, victim.s)
            else:
                new = place(
                    rng,
                    victim.shape,
                    victim.color,
                    others,
                    extent=(victim.s, victim.s),
                    accept=lambda o, v=victim: math.hypot(o.cx - v.cx, o.cy - v.cy) > 3 * POSITION_TOLERANCE,
                )
                if new is None:
                    continue
            yield sample, render([*others, new], size), victim


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("how", ["recolor", "move"])
def test_disturbed_untouched_object_is_inconsistent(size, how):
    seen = set()
    for sample, image, victim in _disturbed_scenes(size, how):
        result = SCORER.score(image, sample.meta)
        name = f"{victim.color} {victim.shape}"
        assert not result["consistent"]
        assert result["kept"] == result["untouched"] - 1
        assert (
            result["reason"]
            .splitlines()[0]
            .startswith(f"untouched {name} " + ("not found" if how == "recolor" else "moved by"))
        )
        if f"the {name}" not in sample.meta["edit"]["instruction"]:  # the edit itself is intact
            assert result["edit_ok"], result["reason"]
        seen.add(sample.meta["edit"]["type"])
    assert len(seen) >= 3


@pytest.mark.parametrize("size", SIZES)
def test_move_to_the_opposite_side_fails_but_stays_consistent(size):
    rng = random.Random(f"opposite-{size}")
    scored = 0
    for sample in triplets(size)["move"]:
        edit = sample.meta["edit"]
        target = _objects(edit["objects"])
        subject = next(o for o in target if f"{o.color} {o.shape}" == edit["subject"])
        ref = next(o for o in target if f"{o.color} {o.shape}" == edit["reference"])
        others = [o for o in target if o is not subject]
        wrong = place(
            rng,
            subject.shape,
            subject.color,
            others,
            extent=(subject.s, subject.s),
            accept=lambda o, ref=ref, rel=INVERSE[edit["relation"]]: relation_holds(o, ref, rel),
        )
        if wrong is None:
            continue
        result = SCORER.score(render([*others, wrong], size), sample.meta)
        assert not result["edit_ok"] and result["consistent"]
        assert result["reason"].startswith(f"expected {edit['subject']} {edit['relation']} {edit['reference']}, found")
        scored += 1
    assert scored >= 1


# ---- matching and tolerance, with a stub detector ----------------------------------------------------------
class StubDetector:
    classes = ("circle", "square")

    def __init__(self, detections: list[Detection]) -> None:
        self.detections = detections

    def detect(self, image: np.ndarray) -> list[Detection]:
        return list(self.detections)


def _det(shape: str, color: str, cx: float, cy: float, half: float = 10.0, score: float = 0.9) -> Detection:
    return Detection(label=shape, score=score, box=(cx - half, cy - half, cx + half, cy + half), color=color)


def _remove_meta() -> dict:
    source = [Obj("circle", "red", 0.5, 0.5, 0.3), Obj("square", "blue", 0.2, 0.2, 0.25)]
    return {
        "objects": scene_to_json(source, 100),
        "edit": {
            "type": "remove",
            "instruction": "remove the blue square",
            "subject": "blue square",
            "objects": scene_to_json(source[:1], 100),
        },
    }


@pytest.mark.parametrize(("shift", "consistent"), [(0.0, True), (0.09, True), (0.11, False), (0.3, False)])
def test_position_tolerance_is_a_fraction_of_the_image_side(shift, consistent):
    assert POSITION_TOLERANCE == 0.1
    image = np.zeros((100, 100, 3), np.uint8)
    scorer = EditScorer(detector=StubDetector([_det("circle", "red", 50 + 100 * shift, 50)]))
    result = scorer.score(image, _remove_meta())
    assert result["edit_ok"] and result["consistent"] is consistent
    assert result["kept"] == int(consistent) and result["untouched"] == 1
    assert result["detections"][0]["cx"] == pytest.approx(0.5 + shift)


def test_threshold_and_wrong_colour_detections_are_not_matched():
    image = np.zeros((100, 100, 3), np.uint8)
    dets = [_det("circle", "red", 50, 50, score=0.4), _det("circle", "pink", 50, 50), _det("square", "blue", 20, 20)]
    result = EditScorer(detector=StubDetector(dets)).score(image, _remove_meta())
    assert not result["edit_ok"] and not result["consistent"]
    assert result["reason"] == "untouched red circle not found\nremoved blue square still present"
    assert [d["color"] for d in result["detections"]] == ["pink", "blue"]  # the 0.4 detection is dropped
    assert result["extra"] == 2


def test_recolor_needs_the_old_colour_gone():
    source = [Obj("circle", "red", 0.3, 0.5, 0.3), Obj("square", "green", 0.8, 0.2, 0.2)]
    target = [Obj("circle", "blue", 0.3, 0.5, 0.3), source[1]]
    meta = {
        "objects": scene_to_json(source, 100),
        "edit": {
            "type": "recolor",
            "instruction": "make the red circle blue",
            "subject": "red circle",
            "color": "blue",
            "objects": scene_to_json(target, 100),
        },
    }
    image = np.zeros((100, 100, 3), np.uint8)
    square = _det("square", "green", 80, 20)
    cases = [
        ([_det("circle", "blue", 30, 50), square], True, ""),
        ([_det("circle", "blue", 30, 50), _det("circle", "red", 60, 70), square], False, "red circle still present"),
        ([_det("square", "blue", 30, 50), square], False, "no blue circle found"),
    ]
    for dets, ok, reason in cases:
        result = EditScorer(detector=StubDetector(dets)).score(image, meta)
        assert (result["edit_ok"], result["consistent"], result["reason"]) == (ok, True, reason)


def test_move_uses_genevals_relation_rule():
    source = [Obj("circle", "red", 0.2, 0.5, 0.2), Obj("square", "green", 0.5, 0.5, 0.2)]
    meta = {
        "objects": scene_to_json(source, 100),
        "edit": {
            "type": "move",
            "instruction": "move the red circle right of the green square",
            "subject": "red circle",
            "relation": "right of",
            "reference": "green square",
            "objects": scene_to_json([Obj("circle", "red", 0.8, 0.5, 0.2), source[1]], 100),
        },
    }
    image = np.zeros((100, 100, 3), np.uint8)
    square = _det("square", "green", 50, 50)
    # Offset dx = 30 px, margin 0.1 * (20 + 20) = 4 px: right of. dx = 3 px lies inside the margin: no relation.
    for x, ok in [(80, True), (53, False), (20, False)]:
        result = EditScorer(detector=StubDetector([_det("circle", "red", x, 50), square])).score(image, meta)
        assert result["edit_ok"] is ok and result["consistent"]
    assert result["reason"] == "expected red circle right of green square, found left of"
    result = EditScorer(detector=StubDetector([_det("circle", "red", 80, 50)])).score(image, meta)
    assert not result["edit_ok"] and result["reason"] == (
        "untouched green square not found\nreference green square not found"
    )


def test_match_objects_greedy_nearest_one_to_one():
    expected = [Obj("circle", "red", 0.2, 0.5, 0.2), Obj("circle", "red", 0.8, 0.5, 0.2)]
    dets = [_det("circle", "red", 75, 50), _det("circle", "blue", 20, 50), _det("circle", "red", 30, 50)]
    matched = match_objects(expected, dets, 100, 100)
    assert {i: j for i, (j, _) in matched.items()} == {0: 2, 1: 0}
    assert [round(d, 6) for _, d in sorted(matched.values())] == [0.05, 0.1]
    # One detection for two objects: the nearer object takes it, the other stays unmatched.
    assert match_objects(expected, dets[:1], 100, 100) == {1: (0, pytest.approx(0.05))}


def test_bad_meta_raises():
    meta = _remove_meta()
    with pytest.raises(ValueError, match="meta needs"):
        SCORER.score(np.zeros((64, 64, 3), np.uint8), {"objects": meta["objects"]})
    meta["edit"]["type"] = "rotate"
    with pytest.raises(ValueError, match="unknown edit type 'rotate'"):
        SCORER.score(np.zeros((64, 64, 3), np.uint8), meta)


# ---- summary ------------------------------------------------------------------------------------------------
def test_summarise_edits_means_by_hand():
    rows = [
        ("recolor", True, True),
        ("recolor", False, True),
        ("add", True, False),
        ("remove", False, False),
        ("move", True, True),
        ("move", True, False),
    ]
    results = [{"type": t, "edit_ok": e, "consistent": c} for t, e, c in rows]
    summary = summarise_edits(results)
    assert summary["n"] == 6
    assert summary["edit_accuracy"] == pytest.approx(4 / 6)
    assert summary["consistency"] == pytest.approx(3 / 6)
    assert list(summary["types"]) == ["recolor", "add", "remove", "move"]
    assert summary["types"]["recolor"] == {"n": 2, "edit_accuracy": 0.5, "consistency": 1.0}
    assert summary["types"]["add"] == {"n": 1, "edit_accuracy": 1.0, "consistency": 0.0}
    assert summary["types"]["remove"] == {"n": 1, "edit_accuracy": 0.0, "consistency": 0.0}
    assert summary["types"]["move"] == {"n": 2, "edit_accuracy": 1.0, "consistency": 0.5}
    assert summarise_edits([]) == {"n": 0, "edit_accuracy": 0.0, "consistency": 0.0, "types": {}}

    table = format_edit_table(summary).splitlines()
    assert len(table) == 6
    assert table[1].split() == ["recolor", "2", "0.5000", "1.0000"]
    assert table[-1].split() == ["overall", "6", "0.6667", "0.5000"]
