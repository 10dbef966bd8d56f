"""Text scenes (`blip3o.world.text`) and the OCR scorer (`blip3o.eval.ocr`), including real RapidOCR."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from blip3o.eval.ocr import (
    OCRScorer,
    edit_distance,
    evaluate_ocr_folder,
    normalise,
    ocr_reward,
    quoted_text,
)
from blip3o.world.text import (
    DEFAULT_TEXT_SIZE,
    TEXT_COLOURS,
    WORDS,
    render_text,
    split_words,
    text_prompt,
)

GREY = (128, 128, 128)
# sha256 of the pixels of render_text("lemon", 64)
GOLDEN_LEMON_64 = "aa5a8fddb968407bd4e2f8a60d74f9c0b254f9504fe5a3aed90271e30611e722"


def ink_box(image: Image.Image, background: tuple[int, int, int] = GREY) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) inclusive bounds of the pixels that differ from the background."""
    pixels = np.asarray(image)
    ys, xs = np.nonzero((pixels != np.array(background, dtype=np.uint8)).any(axis=-1))
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


# ---------------------------------------------------------------------------------------------
# Words and prompts


def test_words_are_distinct_short_lowercase_and_sorted() -> None:
    assert 180 <= len(WORDS) <= 250
    assert list(WORDS) == sorted(set(WORDS))
    for word in WORDS:
        assert 3 <= len(word) <= 6, word
        assert word.isascii() and word.isalpha() and word.islower(), word
    colour_and_shape_names = {"red", "orange", "green", "blue", "star", "circle", "square", "cross"}
    assert not colour_and_shape_names & set(WORDS)


@pytest.mark.parametrize("fraction", [0.1, 0.15, 0.5])
def test_split_words_is_disjoint_covering_and_sized(fraction: float) -> None:
    train, heldout = split_words(0, fraction)
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == list(WORDS)
    assert len(heldout) == round(len(WORDS) * fraction)
    assert list(train) == sorted(train) and list(heldout) == sorted(heldout)


def test_split_words_is_deterministic_per_seed() -> None:
    assert split_words(3, 0.2) == split_words(3, 0.2)
    assert split_words(3, 0.2)[1] != split_words(4, 0.2)[1]


def test_split_words_keeps_both_parts_non_empty() -> None:
    train, heldout = split_words(0, 0.001)
    assert len(heldout) == 1 and len(train) == len(WORDS) - 1
    train, heldout = split_words(0, 0.999)
    assert len(train) == 1 and len(heldout) == len(WORDS) - 1


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_words_rejects_fraction_outside_open_unit_interval(fraction: float) -> None:
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_words(0, fraction)


def test_text_prompt_quotes_the_word_and_quoted_text_recovers_it() -> None:
    assert text_prompt("lemon") == 'a sign that says "lemon"'
    for word in WORDS[:20]:
        assert quoted_text(text_prompt(word)) == word
    with pytest.raises(ValueError, match="a-z"):
        text_prompt("Lemon")


# ---------------------------------------------------------------------------------------------
# Rendering


def test_render_is_deterministic_rgb_and_the_right_size() -> None:
    first = render_text("lemon", 64)
    second = render_text("lemon", 64)
    assert first.mode == "RGB" and first.size == (64, 64)
    assert first.tobytes() == second.tobytes()
    assert render_text("lemon", 64).tobytes() != render_text("melon", 64).tobytes()
    assert render_text("lemon", 100).size == (100, 100)


def test_render_bytes_match_golden_hash() -> None:
    # The font ships inside matplotlib and Pillow is pinned, so every machine with the locked
    # environment must draw exactly these bytes; a change here means the rendering changed.
    digest = hashlib.sha256(render_text("lemon", 64).tobytes()).hexdigest()
    assert digest == GOLDEN_LEMON_64


@pytest.mark.parametrize("size", [32, DEFAULT_TEXT_SIZE, 256])
def test_rendered_word_is_large_and_centred(size: int) -> None:
    for word in WORDS:
        x0, y0, x1, y1 = ink_box(render_text(word, size))
        width, height = x1 - x0 + 1, y1 - y0 + 1
        # Within the limits (90% of the width, 60% of the height) ...
        assert width <= 0.9 * size and height <= 0.6 * size, (word, width, height)
        # ... and pressed against one of them: the word is as large as fits.
        assert width >= 0.75 * size or height >= 0.5 * size, (word, width, height)
        # Centred to the pixel.
        assert abs((x0 + x1) / 2 - (size - 1) / 2) <= 1.0, word
        assert abs((y0 + y1) / 2 - (size - 1) / 2) <= 1.0, word


