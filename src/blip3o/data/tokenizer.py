"""A small byte-level BPE tokenizer for the shapes world, with Qwen-style ChatML special tokens.

Tests and tiny runs need a text tokenizer without downloading Qwen's 151k-token vocabulary. This
module trains one on world sentences with the `tokenizers` library (byte-level BPE as in GPT-2 and
Qwen2, so any string round-trips) and wraps it as a `transformers.PreTrainedTokenizerFast`, so
the rest of the code handles it exactly as it would a pretrained tokenizer.

Special tokens (ids 0..3 in this order, then the extras):
    `<|endoftext|>`  end of sequence and padding (as in Qwen2/Qwen3)
    `<|im_start|>`, `<|im_end|>`  ChatML turn delimiters
    `<image>`  placeholder that data processing expands into image-token spans

The chat template is ChatML as Qwen writes it, `<|im_start|>{role}\\n{content}<|im_end|>\\n` per
turn, without Qwen2.5's implicit default system turn; `add_generation_prompt=True` appends
`<|im_start|>assistant\\n`. Content is a string, or a list of parts `{"type": "text", "text": ...}`
and `{"type": "image"}` (rendered as `<image>`). Assistant contents are wrapped in
`{% generation %}` so that `return_assistant_tokens_mask=True` marks the tokens to train on.

Training is deterministic: the same texts and arguments give the same vocabulary and merges.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "CHAT_TEMPLATE",
    "ENDOFTEXT_TOKEN",
    "IMAGE_TOKEN",
    "IM_END_TOKEN",
    "IM_START_TOKEN",
    "SPECIAL_TOKENS",
    "load_tokenizer",
    "save_tokenizer",
    "train_bpe_tokenizer",
]

ENDOFTEXT_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT_TOKEN, IM_START_TOKEN, IM_END_TOKEN, IMAGE_TOKEN)
"""The special tokens every world tokenizer has, at ids 0..3 in this order."""

_BYTE_ALPHABET_SIZE = 256

CHAT_TEMPLATE = (
    "{%- macro render_content(content) %}"
    "{%- if content is string %}{{- content }}"
    "{%- else %}"
    "{%- for part in content %}"
    "{%- if part['type'] == 'image' %}{{- '<image>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}"
    "{%- else %}{{- raise_exception('content part type must be text or image, got ' + part['type']) }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{%- endmacro %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{% generation %}{{- render_content(message['content']) + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- elif message['role'] in ['system', 'user'] %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + render_content(message['content']) + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- raise_exception('message role must be system, user or assistant, got ' + message['role']) }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""ChatML (Qwen style) Jinja template; see the module docstring."""


def train_bpe_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int = 1024,
    min_frequency: int = 2,
    extra_special_tokens: Sequence[str] = (),
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` and wrap it for `transformers`.

    Args:
        texts: training sentences (consumed once).
        vocab_size: upper bound on the vocabulary, special tokens and the 256 byte symbols
            included; the result is smaller when the texts run out of pairs to merge.
        min_frequency: a pair is merged only if it occurs at least this often.
        extra_special_tokens: more special tokens, given ids right after `SPECIAL_TOKENS`.

    Returns:
        A `PreTrainedTokenizerFast` with eos = pad = `<|endoftext|>`, the ChatML tokens and
        `<image>` as single special ids, and `CHAT_TEMPLATE` as its chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    extras = list(extra_special_tokens)
    for token in extras:
        if not isinstance(token, str) or not token or token.isspace():
            raise ValueError(f"extra_special_tokens must be non-empty strings, got {token!r}")
    duplicates = sorted({t for t in extras if extras.count(t) > 1 or t in SPECIAL_TOKENS})
    if duplicates:
        raise ValueError(f"extra_special_tokens repeat tokens or reuse {SPECIAL_TOKENS}: {duplicates}")
    special = [*SPECIAL_TOKENS, *extras]
    if vocab_size < _BYTE_ALPHABET_SIZE + len(special):
        raise ValueError(
            f"vocab_size must be >= {_BYTE_ALPHABET_SIZE + len(special)} "
            f"(256 byte symbols + {len(special)} special tokens), got {vocab_size}"
        )
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, seen or not
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=ENDOFTEXT_TOKEN,
        pad_token=ENDOFTEXT_TOKEN,
        extra_special_tokens=[IM_START_TOKEN, IM_END_TOKEN, IMAGE_TOKEN, *extras],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, path: str | os.PathLike[str]) -> Path:
    """Write `tokenizer` (vocabulary, merges, special tokens, chat template) to directory `path`."""
    path = Path(path)
    tokenizer.save_pretrained(path)
    return path


def load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerFast:
    """Load a tokenizer written by `save_tokenizer` from the local directory `path` (no network)."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {path}; write one with save_tokenizer")
    return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
