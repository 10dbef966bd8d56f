"""Token rows for BLIP3o-NEXT: text-to-image, editing and image-to-text, all in one vocabulary.

An image is written ``<im_start> <S{s}> <I…>×N <im_end>`` when the model writes it (the assistant turn),
and ``<im_start> <I…>×N <im_end>`` when it is read (a user turn: the image being edited or asked about;
no scale token, so :func:`blip3o.models.next.condition_positions` never mistakes it for the condition).

- text-to-image: user "Generate an image: {prompt}" → assistant image (the prompt of BLIP3-o's
  :func:`blip3o.data.processing.generation_messages`, so both models read the same requests);
- editing: user "Edit the image: {instruction}" [reference image] → assistant image. The instruction comes
  first so that the reference ends right before the written image: code i of the output then sits a fixed
  number of positions after code i of the reference, whatever the instruction's length, and copying an
  unchanged code is one attention head at a fixed relative (RoPE) offset;
- understanding: user [image] question → assistant text answer.

Prompt rows (for sampling) end with ``<im_start> <S0>``; training rows continue with the codes and
``<im_end>``. Labels are the codes and ``<im_end>`` (and, with ``train_prompt_text``, every earlier
token too); for understanding rows, the answer and its end-of-turn token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from blip3o.data.processing import IGNORE, generation_messages, pad, understanding_messages
from blip3o.data.tokenizer import IMAGE_TOKEN
from blip3o.models.next import ImageVocab

EDIT_INSTRUCTION = "Edit the image: "


def edit_messages(instruction: str) -> list[dict]:
    """The user turn of an edit: the instruction, then the reference image (see the module docstring)."""
    return [{"role": "user", "content": [{"type": "text", "text": EDIT_INSTRUCTION + instruction}, {"type": "image"}]}]


def read_image(vocab: ImageVocab, codes: Sequence[int]) -> list[int]:
    """An image in a user turn: ``<im_start>`` codes ``<im_end>``."""
    return [vocab.im_start, *(vocab.first_code_id + int(c) for c in codes), vocab.im_end]


def _splice(ids: list[int], image_id: int, image: list[int]) -> list[int]:
    """Replace the one image placeholder of a templated row with the image's ids."""
    at = ids.index(image_id)
    return ids[:at] + image + ids[at + 1 :]


def _template(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]


def image_prompt(
    tokenizer: PreTrainedTokenizerBase,
    vocab: ImageVocab,
    prompt: str,
    reference: Sequence[int] | None = None,
    scale: int = 0,
) -> list[int]:
    """The ids of a request to write an image, ending ``<im_start> <S{scale}>``: a text-to-image prompt, or,
    with ``reference`` codes, an edit instruction for that image."""
    if reference is None:
        ids = _template(tokenizer, generation_messages(prompt))
    else:
        ids = _splice(
            _template(tokenizer, edit_messages(prompt)),
            tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
            read_image(vocab, reference),
        )
    return [*ids, vocab.im_start, vocab.scale_ids[scale]]


def image_prompts(
    tokenizer: PreTrainedTokenizerBase,
    vocab: ImageVocab,
    prompts: Sequence[str],
    references: Sequence[Sequence[int] | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded :func:`image_prompt` rows (B, L) and their attention mask, for sampling."""
    refs = references if references is not None else [None] * len(prompts)
    rows = [image_prompt(tokenizer, vocab, p, r) for p, r in zip(prompts, refs, strict=True)]
    return pad(rows, tokenizer.pad_token_id, "left")


def image_rows(
    tokenizer: PreTrainedTokenizerBase,
    vocab: ImageVocab,
    prompts: Sequence[str],
    codes: torch.Tensor,
    references: Sequence[Sequence[int] | None] | None = None,
    train_prompt_text: bool = False,
) -> dict[str, torch.Tensor]:
    """Right-padded training rows that write images: ``input_ids``, ``attention_mask``, ``labels`` (B, T).

    ``codes`` (B, N) are the target images' codes; ``references`` the codes of the images being edited
    (``None`` for a text-to-image row).
    """
    refs = references if references is not None else [None] * len(prompts)
    rows, labels = [], []
    for prompt, ref, target in zip(prompts, refs, codes.tolist(), strict=True):
        head = image_prompt(tokenizer, vocab, prompt, ref)
        tail = [vocab.first_code_id + c for c in target] + [vocab.im_end]
        rows.append(head + tail)
        labels.append((head if train_prompt_text else [IGNORE] * len(head)) + tail)
    ids, mask = pad(rows, tokenizer.pad_token_id, "right")
    lab, _ = pad(labels, IGNORE, "right")
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def text_rows(
    tokenizer: PreTrainedTokenizerBase,
    vocab: ImageVocab,
    codes: torch.Tensor,
    questions: Sequence[str],
    answers: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Image → text rows: the image as codes in the user turn, then the question.

    With ``answers``: right-padded training rows with labels on the answer and its end-of-turn token.
    Without: left-padded prompts ending in the assistant turn, for answering.
    """
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    rows, labels = [], []
    for i, (image, question) in enumerate(zip(codes.tolist(), questions, strict=True)):
        image_ids = read_image(vocab, image)
        if answers is None:
            rows.append(_splice(_template(tokenizer, understanding_messages(question)), image_id, image_ids))
            continue
        enc = tokenizer.apply_chat_template(
            understanding_messages(question, answers[i]),
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        ids = enc["input_ids"]
        lab = [t if m else IGNORE for t, m in zip(ids, enc["assistant_masks"], strict=True)]
        at = ids.index(image_id)
        rows.append(_splice(ids, image_id, image_ids))
        labels.append(lab[:at] + [IGNORE] * len(image_ids) + lab[at + 1 :])
    if answers is None:
        ids, mask = pad(rows, tokenizer.pad_token_id, "left")
        return {"input_ids": ids, "attention_mask": mask}
    ids, mask = pad(rows, tokenizer.pad_token_id, "right")
    lab, _ = pad(labels, IGNORE, "right")
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}
