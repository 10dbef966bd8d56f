"""The shapes-world training stages of BLIP3-o as tasks for :func:`blip3o.train.trainer.train`.

Each task builds its trainable model, serves deterministic random-access batches, and computes its
losses; frozen encoders (the mini-CLIP vision tower when it is a target, the VAE) are held by the
task and run under ``no_grad`` outside the trained model.

Stages (in order): ``clip`` (SigLIP contrastive on captions), ``vae`` (AutoencoderKL reconstruction),
``decoder`` (SANA over VAE latents from CLIP features), ``understanding`` (projector + backbone on
captions and questions), ``generation`` (queries + generation head, backbone frozen: the paper's
sequential recipe; or everything trainable with understanding batches mixed in: joint).
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from blip3o.config.model import ModelConfig
from blip3o.data.processing import generation_inputs, to_pixels, understanding_inputs
from blip3o.data.tokenizer import load_tokenizer
from blip3o.data.world_data import WorldSplit, batch_indices, load_split
from blip3o.diffusion.flow import flow_loss, interpolate, sample_sigmas, velocity_target
from blip3o.diffusion.masked import corrupt_cells, mask_cells, masked_ce
from blip3o.models.build import Encoders, build_blip3o, build_reader, clip_map, grounding_width, load_weights
from blip3o.models.heads import (
    LAYOUT_VOCAB,
    PixelDecoder,
    layout_to_ids,
    map_to_tokens,
    pool_layout,
    tokens_to_map,
)
from blip3o.models.parts import build_clip, build_vae
from blip3o.models.unified import GENERATION_PARTS
from blip3o.world.prompts import shape_swapped, shapes_named
from blip3o.world.spec import COLOR_NAMES, NUM_CLASS_IDS, NUM_COLOUR_IDS, SHAPES


class StageTask:
    """Shared plumbing: world data, tokenizer, batch size and accumulation, seeds, frozen encoders."""

    def __init__(
        self,
        cfg: ModelConfig,
        world: str | Path,
        tokenizer: str | Path,
        batch_size: int,
        seed: int,
        encoders: Encoders | None = None,
        grad_accum: int = 1,
    ) -> None:
        self.cfg, self.batch_size, self.seed, self.enc, self.grad_accum = cfg, batch_size, seed, encoders, grad_accum
        self.data: WorldSplit = load_split(world, "train")
        self.tokenizer = load_tokenizer(tokenizer)

    def indices(self, step: int, micro: int, rank: int, world_size: int) -> list[int]:
        """Micro-batch ``micro`` of this rank's share of global batch ``step``."""
        share = batch_indices(len(self.data), self.batch_size, step, self.seed, rank, world_size)
        size = len(share) // self.grad_accum
        return share[micro * size : (micro + 1) * size]

    def generator(self, step: int, micro: int, rank: int) -> int:
        """A seed for this micro-batch's noise, so that a resumed run draws the same noise."""
        return (self.seed * 1_000_003 + step * 1_009 + micro * 101 + rank) % (2**31)


def side_generator(seed: int) -> torch.Generator:
    """A generator for a batch's draws besides its flow noise (augmentation, corruption), from the batch's
    seed. :meth:`StageTask.generator` seeds stay below 2**31, so this one never replays another micro-batch's
    or rank's stream (``seed + 1`` is the next rank's seed)."""
    return torch.Generator().manual_seed(seed + 2**31)


@torch.no_grad()
def encode_in_chunks(
    images: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor], chunk: int = 256
) -> torch.Tensor:
    """``encode`` (a frozen encoder of pixels in [-1, 1]) over uint8 images (N, 3, H, W), in chunks."""
    return torch.cat([encode(to_pixels(images[i : i + chunk])) for i in range(0, len(images), chunk)])


def asked_text(meta: dict[str, Any], prompt_fraction: float, rng: random.Random) -> str:
    """The text a generation row asks by: the scene's GenEval-style prompt with probability
    ``prompt_fraction``, else its caption."""
    return meta["prompt"] if rng.random() < prompt_fraction else meta["caption"]


