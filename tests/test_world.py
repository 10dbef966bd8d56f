"""The shapes world: vocabulary, prompts and split, oracle scenes, deterministic shards."""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from blip3o.eval.rules import evaluate, relative_position
from blip3o.world import prompts as P
from blip3o.world.samples import edit, questions, render_record, scene_for
from blip3o.world.scene import GAP, Obj, render
from blip3o.world.shards import ReadStats, make_world, read_shards, shard_paths
from blip3o.world.spec import COLORS, SHAPES, TAG_COUNTS, TAGS

GENEVAL_METADATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "geneval" / "evaluation_metadata.jsonl"


def test_vocabulary_is_genevals():
    assert SHAPES == ("circle", "square", "triangle", "star", "hexagon", "cross")
    assert COLORS == {
        "red": (255, 0, 0),
        "orange": (255, 165, 0),
        "yellow": (255, 255, 0),
        "green": (0, 128, 0),
        "blue": (0, 0, 255),
        "purple": (128, 0, 128),
        "pink": (255, 192, 203),
        "brown": (165, 42, 42),
        "black": (0, 0, 0),
        "white": (255, 255, 255),
    }
    official = [json.loads(line) for line in GENEVAL_METADATA.read_text().splitlines()]
    assert {t: sum(r["tag"] == t for r in official) for t in TAGS} == TAG_COUNTS


@pytest.mark.parametrize(
    ("record", "text"),
    [
        (P.counting("circle", 2), "a photo of two circles"),
        (P.counting("cross", 4), "a photo of four crosses"),
        (P.position("star", "right of", "cross"), "a photo of a star right of a cross"),
        (P.colors("square", "orange"), "a photo of an orange square"),
        (P.color_attr("hexagon", "red", "triangle", "blue"), "a photo of a red hexagon and a blue triangle"),
        (P.two_object("hexagon", "circle"), "a photo of a hexagon and a circle"),
        (P.single_object("star"), "a photo of a star"),
    ],
)
def test_prompt_templates(record, text):
    assert record["prompt"] == text


def test_counting_and_position_schema():
    assert P.counting("star", 3)["exclude"] == [{"class": "star", "count": 4}]
    assert P.position("star", "above", "circle")["include"] == [
        {"class": "circle", "count": 1},
        {"class": "star", "count": 1, "position": ["above", 0]},
    ]


def test_split_never_shares_a_prompt_or_a_meaning():
    train, held = P.split(seed=3, heldout_fraction=0.25)
    for tag in TAGS:
        assert held[tag], tag
        assert {r["prompt"] for r in train[tag]}.isdisjoint({r["prompt"] for r in held[tag]})
        assert {P.meaning(r) for r in train[tag]}.isdisjoint({P.meaning(r) for r in held[tag]})
        assert len(train[tag]) + len(held[tag]) == len(P.prompt_pool(tag))
    # "A left of B" and "B right of A" share a meaning, so they land on the same side.
    assert P.meaning(P.position("star", "left of", "circle")) == P.meaning(P.position("circle", "right of", "star"))


def test_eval_prompts_follow_geneval_proportions():
    _, held = P.split(0, 0.25)
    prompts = P.eval_prompts(held, 553, seed=0)
    assert {t: sum(p["tag"] == t for p in prompts) for t in TAGS} == TAG_COUNTS
    assert [p["index"] for p in prompts] == [f"{i:05d}" for i in range(553)]
    small = P.eval_prompts(held, 60, seed=0)
    assert sum(P.proportional(60, TAG_COUNTS).values()) == 60 == len(small)


@pytest.mark.parametrize("tag", TAGS)
def test_oracle_scene_satisfies_its_record(tag):
    rng = random.Random(0)
    for record in rng.sample(P.prompt_pool(tag), min(20, len(P.prompt_pool(tag)))):
        objects = scene_for(record, rng)
        by_class: dict[str, list] = {}
        for o in objects:
            by_class.setdefault(o.shape, []).append(o)
        verdict = evaluate(
            record,
            {k: [o.unit_box for o in v] for k, v in by_class.items()},
            lambda name, i, by_class=by_class: by_class[name][i].color,
        )
        assert verdict.correct, (record["prompt"], verdict.reason)
        boxes = [o.unit_box for o in objects]
        for i, a in enumerate(boxes):
            assert a[0] >= 0 and a[2] <= 1 and a[1] >= 0 and a[3] <= 1
            for b in boxes[i + 1 :]:  # objects never touch
                assert (
                    a[2] + GAP <= b[0] + 1e-9
                    or b[2] + GAP <= a[0] + 1e-9
                    or a[3] + GAP <= b[1] + 1e-9
                    or b[3] + GAP <= a[1] + 1e-9
                )


