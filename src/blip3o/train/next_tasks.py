"""The BLIP3o-NEXT stages on the shapes world, after the shared ``clip``, ``vae`` and ``decoder`` stages.

- ``image_tokenizer``: a SimVQ tokenizer over the frozen mini-CLIP's standardised 8×8 feature map
  (:class:`blip3o.models.image_tokenizer.ImageTokenizer`), trained to reconstruct the features; logs
  codebook usage and perplexity per batch.
- ``next``: the AR backbone writes the image's codes after the prompt (cross-entropy) and the hidden
  states of the scale token and codes condition the pixel decoder's SANA over VAE latents (flow
  matching), which starts from the ``decoder`` stage and stays frozen but for ``NextConfig.train_sana``.
  Rows mix text-to-image on captions, edit triplets (reference codes in the prompt, reference latents
  into SANA, a share of the target's input codes corrupted: ``NextConfig.edit_corruption``) and
  image → text. With ``NextConfig.upsample_codes`` SANA draws from each target's true reading, and the
  code upsampler learns the readings from their codes (cross-entropy, ``cells``).
- ``instruct``: the same losses from the ``next`` weights on a curated set, the shapes analogue of
  BLIP3o-60k: an equal number of scenes per GenEval tag, each asked for by its GenEval-style prompt
  or by its caption (``prompt_fraction``).

Image codes and VAE latents of the training images are computed once, at the first batch (the
encoders are frozen), so a step only runs the trained model and a finished stage encodes nothing.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from functools import cached_property
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from blip3o.config.next import NextConfig
from blip3o.data.next_inputs import image_rows, text_rows
from blip3o.data.processing import IGNORE
from blip3o.data.world_data import load_split
from blip3o.diffusion.flow import flow_loss
from blip3o.infer.pipeline import MODEL_FILE, require
from blip3o.models.build import Encoders, load_weights
from blip3o.models.heads import ids_to_layout, map_to_tokens
from blip3o.models.image_tokenizer import ImageTokenizer, LayoutTokenizer, codebook_usage, perplexity
from blip3o.models.next import BLIP3oNext, ImageVocab, add_image_vocabulary, condition_positions, word_rows
from blip3o.train.tasks import (
    StageTask,
    asked_text,
    causal_lm_loss,
    conversation,
    encode_in_chunks,
    flow_step,
    side_generator,
)


def build_image_tokenizer(cfg: NextConfig, enc_cfg) -> ImageTokenizer | LayoutTokenizer:
    """The image tokenizer of a NEXT config: SimVQ over the mini-CLIP's generation-target map, or the cells
    of its grounded reading (``next.image_codes``)."""
    if cfg.image_codes == "layout":
        return LayoutTokenizer(enc_cfg.layout_side, cfg.layout_pool)
    return ImageTokenizer(cfg.tokenizer_config(), enc_cfg.vision.hidden_size, enc_cfg.vision.target_grid)


def image_tokenizer_weights(cfg: NextConfig, run: Path) -> Path | None:
    """The weights of run ``run``'s ``image_tokenizer`` stage, which SimVQ codes need (an error names the stage
    when they are missing); None for layout codes, which have nothing to train."""
    return require(run / "image_tokenizer" / MODEL_FILE, "image_tokenizer") if cfg.image_codes == "vq" else None


def load_image_tokenizer(cfg: NextConfig, enc_cfg, weights: str | Path | None) -> ImageTokenizer | LayoutTokenizer:
    """The run's image tokenizer in eval mode; ``weights`` (the ``image_tokenizer`` stage's) are needed for
    SimVQ codes only, since layout codes have nothing to train."""
    tokenizer = build_image_tokenizer(cfg, enc_cfg)
    if isinstance(tokenizer, ImageTokenizer):
        if weights is None:
            raise ValueError("vq image codes need the image_tokenizer stage's weights; none given")
        load_weights(tokenizer, weights)
    return tokenizer.eval()


@torch.no_grad()
def image_codes(enc: Encoders, image_tokenizer: ImageTokenizer | LayoutTokenizer, pixels: torch.Tensor) -> torch.Tensor:
    """Codes (B, n) of pixels (B, 3, H, W) in [-1, 1]: SimVQ over the standardised CLIP map, or the cells of
    the tower's grounded reading."""
    if isinstance(image_tokenizer, LayoutTokenizer):
        return image_tokenizer.encode(enc.layout(pixels))
    return image_tokenizer.encode(map_to_tokens(enc.clip(pixels)))