class TaggedSiglip(nn.Module):
    """SigLIP plus two linear heads that the stage drops afterwards: a tagging head on the pooled image
    embedding (which classes the caption names) and a grounding head on every patch of the map (which
    class and which colour cover that patch, background included)."""

    def __init__(self, clip: nn.Module, num_tags: int, num_grounded: int) -> None:
        super().__init__()
        self.clip = clip
        width = clip.config.vision_config.hidden_size
        self.tags = nn.Linear(width, num_tags)
        self.patches = nn.Linear(width, num_grounded)
        self.background = nn.Parameter(torch.zeros(width))  # the empty patches' feature (locality loss)

    def forward(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor, shifted: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """→ logits per image (B, texts), tag logits (B, T), grounding logits per patch (B, g·g, G), each
        patch feature's offset from the learnt background feature (B, g·g, D), and the same offsets for
        ``shifted`` (the images moved by a few pixels; None when not given)."""
        out = self.clip(input_ids=input_ids, pixel_values=pixel_values)
        vision = out.vision_model_output
        patches = vision.last_hidden_state
        moved = None
        if shifted is not None:
            moved = self.clip.vision_model(pixel_values=shifted).last_hidden_state - self.background
        offsets = patches - self.background
        return out.logits_per_image, self.tags(vision.pooler_output), self.patches(patches), offsets, moved


def sigmoid_loss(logits: torch.Tensor) -> torch.Tensor:
    """SigLIP's loss per image for logits (B, B + K): image i matches text i; every other column, the
    other texts of the batch and K extra negatives, is a negative."""
    b = logits.shape[0]
    labels = -torch.ones_like(logits)
    labels[:, :b].fill_diagonal_(1.0)
    return -F.logsigmoid(labels * logits).sum() / b


class ClipTask(StageTask):
    """Mini-CLIP: SigLIP's sigmoid contrastive loss on world prompts and captions, with two additions
    that make a tiny tower learn shapes, not only colours, within a CPU budget:

    - every image gets one hard negative, its own text with one shape swapped
      (:func:`blip3o.world.prompts.shape_swapped`), besides the other texts of the batch;
    - a tagging loss (:class:`TaggedSiglip`, weight ``tag_weight``): the pooled embedding predicts
      which classes the caption names (multi-label, read from the caption's nouns);
    - a grounding loss (weight ``ground_weight``): every patch predicts the class and the colour of the
      object whose box covers it, or background (:func:`grounding_targets`), so that every patch
      feature knows what covers it. It stands in for the LocCa grounded-captioning decoder (captions
      with boxes) that SigLIP2, the real-scale target encoder, is trained with for dense features;
    - optionally a locality loss (weight ``local_weight``, :func:`locality_loss`): the patches that no
      object touches should all carry one learnt feature. Attention otherwise spreads the scene into
      every patch, so that a decoder reads objects from the background too and a generator has to
      write the whole scene into every token.

    Random negatives in a small batch differ in colour almost always. With the contrastive loss alone,
    or with a bag-of-words loss over every caption token, a linear probe finds no more about which
    shapes an image holds in the tower's features than the majority guess (docs/blip3o.md); the pixel
    decoder and the understanding stage cannot recover what the features lack. The weights saved
    under ``clip.`` are a plain ``SiglipModel``.
    """

    tag_weight = 10.0
    ground_weight = 10.0

    def __init__(self, *args: Any, local_weight: float = 0.0, shift_weight: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.local_weight, self.shift_weight = local_weight, shift_weight

    def build_model(self) -> nn.Module:
        vision = self.cfg.vision
        clip = build_clip(vision, len(self.tokenizer))
        return TaggedSiglip(clip, len(SHAPES), grounding_width(vision.grounding_cells))

    @cached_property
    def grounding(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Class and colour ids of every training image's patches, or of each patch's cells (B, g·g·c²), patch
        by patch (:func:`grounding_targets`, :func:`patch_cells`), built at the first batch."""
        cells = self.cfg.vision.grounding_cells
        fine = grounding_targets(self.data.meta, self.cfg.vision.grid * cells)
        return tuple(patch_cells(ids, cells) for ids in fine)  # type: ignore[return-value]

    @cached_property
    def empty(self) -> torch.Tensor:
        """Which patches of every training image no object touches (:func:`empty_patches`)."""
        return empty_patches(self.data.meta, self.cfg.vision.grid)

    def batch(self, step: int, micro: int, rank: int, world_size: int) -> dict[str, Any]:
        idx = self.indices(step, micro, rank, world_size)
        rng = random.Random(f"{self.seed}-{step}-{rank}")
        captions = [self.data.meta[i]["caption"] for i in idx]
        texts = [self.data.meta[i]["prompt"] if rng.random() < 0.5 else c for i, c in zip(idx, captions, strict=True)]
        negatives = [shape_swapped(t, rng) for t in texts]
        enc = self.tokenizer(
            texts + negatives, padding="max_length", truncation=True, max_length=48, return_tensors="pt"
        )
        named = [shapes_named(c) for c in captions]
        tags = torch.tensor([[s in n for s in SHAPES] for n in named], dtype=torch.float32)
        classes, colours = self.grounding
        pixels = to_pixels(self.data.images[idx])
        shifted = None
        if self.shift_weight > 0:
            g = side_generator(self.generator(step, micro, rank))
            shifted = shift_pixels(pixels, self.cfg.vision.patch_size // 2 - 1, g)
        return {
            "pixels": pixels,
            "shifted": shifted,
            "input_ids": enc["input_ids"],
            "tags": tags,
            "classes": classes[idx],
            "colours": colours[idx],
            "empty": self.empty[idx],
        }

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits, tag_logits, patch_logits, offsets, moved = model(batch["input_ids"], batch["pixels"], batch["shifted"])
        b, k = logits.shape[0], NUM_CLASS_IDS
        patch_logits = patch_logits.reshape(b, -1, NUM_CLASS_IDS + NUM_COLOUR_IDS)  # one row per patch cell
        contrastive = sigmoid_loss(logits)
        tags = F.binary_cross_entropy_with_logits(tag_logits, batch["tags"])
        grounding = labelled_ce(patch_logits[..., :k], batch["classes"]) + labelled_ce(
            patch_logits[..., k:], batch["colours"]
        )
        hard = (logits[:, :b].diagonal() > logits[:, b:].diagonal()).float().mean()
        tag_acc = ((tag_logits > 0) == batch["tags"].bool()).float().mean()
        on_object = batch["classes"] > 0
        right = (patch_logits[..., :k].argmax(-1) == batch["classes"]) & on_object
        patch_acc = right.sum() / on_object.sum().clamp_min(1)
        local = locality_loss(offsets, batch["empty"])
        total = contrastive + self.tag_weight * tags + self.ground_weight * grounding
        extra = {}
        if moved is not None:
            extra["shift"] = shift_loss(offsets, moved)
            total = total + self.shift_weight * extra["shift"]
        return {
            # Also at weight 0, so that the background feature has a gradient and optimizer state to checkpoint.
            "loss": total + self.local_weight * local,
            "local": local.detach(),
            **{k: v.detach() for k, v in extra.items()},
            "contrastive": contrastive.detach(),
            "tags": tags.detach(),
            "grounding": grounding.detach(),
            "tag_acc": tag_acc.detach(),
            "object_patch_acc": patch_acc.detach(),
            "hard_negative_acc": hard.detach(),
        }


def labelled_ce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over the labelled entries (label != -100); 0 when none is labelled. With ``weights``
    (shaped like ``labels``) each entry's CE is weighted before summing; the divisor stays the labelled count."""
    labels = labels.flatten()
    logits = logits.flatten(0, -2).float()
    if weights is None:
        total = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    else:
        ce = F.cross_entropy(logits, labels, ignore_index=-100, reduction="none")
        total = (ce * weights.flatten()).sum()
    return total / (labels != -100).sum().clamp_min(1)


def map_spread(features: torch.Tensor) -> torch.Tensor:
    """Σ ‖feature − mean feature‖² over a batch of (B, N, D) patch features (or their offsets from one
    shared vector), clamped away from 0: the denominator that makes the map losses scale-free."""
    return (features - features.mean((0, 1))).pow(2).sum().clamp_min(1e-8)


def shift_pixels(pixels: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by its own random (dy, dx) ∈ [−max_shift, max_shift]², edges replicated."""
    b, _, h, w = pixels.shape
    padded = F.pad(pixels, (max_shift,) * 4, mode="replicate")
    dy, dx = (torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator)).unbind(0)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(b, pixels.shape[1], h, w + 2 * max_shift)
    cropped = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(b, pixels.shape[1], h, w)
    return cropped.gather(3, cols)


def shift_loss(patches: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
    """Σ ‖patch − the same patch of the moved image‖² over Σ ‖patch − mean patch‖² ((B, N, D) features,
    or their offsets from one shared vector): the share of the map's variance that a sub-patch move of
    the scene changes. Scale-free, so shrinking every feature does not lower it."""
    return (patches - moved).pow(2).sum() / map_spread(patches)


def locality_loss(offsets: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """Σ over empty patches of ‖feature − background‖², over Σ over all patches of ‖feature − mean feature‖²
    ((B, N, D) offsets feature − background, (B, N) empty mask): the share of the map's variance that the
    patches no object touches hold. Scale-free, so shrinking every feature does not lower it."""
    return (offsets.pow(2).sum(-1) * empty).sum() / map_spread(offsets)


def unit_boxes(meta: dict[str, Any]) -> list[tuple[dict[str, Any], tuple[float, ...]]] | None:
    """A shape scene's objects, each with its box (x0, y0, x1, y1) as fractions of the image side; None for a
    sample that is not a shape scene (a text scene)."""
    if meta["kind"] != "scene":
        return None
    return [(obj, tuple(v / meta["size"] for v in obj["box"])) for obj in meta["objects"]]


def empty_patches(metas: list[dict[str, Any]], grid: int) -> torch.Tensor:
    """(B, g·g) bool: the patches of a ``grid``×``grid`` map (row-major) that no object box overlaps. Text
    scenes have none."""
    empty = torch.ones(len(metas), grid, grid, dtype=torch.bool)
    edges = torch.arange(grid + 1) / grid
    lo, hi = edges[:-1], edges[1:]
    for i, meta in enumerate(metas):
        if (boxes := unit_boxes(meta)) is None:
            empty[i] = False
            continue
        for _, (x0, y0, x1, y1) in boxes:
            rows, cols = (lo < y1) & (hi > y0), (lo < x1) & (hi > x0)
            empty[i] &= ~(rows[:, None] & cols[None, :])
    return empty.flatten(1)


def patch_cells(ids: torch.Tensor, cells: int) -> torch.Tensor:
    """Ids on a fine (g·c)×(g·c) grid (B, (g·c)², row-major) → patch by patch (B, g·g·c²): the c×c cells of
    patch 0 row by row, then those of patch 1, the order in which a per-patch head emits them
    (:func:`blip3o.models.heads.cells_to_map` is the inverse for its outputs)."""
    b, n = ids.shape
    g = math.isqrt(n) // cells
    return ids.view(b, g, cells, g, cells).permute(0, 1, 3, 2, 4).reshape(b, -1)


def grounding_targets(metas: list[dict[str, Any]], grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per patch of a ``grid``×``grid`` map (row-major), the class and the colour of the object whose box
    covers the patch's centre: (B, g·g) class ids (0 background, 1 + index in ``SHAPES``) and colour ids
    (0 background, 1 + index in ``COLOR_NAMES``). Samples that are not shape scenes (text scenes) are
    ignored (-100)."""
    classes = torch.zeros(len(metas), grid, grid, dtype=torch.long)
    colours = torch.zeros_like(classes)
    centres = (torch.arange(grid) + 0.5) / grid
    for i, meta in enumerate(metas):
        if (boxes := unit_boxes(meta)) is None:
            classes[i] = colours[i] = -100
            continue
        for obj, (x0, y0, x1, y1) in boxes:
            inside = ((centres >= y0) & (centres <= y1))[:, None] & ((centres >= x0) & (centres <= x1))[None, :]
            classes[i][inside] = 1 + SHAPES.index(obj["class"])
            colours[i][inside] = 1 + COLOR_NAMES.index(obj["color"])
    return classes.flatten(1), colours.flatten(1)


class VAEAutoencoding(nn.Module):
    """Training wrapper so that FSDP sees one ``forward``: encode, sample with given noise, decode."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        recon = self.vae.decode(posterior.mean + posterior.std * noise).sample
        return recon, posterior.kl().mean()


class VAETask(StageTask):
    """AutoencoderKL: L1 + MSE reconstruction and a small KL term."""

    kl_weight = 1e-6

    def build_model(self) -> nn.Module:
        return VAEAutoencoding(build_vae(self.cfg.vae))

    def batch(self, step: int, micro: int, rank: int, world_size: int) -> dict[str, Any]:
        idx = self.indices(step, micro, rank, world_size)
        return {"pixels": to_pixels(self.data.images[idx]), "seed": self.generator(step, micro, rank)}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        x = batch["pixels"]
        c, side, _ = self.cfg.latent_shape
        noise = torch.randn((x.shape[0], c, side, side), generator=torch.Generator().manual_seed(batch["seed"]))
        recon, kl = model(x, noise.to(x.device))
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        return {"loss": rec + self.kl_weight * kl, "recon": rec.detach(), "kl": kl.detach()}


def flow_step(
    cfg_dropout: float,
    shift: float,
    mode: str,
    x0: torch.Tensor,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise level, noised input, velocity target and condition keep-mask for one flow-matching batch."""
    g = torch.Generator().manual_seed(seed)
    sigma = sample_sigmas(x0.shape[0], generator=g, mode=mode, shift=shift)
    noise = torch.randn(x0.shape, generator=g)
    keep = (torch.rand(x0.shape[0], generator=g) >= cfg_dropout).float()
    return sigma, interpolate(x0, noise, sigma), velocity_target(x0, noise), keep


class ReaderTask(StageTask):
    """Layout reader (:class:`~blip3o.models.heads.LayoutReader`): the frozen mini-CLIP's map of each training
    image → the class and colour of each cell of its layout (:func:`grounding_targets`), cross-entropy on both."""

    def build_model(self) -> nn.Module:
        return build_reader(self.cfg.vision)

    @cached_property
    def targets(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The tower's map of every training image (the tower is frozen) and its cells' class and colour ids
        (B, s, s), built at the first batch."""
        maps = encode_in_chunks(self.data.images, lambda px: clip_map(self.enc.vision, px, self.enc.pool))
        side = self.cfg.layout_side
        classes, colours = grounding_targets(self.data.meta, side)
        return maps, classes.view(-1, side, side), colours.view(-1, side, side)

    def batch(self, step: int, micro: int, rank: int, world_size: int) -> dict[str, Any]:
        idx = self.indices(step, micro, rank, world_size)
        maps, classes, colours = self.targets
        return {"maps": maps[idx], "classes": classes[idx], "colours": colours[idx]}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits = model(batch["maps"]).permute(0, 2, 3, 1)  # (B, s, s, classes + colours)
        k, classes = NUM_CLASS_IDS, batch["classes"]
        loss = labelled_ce(logits[..., :k], classes) + labelled_ce(logits[..., k:], batch["colours"])
        on_object = classes > 0
        right = (logits[..., :k].argmax(-1) == classes) & on_object
        return {"loss": loss, "object_cell_acc": (right.sum() / on_object.sum().clamp_min(1)).detach()}


class DecoderTask(StageTask):
    """Pixel decoder: SANA flow matching over VAE latents, conditioned on CLIP maps or layouts (dropped with p);
    each layout pooled by one of ``decoder.layout_pools``, drawn per sample."""

    def build_model(self) -> nn.Module:
        c, side, _ = self.cfg.latent_shape
        return PixelDecoder(self.cfg.decoder, c, side, self.cfg.decoder_channels)

    @cached_property
    def targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Condition tokens (standardised CLIP map or layout) and VAE latents of every training image (the
        encoders are frozen)."""
        condition = self.enc.encode_all(self.data.images, self.cfg.decoder_input)
        return map_to_tokens(condition), self.enc.encode_all(self.data.images, "latent")

    def batch(self, step: int, micro: int, rank: int, world_size: int) -> dict[str, Any]:
        idx = self.indices(step, micro, rank, world_size)
        clip, latents = self.targets
        return {"latents": latents[idx], "clip": clip[idx], "seed": self.generator(step, micro, rank)}

    def pooled(self, tokens: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Layout tokens (B, s·s, C), each sample's pooled by a block side drawn from ``decoder.layout_pools``."""
        pools = self.cfg.decoder.layout_pools
        if pools == [1]:
            return tokens
        layout = tokens_to_map(tokens)
        choice = torch.randint(len(pools), (len(tokens),), generator=g)
        out = layout.clone()
        for i, p in enumerate(pools):
            pick = choice == i
            out[pick] = pool_layout(layout[pick], p)
        return map_to_tokens(out)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        dec = self.cfg.decoder
        sigma, x_t, target, keep = flow_step(dec.cond_dropout, 1.0, "uniform", batch["latents"], batch["seed"])
        g = side_generator(batch["seed"])
        clip = self.pooled(batch["clip"], g)
        if dec.noise_augment > 0:
            level = dec.noise_augment * torch.rand(clip.shape[0], 1, 1, generator=g)
            clip = clip + level * torch.randn(clip.shape, generator=g)
        v = model(x_t, sigma, clip * keep[:, None, None])
        return {"loss": flow_loss(v, target)}


DESCRIBE = "Describe the image."


class UnderstandingTask(StageTask):
    """Image → text: captions ("Describe the image.") and question/answer conversations, CE on the answers."""

    def __init__(self, *args: Any, qa_turns: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.qa_turns = qa_turns

    def build_model(self) -> nn.Module:
        # The model gets its own copy of the tower: the task's copy computes targets outside the (sharded) model.
        return build_blip3o(self.cfg, self.tokenizer, copy.deepcopy(self.enc.vision))

    def batch(self, step: int, micro: int, rank: int, world_size: int) -> dict[str, Any]:
        idx = self.indices(step, micro, rank, world_size)
        return understanding_batch(
            self.data, self.tokenizer, idx, f"{self.seed}-und-{step}-{rank}", self.cfg.vision.grid**2, self.qa_turns
        )

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"loss": understanding_loss(model, batch)}


def conversation(meta: dict[str, Any], rng: random.Random, turns: int) -> tuple[list[str], list[str]]:
    """What one understanding row asks about a scene: its questions and answers (3 rows in 4), or its
    caption ("Describe the image.").

    A conversation asks up to ``turns`` of the scene's questions in random order (multi-turn, as LLaVA
    trains): one forward pass over the image then supervises several answers. It holds the yes/no or
    the colour question of a scene, not both: they ask about one object, and either answer would give
    the other away without a look at the image. Captions, which tell everything, are rows of their own.
    """
    qa = meta["qa"]
    if not qa or rng.random() >= 0.75:
        return [DESCRIBE], [meta["caption"]]
    if turns > 1:
        drop = rng.choice(("yesno", "color"))
        qa = [p for p in qa if p.get("type") != drop] or qa
    pairs = rng.sample(qa, min(turns, len(qa)))
    return [p["question"] for p in pairs], [p["answer"] for p in pairs]


def understanding_batch(
    data: WorldSplit,
    tokenizer,
    idx: list[int],
    seed: str,
    n_image_tokens: int,
    qa_turns: int = 1,
) -> dict[str, Any]:
    """Understanding rows (:func:`conversation`) for the given samples."""
    rng = random.Random(seed)
    rows = [conversation(data.meta[i], rng, qa_turns) for i in idx]
    inputs = understanding_inputs(tokenizer, [q for q, _ in rows], [a for _, a in rows], n_image_tokens)
    return {**inputs, "pixels": to_pixels(data.images[idx])}


def understanding_loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    logits = model(
        "logits", input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixels=batch["pixels"]
    )
    return causal_lm_loss(logits, batch["labels"])


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token CE in float32, averaged over the labelled tokens; ``weights`` (shaped like ``labels[:, 1:]``)
    weigh each target (:func:`labelled_ce`)."""
    return labelled_ce(logits[:, :-1], labels[:, 1:], weights)


class GenerationTask(StageTask):
    """Text → image: query-conditioned flow matching (or MSE) on CLIP maps or VAE latents.

    ``joint_weight`` > 0 mixes an understanding batch into every step (joint training); with the
    backbone frozen (sequential training) it must be 0. ``prompt_fraction``: share of rows asked for by
    the scene's GenEval-style prompt; the others by its caption, which names every object's colour
    and place.
    """

    def __init__(
        self,
        *args: Any,
        init: str | Path,
        joint_weight: float = 0.0,
        prompt_fraction: float = 1.0,
        qa_turns: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.init, self.joint_weight, self.prompt_fraction = init, joint_weight, prompt_fraction
        self.qa_turns = qa_turns

    def build_model(self) -> nn.Module:
        model = build_blip3o(self.cfg, self.tokenizer, copy.deepcopy(self.enc.vision))
        # The understanding stage's weights, without its (untrained) generation head, which may differ in kind.
        load_weights(model, self.init, skip=GENERATION_PARTS)
        return model

    @cached_property
    def targets(self) -> torch.Tensor:
        """The generation target (standardised CLIP map, VAE latents or layout) of every training image."""
        return self.enc.encode_all(self.data.images, self.cfg.generation.target)

    def batch(self, step: int, micro: int, rank: int, world_size: int) -> dict[str, Any]:
        idx = self.indices(step, micro, rank, world_size)
        rng = random.Random(f"{self.seed}-gen-{step}-{micro}-{rank}")
        texts = [asked_text(self.data.meta[i], self.prompt_fraction, rng) for i in idx]
        ids, mask = generation_inputs(self.tokenizer, texts)
        seed = self.generator(step, micro, rank)
        out = {"input_ids": ids, "attention_mask": mask, "x0": self.targets[idx], "seed": seed}
        if self.cfg.generation.self_condition:  # half of the rows see the head's own estimate
            out["self_cond"] = torch.rand(len(idx), generator=side_generator(seed)) < 0.5
        if self.joint_weight > 0:
            out["und"] = understanding_batch(
                self.data,
                self.tokenizer,
                idx,
                f"{self.seed}-und-{step}-{rank}",
                self.cfg.vision.grid**2,
                self.qa_turns,
            )
        return out

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        gen = self.cfg.generation
        if gen.objective == "discrete":
            return self.with_joint(model, batch, self.masked_loss(model, batch))
        x0 = batch["x0"]
        sigma, x_t, target, keep = flow_step(gen.cond_dropout, gen.shift, gen.timestep_sampling, x0, batch["seed"])
        pred = model(
            "generate",
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            x=x_t,
            sigma=sigma,
            keep=keep,
            **({"self_cond": batch["self_cond"]} if "self_cond" in batch else {}),
        )
        pred, prior = pred if gen.prior else (pred, None)
        gen_loss = flow_loss(pred, target) if gen.objective == "flow" else flow_loss(pred, x0)
        out = {"gen": gen_loss.detach()}
        total = gen_loss
        if prior is not None:
            prior_loss = flow_loss(prior, x0)
            total = total + gen.prior_weight * prior_loss
            out["prior"] = prior_loss.detach()
        out["loss"] = total
        return self.with_joint(model, batch, out)

    def masked_loss(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Discrete flow matching (:mod:`blip3o.diffusion.masked`): the masked cells' cross-entropy, and with
        ``generation.corruption`` that of the revealed cells replaced by random ids."""
        gen = self.cfg.generation
        ids = layout_to_ids(batch["x0"])
        g = torch.Generator().manual_seed(batch["seed"])
        sigma = sample_sigmas(ids.shape[0], generator=g, mode=gen.timestep_sampling, shift=gen.shift)
        keep = (torch.rand(ids.shape[0], generator=g) >= gen.cond_dropout).float()
        x_t, masked = mask_cells(ids, sigma, LAYOUT_VOCAB, g)
        if gen.corruption > 0:
            x_t, corrupted = corrupt_cells(x_t, masked, gen.corruption, LAYOUT_VOCAB, g)
            masked = masked | corrupted
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        logits = model("generate", **inputs, x=x_t, sigma=sigma, keep=keep)
        logits, prior = logits if gen.prior else (logits, None)
        loss = masked_ce(logits, ids, masked)
        out = {"gen": loss.detach(), "loss": loss}
        if prior is not None:  # log p(cell | prompt): every cell's cross-entropy
            prior_loss = masked_ce(prior, ids, torch.ones_like(masked))
            out["loss"] = loss + gen.prior_weight * prior_loss
            out["prior"] = prior_loss.detach()
        return out

    def with_joint(
        self, model: nn.Module, batch: dict[str, Any], out: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Add joint training's understanding loss (weight ``joint_weight``) to a generation loss dict."""
        if self.joint_weight > 0:
            und = understanding_loss(model, batch["und"])
            out["loss"] = out["loss"] + self.joint_weight * und
            out["und"] = und.detach()
        return out
