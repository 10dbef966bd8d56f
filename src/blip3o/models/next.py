"""BLIP3o-NEXT: a causal LM that writes discrete image tokens, a connector, and a SANA velocity network.

The backbone (a ``transformers`` Qwen3) reads a prompt and writes an image as
``<im_start> <S{scale}> <I{k1}> … <I{kN}> <im_end>``, one ``<I{k}>`` token per code of the image
tokenizer (reference spec §5.2). The last-layer hidden states of the scale token and the N image tokens
(the "condition", 1 + N positions; 730 for the official 729-token images) go through the
:class:`Connector` into the cross-attention of a ``diffusers`` ``SanaTransformer2DModel`` that predicts
the flow velocity of VAE latents (§5.3, §6.2). The model computes no loss; CE, noise and CFG dropout
live in the trainer, sampling in ``infer/``.

Deliberate differences from the official code:

- the condition is found by token id, per row, with a vectorised mask (:func:`condition_positions`);
  a row without exactly 1 + N such positions is an error. The official code meant to slice
  ``<im_start>+1 … <im_end>`` but compared the hidden *width* with 730 and so always took the last 730
  positions of the padded row (§5.3, issue #78);
- positions come from the attention mask (``positions_from_mask``), so a row's hidden states and
  condition do not depend on how much padding the batch gave it (issue #83);
- image-token embeddings start from a projection of the codebook, so they differ from one another
  (:meth:`BLIP3oNext.init_image_embeddings`); the official ``load_embeddings_from_vision`` is a no-op
  for Qwen3 and every image row starts as the same mean vector (§5.2, issue #99);
- every id is read back from the tokenizer (:func:`add_image_vocabulary`), none is hard-coded.

The DiT is the ``dit`` attribute (named by role); ``freeze_sana_except`` keeps the official recipe's
name for what it freezes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from diffusers import SanaTransformer2DModel
from torch import Tensor, nn
from transformers import PreTrainedModel

from blip3o.config.next import NextConfig
from blip3o.models.heads import CodeUpsampler, tokens_to_map
from blip3o.models.parts import build_backbone, build_sana
from blip3o.models.unified import positions_from_mask

if TYPE_CHECKING:
    from collections.abc import Sequence

    from transformers import PreTrainedTokenizerBase

__all__ = [
    "CONNECTOR_NORM_INIT",
    "IM_END",
    "IM_START",
    "BLIP3oNext",
    "Connector",
    "ImageVocab",
    "NextOutput",
    "add_image_vocabulary",
    "code_token",
    "condition_positions",
    "gather_condition",
    "scale_token",
    "word_rows",
]

IM_START = "<im_start>"
IM_END = "<im_end>"


def scale_token(index: int) -> str:
    """The text of scale token ``index``: ``<S0>``, ``<S1>``, …"""
    return f"<S{index}>"


def code_token(code: int) -> str:
    """The text of the token for image code ``code``: ``<I0>``, ``<I1>``, …"""
    return f"<I{code}>"


@dataclass(frozen=True)
class ImageVocab:
    """Where the image vocabulary sits in the token ids: special tags, scale tokens, K contiguous code ids."""

    im_start: int
    im_end: int
    scale_ids: tuple[int, ...]
    """Id of ``<S{i}>`` at index i."""
    first_code_id: int
    """Id of ``<I0>``; code k has id ``first_code_id + k``."""
    codebook_size: int
    vocab_size: int
    """Rows the backbone's embedding needs: the tokenizer's length after the image tokens were added."""

    def __post_init__(self) -> None:
        if self.codebook_size < 1 or not self.scale_ids:
            raise ValueError(f"an image vocabulary needs ≥ 1 code and ≥ 1 scale token, got {self}")
        added = [self.im_start, self.im_end, *self.scale_ids]
        lo, hi = self.code_range
        if len(set(added)) != len(added) or any(lo <= i < hi for i in added):
            raise ValueError(f"image vocabulary ids overlap: {added} and codes [{lo}, {hi})")
        if min(*added, lo) < 0 or max(*added, hi - 1) >= self.vocab_size:
            raise ValueError(f"image vocabulary ids must lie in [0, vocab_size={self.vocab_size}), got {self}")

    @classmethod
    def appended(cls, text_vocab_size: int, codebook_size: int, num_scales: int) -> ImageVocab:
        """The layout :func:`add_image_vocabulary` gives a tokenizer of length ``text_vocab_size`` that has
        none of the tokens yet: ``<im_start>``, ``<im_end>``, the scale tokens, then the codes (the
        official layout: 151669, 151670, 151671–151673, 151674–217209 for Qwen3). For building the model
        without a tokenizer at hand (meta-device shape checks); with one, read the ids from it."""
        scales = tuple(range(text_vocab_size + 2, text_vocab_size + 2 + num_scales))
        first = text_vocab_size + 2 + num_scales
        return cls(
            im_start=text_vocab_size,
            im_end=text_vocab_size + 1,
            scale_ids=scales,
            first_code_id=first,
            codebook_size=codebook_size,
            vocab_size=first + codebook_size,
        )

    @property
    def code_range(self) -> tuple[int, int]:
        """``(lo, hi)``: the code ids are exactly ``[lo, hi)``."""
        return self.first_code_id, self.first_code_id + self.codebook_size

    @property
    def num_scales(self) -> int:
        return len(self.scale_ids)

    @property
    def added_ids(self) -> list[int]:
        """Every id the image vocabulary owns: tags, scales, codes."""
        return [self.im_start, self.im_end, *self.scale_ids, *range(*self.code_range)]

    def is_code(self, ids: Tensor) -> Tensor:
        """Bool mask of ``ids`` (any shape) that are image codes."""
        lo, hi = self.code_range
        return (ids >= lo) & (ids < hi)

    def codes_to_ids(self, codes: Tensor) -> Tensor:
        """Image-tokenizer codes (any shape, in [0, K)) → token ids."""
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got [{codes.min()}, {codes.max()}]")
        return codes + self.first_code_id

    def ids_to_codes(self, ids: Tensor) -> Tensor:
        """Token ids that are all image codes → codes in [0, K)."""
        if not bool(self.is_code(ids).all()):
            raise ValueError(f"every id must be an image code id in {list(self.code_range)}")
        return ids - self.first_code_id


def word_rows(tokenizer: PreTrainedTokenizerBase, table: Tensor, words: Sequence[str]) -> Tensor:
    """(len(words), H): for each entry of ``words`` (one word or several, space-separated), the mean over its
    words of the mean of the ``table`` rows of the word's tokens as a word inside text (a leading space),
    each row standardised (zero mean, unit standard deviation). As the ``projection`` of
    :meth:`BLIP3oNext.init_image_embeddings` for layout codes (one-hot class and colour), it starts a code's
    embedding as the sum of the embeddings of its class and colour names, so a prompt's words and the codes
    that draw them share directions from the first step."""

    def row(word: str) -> Tensor:
        ids = tokenizer.encode(" " + word, add_special_tokens=False)
        if not ids:
            raise ValueError(f"the tokenizer encodes {word!r} to no tokens")
        r = table.detach()[ids].float().cpu()
        return ((r - r.mean(1, keepdim=True)) / r.std(1, keepdim=True)).mean(0)

    return torch.stack([torch.stack([row(w) for w in entry.split()]).mean(0) for entry in words])


def add_image_vocabulary(tokenizer: PreTrainedTokenizerBase, codebook_size: int, num_scales: int) -> ImageVocab:
    """Add ``<im_start>``, ``<im_end>`` (special), ``<S0>``…``<S{n-1}>`` and ``<I0>``…``<I{K-1}>`` (added,
    not special, as in the official tokenizer) to ``tokenizer`` in place, and read their ids back.

    Tokens already present are kept (so the call is idempotent). Raises ``ValueError`` when a token does
    not map to a single id, or when the K code ids are not contiguous (which happens when some ``<I{k}>``
    were in the tokenizer before): code ids are computed as ``first_code_id + code`` everywhere.
    """
    from tokenizers import AddedToken

    if codebook_size < 1 or num_scales < 1:
        raise ValueError(f"codebook_size and num_scales must be ≥ 1, got {codebook_size} and {num_scales}")
    scales = [scale_token(i) for i in range(num_scales)]
    codes = [code_token(k) for k in range(codebook_size)]

    def added(texts: list[str], special: bool) -> list[AddedToken]:
        return [AddedToken(t, special=special, normalized=False, lstrip=False, rstrip=False) for t in texts]

    tokenizer.add_tokens(added([IM_START, IM_END], True), special_tokens=True)
    tokenizer.add_tokens(added(scales, False))
    tokenizer.add_tokens(added(codes, False))

    texts = [IM_START, IM_END, *scales, *codes]
    ids = tokenizer.convert_tokens_to_ids(texts)
    unk = tokenizer.unk_token_id
    missing = [t for t, i in zip(texts, ids, strict=True) if i is None or (unk is not None and i == unk)]
    if missing:
        raise ValueError(f"the tokenizer has no id for {missing[:5]} after adding them")
    code_ids = ids[2 + num_scales :]
    first = code_ids[0]
    breaks = [k for k, i in enumerate(code_ids) if i != first + k]
    if breaks:
        k = breaks[0]
        raise ValueError(
            f"image code ids must be contiguous, but {code_token(k)} has id {code_ids[k]} where {first + k} "
            f"follows {code_token(0)} = {first}; were some {code_token(0)[:2]}…> tokens in the tokenizer already?"
        )
    # One token per code, also when it is written inside text (an added token is never split).
    probe = tokenizer.encode(IM_START + scales[0] + codes[0] + codes[-1] + IM_END, add_special_tokens=False)
    if probe != [ids[0], ids[2], first, first + codebook_size - 1, ids[1]]:
        raise ValueError(f"image tokens do not encode to single ids: got {probe}")
    return ImageVocab(
        im_start=ids[0],
        im_end=ids[1],
        scale_ids=tuple(ids[2 : 2 + num_scales]),
        first_code_id=first,
        codebook_size=codebook_size,
        vocab_size=len(tokenizer),
    )


CONNECTOR_NORM_INIT = math.sqrt(5.5)
"""Initial RMSNorm gain of the official connector (≈ 2.345, §5.1): the condition tokens start with an
RMS of √5.5 whatever the backbone's hidden scale."""


