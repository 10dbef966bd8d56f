"""The GenEval-rule scorer: the rules in closed form, the shapes detector, and the acceptance bars."""

from __future__ import annotations

import json
import math
import random

import cv2
import numpy as np
import pytest
from PIL import Image

from blip3o.cli import main
from blip3o.eval.detector import ShapesDetector
from blip3o.eval.geneval import GenEvalScorer, oracle_generator, summarise, write_layout
from blip3o.eval.rules import evaluate, relative_position
from blip3o.eval.selfcheck import self_check
from blip3o.world import prompts as P
from blip3o.world.samples import scene_for
from blip3o.world.scene import Obj, render
from blip3o.world.spec import COLOR_NAMES, COLORS, SHAPES, TAGS


# ---- GenEval's rules -----------------------------------------------------------------------------------------
def test_relative_position_closed_form():
    b = (40.0, 40.0, 60.0, 60.0)
    assert relative_position((0, 40, 20, 60), b) == {"left of"}
    assert relative_position((80, 40, 100, 60), b) == {"right of"}
    assert relative_position((40, 0, 60, 20), b) == {"above"}
    assert relative_position((40, 80, 60, 100), b) == {"below"}
    # Diagonal: offset (-40, -40), margin 0.1 * 40 = 4 per axis -> revised (-36, -36) / 56.57 = -0.636 each.
    assert relative_position((0, 0, 20, 20), b) == {"left of", "above"}
    # Offset within the margin (|dx| = 3 < 0.1 * (20 + 20)) gives no relation at all.
    assert relative_position((43, 40, 63, 60), b) == set()
    # |dx| just past the margin but |dy| dominates: only "below".
    assert relative_position((45, 70, 65, 90), b) == {"below"}


def _color(colors):
    return lambda name, i: colors[name][i]


def test_rules_at_least_count_exclude_color_position():
    boxes = {"star": [(0, 0, 10, 10), (50, 0, 60, 10), (0, 50, 10, 60)], "circle": [(80, 40, 90, 50)]}
    colors = {"star": ["red", "red", "blue"], "circle": ["green"]}
    rec = P.counting("star", 2)
    assert evaluate(rec, boxes, _color(colors)).reason == "expected star<3, found 3"
    assert evaluate(P.counting("star", 3), boxes, _color(colors)).correct
    assert not evaluate(P.counting("star", 4), boxes, _color(colors)).correct
    assert evaluate(P.single_object("star"), boxes, _color(colors)).correct  # at least one
    assert evaluate(P.colors("star", "red"), boxes, _color(colors)).correct  # the most confident star is red
    verdict = evaluate(P.colors("circle", "red"), boxes, _color(colors))
    assert not verdict.correct and verdict.reason.startswith("expected red circle>=1, found 0 red; and 1 green")
    assert evaluate(P.position("star", "left of", "circle"), boxes, _color(colors)).correct
    assert not evaluate(P.position("circle", "left of", "star"), boxes, _color(colors)).correct
    verdict = evaluate(P.position("star", "left of", "hexagon"), boxes, _color(colors))
    assert verdict.reason == "expected hexagon>=1, found 0\nno target for star to be left of"


# ---- the detector ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [32, 64, 256])
def test_detector_names_every_class_and_colour(size):
    det = ShapesDetector()
    for k, shape in enumerate(SHAPES):
        for j, color in enumerate(COLOR_NAMES):
            cx, cy = 0.3 + 0.4 * ((k + j) % 2), 0.35 + 0.3 * (j % 3) / 2
            found = det.detect(np.asarray(render([Obj(shape, color, cx, cy, 0.3)], size)))
            assert [(d.label, d.color) for d in found] == [(shape, color)], (size, shape, color, found)
            x0, y0, x1, y1 = Obj(shape, color, cx, cy, 0.3).box(size)
            box = found[0].box
            assert max(abs(box[0] - x0), abs(box[1] - y0), abs(box[2] - x1), abs(box[3] - y1)) <= 1.5 + size / 64


def test_detector_sees_nothing_on_background_and_rejects_bad_input():
    assert ShapesDetector().detect(np.full((64, 64, 3), 128, np.uint8)) == []
    with pytest.raises(ValueError, match="uint8 RGB"):
        ShapesDetector().detect(np.zeros((64, 64), np.float32))


