"""The shapes world's vocabulary: classes, colours, counts, relations and GenEval's tags.

Everything else in :mod:`blip3o.world` and the scorer reads these constants, so the world and its
judge can never disagree about a name or a colour value.
"""

from __future__ import annotations

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross")

#: GenEval's ten colour names, drawn with the CSS colours of the same names.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (0xFF, 0x00, 0x00),
    "orange": (0xFF, 0xA5, 0x00),
    "yellow": (0xFF, 0xFF, 0x00),
    "green": (0x00, 0x80, 0x00),
    "blue": (0x00, 0x00, 0xFF),
    "purple": (0x80, 0x00, 0x80),
    "pink": (0xFF, 0xC0, 0xCB),
    "brown": (0xA5, 0x2A, 0x2A),
    "black": (0x00, 0x00, 0x00),
    "white": (0xFF, 0xFF, 0xFF),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

#: Per-patch grounding ids: 0 is background, 1 + index in SHAPES (or in COLOR_NAMES) an object's class (colour).
NUM_CLASS_IDS, NUM_COLOUR_IDS = 1 + len(SHAPES), 1 + len(COLOR_NAMES)

#: Mid-grey background (#808080).
BACKGROUND: tuple[int, int, int] = (0x80, 0x80, 0x80)

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
MAX_COUNT = 4

#: GenEval's six tags and their prompt counts in the official 553-prompt file.
TAG_COUNTS: dict[str, int] = {
    "single_object": 80,
    "two_object": 99,
    "counting": 80,
    "colors": 94,
    "position": 100,
    "color_attr": 100,
}
TAGS: tuple[str, ...] = tuple(TAG_COUNTS)

MIN_SIZE, MAX_SIZE = 32, 512


def plural(shape: str) -> str:
    """English plural of a class name ("cross" -> "crosses")."""
    return shape + ("es" if shape.endswith(("s", "x", "ch", "sh")) else "s")


def article(word: str) -> str:
    """The indefinite article for ``word`` ("an orange", "a hexagon")."""
    return "an" if word[0] in "aeiou" else "a"


def check_size(size: int, what: str = "size") -> int:
    """Validate an image side in pixels."""
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"{what} must be an integer number of pixels in [{MIN_SIZE}, {MAX_SIZE}], got {size!r}")
    return size