class Connector(nn.Sequential):
    """Backbone hidden states (..., H) → SANA caption tokens (..., C): Linear → GELU(tanh) → Linear → RMSNorm.

    A ``Sequential`` so that its state-dict keys (``0.*``, ``2.*``, ``3.weight``) are those of the
    official ``diffusion_connector``. The RMSNorm (eps 1e-5) gain starts at ``norm_init``.
    """

    def __init__(self, in_dim: int, out_dim: int, *, eps: float = 1e-5, norm_init: float = CONNECTOR_NORM_INIT):
        norm = nn.RMSNorm(out_dim, eps=eps, elementwise_affine=True)
        super().__init__(nn.Linear(in_dim, out_dim), nn.GELU(approximate="tanh"), nn.Linear(out_dim, out_dim), norm)
        with torch.no_grad():
            norm.weight.fill_(norm_init)


def condition_positions(input_ids: Tensor, attention_mask: Tensor, vocab: ImageVocab) -> Tensor:
    """Bool (B, T): each row's condition, i.e. its first scale token and the run of image-code tokens right
    after it, ending at the first position that is not a real code token (``<im_end>``, padding, text, a
    second scale token) or at the end of the row.

    Works for left and right padding alike (padded positions never count), and ignores image tokens that
    come before the scale token (an input image in an editing prompt carries no scale token, §5.2).
    """
    real = attention_mask.bool()
    scales = torch.tensor(vocab.scale_ids, device=input_ids.device)
    is_scale = torch.isin(input_ids, scales) & real
    is_code = vocab.is_code(input_ids) & real
    n_scale = is_scale.long().cumsum(-1)  # (B, T): scale tokens seen so far
    started = n_scale >= 1
    first_scale = is_scale & (n_scale == 1)
    breaks = started & ~first_scale & ~is_code  # anything after the scale token that is not a real code
    return started & (breaks.long().cumsum(-1) == 0)