def _cv2_render(objects: list[Obj], size: int, rng: random.Random) -> Image.Image:
    """An independent renderer: OpenCV anti-aliased polygons with other proportions, small rotations,
    a slightly different grey and star/cross/hexagon variants our renderer never draws."""
    ss = 8
    img = np.full((size * ss, size * ss, 3), 120, np.uint8)
    for o in objects:
        c = np.array([o.cx, o.cy]) * size * ss
        r = o.s * size * ss / 2
        rot = math.radians(rng.uniform(-12, 12))
        if o.shape == "circle":
            cv2.circle(img, tuple(int(v) for v in c), int(r), COLORS[o.color], -1, cv2.LINE_AA)
            continue
        if o.shape == "square":
            pts = [(r * 0.9 * math.cos(a), r * 0.9 * math.sin(a)) for a in np.radians([45, 135, 225, 315])]
        elif o.shape == "triangle":
            pts = [(r * math.cos(a), r * math.sin(a)) for a in np.radians([-90, 30, 150])]
        elif o.shape == "hexagon":  # pointy-top, unlike the world's flat-top hexagon
            pts = [(r * math.cos(a), r * math.sin(a)) for a in np.radians(np.arange(-90, 270, 60))]
        elif o.shape == "star":  # the classic 0.38 inner ratio
            pts = [
                ((r if k % 2 == 0 else 0.38 * r) * math.cos(a), (r if k % 2 == 0 else 0.38 * r) * math.sin(a))
                for k, a in enumerate(np.radians(np.arange(-90, 270, 36)))
            ]
        else:  # a cross with thicker arms
            a, h = 0.2 * r * 2, r
            pts = [
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
        rotm = np.array([[math.cos(rot), -math.sin(rot)], [math.sin(rot), math.cos(rot)]])
        poly = (np.array(pts) @ rotm.T + c).astype(np.int32)
        cv2.fillPoly(img, [poly], COLORS[o.color], cv2.LINE_AA)
    return Image.fromarray(cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA))


@pytest.fixture(scope="module")
def heldout_prompts():
    _, held = P.split(0, 0.25)
    return P.eval_prompts(held, 180, seed=0)


def test_scorer_works_on_another_renderer(heldout_prompts):
    scorer = GenEvalScorer()
    rng = random.Random(0)
    rows = []
    for record in heldout_prompts:
        image = _cv2_render(scene_for(record, rng), 96, rng)
        rows.append(
            {
                "tag": record["tag"],
                "index": record["index"],
                "correct": scorer.score(image, record)["correct"],
            }
        )
    summary = summarise(rows)
    assert summary["overall"] >= 0.95, summary


# ---- the acceptance bars ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [64, 256])
def test_self_check_bars(size, heldout_prompts):
    checks = self_check(heldout_prompts, size)
    assert checks["clean"]["overall"] >= 0.98
    assert min(checks["clean"]["tags"].values()) >= 0.95, checks["clean"]
    assert set(checks["clean"]["tags"]) == set(TAGS)
    assert checks["mismatch"]["overall"] <= 0.25, checks["mismatch"]
    assert checks["degraded"]["overall"] >= 0.90, checks["degraded"]


def test_self_check_32px_clean(heldout_prompts):
    checks = self_check(heldout_prompts, 32)
    assert checks["clean"]["overall"] >= 0.90, checks["clean"]


def test_summary_overall_is_mean_of_tags():
    rows = [{"tag": "counting", "index": "0", "correct": True}] * 3 + [
        {"tag": "colors", "index": "1", "correct": False}
    ]
    s = summarise(rows)
    assert s["overall"] == 0.5 and s["correct_images"] == 0.75 and s["prompts_any_correct"] == 0.5


# ---- the command line ----------------------------------------------------------------------------------------------
def test_eval_geneval_cli_on_genevals_layout(tmp_path, heldout_prompts, capsys):
    records = heldout_prompts[::6]
    write_layout(records, 2, oracle_generator(64), tmp_path / "imgs", progress=False)
    # a wrong image: an empty canvas for the first prompt
    Image.new("RGB", (64, 64), (128, 128, 128)).save(tmp_path / "imgs" / records[0]["index"] / "samples" / "0001.png")
    assert main(["eval", "geneval", str(tmp_path / "imgs"), "--out", str(tmp_path / "res.jsonl")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(last)
    assert summary["images"] == 2 * len(records)
    assert summary["correct_images"] == pytest.approx(1 - 1 / (2 * len(records)))
    rows = [json.loads(x) for x in (tmp_path / "res.jsonl").read_text().splitlines()]
    assert {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"} <= set(rows[0])
    wrong = [r for r in rows if not r["correct"]]
    assert len(wrong) == 1 and wrong[0]["filename"].endswith("0001.png") and "found 0" in wrong[0]["reason"]
    assert json.loads((tmp_path / "res_summary.json").read_text()) == summary
    assert summary["unreadable"] == 0
    (tmp_path / "imgs" / records[1]["index"] / "samples" / "0000.png").write_bytes(b"broken")
    assert main(["eval", "geneval", str(tmp_path / "imgs"), "--out", str(tmp_path / "res2.jsonl")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["unreadable"] == 1 and summary["images"] == 2 * len(records) - 1


def test_eval_geneval_cli_errors(tmp_path, capsys):
    assert main(["eval", "geneval", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("size", [32, 64, 256])
def test_self_check_on_all_553_prompts(size):
    _, held = P.split(0, 0.25)
    checks = self_check(P.eval_prompts(held, 553, seed=0), size)
    assert checks["clean"]["overall"] >= (0.98 if size > 32 else 0.90)
    assert checks["mismatch"]["overall"] <= 0.25
    if size > 32:
        assert checks["degraded"]["overall"] >= 0.90 and min(checks["clean"]["tags"].values()) >= 0.95
