"""Samples of the shapes world: the oracle scene for a prompt, captions, questions, edits, text scenes.

Each sample is drawn from its own ``random.Random`` seeded by (world seed, split, index), so any
sample can be rebuilt alone, and the same seed always gives the same bytes.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from blip3o.world.prompts import INVERSE, Record, sample_record
from blip3o.world.scene import Obj, layout, place, relation_holds, render, scene_to_json
from blip3o.world.spec import COLOR_NAMES, NUMBER_WORDS, RELATIONS, SHAPES, article, plural
from blip3o.world.text import TEXT_COLOURS, render_text, text_prompt


@dataclass
class Sample:
    """One world sample: its key, image, JSON metadata and, for scenes with an edit, the edited image."""

    key: str
    image: Image.Image
    meta: dict[str, Any]
    edit_image: Image.Image | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def scene_for(record: Record, rng: random.Random) -> list[Obj]:
    """The oracle: a scene that satisfies a GenEval-schema record exactly (no distractors)."""
    specs: list[tuple[str, str]] = []
    first: list[int] = []
    for clause in record["include"]:
        first.append(len(specs))
        for _ in range(clause["count"]):
            specs.append((clause["class"], clause.get("color") or rng.choice(COLOR_NAMES)))
    relation = None
    for k, clause in enumerate(record["include"]):
        if "position" in clause:
            rel, target = clause["position"]
            relation = (first[k], rel, first[target])
    return layout(rng, specs, relation)


def render_record(record: Record, size: int, rng: random.Random) -> tuple[Image.Image, list[Obj]]:
    """Draw a ground-truth image for any record of the world's classes."""
    objects = scene_for(record, rng)
    return render(objects, size), objects


def _name(obj: Obj) -> str:
    return f"{obj.color} {obj.shape}"


def _region(obj: Obj) -> str:
    col = "left" if obj.cx < 1 / 3 else "right" if obj.cx > 2 / 3 else "centre"
    row = "top" if obj.cy < 1 / 3 else "bottom" if obj.cy > 2 / 3 else "middle"
    if row == "middle":
        return "centre" if col == "centre" else f"{col}"
    return row if col == "centre" else f"{row} {col}"


def region_cell(obj: Obj) -> tuple[int, int]:
    """(row, column) of the 3×3 cell holding an object's centre: what :func:`caption` calls its place."""
    return min(int(obj.cy * 3), 2), min(int(obj.cx * 3), 2)


_PLACES = {
    "top left": (0, 0),
    "top": (0, 1),
    "top right": (0, 2),
    "left": (1, 0),
    "centre": (1, 1),
    "right": (1, 2),
    "bottom left": (2, 0),
    "bottom": (2, 1),
    "bottom right": (2, 2),
}
_GROUNDED = re.compile(r"\b(?:an?) (\w+) (\w+) at the ((?:top|bottom) (?:left|right)|top|bottom|left|right|centre)\b")


def caption_objects(text: str) -> list[tuple[str, str, int, int]]:
    """The (colour, shape, row, column) of every object a :func:`caption` places, read back from its text;
    row and column index the 3×3 grid of places ("top left" = (0, 0), "centre" = (1, 1))."""
    return [(c, s, *_PLACES[place]) for c, s, place in _GROUNDED.findall(text.lower()) if s in SHAPES]


def caption(objects: Sequence[Obj]) -> str:
    """A detailed caption listing every object with its colour and place."""
    if not objects:
        return "An empty grey background."
    parts = [f"{article(o.color)} {o.color} {o.shape} at the {_region(o)}" for o in objects]
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return body[0].upper() + body[1:] + ", on a grey background."


def _unique(objects: Sequence[Obj], key) -> list[Obj]:
    values = [key(o) for o in objects]
    return [o for o in objects if values.count(key(o)) == 1]


def questions(objects: Sequence[Obj], rng: random.Random) -> list[dict[str, str]]:
    """Unambiguous question/answer pairs of five types: existence, count, color, yesno, position.

    An answer first restates what the question is about, then gives the verdict with nothing in
    between (``square yes``, ``circles two``, ``circle red``): the token that predicts the verdict is
    then the asked word itself, so deciding needs one look from that word at the image. With a bare
    ``yes`` the answer position must first fetch the asked word from the question and then match it
    against the image, two steps that a backbone trained from scratch does not learn together (binary
    answers stay at chance); ``square: yes`` fails the same way, the colon standing between the word
    and the verdict.

    A yes/no answer states the object's true colour, then the asked one, then whether they agree:
    "Is the circle blue?" → ``circle red blue no``. Seeing (``circle red`` is what "What colour is the
    circle?" is answered with) and comparing become separate predictions, and the comparison is of the
    two tokens right before the verdict. With the asked colour alone restated (``blue circle no``) the
    verdict had to look up the colour and compare at once, and stayed at chance. A position answer
    restates the asked relation (``star left of circle no``): stating the true one instead (``star
    right of circle no``) left its verdict two tokens after the word it compares, and answers fell
    below chance. ``verdict`` holds the bare answer.
    """
    qa: list[dict[str, str]] = []

    def ask(kind: str, question: str, subject: str, verdict: str) -> None:
        qa.append({"type": kind, "question": question, "answer": f"{subject} {verdict}", "verdict": verdict})

    present = sorted({o.shape for o in objects})
    absent = [s for s in SHAPES if s not in present]
    if present:
        s = rng.choice(present)
        ask("existence", f"Is there {article(s)} {s} in the image?", s, "yes")
        n = sum(o.shape == s for o in objects)
        ask("count", f"How many {plural(s)} are there?", plural(s), NUMBER_WORDS[n])
    if absent:
        s = rng.choice(absent)
        ask("existence", f"Is there {article(s)} {s} in the image?", s, "no")
    single = _unique(objects, lambda o: o.shape)
    if single:
        o = rng.choice(single)
        ask("color", f"What colour is the {o.shape}?", o.shape, o.color)
        asked = o.color if rng.random() < 0.5 else rng.choice([c for c in COLOR_NAMES if c != o.color])
        ask("yesno", f"Is the {o.shape} {asked}?", f"{o.shape} {o.color} {asked}", "yes" if asked == o.color else "no")
    if len(single) >= 2:
        a, b = rng.sample(single, 2)
        holds = [r for r in RELATIONS if relation_holds(a, b, r, slack=0.6)]
        if holds:
            rel = rng.choice(holds)
            asked, verdict = (rel, "yes") if rng.random() < 0.5 else (INVERSE[rel], "no")
            ask("position", f"Is the {a.shape} {asked} the {b.shape}?", f"{a.shape} {asked} {b.shape}", verdict)
    return qa