def gather_condition(
    hidden: Tensor, input_ids: Tensor, attention_mask: Tensor, vocab: ImageVocab, num_tokens: int
) -> Tensor:
    """The hidden states (B, 1 + num_tokens, H) at :func:`condition_positions`, in sequence order.

    Raises ``ValueError`` naming the rows that do not hold exactly 1 + ``num_tokens`` such positions (a
    missing scale token, a truncated image, a wrong ``num_tokens``).
    """
    if hidden.shape[:2] != input_ids.shape or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"hidden (B, T, H), input_ids and attention_mask (B, T) disagree: {tuple(hidden.shape)}, "
            f"{tuple(input_ids.shape)}, {tuple(attention_mask.shape)}"
        )
    selected = condition_positions(input_ids, attention_mask, vocab)  # (B, T)
    counts = selected.sum(-1)
    bad = (counts != 1 + num_tokens).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"rows {bad} hold {counts[bad].tolist()} condition positions (a scale token followed by image "
            f"tokens); each row needs exactly 1 + num_tokens = {1 + num_tokens}"
        )
    # Boolean indexing walks rows in order, and every row has the same count.
    return hidden[selected].view(hidden.shape[0], 1 + num_tokens, hidden.shape[-1])


@dataclass
class NextOutput:
    """What :meth:`BLIP3oNext.forward` returns."""

    logits: Tensor
    """(B, T, V) next-token logits over the extended vocabulary."""
    hidden: Tensor
    """(B, T, H) last-layer hidden states (after the backbone's final norm)."""
    velocity: Tensor | None = None
    """(B, c, h, w) SANA's velocity for the given noisy latents, when :meth:`BLIP3oNext.forward` got them."""
    cell_logits: Tensor | None = None
    """(B, ids, s, s) the code upsampler's reading of the codes :meth:`BLIP3oNext.forward` got to upsample."""


