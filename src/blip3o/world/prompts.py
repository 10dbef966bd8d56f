"""GenEval-schema prompts of the shapes world: the six tags, their templates, and the held-out split.

Every prompt is a record in GenEval's metadata schema (``tag``, ``include``, optional ``exclude``,
``prompt``, and ``index`` once numbered), written with GenEval's templates:

==============  ==========================================  ==========================================
tag             template                                    clauses
==============  ==========================================  ==========================================
single_object   a photo of a {A}                            A×1
two_object      a photo of a {A} and a {B}                  A×1, B×1
counting        a photo of {n} {As}                         A×n, exclude A×(n+1); n in 2..4
colors          a photo of a {c} {A}                        A×1 coloured c
position        a photo of a {A} {relation} a {B}           B×1, A×1 at [relation, 0]
color_attr      a photo of a {c} {A} and a {d} {B}          A×1 coloured c, B×1 coloured d
==============  ==========================================  ==========================================

The held-out split is made on meanings, not strings: "a circle and a star" and "a star and a
circle" share one key, as do "A left of B" and "B right of A", so no held-out prompt is a rewording
of a training prompt. The world has six classes, so every single-object prompt is held out;
training sees each class through the other five tags.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Hashable
from typing import Any

from blip3o.world.spec import COLOR_NAMES, NUMBER_WORDS, RELATIONS, SHAPES, TAG_COUNTS, TAGS, article, plural

Record = dict[str, Any]

INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _a(word: str) -> str:
    return f"{article(word)} {word}"


def single_object(a: str) -> Record:
    return {"tag": "single_object", "include": [{"class": a, "count": 1}], "prompt": f"a photo of {_a(a)}"}


def two_object(a: str, b: str) -> Record:
    return {
        "tag": "two_object",
        "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
        "prompt": f"a photo of {_a(a)} and {_a(b)}",
    }


def counting(a: str, n: int) -> Record:
    return {
        "tag": "counting",
        "include": [{"class": a, "count": n}],
        "exclude": [{"class": a, "count": n + 1}],
        "prompt": f"a photo of {NUMBER_WORDS[n]} {plural(a)}",
    }


def colors(a: str, c: str) -> Record:
    return {
        "tag": "colors",
        "include": [{"class": a, "count": 1, "color": c}],
        "prompt": f"a photo of {_a(c)} {a}",
    }


def position(a: str, relation: str, b: str) -> Record:
    return {
        "tag": "position",
        "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [relation, 0]}],
        "prompt": f"a photo of {_a(a)} {relation} {_a(b)}",
    }


def color_attr(a: str, c: str, b: str, d: str) -> Record:
    return {
        "tag": "color_attr",
        "include": [{"class": a, "count": 1, "color": c}, {"class": b, "count": 1, "color": d}],
        "prompt": f"a photo of {_a(c)} {a} and {_a(d)} {b}",
    }


def prompt_pool(tag: str) -> list[Record]:
    """Every record of one tag, in a fixed order."""
    pairs = list(itertools.permutations(SHAPES, 2))
    if tag == "single_object":
        return [single_object(a) for a in SHAPES]
    if tag == "two_object":
        return [two_object(a, b) for a, b in pairs]
    if tag == "counting":
        return [counting(a, n) for a in SHAPES for n in (2, 3, 4)]
    if tag == "colors":
        return [colors(a, c) for a in SHAPES for c in COLOR_NAMES]
    if tag == "position":
        return [position(a, r, b) for a, b in pairs for r in RELATIONS]
    if tag == "color_attr":
        return [color_attr(a, c, b, d) for a, b in pairs for c, d in itertools.permutations(COLOR_NAMES, 2)]
    raise ValueError(f"unknown tag {tag!r}; allowed: {', '.join(TAGS)}")


def meaning(record: Record) -> Hashable:
    """A key shared by all records that ask for the same scene."""
    inc = record["include"]
    tag = record["tag"]
    if tag == "position":
        b, a = inc[0]["class"], inc[1]["class"]
        relation = inc[1]["position"][0]
        return (tag, *min(((a, relation, b), (b, INVERSE[relation], a))))
    # A sorted tuple, not a frozenset: the split orders meanings by repr, and a set's repr follows string
    # hashes, which differ between processes (PYTHONHASHSEED), so the split would too.
    clauses = tuple(sorted((c["class"], c["count"], c.get("color") or "") for c in inc))
    return (tag, clauses)


def split_pool(tag: str, seed: int, heldout_fraction: float) -> tuple[list[Record], list[Record]]:
    """(train, held-out) records of one tag; no meaning is in both."""
    pool = prompt_pool(tag)
    if tag == "single_object":
        return [], pool
    keys = sorted({meaning(r) for r in pool}, key=repr)
    random.Random(f"{seed}-split-{tag}").shuffle(keys)
    n_held = max(1, math.ceil(heldout_fraction * len(keys)))
    held = set(keys[:n_held])
    return [r for r in pool if meaning(r) not in held], [r for r in pool if meaning(r) in held]


def split(seed: int, heldout_fraction: float) -> tuple[dict[str, list[Record]], dict[str, list[Record]]]:
    """Per tag, the (train, held-out) record pools."""
    train, held = {}, {}
    for tag in TAGS:
        train[tag], held[tag] = split_pool(tag, seed, heldout_fraction)
    return train, held


def proportional(n: int, weights: dict[str, int]) -> dict[str, int]:
    """Split n into integer parts proportional to ``weights`` (largest remainder)."""
    total = sum(weights.values())
    exact = {k: n * w / total for k, w in weights.items()}
    parts = {k: math.floor(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: (parts[k] - exact[k], list(weights).index(k)))[: n - sum(parts.values())]:
        parts[k] += 1
    return parts


def eval_prompts(pools: dict[str, list[Record]], n: int, seed: int) -> list[Record]:
    """A numbered prompt set of size n with GenEval's tag proportions, drawn from ``pools``.

    Within a tag, prompts are drawn without replacement and the pool is cycled when n asks for
    more prompts than it holds (the six single-object prompts are repeated, for example).
    """
    counts = proportional(n, TAG_COUNTS)
    out: list[Record] = []
    for tag in TAGS:
        rng = random.Random(f"{seed}-prompts-{tag}")
        order: list[Record] = []
        while len(order) < counts[tag]:
            batch = list(pools[tag])
            rng.shuffle(batch)
            order.extend(batch)
        out.extend(order[: counts[tag]])
    return [{**r, "index": f"{i:05d}"} for i, r in enumerate(out)]


def sample_record(rng: random.Random, pools: dict[str, list[Record]]) -> Record:
    """One record: a tag by GenEval's proportions (among tags with prompts), then a prompt of it."""
    tags = [t for t in TAGS if pools[t]]
    tag = rng.choices(tags, weights=[TAG_COUNTS[t] for t in tags])[0]
    return rng.choice(pools[tag])