def edit(objects: Sequence[Obj], rng: random.Random) -> dict[str, Any] | None:
    """One edit triplet's instruction and target scene (recolour, add, remove or move), if one applies."""
    unique = _unique(objects, lambda o: (o.color, o.shape))
    taken = {(o.color, o.shape) for o in objects}
    kinds = ["recolor", "add", "remove", "move"]
    rng.shuffle(kinds)
    for kind in kinds:
        if kind == "recolor" and unique:
            o = rng.choice(unique)
            new = rng.choice([c for c in COLOR_NAMES if (c, o.shape) not in taken])
            target = [Obj(o.shape, new, o.cx, o.cy, o.s) if x is o else x for x in objects]
            return {
                "type": kind,
                "instruction": f"make the {_name(o)} {new}",
                "subject": _name(o),
                "color": new,
                "objects": target,
            }
        if kind == "add" and len(objects) < 4:
            shape, color = rng.choice([(s, c) for s in SHAPES for c in COLOR_NAMES if (c, s) not in taken])
            new_obj = place(rng, shape, color, objects)
            if new_obj is not None:
                return {
                    "type": kind,
                    "instruction": f"add {article(color)} {color} {shape}",
                    "subject": f"{color} {shape}",
                    "objects": [*objects, new_obj],
                }
        if kind == "remove" and len(objects) >= 2 and unique:
            o = rng.choice(unique)
            return {
                "type": kind,
                "instruction": f"remove the {_name(o)}",
                "subject": _name(o),
                "objects": [x for x in objects if x is not o],
            }
        if kind == "move" and len(unique) >= 2:
            o, ref = rng.sample(unique, 2)
            rel = rng.choice([r for r in RELATIONS if not relation_holds(o, ref, r, slack=0.5)] or RELATIONS)
            others = [x for x in objects if x is not o]
            new_obj = place(
                rng,
                o.shape,
                o.color,
                others,
                extent=(o.s, o.s),
                accept=lambda x, ref=ref, rel=rel: relation_holds(x, ref, rel),
            )
            if new_obj is not None:
                return {
                    "type": kind,
                    "instruction": f"move the {_name(o)} {rel} the {_name(ref)}",
                    "subject": _name(o),
                    "relation": rel,
                    "reference": _name(ref),
                    "objects": [new_obj if x is o else x for x in objects],
                }
    return None


def scene_sample(key: str, record: Record, size: int, rng: random.Random) -> Sample:
    """A scene sample for a prompt record: image, objects, caption, questions and an edit triplet."""
    image, objects = render_record(record, size, rng)
    record = {k: v for k, v in record.items() if k != "index"}
    meta: dict[str, Any] = {
        "kind": "scene",
        "size": size,
        "prompt": record["prompt"],
        "metadata": record,
        "objects": scene_to_json(objects, size),
        "caption": caption(objects),
        "qa": questions(objects, rng),
    }
    triplet = edit(objects, rng)
    edit_image = None
    if triplet is not None:
        edit_image = render(triplet["objects"], size)
        meta["edit"] = {**triplet, "objects": scene_to_json(triplet["objects"], size)}
    return Sample(key=key, image=image, meta=meta, edit_image=edit_image)


def text_sample(key: str, words: Sequence[str], size: int, rng: random.Random) -> Sample:
    """A text scene: a short word drawn large."""
    word = rng.choice(list(words))
    color = rng.choice(list(TEXT_COLOURS))
    meta = {
        "kind": "text",
        "size": size,
        "text": word,
        "color": color,
        "prompt": text_prompt(word),
        "caption": f'The word "{word}" written in {color} on a grey background.',
    }
    return Sample(key=key, image=render_text(word, size, color=color), meta=meta)


def make_sample(
    split: str,
    index: int,
    *,
    seed: int,
    pools: dict[str, list[Record]],
    words: Sequence[str],
    size: int,
    text_size: int,
    text_fraction: float,
) -> Sample:
    """Sample ``index`` of a split: a text scene with probability ``text_fraction``, else a prompt's scene."""
    rng = random.Random(f"{seed}-{split}-{index}")
    key = f"{split}-{index:07d}"
    if words and rng.random() < text_fraction:
        return text_sample(key, words, text_size, rng)
    return scene_sample(key, sample_record(rng, pools), size, rng)