class BLIP3oNext(nn.Module):
    """Backbone + connector + SANA DiT over VAE latents, with the image vocabulary's ids.

    Args:
        backbone: a ``transformers`` causal LM (Qwen3-style ``get_decoder()`` / ``get_output_embeddings()``)
            whose embedding has at least ``vocab.vocab_size`` rows.
        connector: backbone width → the DiT's ``caption_channels``.
        dit: ``SanaTransformer2DModel``.
        vocab: the image vocabulary (from :func:`add_image_vocabulary` or :meth:`ImageVocab.appended`).
        spatial: also give the DiT the image-token part of the condition as a map, upsampled to the latent
            grid and concatenated to its input channels (:attr:`NextConfig.spatial`).
        reference_latents: the DiT's input also holds a reference image's latents, for editing
            (:attr:`NextConfig.reference_latents`); zeros when there is none.
        upsampler: pooled layout codes → the reading's cells (:attr:`NextConfig.upsample_codes`); SANA's
            spatial input is then a reading given to :meth:`velocity`, not the connector's map.
    """

    def __init__(
        self,
        backbone: PreTrainedModel,
        connector: Connector,
        dit: SanaTransformer2DModel,
        vocab: ImageVocab,
        *,
        spatial: bool = False,
        reference_latents: bool = False,
        upsampler: CodeUpsampler | None = None,
    ) -> None:
        super().__init__()
        width = backbone.config.hidden_size
        rows = backbone.get_input_embeddings().weight.shape[0]
        if rows < vocab.vocab_size:
            raise ValueError(f"the backbone embeds {rows} ids but the image vocabulary needs {vocab.vocab_size}")
        if connector[0].in_features != width or connector[2].out_features != dit.config.caption_channels:
            raise ValueError(
                f"the connector maps {connector[0].in_features} → {connector[2].out_features}, but the backbone "
                f"is {width} wide and the DiT takes {dit.config.caption_channels}-wide captions"
            )
        self.backbone, self.connector, self.dit = backbone, connector, dit
        self.vocab = vocab
        self.spatial, self.reference_latents = spatial, reference_latents
        if upsampler is not None and not spatial:
            raise ValueError("an upsampler feeds SANA's spatial input, and this model has none (spatial=False)")
        self.upsampler = upsampler
        latent = dit.config.out_channels
        expected = latent * (2 if reference_latents else 1) + (dit.config.caption_channels if spatial else 0)
        if dit.config.in_channels != expected:
            raise ValueError(
                f"the DiT takes {dit.config.in_channels} input channels, but {latent} latent channels with "
                f"spatial={spatial} and reference_latents={reference_latents} make {expected}"
            )

    @classmethod
    def from_config(cls, cfg: NextConfig, vocab: ImageVocab | None = None) -> BLIP3oNext:
        """Build every part from ``cfg`` (a pretrained backbone is loaded and its embedding resized).

        ``vocab`` defaults to :meth:`ImageVocab.appended` over ``cfg.text_vocab_size``.
        """
        if vocab is None:
            vocab = ImageVocab.appended(cfg.text_vocab_size, cfg.codebook_size, cfg.num_scales)
        if vocab.codebook_size != cfg.codebook_size or vocab.num_scales != cfg.num_scales:
            raise ValueError(
                f"the vocabulary has {vocab.codebook_size} codes and {vocab.num_scales} scales, the config "
                f"{cfg.codebook_size} and {cfg.num_scales}"
            )
        backbone = build_backbone(cfg.backbone, vocab.vocab_size)
        if backbone.get_input_embeddings().weight.shape[0] < vocab.vocab_size:  # a pretrained checkpoint
            backbone.resize_token_embeddings(vocab.vocab_size)
        connector = Connector(backbone.config.hidden_size, cfg.connector_dim)
        dit = build_sana(
            cfg.sana, cfg.sana_in_channels, cfg.latent_side, cfg.connector_dim, out_channels=cfg.latent_channels
        )
        upsampler = CodeUpsampler(cfg.layout_pool, cfg.upsampler_width) if cfg.upsample_codes else None
        return cls(
            backbone,
            connector,
            dit,
            vocab,
            spatial=cfg.spatial,
            reference_latents=cfg.reference_latents,
            upsampler=upsampler,
        )

    @torch.no_grad()
    def init_image_embeddings(
        self,
        codebook_vectors: Tensor,
        *,
        generator: torch.Generator | None = None,
        projection: Tensor | None = None,
    ) -> None:
        """Initialise the K image-code rows of the input embedding from the image tokenizer's codebook.

        With C (K, d) the codebook vectors (for :class:`~blip3o.models.image_tokenizer.SimVQ`, ``codes()``),
        P (d, H) a random projection with N(0, 1) entries drawn on the CPU from ``generator`` (a generator
        seeded 0 when ``None``), or ``projection`` when given (e.g. :func:`word_rows`), and m (H,), s the mean
        row and the overall standard deviation (``torch.std``) of the text rows (every row the image
        vocabulary does not own)::

            Z = (C − mean_k C) P                       # (K, H)
            rows = m + Z · s / std(Z)

        A random projection keeps the codebook's geometry (Johnson–Lindenstrauss: nearby codes get nearby
        embeddings) and needs no paired data, where a least-squares fit would need text–code pairs; the
        rescaling puts the rows on the scale of the text rows, centred where the official mean
        initialisation puts them all. An untied output embedding gets the same Z with its own m and s.
        Tag and scale rows are left as they are.
        """
        k, h = self.vocab.codebook_size, self.backbone.config.hidden_size
        if codebook_vectors.ndim != 2 or codebook_vectors.shape[0] != k:
            raise ValueError(f"codebook_vectors must be (K={k}, d), got {tuple(codebook_vectors.shape)}")
        c = codebook_vectors.detach().float().cpu()
        if projection is None:
            generator = torch.Generator().manual_seed(0) if generator is None else generator
            proj = torch.randn(c.shape[1], h, generator=generator)  # (d, H)
        elif projection.shape != (c.shape[1], h):
            raise ValueError(f"projection must be (d={c.shape[1]}, H={h}), got {tuple(projection.shape)}")
        else:
            proj = projection.detach().float().cpu()
        z = (c - c.mean(0)) @ proj  # (K, H)
        z = z / z.std()
        lo, hi = self.vocab.code_range
        tables = [self.backbone.get_input_embeddings().weight]
        out = self.backbone.get_output_embeddings()
        if out is not None and out.weight is not tables[0]:
            tables.append(out.weight)
        for table in tables:
            text = torch.ones(table.shape[0], dtype=torch.bool)
            text[self.vocab.added_ids] = False
            ref = table.detach()[text.to(table.device)].float()
            rows = ref.mean(0).cpu() + z * ref.std().cpu()
            table[lo:hi] = rows.to(device=table.device, dtype=table.dtype)

    def freeze_sana_except(self, paths: list[str] | tuple[str, ...]) -> None:
        """Freeze every DiT parameter except those under the exact module (or parameter) ``paths`` inside it,
        e.g. ``["caption_projection", "caption_norm"]`` (official §5.5). Backbone and connector are untouched."""
        if isinstance(paths, str):
            raise TypeError(f"paths must be a list of module paths, not a single str ({paths!r})")
        modules = dict(self.dit.named_modules())
        params = dict(self.dit.named_parameters())
        keep: set[int] = set()
        for path in paths:
            if path in modules and path:
                keep.update(id(p) for p in modules[path].parameters())
            elif path in params:
                keep.add(id(params[path]))
            else:
                top = [name for name, _ in self.dit.named_children()]
                raise ValueError(f"{path!r} is not a module or parameter path inside the DiT; top-level: {top}")
        for param in self.dit.parameters():
            param.requires_grad_(id(param) in keep)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Last-layer hidden states (B, T, H), positions from the mask (left or right padding)."""
        out = self.backbone.get_decoder()(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions_from_mask(attention_mask),
            use_cache=False,
        )
        return out.last_hidden_state

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        latents: Tensor | None = None,
        sigma: Tensor | None = None,
        keep: Tensor | None = None,
        reference: Tensor | None = None,
        num_tokens: int | None = None,
        spatial: Tensor | None = None,
        upsample: Tensor | None = None,
        flow_rows: Tensor | None = None,
    ) -> NextOutput:
        """input_ids, attention_mask (B, T) → :class:`NextOutput`: logits (B, T, V), hidden (B, T, H) and,
        given noisy ``latents`` (B, c, h, w) at ``sigma`` (B,), the velocity conditioned on each row's
        ``num_tokens`` image tokens (``keep``, ``reference`` and ``spatial`` as in :meth:`connect` and
        :meth:`velocity`; ``keep`` drops ``spatial`` too), and given pooled codes ``upsample`` (B', n), the
        upsampler's cell logits. ``flow_rows`` (B',) names the rows the latents (and ``sigma``, ``keep``,
        ``reference``, ``spatial``) belong to when only those take the flow loss; None: every row. One call,
        so that a sharded (FSDP) model runs the whole training step inside its forward."""
        hidden = self.hidden_states(input_ids, attention_mask)
        out = NextOutput(logits=self.backbone.get_output_embeddings()(hidden), hidden=hidden)
        if latents is not None:
            if sigma is None or num_tokens is None:
                raise ValueError("noisy latents need their sigma and num_tokens")
            h, ids, mask = hidden, input_ids, attention_mask
            if flow_rows is not None:
                h, ids, mask = hidden[flow_rows], input_ids[flow_rows], attention_mask[flow_rows]
            cond = self.connect(h, ids, mask, num_tokens, keep)
            if spatial is not None and keep is not None:
                spatial = spatial * keep.to(spatial.dtype)[:, None, None, None]
            out.velocity = self.velocity(latents, sigma, cond, reference=reference, spatial=spatial)
        if upsample is not None:
            if self.upsampler is None:
                raise ValueError("this model has no code upsampler (NextConfig.upsample_codes=False)")
            out.cell_logits = self.upsampler(upsample)
        return out

    def connect(
        self,
        hidden: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        num_tokens: int,
        keep: Tensor | None = None,
    ) -> Tensor:
        """Hidden states (B, T, H) of a forward → the SANA condition (B, 1 + num_tokens, C).

        ``keep`` (B,) multiplies each row's gathered hidden block before the connector: 0 drops the
        condition for classifier-free guidance, as the official ``mask_drop`` does (§6.2), so a dropped
        row equals :meth:`null_condition`.
        """
        h = gather_condition(hidden, input_ids, attention_mask, self.vocab, num_tokens)  # (B, 1 + N, H)
        if keep is not None:
            h = h * keep.to(h.dtype)[:, None, None]
        return self.connector(h)

    def condition(
        self, input_ids: Tensor, attention_mask: Tensor, num_tokens: int, keep: Tensor | None = None
    ) -> Tensor:
        """The SANA condition (B, 1 + num_tokens, C) of sequences holding ``<S…>`` + num_tokens image tokens."""
        return self.connect(self.hidden_states(input_ids, attention_mask), input_ids, attention_mask, num_tokens, keep)

    def null_condition(self, batch_size: int, num_tokens: int) -> Tensor:
        """The unconditional condition (B, 1 + num_tokens, C): the connector applied to zeros."""
        weight = self.connector[0].weight
        zeros = weight.new_zeros(batch_size, 1 + num_tokens, weight.shape[1])
        return self.connector(zeros)

    def velocity(
        self,
        latents: Tensor,
        sigma: Tensor,
        cond: Tensor,
        cond_mask: Tensor | None = None,
        reference: Tensor | None = None,
        spatial: Tensor | None = None,
    ) -> Tensor:
        """SANA's flow velocity for latents x_σ (B, c, h, w) at σ ∈ [0, 1] (B,) or (), σ = 1 pure noise.

        ``cond`` (B, L, C) from :meth:`condition`; ``cond_mask`` (B, L), 1 where a token may be attended;
        ``reference`` (B, c, h, w) the latents of the image being edited (zeros when ``None``), used only
        when the model has reference channels. ``spatial`` (B, C, s, s): a model with an upsampler takes
        its spatial input from it (a reading, zeros for the unconditional branch) instead of the
        connector's map of ``cond``. SANA counts time in [0, 1000]; the factor is applied here so callers
        only see σ.
        """
        sigma = torch.as_tensor(sigma, device=latents.device, dtype=latents.dtype)
        if sigma.ndim == 0:
            sigma = sigma.expand(latents.shape[0])
        x = latents
        if (spatial is None) != (self.upsampler is None):
            raise ValueError(
                "a model with a code upsampler takes SANA's spatial input as `spatial`, one without takes it from "
                f"the condition (upsampler: {self.upsampler is not None}, spatial given: {spatial is not None})"
            )
        if self.spatial:  # the reading, or the N image-token outputs of the connector as a map, on the latent grid
            grid = tokens_to_map(cond[:, 1:]) if spatial is None else spatial
            grid = F.interpolate(grid, size=latents.shape[-2:], mode="nearest")
            x = torch.cat([x, grid.to(x.dtype)], dim=1)
        if self.reference_latents:
            x = torch.cat([x, torch.zeros_like(latents) if reference is None else reference.to(x.dtype)], dim=1)
        elif reference is not None:
            raise ValueError("this model has no reference-latent channels (NextConfig.reference_latents=False)")
        return self.dit(x, cond, 1000.0 * sigma, encoder_attention_mask=cond_mask).sample

    @torch.no_grad()
    def load_decoder(self, state: dict[str, Tensor]) -> None:
        """Start the DiT from a trained pixel decoder's SANA (``state``: its ``dit.*`` weights without the
        prefix), the shapes-scale "pretrained SANA". The decoder's input channels (latents, then the
        feature map) fill the first ones here; reference-latent channels keep zero input weights."""
        own = self.dit.state_dict()
        key = "patch_embed.proj.weight"
        weight = own[key].zero_()
        weight[:, : state[key].shape[1]] = state[key]
        missing, unexpected = self.dit.load_state_dict({**state, key: weight}, strict=False)
        if missing or unexpected:
            raise ValueError(f"the decoder's SANA does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
