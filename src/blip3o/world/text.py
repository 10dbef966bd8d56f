"""Text scenes of the shapes world: one short word drawn large on the grey background.

Text scenes train and score text rendering the way BLIP3o-NEXT and Flow-GRPO do it for real
images: the prompt quotes a word (`a sign that says "lemon"`), the model draws an image, and an
OCR reader (`blip3o.eval.ocr`) turns the image back into text, scored by normalised edit
distance against the quoted word.

The word is drawn in the bold DejaVu Sans that ships inside matplotlib, located through
`matplotlib.__file__`, so every machine with the locked environment draws the same bytes. The
font size is the largest whose ink box fits in 90% of the width and 60% of the height; the ink
box is centred. Rendering is pure (same arguments, same bytes) and needs no randomness.

Measured with RapidOCR (PP-OCRv4 det + rec, onnxruntime CPU) through `OCRScorer`, which upscales
images to a 256-px short side before reading them, over all 217 words in black: at 64 px
(`DEFAULT_TEXT_SIZE`) every word reads back exactly (mean reward 1.000, about 0.16 s per image on
2 CPU cores); at 48 px the mean is 0.999 and at 32 px 0.991. At 64 px each colour of
`TEXT_COLOURS` scores a mean of at least 0.999.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image, ImageFont

__all__ = [
    "DEFAULT_TEXT_SIZE",
    "MAX_TEXT_SIZE",
    "MIN_TEXT_SIZE",
    "TEXT_COLOURS",
    "WORDS",
    "font_path",
    "render_text",
    "split_words",
    "text_prompt",
]

DEFAULT_TEXT_SIZE = 64
MIN_TEXT_SIZE = 32
MAX_TEXT_SIZE = 512

# Fractions of the image the word's ink box may fill.
_MAX_WIDTH_FRACTION = 0.9
_MAX_HEIGHT_FRACTION = 0.6

# Text colours (GenEval hex values) whose luminance contrast ratio against the #808080 background is
# above 2: black 5.3, white 3.9, yellow 3.7, pink 2.6, purple 2.4, blue 2.2. Red (1.0), green (1.3),
# brown (1.8) and orange (2.0) are left out: RapidOCR still reads them on clean renders (it sees
# colour), but they would rely on chroma alone, which blurry or low-bit generated images lose.
TEXT_COLOURS: dict[str, str] = {
    "black": "#000000",
    "white": "#FFFFFF",
    "yellow": "#FFFF00",
    "blue": "#0000FF",
    "purple": "#800080",
    "pink": "#FFC0CB",
}

# Common English words, 3 to 6 letters a-z, sorted. Colour and shape names are left out so that
# text scenes and shape scenes never share a prompt word, and so is "zoo", which OCR reads as "z00".
WORDS: tuple[str, ...] = (
    "able", "acid", "act", "actor", "add", "age", "air", "alarm", "album", "alive",
    "angle", "animal", "ankle", "answer", "apple", "arm", "army", "art", "ask", "baby",
    "back", "bag", "bake", "ball", "band", "bank", "basket", "bath", "beach", "bean",
    "bear", "bed", "bee", "bell", "belt", "bench", "bike", "bird", "boat", "body",
    "bone", "book", "boot", "bottle", "bowl", "box", "bread", "brick", "bridge", "brush",
    "bus", "butter", "cake", "camera", "camp", "candle", "car", "card", "carpet", "cat",
    "chair", "chalk", "cheese", "chess", "city", "class", "clock", "cloud", "coat", "coffee",
    "coin", "cook", "corn", "cow", "cup", "dance", "desk", "dinner", "dish", "dog",
    "door", "dragon", "dream", "drink", "drum", "duck", "eagle", "earth", "egg", "engine",
    "eye", "face", "farm", "fence", "field", "fish", "flag", "floor", "flower", "fork",
    "fox", "frog", "fruit", "game", "garden", "gate", "ghost", "gift", "glass", "glove",
    "goat", "grape", "grass", "guitar", "hair", "hammer", "hand", "hat", "honey", "horse",
    "house", "ice", "island", "jacket", "jam", "jar", "jelly", "juice", "key", "king",
    "kite", "knife", "lamp", "leaf", "lemon", "letter", "light", "lion", "lock", "magic",
    "map", "market", "milk", "mirror", "money", "monkey", "moon", "mouse", "music", "nest",
    "night", "nose", "ocean", "onion", "owl", "paint", "paper", "park", "party", "pen",
    "pencil", "piano", "pizza", "plane", "plant", "plate", "pocket", "queen", "rabbit", "rain",
    "river", "road", "robot", "rock", "roof", "rope", "salt", "sand", "school", "sea",
    "seed", "sheep", "ship", "shirt", "shoe", "sky", "smile", "snake", "snow", "sock",
    "soup", "spoon", "stone", "storm", "sugar", "summer", "sun", "table", "tea", "tiger",
    "toast", "tooth", "tower", "town", "toy", "train", "tree", "truck", "water", "whale",
    "wind", "window", "winter", "wolf", "wood", "world", "zebra",
)  # fmt: skip


def _check_word(word: str) -> None:
    if not isinstance(word, str) or not word or not all("a" <= ch <= "z" for ch in word):
        raise ValueError(f"word must be a non-empty string of lowercase letters a-z, got {word!r}")


def split_words(seed: int, heldout_fraction: float) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split `WORDS` into disjoint (train, held-out) tuples, each sorted.

    The held-out part holds `round(len(WORDS) * heldout_fraction)` words, clamped so that both
    parts are non-empty; which words go where depends only on `seed` (`random.Random(seed)`).
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}")
    shuffled = list(WORDS)
    random.Random(seed).shuffle(shuffled)
    n_heldout = min(max(round(len(WORDS) * heldout_fraction), 1), len(WORDS) - 1)
    heldout = tuple(sorted(shuffled[:n_heldout]))
    train = tuple(sorted(shuffled[n_heldout:]))
    return train, heldout


def text_prompt(word: str) -> str:
    """The generation prompt for a text scene; the target is the text between the double quotes."""
    _check_word(word)
    return f'a sign that says "{word}"'


def font_path() -> Path:
    """Path of the bold DejaVu Sans TTF inside the installed matplotlib."""
    import matplotlib  # lazy: only text rendering needs it

    path = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans-Bold.ttf"
    if not path.is_file():
        raise FileNotFoundError(f"DejaVuSans-Bold.ttf not found in matplotlib at {path}")
    return path


@functools.lru_cache(maxsize=64)
def _font(points: int) -> ImageFont.FreeTypeFont:
    from PIL import ImageFont

    return ImageFont.truetype(str(font_path()), points)


def _ink(word: str, points: int) -> Image.Image:
    """The word's antialiased ink at `points`, as an "L" mask cropped to its exact ink box.

    `FreeTypeFont.getbbox` measures advances, not ink, horizontally (it starts at the pen origin
    and ignores side bearings), so centring and fitting use the rasterised mask instead.
    """
    from PIL import Image, ImageDraw

    font = _font(points)
    _, _, right, bottom = font.getbbox(word)
    pad = points  # room for negative bearings on either side
    canvas = Image.new("L", (right + 2 * pad, bottom + 2 * pad), 0)
    ImageDraw.Draw(canvas).text((pad, pad), word, font=font, fill=255)
    box = canvas.getbbox()
    assert box is not None, f"no ink for {word!r} at {points} pt"
    return canvas.crop(box)


@functools.lru_cache(maxsize=1024)
def _fit_points(word: str, size: int) -> int:
    """Largest font size whose ink fits the width and height limits (binary search)."""
    max_w = _MAX_WIDTH_FRACTION * size
    max_h = _MAX_HEIGHT_FRACTION * size

    def fits(points: int) -> bool:
        width, height = _ink(word, points).size
        return width <= max_w and height <= max_h

    lo, hi = 1, 2 * size  # at 2 * size points even the x-height (~0.55 em) breaks the height limit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _check_background(background: tuple[int, int, int]) -> tuple[int, int, int]:
    if (
        not isinstance(background, tuple | list)
        or len(background) != 3
        or not all(isinstance(c, int) and 0 <= c <= 255 for c in background)
    ):
        raise ValueError(f"background must be an (R, G, B) tuple of ints in 0..255, got {background!r}")
    return (background[0], background[1], background[2])


def render_text(
    word: str,
    size: int = DEFAULT_TEXT_SIZE,
    *,
    color: str = "black",
    background: tuple[int, int, int] = (128, 128, 128),
) -> Image.Image:
    """Draw `word` as large as fits, centred, on a `size` x `size` RGB image.

    Args:
        word: lowercase letters a-z.
        size: image side in pixels, `MIN_TEXT_SIZE`..`MAX_TEXT_SIZE`.
        color: a key of `TEXT_COLOURS`.
        background: RGB fill, the world's mid-grey by default.

    Returns:
        A new `PIL.Image.Image` in mode RGB; identical bytes for identical arguments.
    """
    from PIL import Image, ImageColor

    _check_word(word)
    if not isinstance(size, int) or not MIN_TEXT_SIZE <= size <= MAX_TEXT_SIZE:
        raise ValueError(f"size must be an int in {MIN_TEXT_SIZE}..{MAX_TEXT_SIZE}, got {size!r}")
    if color not in TEXT_COLOURS:
        raise ValueError(f"color must be one of {sorted(TEXT_COLOURS)}, got {color!r}")
    fill = _check_background(background)

    ink = _ink(word, _fit_points(word, size))
    x = (size - ink.width) // 2
    y = (size - ink.height) // 2
    image = Image.new("RGB", (size, size), fill)
    image.paste(ImageColor.getrgb(TEXT_COLOURS[color]), (x, y, x + ink.width, y + ink.height), ink)
    return image
