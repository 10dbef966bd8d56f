"""The unified BLIP3-o model: understanding (image → text) and query-conditioned generation in one module.

Parts are injected already built (``backbone``, ``vision``, ``projector``, generation ``head``);
the model composes them and returns tensors; losses, noise and sampling live in ``train/`` and
``diffusion/``. The VAE and the pixel decoder stay outside: they are frozen at generation time and
the pipeline owns them.

Sequences:
- understanding: a chat prompt whose ``<image>`` placeholders (one per vision patch) are replaced by
  projected vision features (one vectorised ``masked_scatter``);
- generation: the (left-padded) prompt followed by N learnable query embeddings; position ids are
  derived from the attention mask, so a row's hidden states do not depend on its padding, and the
  queries' last hidden states (always the last N positions) are the condition.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig, PreTrainedModel

from blip3o.models.heads import FlowHead, MaskedHead, RegressionHead

GENERATION_PARTS = ("head.", "queries", "connector.", "condition_norm.")
"""State-dict prefixes of the generation path: an understanding checkpoint's copies are untrained (or absent)."""


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a (possibly left-padded) attention mask (B, T): 0, 1, … over the real tokens."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


class Connector(nn.Module):
    """Trainable transformer layers between the backbone's last hidden states and the generation head.

    MetaQuery (Pan et al. 2025) puts such a connector between a frozen MLLM and its diffusion decoder: the
    frozen backbone's attention was learnt for understanding, and the connector's own attention learns how
    the queries read the prompt for generation. Its layers are the backbone's decoder layers (the same
    ``transformers`` class, width, heads and rotary positions, freshly initialised), run over the whole
    prompt-and-queries sequence with the backbone's causal mask and positions, so the queries (last) see the
    prompt's every token. With ``num_layers`` 0 it passes the states through and holds no parameters.
    """

    def __init__(self, backbone_config: PretrainedConfig, num_layers: int) -> None:
        super().__init__()
        self.model: PreTrainedModel | None = None
        if num_layers > 0:
            fields = backbone_config.to_dict()
            fields.update(num_hidden_layers=num_layers, vocab_size=1, layer_types=None, pad_token_id=None)
            config = type(backbone_config)(**fields)
            config._attn_implementation = "sdpa"
            self.model = AutoModel.from_config(config)
            self.model.embed_tokens = None  # reads hidden states, never token ids

    @property
    def num_layers(self) -> int:
        return 0 if self.model is None else self.model.config.num_hidden_layers

    def forward(self, states: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """states (B, T, D), attention mask (B, T), position ids (B, T) → (B, T, D)."""
        if self.model is None:
            return states
        out = self.model(inputs_embeds=states, attention_mask=mask, position_ids=positions, use_cache=False)
        return out.last_hidden_state


class BLIP3o(nn.Module):
    """Backbone + vision encoder + projector + N learnable queries + generation head.

    Args:
        backbone: a causal LM (``transformers`` Qwen3/Qwen2-style: ``.model`` decoder and ``.lm_head``).
        vision: a vision tower returning ``last_hidden_state`` (B, P, Dv) (SigLIP).
        projector: maps vision features to the backbone width.
        head: :class:`FlowHead`, :class:`MaskedHead` or :class:`RegressionHead`.
        num_queries: N; image_token_id: the placeholder id replaced by vision features.
        connector_layers: trainable transformer layers between the backbone and the head (:class:`Connector`).
        condition_norm: standardise each (query, channel) of the condition over the data (batch statistics
            in training, running ones at inference, as ``BatchNorm1d`` without affine weights) before the
            head. A backbone trained from scratch gives every prompt's query states one shared vector plus
            a prompt-dependent part of about a fifth of its size, which the head barely learns to read; the
            official backbone's states need no such step, so it is off unless a preset turns it on.
    """

    def __init__(
        self,
        backbone: PreTrainedModel,
        vision: nn.Module,
        projector: nn.Module,
        head: FlowHead | MaskedHead | RegressionHead,
        num_queries: int,
        image_token_id: int,
        condition_norm: bool = False,
        connector_layers: int = 0,
    ) -> None:
        super().__init__()
        self.backbone, self.vision, self.projector, self.head = backbone, vision, projector, head
        width = backbone.config.hidden_size
        self.queries = nn.Parameter(torch.randn(num_queries, width) * width**-0.5)
        self.connector = Connector(backbone.config, connector_layers)
        self.condition_norm = nn.BatchNorm1d(num_queries * width, affine=False) if condition_norm else nn.Identity()
        self.image_token_id = image_token_id

    @property
    def num_queries(self) -> int:
        return self.queries.shape[0]

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → (B, P, D) backbone-width tokens."""
        return self.projector(self.vision(pixel_values=pixels).last_hidden_state)

    def embed(self, input_ids: torch.Tensor, pixels: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with every ``<image>`` placeholder replaced by the image features, in order."""
        embeds = self.backbone.get_input_embeddings()(input_ids)  # (B, T, D)
        slots = input_ids == self.image_token_id
        if pixels is None:
            return embeds
        feats = self.image_features(pixels).to(embeds.dtype)  # (B_img, P, D)
        # Placeholder counts are checked by the data pipeline; a mismatch here is a bug, not user error.
        return embeds.masked_scatter(slots.unsqueeze(-1), feats.reshape(-1, feats.shape[-1]))

    def logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token logits (B, T, V) of a multimodal sequence."""
        out = self.backbone(
            inputs_embeds=self.embed(input_ids, pixels),
            attention_mask=attention_mask,
            position_ids=positions_from_mask(attention_mask),
            use_cache=False,
        )
        return out.logits

    def condition(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The queries' last hidden states (B, N, D) after a left-padded prompt (B, T), through the connector's
        layers and standardised with ``condition_norm``."""
        b = input_ids.shape[0]
        embeds = torch.cat([self.embed(input_ids), self.queries.expand(b, -1, -1).to(self.queries.dtype)], 1)
        mask = torch.cat([attention_mask, attention_mask.new_ones(b, self.num_queries)], 1)
        positions = positions_from_mask(mask)
        out = self.backbone.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)
        states = self.connector(out.last_hidden_state, mask, positions)[:, -self.num_queries :]  # (B, N, D)
        return self.condition_norm(states.flatten(1)).view_as(states)

    def forward(self, mode: str, **inputs: torch.Tensor) -> torch.Tensor:
        """Training entry point (FSDP wraps ``forward``): ``"logits"`` or ``"generate"``.

        ``generate`` takes input_ids, attention_mask, keep (B,) (1 keeps the condition, 0 drops it for
        classifier-free guidance) and, for flow heads, x (B, C, h, w), sigma (B,) and, for a self-conditioned
        head, self_cond (B,) (1: the row gets the head's own no-grad x̂0 as input, 0: zeros); it returns the
        velocity, or the regressed map for the MSE head; a flow head with a prior returns the velocity and
        the prior's map. A masked head takes x as cell ids (B, h, w) and returns per-cell
        log-probabilities (and its prior's, if it has one).
        """
        if mode == "logits":
            return self.logits(inputs["input_ids"], inputs["attention_mask"], inputs.get("pixels"))
        if mode == "generate":
            cond = self.condition(inputs["input_ids"], inputs["attention_mask"])
            cond = cond * inputs["keep"].to(cond.dtype)[:, None, None]
            if isinstance(self.head, RegressionHead):
                return self.regress(cond)
            if isinstance(self.head, MaskedHead):
                logits, prior = self.head.logits(inputs["x"], inputs["sigma"], cond)
                return (logits, prior) if prior is not None else logits
            x, sigma, head = inputs["x"], inputs["sigma"], self.head
            prior = head.prior(cond) if head.prior is not None else None
            estimate = None
            if head.self_condition and "self_cond" in inputs:  # rows marked 1 see the head's own x̂0
                with torch.no_grad():
                    first = head.clean_estimate(x, sigma, head(x, sigma, cond, prior=prior))
                estimate = first * inputs["self_cond"].to(first.dtype).view(-1, *[1] * (x.dim() - 1))
            v = head(x, sigma, cond, prior=prior, estimate=estimate)
            return (v, prior) if prior is not None else v
        raise ValueError(f"unknown mode {mode!r}; allowed: 'logits', 'generate'")

    def velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, estimate: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The generation head's velocity for x_σ (B, C, h, w) given the query condition (B, N, D) and, for a
        self-conditioned head, an earlier x̂0 (``estimate``)."""
        return self.head(x, sigma, cond, estimate=estimate)

    def regress(self, cond: torch.Tensor) -> torch.Tensor:
        """CLIP + MSE: the predicted feature map (B, C, h, w)."""
        return self.head(cond)