@torch.no_grad()
def encode_images(
    images: torch.Tensor, enc: Encoders, image_tokenizer: ImageTokenizer | LayoutTokenizer | None, chunk: int = 256
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Codes (N, n) (None without a tokenizer), standardised VAE latents (N, c, h, w) and, for layout codes,
    the reading's cell ids (N, s, s) that the codes pool (else None) of uint8 images."""
    codes = cells = None
    if isinstance(image_tokenizer, LayoutTokenizer):
        cells = enc.encode_all(images, "cells", chunk)
        codes = layout_codes(image_tokenizer, cells)
    elif image_tokenizer is not None:
        codes = encode_in_chunks(images, lambda pixels: image_codes(enc, image_tokenizer, pixels), chunk)
    return codes, enc.encode_all(images, "latent", chunk), cells


def layout_codes(image_tokenizer: LayoutTokenizer, cells: torch.Tensor) -> torch.Tensor:
    """The codes of readings' cell ids (N, s, s), 1,024 at a time: pooling one-hots every id (61 floats a cell)."""
    return torch.cat([image_tokenizer.encode_cells(chunk) for chunk in cells.split(1024)])


@torch.no_grad()
def codebook_report(cfg, enc: Encoders, weights: str | Path, world: str | Path) -> dict[str, float]:
    """Codebook usage (share of codes used), perplexity (exp of the code-frequency entropy) and feature
    reconstruction MSE of a trained image tokenizer over the held-out images of a world."""
    tokenizer = load_weights(build_image_tokenizer(cfg.next, cfg.model), weights).eval()
    images = load_split(world, "heldout").images
    features = map_to_tokens(encode_in_chunks(images, enc.clip))
    ids = tokenizer.encode(features)
    k = cfg.next.codebook_size
    return {
        "images": len(images),
        "codebook_size": k,
        "usage": float(codebook_usage(ids, k)),
        "perplexity": float(perplexity(ids, k)),
        "reconstruction_mse": float(torch.nn.functional.mse_loss(tokenizer.decode(ids), features)),
    }


class ImageTokenizerTask(StageTask):
    """SimVQ image tokenizer on standardised CLIP maps: reconstruction + codebook + commitment losses."""

    def __init__(self, *args: Any, next_cfg: NextConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.next_cfg = next_cfg

    def build_model(self) -> nn.Module:
        return build_image_tokenizer(self.next_cfg, self.cfg)

    @cached_property
    def features(self) -> torch.Tensor:
        """Standardised CLIP tokens of every training image (the tower is frozen), encoded at the first batch."""
        return map_to_tokens(self.enc.encode_all(self.data.images, "clip"))

    def batch(self, step: int, micro: int, rank: int, world_size: int) -> dict[str, Any]:
        return {"features": self.features[self.indices(step, micro, rank, world_size)]}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = model(batch["features"])
        k = self.next_cfg.codebook_size
        return {
            "loss": out.loss,
            "reconstruction": out.reconstruction_loss.detach(),
            "commit": out.commit_loss.detach(),
            "usage": codebook_usage(out.ids, k),
            "perplexity": perplexity(out.ids, k),
        }


def length_groups(attention_mask: torch.Tensor, split: int, world_size: int = 1) -> list[tuple[int, int, int]]:
    """``(start, stop, width)`` row ranges of a right-padded image batch, each run as one forward trimmed to
    its longest row: rows ``[0, split)`` (text-to-image, about 280 tokens at 256 codes) apart from the rest
    (edits, which also read the reference: about 540), so that short rows are not padded to the edits'
    length. Trailing padding changes no earlier position of a causal model, so the groups' losses, weighted
    by their share of the batch, are the whole batch's. Several ranks run one group: every rank has to make
    the same sharded forward calls."""
    lengths = attention_mask.sum(1).tolist()
    bounds = [0, len(lengths)] if world_size > 1 else sorted({0, split, len(lengths)})
    return [(a, b, max(lengths[a:b])) for a, b in pairwise(bounds) if b > a]


def start_cells(labels: torch.Tensor, vocab: ImageVocab, side: int) -> torch.Tensor:
    """Bool mask, shaped like ``labels[:, 1:]`` (the next-token targets), of the layout cells where an object
    starts in raster order: an object code (not code 0, the background) whose left and upper neighbours in
    its ``side`` × ``side`` image are background or past the image's edge. Every labelled image block holds
    ``side``² consecutive codes (a target, or a labelled reference before it), so a code's cell is its
    count among the row's labelled codes modulo ``side``²; its neighbours lie 1 and ``side`` tokens back."""
    target = labels[:, 1:]
    code = vocab.is_code(target)
    cell = (code.cumsum(1) - 1) % (side * side)
    background = target == vocab.first_code_id

    def behind(k: int) -> torch.Tensor:  # is the code k tokens back background?
        return F.pad(background, (k, 0))[:, : background.shape[1]]

    left_clear = (cell % side == 0) | behind(1)
    up_clear = (cell < side) | behind(side)
    return code & ~background & left_clear & up_clear


def flow_rows(written: int, edits: int, fraction: float) -> torch.Tensor:
    """Bool mask (written + edits,) of the image rows that take the flow loss: the first ⌈fraction · n⌉ of the
    ``written`` text-to-image rows and of the ``edits`` edit rows after them (rows come in random order)."""
    n = torch.arange(written + edits)
    return (n < math.ceil(fraction * written)) | ((n >= written) & (n < written + math.ceil(fraction * edits)))


def curated_indices(meta: list[dict[str, Any]], per_tag: int, seed: int) -> list[int]:
    """Up to ``per_tag`` scenes of each GenEval tag, drawn with ``seed``: a tag-balanced instruction set."""
    by_tag: dict[str, list[int]] = defaultdict(list)
    for i, m in enumerate(meta):
        by_tag[m["metadata"]["tag"]].append(i)
    rng = random.Random(seed)
    picked = [i for tag in sorted(by_tag) for i in rng.sample(by_tag[tag], min(per_tag, len(by_tag[tag])))]
    return sorted(picked)


class NextTask(StageTask):
    """BLIP3o-NEXT training (stages ``next`` and ``instruct``; see the module docstring).

    Args (besides :class:`StageTask`'s):
        next_cfg: the model and its row mix.
        image_tokenizer: weights of the ``image_tokenizer`` stage (None for layout codes).
        decoder: weights of the ``decoder`` stage (the SANA to start from); used when ``init`` is None.
        init: weights of an earlier NEXT stage to continue from (the ``instruct`` stage).
        prompt_fraction: share of image rows asked for by the GenEval-style prompt rather than the caption.
        curated: scenes per GenEval tag to train on (None: every training scene).
        train_upsampler: draw ``next.upsampler_batch`` readings a step for the code upsampler's
            cross-entropy (the stage trains it).
    """

    def __init__(
        self,
        *args: Any,
        next_cfg: NextConfig,
        image_tokenizer: str | Path | None,
        decoder: str | Path | None = None,
        init: str | Path | None = None,
        prompt_fraction: float = 0.0,
        curated: int | None = None,
        qa_turns: int = 1,
        train_upsampler: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.train_upsampler = train_upsampler
        self.next_cfg, self.decoder, self.init, self.prompt_fraction = next_cfg, decoder, init, prompt_fraction
        self.qa_turns = qa_turns
        self.vocab: ImageVocab = add_image_vocabulary(self.tokenizer, next_cfg.codebook_size, next_cfg.num_scales)
        self.image_tokenizer = load_image_tokenizer(next_cfg, self.cfg, image_tokenizer)
        n = self.image_tokenizer.num_tokens(0)
        if n != next_cfg.image_tokens:
            raise ValueError(f"next.image_tokens is {next_cfg.image_tokens} but the image tokenizer writes {n}")
        if next_cfg.text_fraction > 0 and not self.data.text_meta:
            raise ValueError("next.text_fraction > 0 but the world has no text scenes (world.text_fraction = 0)")
        self.edit_of = {scene: j for j, scene in enumerate(self.data.edited)}
        self.pool = curated_indices(self.data.meta, curated, self.seed) if curated else None

    @cached_property
    def encoded(self) -> dict[str, torch.Tensor]:
        """Codes and latents of the scenes, of their edited versions and of the text scenes (none unless
        text rows are asked for), encoded at the first batch, so that a finished stage encodes nothing."""
        out = self.encode(self.data.images, "")
        out |= self.encode(self.data.edit_images, "edit_")
        if self.next_cfg.text_fraction > 0:
            side = self.data.images.shape[-1]  # text scenes have their own size (world.text_size)
            texts = F.interpolate(self.data.text_images.float(), size=(side, side), mode="bilinear", antialias=True)
            out |= self.encode(texts.round().clamp(0, 255).to(torch.uint8), "text_")
        else:
            out |= {f"text_{k}": v[:0] for k, v in out.items() if not k.startswith("edit_")}
        return out

    def encode(self, images: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
        """``codes`` and ``latents`` of uint8 images and, for a model with a code upsampler, ``cells``: the
        reading's cell ids (N, s, s), which the codes pool."""
        codes, latents, cells = encode_images(images, self.enc, self.image_tokenizer)
        out = {f"{prefix}codes": codes, f"{prefix}latents": latents}
        if self.next_cfg.upsample_codes:  # the config allows the upsampler with layout codes only
            out[f"{prefix}cells"] = cells
        return out

    def build_model(self) -> nn.Module:
        model = BLIP3oNext.from_config(self.next_cfg, self.vocab)
        if self.init is not None:
            return load_weights(model, self.init)
        if self.decoder is None:
            raise ValueError("the next stage starts SANA from the decoder stage's weights; none given")
        model.load_decoder({k[4:]: v for k, v in load_file(str(self.decoder)).items() if k.startswith("dit.")})
        projection = None
        if self.next_cfg.name_init:
            table = model.backbone.get_input_embeddings().weight
            projection = word_rows(self.tokenizer, table, self.image_tokenizer.vector_names())
        model.init_image_embeddings(self.image_tokenizer.codebook_vectors(), projection=projection)
        return model

    def indices(self, step: int, micro: int, rank: int, world_size: int) -> list[int]:
        idx = super().indices(step, micro, rank, world_size)
        return idx if self.pool is None else [self.pool[i % len(self.pool)] for i in idx]

    def batch(self, step: int, micro: int, rank: int, world_size: int) -> dict[str, Any]:
        cfg = self.next_cfg
        rng = random.Random(f"{self.seed}-next-{step}-{micro}-{rank}")
        t2i, words, edits, und = [], [], [], []
        for i in self.indices(step, micro, rank, world_size):
            r = rng.random()
            if r < cfg.edit_fraction and i in self.edit_of:
                edits.append(i)
            elif cfg.edit_fraction <= r < cfg.edit_fraction + cfg.understanding_fraction:
                und.append(i)
            elif cfg.text_fraction > 0 and rng.random() < cfg.text_fraction:
                words.append(i % len(self.data.text_meta))
            else:
                t2i.append(i)
        out: dict[str, Any] = {"seed": self.generator(step, micro, rank)}
        e = self.encoded
        if t2i or words or edits:
            meta = self.data.meta
            texts = [asked_text(meta[i], self.prompt_fraction, rng) for i in t2i]
            texts += [self.data.text_meta[w]["prompt"] for w in words]
            texts += [meta[i]["edit"]["instruction"] for i in edits]
            j = [self.edit_of[i] for i in edits]
            codes = torch.cat([e["codes"][t2i], e["text_codes"][words], e["edit_codes"][j]])
            written = len(t2i) + len(words)
            refs = [None] * written + e["codes"][edits].tolist()
            rows = image_rows(self.tokenizer, self.vocab, texts, codes, refs, cfg.train_prompt_text)
            if edits and cfg.edit_corruption > 0:
                rows["input_ids"] = self.corrupt(rows, written, out["seed"])
            out["image"] = rows
            out["groups"] = length_groups(rows["attention_mask"], written, world_size)
            # Per length group, the indices in it of the rows that take the flow loss (found here, on the host).
            takes_flow = flow_rows(written, len(edits), cfg.flow_fraction)
            out["flow_rows"] = [takes_flow[a:b].nonzero().squeeze(1) for a, b, _ in out["groups"]]
            out["latents"] = torch.cat([e["latents"][t2i], e["text_latents"][words], e["edit_latents"][j]])
            reference = torch.zeros_like(out["latents"])
            reference[written:] = e["latents"][edits]
            out["reference"] = reference
            if cfg.upsample_codes:  # SANA draws from the true reading of each row's target
                cells = torch.cat([e["cells"][t2i], e["text_cells"][words], e["edit_cells"][j]])
                out["spatial"] = ids_to_layout(cells.long())
        if cfg.upsample_codes and self.train_upsampler:
            pick = torch.randint(len(e["codes"]), (cfg.upsampler_batch,), generator=side_generator(out["seed"]))
            out["upsample"] = {"codes": e["codes"][pick], "cells": e["cells"][pick].long()}
        if und:
            chats = [conversation(self.data.meta[i], rng, self.qa_turns) for i in und]
            questions, answers = [q for q, _ in chats], [a for _, a in chats]
            out["text"] = text_rows(self.tokenizer, self.vocab, e["codes"][und], questions, answers)
        return out

    def corrupt(self, rows: dict[str, torch.Tensor], first_edit: int, seed: int) -> torch.Tensor:
        """Input ids with ``edit_corruption`` of the written codes of rows ``first_edit``… (the edit rows)
        replaced by uniformly drawn codes; labels are left as they are."""
        g = side_generator(seed)  # not seed + 1, which is the next rank's flow-noise seed
        ids = rows["input_ids"].clone()
        written = condition_positions(ids, rows["attention_mask"], self.vocab) & self.vocab.is_code(ids)
        written[:first_edit] = False
        hit = written & (torch.rand(ids.shape, generator=g) < self.next_cfg.edit_corruption)
        random_codes = torch.randint(*self.vocab.code_range, ids.shape, generator=g)
        return torch.where(hit, random_codes, ids)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        cfg = self.next_cfg
        zero = torch.zeros(())
        ce, flow, text, cells = zero, zero, zero, zero
        upsample = batch.get("upsample")
        if "image" in batch:
            rows = batch["image"]
            sigma, x_t, target, keep = flow_step(cfg.cond_dropout, 1.0, "uniform", batch["latents"], batch["seed"])
            reference = batch["reference"] if cfg.reference_latents else None
            labelled = (rows["labels"][:, 1:] != IGNORE).sum()
            flowing = sum(len(f) for f in batch["flow_rows"])
            # the batch's CE and flow means, summed group by group
            for (start, stop, width), f in zip(batch["groups"], batch["flow_rows"], strict=True):
                r, fr = slice(start, stop), f + start
                out = model(
                    rows["input_ids"][r, :width],
                    rows["attention_mask"][r, :width],
                    latents=x_t[fr],
                    sigma=sigma[fr],
                    keep=keep[fr],
                    reference=None if reference is None else reference[fr],
                    num_tokens=cfg.image_tokens,
                    spatial=batch["spatial"][fr] if "spatial" in batch else None,
                    upsample=upsample["codes"] if upsample is not None and start == 0 else None,
                    flow_rows=f,
                )
                if out.cell_logits is not None:
                    cells = F.cross_entropy(out.cell_logits, upsample["cells"])
                labels = rows["labels"][r, :width]
                weights = None
                if cfg.start_cell_weight != 1:
                    starts = start_cells(labels, self.vocab, self.image_tokenizer.side)
                    weights = 1 + (cfg.start_cell_weight - 1) * starts
                group_ce = causal_lm_loss(out.logits, labels, weights)
                ce = ce + group_ce * (labels[:, 1:] != IGNORE).sum() / labelled
                flow = flow + flow_loss(out.velocity, target[fr]) * len(f) / flowing
        if "text" in batch:
            rows = batch["text"]
            text = causal_lm_loss(model(rows["input_ids"], rows["attention_mask"]).logits, rows["labels"])
        return {
            "loss": cfg.ce_weight * (ce + text) + cfg.flow_weight * flow + cells,
            "ce": ce.detach(),
            "cells": cells.detach(),
            "flow": flow.detach(),
            "text": text.detach(),
        }