def test_render_is_deterministic_and_draws_the_colour():
    objects = [Obj("square", "red", 0.5, 0.5, 0.3)]
    a, b = render(objects, 64), render(objects, 64)
    assert a.tobytes() == b.tobytes()
    px = np.asarray(a)
    assert tuple(px[32, 32]) == (255, 0, 0)
    assert tuple(px[2, 2]) == (128, 128, 128)
    with pytest.raises(ValueError, match="32, 512"):
        render(objects, 16)
    with pytest.raises(ValueError, match="allowed"):
        Obj("blob", "red", 0.5, 0.5, 0.3)


def test_questions_are_answered_by_the_scene():
    rng = random.Random(1)
    objects = [Obj("circle", "red", 0.2, 0.5, 0.25), Obj("star", "blue", 0.8, 0.5, 0.25)]
    qa = {q["question"]: q for q in questions(objects, rng)}
    assert {q["type"] for q in qa.values()} == {"existence", "count", "color", "yesno", "position"}
    for question, q in qa.items():
        # The answer restates the subject, then the verdict right after it (no token in between).
        assert q["answer"].endswith(" " + q["verdict"]) and ":" not in q["answer"]
        if question.startswith("What colour is the "):
            shape = question.removeprefix("What colour is the ").rstrip("?")
            assert q["answer"] == f"{shape} " + {"circle": "red", "star": "blue"}[shape]
        if question.startswith("Is the circle left of"):
            assert q["answer"] == "circle left of star yes"
        if question.startswith("Is the circle right of"):
            assert q["answer"] == "circle right of star no"
        if q["type"] == "yesno":  # the shape, its true colour, the asked colour, then whether they agree
            shape, asked = question.removeprefix("Is the ").rstrip("?").split()
            true = {"circle": "red", "star": "blue"}[shape]
            assert q["answer"] == f"{shape} {true} {asked} " + ("yes" if asked == true else "no")
        if question.startswith("Is there a "):
            shape = question.removeprefix("Is there a ").split()[0]
            assert q["answer"] == f"{shape} " + ("yes" if shape in ("circle", "star") else "no")


@pytest.mark.parametrize("seed", range(8))
def test_edits_change_only_what_they_say(seed):
    rng = random.Random(seed)
    objects = scene_for(P.color_attr("circle", "red", "star", "blue"), rng)
    triplet = edit(objects, rng)
    assert triplet is not None
    after = triplet["objects"]
    kind = triplet["type"]
    if kind == "recolor":
        changed = [(a, b) for a, b in zip(objects, after, strict=True) if a != b]
        assert len(changed) == 1 and changed[0][1].color == triplet["color"]
        assert triplet["instruction"] == f"make the {changed[0][0].color} {changed[0][0].shape} {triplet['color']}"
    elif kind == "add":
        assert after[:-1] == objects and triplet["instruction"].startswith("add ")
    elif kind == "remove":
        assert len(after) == len(objects) - 1 and all(o in objects for o in after)
    else:
        moved = [b for a, b in zip(objects, after, strict=True) if a != b]
        ref = next(o for o in after if f"{o.color} {o.shape}" == triplet["reference"])
        assert len(moved) == 1 and triplet["relation"] in relative_position(moved[0].unit_box, ref.unit_box)


def _digest(root):
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes(tmp_path, tiny_cfg):
    cfg = replace(tiny_cfg.world, n_train=24, n_heldout=8)
    make_world(cfg, tmp_path / "a", progress=False)
    make_world(cfg, tmp_path / "b", progress=False)
    make_world(replace(cfg, seed=1), tmp_path / "c", progress=False)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_world_directory(tiny_world, tiny_cfg):
    cfg = tiny_cfg.world
    meta = json.loads((tiny_world / "world.json").read_text())
    assert meta["samples"] == {"train": cfg.n_train, "heldout": cfg.n_heldout}
    prompts = [json.loads(x) for x in (tiny_world / "prompts.jsonl").read_text().splitlines()]
    train_prompts = {json.loads(x)["prompt"] for x in (tiny_world / "train_prompts.jsonl").read_text().splitlines()}
    assert len(prompts) == cfg.n_prompts and not train_prompts & {p["prompt"] for p in prompts}
    for p in prompts:
        assert set(p) <= {"tag", "include", "exclude", "prompt", "index"} and {
            "tag",
            "include",
            "prompt",
        } <= set(p)
    assert set(meta["words"]["train"]).isdisjoint(meta["words"]["heldout"])

    train_words = set(meta["words"]["train"])
    stats = ReadStats()
    samples = list(read_shards(shard_paths(tiny_world, "train"), stats))
    assert stats.samples == cfg.n_train == len(samples) and stats.bad == 0
    kinds = {s["meta"]["kind"] for s in samples}
    assert kinds == {"scene", "text"}
    for s in samples:
        meta = s["meta"]
        assert s["image"].size == ((cfg.size,) * 2 if meta["kind"] == "scene" else (cfg.text_size,) * 2)
        if meta["kind"] == "scene":
            assert meta["prompt"] not in {p["prompt"] for p in prompts}
            assert meta["metadata"]["prompt"] == meta["prompt"]
            assert {"class", "color", "box"} <= set(meta["objects"][0])
            assert all(q["answer"] for q in meta["qa"])
            if "edit" in meta:
                assert s["edit_image"].size == s["image"].size
        else:
            assert meta["prompt"] == f'a sign that says "{meta["text"]}"'
            assert meta["text"] in train_words
    assert any("edit" in s["meta"] for s in samples)


