"""Record → tensors: chat prompts for generation and understanding, padding, label masks, image tensors.

The prompt text of a generation request is built by one function, :func:`generation_messages`, for
training and for inference alike (the official code trains on one context and samples with another).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from blip3o.data.tokenizer import IMAGE_TOKEN

IGNORE = -100
GENERATION_INSTRUCTION = "Generate an image: "


def generation_messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": GENERATION_INSTRUCTION + prompt}]


def pad(rows: Sequence[Sequence[int]], value: int, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id lists to one length: (ids (B, T), attention mask (B, T))."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        sl = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, sl] = torch.tensor(row, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def generation_inputs(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded chat prompts ending in the assistant turn; the queries are appended after them."""
    rows = [
        tokenizer.apply_chat_template(
            generation_messages(p), add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        for p in prompts
    ]
    return pad(rows, tokenizer.pad_token_id, "left")


def _expand_images(
    ids: list[int],
    image_id: int,
    n: int,
    labels: list[int] | None = None,
) -> tuple[list[int], list[int]]:
    """Repeat each image placeholder n times (one per vision token); labels of placeholders are ignored."""
    labels = labels if labels is not None else ids
    out_ids: list[int] = []
    out_labels: list[int] = []
    for t, lab in zip(ids, labels, strict=True):
        reps = n if t == image_id else 1
        out_ids.extend([t] * reps)
        out_labels.extend([IGNORE if t == image_id else lab] * reps)
    return out_ids, out_labels


def understanding_messages(question: str | Sequence[str], answer: str | Sequence[str] | None = None) -> list[dict]:
    """A chat about one image: the image opens the first user turn; several questions (with as many
    answers) make a multi-turn conversation."""
    questions = [question] if isinstance(question, str) else list(question)
    answers = None if answer is None else [answer] if isinstance(answer, str) else list(answer)
    if answers is not None and len(answers) != len(questions):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    if answers is None and len(questions) != 1:
        raise ValueError("a prompt for answering takes one question")
    msgs: list[dict] = []
    for k, q in enumerate(questions):
        image = [{"type": "image"}] if k == 0 else []
        msgs.append({"role": "user", "content": [*image, {"type": "text", "text": q}]})
        if answers is not None:
            msgs.append({"role": "assistant", "content": answers[k]})
    return msgs


def understanding_inputs(
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str | Sequence[str]],
    answers: Sequence[str | Sequence[str]],
    n_image_tokens: int,
) -> dict[str, torch.Tensor]:
    """Right-padded training rows: ids, attention mask and labels (answer tokens and their <|im_end|> only).

    A row's question may be a list of questions (with a list of answers): one multi-turn conversation.
    """
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    rows, labels = [], []
    for q, a in zip(questions, answers, strict=True):
        enc = tokenizer.apply_chat_template(
            understanding_messages(q, a), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        raw = [t if m else IGNORE for t, m in zip(enc["input_ids"], enc["assistant_masks"], strict=True)]
        ids, lab = _expand_images(enc["input_ids"], image_id, n_image_tokens, raw)
        rows.append(ids)
        labels.append(lab)
    ids, mask = pad(rows, tokenizer.pad_token_id, "right")
    lab, _ = pad(labels, IGNORE, "right")
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def chat_inputs(
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    n_image_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts for answering questions about images (generation continues after them)."""
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    rows = [
        _expand_images(
            tokenizer.apply_chat_template(
                understanding_messages(q), add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"],
            image_id,
            n_image_tokens,
        )[0]
        for q in questions
    ]
    return pad(rows, tokenizer.pad_token_id, "left")


def to_pixels(images: Sequence[Image.Image] | torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Images → float (B, 3, H, W) in [-1, 1]; a uint8 (B, 3, H, W) tensor is converted directly."""
    if isinstance(images, torch.Tensor):
        return images.float().div(127.5).sub(1.0)
    arrays = []
    for im in images:
        im = im.convert("RGB")
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(im))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] → PIL images."""
    arr = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