_SHAPE_WORDS = {**{s: s for s in SHAPES}, **{plural(s): s for s in SHAPES}}


def _shape_of(word: str) -> str | None:
    return _SHAPE_WORDS.get(word.rstrip(",.").lower())


def shapes_named(text: str) -> set[str]:
    """The classes a prompt or caption names ("two stars and a red circle" → {"star", "circle"})."""
    return {s for w in text.split(" ") if (s := _shape_of(w))}


def shape_swapped(text: str, rng: random.Random) -> str:
    """``text`` with one shape mention replaced by a shape it does not mention (a contrastive hard negative).

    "a photo of a red circle and a blue star" → "a photo of a red hexagon and a blue star": the same
    colours, counts and places with one class wrong, so a contrastive model cannot tell the two captions
    apart by colour alone. Plurals stay plural; a text without a shape comes back unchanged.
    """
    words = text.split(" ")
    spots = [i for i, w in enumerate(words) if _shape_of(w)]
    if not spots:
        return text
    i = rng.choice(spots)
    word, old = words[i].rstrip(",."), _shape_of(words[i])
    named = shapes_named(text)
    new = rng.choice([s for s in SHAPES if s not in named] or [s for s in SHAPES if s != old])
    if word.lower() != old:
        new = plural(new)
    words[i] = new + words[i][len(word) :]
    return " ".join(words)