def test_shards_read_with_webdataset(tiny_world):
    ds = wds.WebDataset([str(p) for p in shard_paths(tiny_world, "heldout")], shardshuffle=False).decode("pil")
    items = list(ds)
    assert len(items) == 16
    first = items[0]
    assert isinstance(first["png"], Image.Image) and isinstance(first["json"], dict)
    assert first["txt"] == first["json"]["prompt"]


def test_bad_samples_are_skipped_and_counted(tmp_path, tiny_world):
    src = shard_paths(tiny_world, "heldout")[0]
    bad = tmp_path / "shard-00000.tar"
    with tarfile.open(src) as tin, tarfile.open(bad, "w") as tout:
        for i, member in enumerate(tin):
            data = tin.extractfile(member).read()
            if member.name.endswith(".png") and i < 10:
                data = b"not a png"
            member.size = len(data)
            tout.addfile(member, io.BytesIO(data))
    stats = ReadStats()
    good = list(read_shards([bad], stats))
    assert stats.bad >= 1 and stats.bad + stats.samples == 16 == stats.bad + len(good)
    assert "skipped bad sample" in stats.errors[0]


def test_render_record_any_size():
    image, objects = render_record(P.counting("triangle", 3), 256, random.Random(0))
    assert image.size == (256, 256) and [o.shape for o in objects] == ["triangle"] * 3


def test_shapes_named_reads_singular_and_plural_nouns():
    assert P.shapes_named("a photo of two stars and a red circle.") == {"star", "circle"}
    assert P.shapes_named("A blue cross at the top, on a grey background.") == {"cross"}
    assert P.shapes_named("An empty grey background.") == set()


@pytest.mark.parametrize("seed", range(20))
def test_shape_swapped_changes_exactly_one_class(seed):
    rng = random.Random(seed)
    text = rng.choice(
        [
            "a photo of three crosses",
            "a photo of a red circle and a blue star",
            "An orange square at the bottom and a red cross at the top, on a grey background.",
        ]
    )
    swapped = P.shape_swapped(text, rng)
    old, new = text.split(" "), swapped.split(" ")
    changed = [(a, b) for a, b in zip(old, new, strict=True) if a != b]
    assert len(changed) == 1
    a, b = changed[0]
    assert P.shapes_named(a) and P.shapes_named(b) and P.shapes_named(a) != P.shapes_named(b)
    assert not P.shapes_named(b) & P.shapes_named(text)  # a class the text did not name
    plurals = {P.plural(s) for s in SHAPES}
    assert (a.rstrip(",.") in plurals) == (b.rstrip(",.") in plurals)
    assert P.shape_swapped("An empty grey background.", rng) == "An empty grey background."


def test_caption_objects_reads_back_every_object_and_its_place():
    from blip3o.world.samples import caption, caption_objects, region_cell, scene_sample

    rng = random.Random(3)
    records = [r for tag in TAGS for r in P.prompt_pool(tag)]
    checked = 0
    for i in range(200):
        sample = scene_sample(f"k{i}", rng.choice(records), 64, rng)
        objects = [Obj(o["class"], o["color"], o["cx"], o["cy"], o["s"]) for o in sample.meta["objects"]]
        assert caption_objects(sample.meta["caption"]) == [(o.color, o.shape, *region_cell(o)) for o in objects]
        assert caption(objects) == sample.meta["caption"]
        checked += len(objects)
    assert checked > 200


def test_split_is_the_same_in_every_process():
    """The prompt split (and so every scene after it) must not depend on string hashing (PYTHONHASHSEED)."""
    import os
    import subprocess
    import sys

    code = (
        "import json; from blip3o.world import prompts as P; "
        "train, held = P.split(0, 0.25); print(json.dumps({t: [r['prompt'] for r in held[t]] for t in held}))"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": h},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for h in ("0", "1", "2", "3")
    }
    assert len(outs) == 1