def test_render_uses_the_requested_colour_and_background() -> None:
    for name, hex_value in TEXT_COLOURS.items():
        pixels = np.asarray(render_text("box", 64, color=name, background=(10, 200, 30)))
        colour = tuple(int(hex_value[i : i + 2], 16) for i in (1, 3, 5))
        is_text = (pixels == colour).all(axis=-1)
        is_background = (pixels == (10, 200, 30)).all(axis=-1)
        assert is_text.mean() > 0.05, name  # glyph interiors carry the exact colour
        assert is_background.mean() > 0.5, name
        assert is_background[0].all() and is_background[-1].all(), name  # borders stay clear


@pytest.mark.parametrize("word", ["", "Cat", "a b", "café", "x1", "dog!"])
def test_render_rejects_words_outside_a_to_z(word: str) -> None:
    with pytest.raises(ValueError, match="a-z"):
        render_text(word, 64)


@pytest.mark.parametrize("size", [31, 513, 0, 64.0])
def test_render_rejects_sizes_outside_range(size: object) -> None:
    with pytest.raises(ValueError, match=r"32\.\.512"):
        render_text("cat", size)  # type: ignore[arg-type]


def test_render_rejects_unknown_colour_and_bad_background() -> None:
    with pytest.raises(ValueError, match="black"):
        render_text("cat", 64, color="grey")
    with pytest.raises(ValueError, match="background"):
        render_text("cat", 64, background=(0, 0, 256))
    with pytest.raises(ValueError, match="background"):
        render_text("cat", 64, background=(0, 0))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Reward arithmetic


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [
        ("kitten", "sitting", 3),
        ("flaw", "lawn", 2),
        ("intention", "execution", 5),
        ("abc", "acb", 2),  # Levenshtein: a transposition costs two edits
        ("", "abc", 3),
        ("abc", "", 3),
        ("", "", 0),
        ("same", "same", 0),
        ("lamp", "lump", 1),
    ],
)
def test_edit_distance_known_pairs(a: str, b: str, distance: int) -> None:
    assert edit_distance(a, b) == distance
    assert edit_distance(b, a) == distance


def test_normalise_lowercases_and_drops_all_whitespace() -> None:
    assert normalise("  Hello\tWor ld\n") == "helloworld"
    assert normalise("") == ""


@pytest.mark.parametrize(
    ("read", "target", "reward"),
    [
        ("lemon", "lemon", 1.0),
        ("LEMON", "lemon", 1.0),  # case-insensitive
        ("le mon", "lemon", 1.0),  # space-insensitive
        ("Lemon\n", "le mon", 1.0),
        ("lump", "lamp", 0.75),  # one substitution in four letters
        ("lam", "lamp", 0.75),  # one deletion
        ("dgo", "dog", 1 / 3),  # two edits of three
        ("xyzxyzxyz", "cat", 0.0),  # unrelated: distance 9 capped at 3
        ("", "cat", 0.0),
        ("the cat sat", "cat", 1.0),  # substring rule
        ("cats", "cat", 1.0),
        ("dog cat", "cat", 1.0),
    ],
)
def test_ocr_reward_hand_computed(read: str, target: str, reward: float) -> None:
    assert ocr_reward(read, target) == pytest.approx(reward)


@pytest.mark.parametrize("target", ["", "   ", "\n"])
def test_ocr_reward_rejects_empty_target(target: str) -> None:
    with pytest.raises(ValueError, match="target"):
        ocr_reward("cat", target)


def test_quoted_text_takes_the_first_pair() -> None:
    assert quoted_text('a sign that says "hello world"') == "hello world"
    assert quoted_text('say "a" then "b"') == "a"
    assert quoted_text('""') == ""
    with pytest.raises(ValueError, match="no quotes here"):
        quoted_text("no quotes here")
    with pytest.raises(ValueError, match="double quotes"):
        quoted_text('one "quote only')


