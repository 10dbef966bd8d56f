"""The world BPE tokenizer (`blip3o.data.tokenizer`): training, special tokens, ChatML, save/load."""

from __future__ import annotations

import itertools

import pytest
from jinja2.exceptions import TemplateError

from blip3o.data.tokenizer import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    load_tokenizer,
    save_tokenizer,
    train_bpe_tokenizer,
)
from blip3o.world.text import WORDS, text_prompt

COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross")
COUNTS = ("one", "two", "three", "four")
RELATIONS = ("left of", "right of", "above", "below")
EXTRA = "<|gen_start|>"


def world_corpus() -> list[str]:
    """World-like sentences in a fixed order: counting, position, questions, text prompts."""
    texts = [f"a photo of {n} {c} {s}s" for n, c, s in itertools.product(COUNTS, COLOURS, SHAPES)]
    texts += [f"a {a} {r} a {b}" for a, r, b in itertools.product(SHAPES, RELATIONS, SHAPES)]
    texts += [f"what colour is the {s}?" for s in SHAPES]
    texts += [f"The {s} is {c}." for s, c in itertools.product(SHAPES, COLOURS)]
    texts += [text_prompt(w) for w in WORDS]
    texts += list(WORDS)
    return texts


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(world_corpus(), vocab_size=512, extra_special_tokens=[EXTRA])


def test_vocabulary_is_bounded_and_merges_frequent_words(tok) -> None:
    assert 300 < len(tok) <= 512
    # Frequent world words become one token each ("Ġ" marks a leading space in byte-level BPE).
    for word in ("circle", "hexagon", "triangle", "photo"):
        assert tok.tokenize(f"a {word}") == ["a", f"Ġ{word}"], word


@pytest.mark.parametrize(
    "text",
    [
        "a photo of two red circles",
        "a star right of a cross",
        "what colour is the hexagon?",
        'a sign that says "lemon"',
        "  leading spaces, tabs\tand\nnewlines  ",
        "unseen: Zürich ☂ 42 émoji 🙂",  # byte-level BPE covers any string
        "",
    ],
)
def test_encode_decode_round_trip_is_exact(tok, text: str) -> None:
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text


def test_special_tokens_are_single_ids_in_order(tok) -> None:
    expected = [*SPECIAL_TOKENS, EXTRA]
    assert tok.convert_tokens_to_ids(expected) == list(range(len(expected)))
    for i, token in enumerate(expected):
        assert tok(token)["input_ids"] == [i], token
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == tok.pad_token_id == 0
    assert set(expected) <= set(tok.all_special_tokens)
    # Embedded in text, the image placeholder stays whole and the text around it is unchanged.
    ids = tok('<image>a sign that says "cat"')["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<image>")
    assert ids[1:] == tok('a sign that says "cat"')["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == 'a sign that says "cat"'


MESSAGES = [
    {"role": "system", "content": "You describe shapes."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is the star?"}]},
    {"role": "assistant", "content": "The star is red."},
    {"role": "user", "content": "and the circle?"},
]


def test_chat_template_renders_chatml_exactly(tok) -> None:
    rendered = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nYou describe shapes.<|im_end|>\n"
        "<|im_start|>user\n<image>what colour is the star?<|im_end|>\n"
        "<|im_start|>assistant\nThe star is red.<|im_end|>\n"
        "<|im_start|>user\nand the circle?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    without = tok.apply_chat_template(MESSAGES, tokenize=False)
    assert without == rendered.removesuffix("<|im_start|>assistant\n")
    assert tok.chat_template == CHAT_TEMPLATE


def test_chat_template_tokenises_to_the_rendered_string(tok) -> None:
    out = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True)
    rendered = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert out["input_ids"] == tok(rendered)["input_ids"]
    ids = out["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 5
    assert ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 4
    assert ids.count(tok.convert_tokens_to_ids("<image>")) == 1


def test_assistant_mask_covers_the_reply_and_its_end_token(tok) -> None:
    out = tok.apply_chat_template(MESSAGES[:3], return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tok.decode(masked) == "The star is red.<|im_end|>"


def test_chat_template_rejects_unknown_roles_and_parts(tok) -> None:
    with pytest.raises(TemplateError, match="role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
    with pytest.raises(TemplateError, match="part type"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "video"}]}], tokenize=False)


def test_save_load_round_trip_by_path(tok, tmp_path) -> None:
    path = save_tokenizer(tok, tmp_path / "tok")
    loaded = load_tokenizer(str(path))
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded.chat_template == tok.chat_template
    assert loaded.all_special_tokens == tok.all_special_tokens
    assert (loaded.eos_token_id, loaded.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    for text in [*world_corpus()[::25], "<image>unseen Zürich 🙂<|im_end|>"]:
        assert loaded(text)["input_ids"] == tok(text)["input_ids"], text
    assert (
        loaded.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True)["input_ids"]
        == tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True)["input_ids"]
    )


def test_load_rejects_a_directory_without_tokenizer(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        load_tokenizer(tmp_path)


def test_training_is_deterministic(tok) -> None:
    again = train_bpe_tokenizer(world_corpus(), vocab_size=512, extra_special_tokens=[EXTRA])
    assert again.get_vocab() == tok.get_vocab()
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()  # merges in order too


def test_min_frequency_and_vocab_size_change_the_result(tok) -> None:
    small = train_bpe_tokenizer(world_corpus(), vocab_size=300)
    assert len(small) == 300
    strict = train_bpe_tokenizer(world_corpus(), vocab_size=512, min_frequency=50)
    assert len(strict) < len(tok)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vocab_size": 259}, "vocab_size must be >= 260"),
        ({"min_frequency": 0}, "min_frequency"),
        ({"extra_special_tokens": ["<image>"]}, "extra_special_tokens"),
        ({"extra_special_tokens": ["<a>", "<a>"]}, "extra_special_tokens"),
        ({"extra_special_tokens": [""]}, "extra_special_tokens"),
    ],
)
def test_train_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        train_bpe_tokenizer(["a photo"], **kwargs)