# ---------------------------------------------------------------------------------------------
# Real OCR (RapidOCR, offline)


def test_importing_these_modules_loads_no_ocr_engine_or_heavy_library() -> None:
    code = (
        "import sys, blip3o.eval.ocr, blip3o.world.text, blip3o.data.tokenizer\n"
        "heavy = {'rapidocr_onnxruntime', 'onnxruntime', 'cv2', 'matplotlib', 'transformers', 'tokenizers'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_scorer_builds_its_engine_lazily() -> None:
    scorer = OCRScorer()
    assert scorer._engine is None
    with pytest.raises(ValueError, match="num_threads"):
        OCRScorer(num_threads=0)


@pytest.fixture(scope="module")
def scorer() -> OCRScorer:
    return OCRScorer()


def test_ocr_reads_heldout_words_at_default_size(scorer: OCRScorer) -> None:
    heldout = split_words(0, 0.15)[1][:30]
    assert len(heldout) == 30
    images = [render_text(word, DEFAULT_TEXT_SIZE) for word in heldout]
    rewards = scorer.score(images, heldout)
    assert np.mean(rewards) >= 0.95, dict(zip(heldout, scorer.read(images), strict=True))


def test_ocr_reads_every_text_colour(scorer: OCRScorer) -> None:
    images = [render_text("lemon", DEFAULT_TEXT_SIZE, color=name) for name in TEXT_COLOURS]
    assert scorer.read(images) == ["lemon"] * len(TEXT_COLOURS)


def test_blank_image_scores_zero(scorer: OCRScorer) -> None:
    blank = Image.new("RGB", (DEFAULT_TEXT_SIZE, DEFAULT_TEXT_SIZE), GREY)
    assert scorer.read([blank]) == [""]
    assert scorer.score([blank], ["lemon"]) == [0.0]


def test_score_prompts_accepts_arrays_and_checks_lengths(scorer: OCRScorer) -> None:
    image = render_text("piano", DEFAULT_TEXT_SIZE)
    prompts = [text_prompt("piano"), 'the word "Piano"', 'a sign that says "tiger"']
    arrays = [np.asarray(image), np.asarray(image.convert("L")), np.asarray(image)]
    rewards = scorer.score_prompts(arrays, prompts)
    assert rewards[:2] == [1.0, 1.0]
    assert rewards[2] <= 0.4
    with pytest.raises(ValueError, match="2 images but 1 targets"):
        scorer.score([image, image], ["piano"])
    with pytest.raises(ValueError, match="targets"):
        scorer.score([image], [" "])
    with pytest.raises(ValueError, match="uint8"):
        scorer.read([np.zeros((64, 64, 3), dtype=np.float32)])


def test_evaluate_ocr_folder_scores_a_geneval_layout(scorer: OCRScorer, tmp_path) -> None:
    blank = Image.new("RGB", (DEFAULT_TEXT_SIZE, DEFAULT_TEXT_SIZE), GREY)
    layout = {
        "00000": ("lemon", [render_text("lemon", DEFAULT_TEXT_SIZE), blank]),
        "00001": ("tiger", [render_text("tiger", DEFAULT_TEXT_SIZE)]),
    }
    for index, (word, images) in layout.items():
        (tmp_path / index / "samples").mkdir(parents=True)
        record = {"index": index, "tag": "text", "prompt": text_prompt(word)}
        (tmp_path / index / "metadata.jsonl").write_text(json.dumps(record) + "\n")
        for k, image in enumerate(images):
            image.save(tmp_path / index / "samples" / f"{k:04d}.png")

    summary = evaluate_ocr_folder(tmp_path, scorer=scorer)
    assert summary == {"mean": pytest.approx(2 / 3), "exact": pytest.approx(2 / 3), "images": 3, "prompts": 2}
    lines = [json.loads(line) for line in (tmp_path / "ocr_results.jsonl").read_text().splitlines()]
    assert [(r["index"], r["target"], r["read"], r["reward"]) for r in lines] == [
        ("00000", "lemon", "lemon", 1.0),
        ("00000", "lemon", "", 0.0),
        ("00001", "tiger", "tiger", 1.0),
    ]
    assert json.loads((tmp_path / "ocr_results_summary.json").read_text())["images"] == 3
