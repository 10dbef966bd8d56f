"""BLIP3o-NEXT's autoregressive stage: sample image-token ids from a causal LM and keep their hidden states.

A left-padded batch of prompts is run once (prefill) into a ``DynamicCache``; then each step feeds only
the newly sampled token. Position ids come from the attention mask (``cumsum − 1``), so a row's tokens
and hidden states do not depend on how much left padding the batch gave it, and the mask grows by one
column of ones per step.

Sampling follows the official ``generate`` call (reference spec §5.6: ``top_k=1200``, ``top_p=0.95``;
the temperature is an explicit argument, 1.0 by default, where the official code silently takes the
checkpoint's ``generation_config``) with three deliberate differences:

- logits are restricted to an id range ``[lo, hi)`` (the image tokens); the official code samples from
  the whole vocabulary, so a text token can land among the 729 image tokens;
- each row draws its uniforms from its own seed, and a token is picked by inverse CDF over the filtered
  distribution in vocabulary order, so a prompt gives the same tokens alone or in any batch;
- the last-layer hidden states of the generated positions (and of ``prompt_hidden`` trailing prompt
  positions, e.g. the scale token ``<S0>``: the condition is ``<S0>`` + 729 image tokens, §5.3) are
  collected while decoding. The official code re-runs the full sequence for them, without an attention
  mask, which corrupts left-padded rows (issue #83).

Classifier-free guidance on logits runs the unconditional and conditional prompts as ONE batch
``[uncond; cond]``; ``logits = u + s·(c − u)`` picks a token per pair, and both rows of the pair are fed
that token.

A copy prior (``copy_ids``, ``copy_bias``) adds a constant to the (guided) logit of one given id per row and
step, before temperature and filtering: for an edit, the reference's own code at the same position, so a
cell the instruction does not speak about keeps its code unless the model is confident otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel

from blip3o.diffusion.sampler import cfg_combine
from blip3o.models.unified import positions_from_mask

__all__ = ["ARSample", "filter_logits", "pick_tokens", "sample_image_tokens"]


@dataclass
class ARSample:
    """Output of :func:`sample_image_tokens`."""

    tokens: Tensor
    """(B, N) long: the sampled ids, all in ``[lo, hi)``."""
    hidden: Tensor
    """(B, P + N, H): last-layer hidden states of the P trailing prompt positions, then of the N
    generated tokens (each at the position where it is the input)."""


def _keep_threshold(logits: Tensor, top_k: int | None, top_p: float) -> Tensor:
    """The smallest logit each row keeps under top-k then top-p: (B, V) → (B, 1).

    Top-k keeps the k largest logits, top-p then the fewest of those whose renormalised mass reaches
    ``top_p`` (HF's order). Returning a value rather than a set of indices means tokens tied with the
    last kept one are kept too, whatever order the sort left them in, and the largest logit always
    survives.
    """
    k = logits.shape[-1] if top_k is None else min(top_k, logits.shape[-1])
    if top_p >= 1.0:
        return logits.topk(k, dim=-1).values[:, -1:]
    vals = logits.sort(dim=-1, descending=True).values  # (B, V)
    kth = vals[:, k - 1 : k]
    # Top-p renormalises over everything top-k keeps, ties with the k-th logit included.
    probs = vals.masked_fill(vals < kth, float("-inf")).softmax(-1)
    # Mass strictly ahead of each token; an exclusive cumsum stays monotone, so the kept set is a prefix.
    ahead = torch.cat([torch.zeros_like(probs[:, :1]), probs.cumsum(-1)[:, :-1]], dim=-1)
    n = (ahead < top_p).sum(-1, keepdim=True)  # ≥ 1: nothing is ahead of the first token
    # With top_p within rounding of 1 the count can run past the top-k set; never go below the k-th.
    return torch.maximum(vals.gather(-1, n - 1), kth)


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float = 1.0) -> Tensor:
    """``logits`` (B, V) with every token outside the top-k / top-p set at −inf.

    Args:
        logits: (B, V) float.
        top_k: keep the k largest (and any tied with the k-th); ``None`` keeps all.
        top_p: then keep the fewest most-probable tokens whose mass reaches ``top_p`` (and any tied with
            the last of them); 1 keeps all.
    """
    return logits.masked_fill(logits < _keep_threshold(logits, top_k, top_p), float("-inf"))


def pick_tokens(
    logits: Tensor,
    uniforms: Tensor | None,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
) -> Tensor:
    """One token index per row of ``logits`` (B, V) → (B,) long; ``uniforms`` may be ``None`` only when greedy.

    Greedy (argmax) when ``temperature`` is 0 or ``top_k`` is 1. Otherwise the logits are divided by
    the temperature, filtered (:func:`filter_logits`), and the token is the first whose cumulative
    probability, in vocabulary order, exceeds ``uniforms`` (B,) ∈ [0, 1) times the total. Vocabulary
    order rather than sorted order makes the pick insensitive to how a sort breaks near-ties, which
    differ by rounding between batch sizes.
    """
    if temperature == 0 or top_k == 1:
        return logits.argmax(-1)
    if uniforms is None:
        raise ValueError(
            "uniforms (B,) are needed to sample; only greedy picking (temperature 0, top_k 1) runs without"
        )
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    cdf = logits.softmax(-1).cumsum(-1)  # (B, V)
    idx = torch.searchsorted(cdf, uniforms[:, None].to(cdf) * cdf[:, -1:], right=True)  # (B, 1)
    # `right=True` lands on a token with non-zero probability unless rounding pushes u·total to the
    # total; then fall back to the last kept token.
    kept = torch.arange(logits.shape[-1], device=logits.device).masked_fill(logits == float("-inf"), -1)
    return torch.minimum(idx[:, 0], kept.amax(-1))


def _left_pad(ids: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Left-pad (B, L) ids and mask to (B, length); pad ids are 0 and masked out."""
    pad = length - ids.shape[1]
    return F.pad(ids, (pad, 0), value=0), F.pad(mask, (pad, 0), value=0)


def _check_copy(copy_ids: Tensor | None, copy_bias: float, shape: tuple[int, int], id_range: tuple[int, int]) -> None:
    """Raise ``ValueError`` for a bad copy prior of :func:`sample_image_tokens`."""
    if copy_bias < 0:
        raise ValueError(f"copy_bias must be >= 0, got {copy_bias}")
    if copy_ids is None:
        return
    lo, hi = id_range
    if tuple(copy_ids.shape) != shape:
        raise ValueError(f"copy_ids must be (B, num_tokens) = {shape}, got {tuple(copy_ids.shape)}")
    if copy_ids.numel() and (copy_ids.min() < lo or copy_ids.max() >= hi):
        raise ValueError(f"copy_ids must lie in id_range [{lo}, {hi})")


def _check(
    model: PreTrainedModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    num_tokens: int,
    id_range: tuple[int, int],
    temperature: float,
    top_k: int | None,
    top_p: float,
    seeds: Sequence[int] | None,
    uncond: tuple[Tensor, Tensor] | None,
    prompt_hidden: int,
) -> None:
    """Raise ``ValueError`` naming the first bad argument of :func:`sample_image_tokens`."""
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and attention_mask must both be (B, L); got {tuple(input_ids.shape)} and "
            f"{tuple(attention_mask.shape)}"
        )
    b, length = input_ids.shape
    vocab = model.get_output_embeddings().weight.shape[0]
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    lo, hi = id_range
    if not 0 <= lo < hi <= vocab:
        raise ValueError(f"id_range must satisfy 0 <= lo < hi <= vocab size {vocab}, got {id_range}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None (no top-k), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if seeds is not None and len(seeds) != b:
        raise ValueError(f"seeds must have one entry per row: got {len(seeds)} for a batch of {b}")
    if not 0 <= prompt_hidden <= length:
        raise ValueError(f"prompt_hidden must be in [0, prompt length {length}], got {prompt_hidden}")
    if uncond is not None:
        u_ids, u_mask = uncond
        if u_ids.ndim != 2 or u_ids.shape[0] != b or u_mask.shape != u_ids.shape:
            raise ValueError(
                f"uncond_input_ids and uncond_attention_mask must both be ({b}, L'); got {tuple(u_ids.shape)} "
                f"and {tuple(u_mask.shape)}"
            )


@torch.no_grad()
def sample_image_tokens(
    model: PreTrainedModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    num_tokens: int,
    id_range: tuple[int, int] | None = None,
    *,
    temperature: float = 1.0,
    top_k: int | None = 1200,
    top_p: float = 0.95,
    seeds: Sequence[int] | None = None,
    uncond_input_ids: Tensor | None = None,
    uncond_attention_mask: Tensor | None = None,
    guidance_scale: float = 1.0,
    prompt_hidden: int = 0,
    copy_ids: Tensor | None = None,
    copy_bias: float = 0.0,
) -> ARSample:
    """Sample ``num_tokens`` ids per prompt with a KV cache; see the module docstring.

    Args:
        model: a ``transformers`` causal LM (e.g. ``Qwen3ForCausalLM``) with ``get_decoder()`` returning
            the transformer and ``get_output_embeddings()`` the LM head.
        input_ids: (B, L) left-padded prompts.
        attention_mask: (B, L), 0 on padding.
        num_tokens: N ≥ 1 tokens to sample per row (729 for BLIP3o-NEXT).
        id_range: ``(lo, hi)``: only ids in ``[lo, hi)`` can be sampled; ``None`` allows the whole vocabulary.
        temperature: ≥ 0; 0 is greedy.
        top_k: keep the k most likely ids (ties kept); ``None`` keeps all; 1 is greedy.
        top_p: in (0, 1]; nucleus mass kept after top-k.
        seeds: one seed per row; ``None`` draws from torch's global generator.
        uncond_input_ids: (B, L') left-padded unconditional prompts for classifier-free guidance; ``None``
            disables guidance.
        uncond_attention_mask: (B, L'); all ones when ``None``.
        guidance_scale: s in ``u + s·(c − u)``, used only with unconditional prompts.
        prompt_hidden: P, how many trailing prompt positions' hidden states to return before the generated
            ones.
        copy_ids: (B, N) ids in ``[lo, hi)``; at step t, ``copy_bias`` is added to the logit of
            ``copy_ids[:, t]`` (after guidance). ``None`` adds nothing.
        copy_bias: the added logit, ≥ 0 (a factor e^bias on that id's odds).

    Returns:
        :class:`ARSample` with ``tokens`` (B, N) and ``hidden`` (B, P + N, H) of the conditional rows.
    """
    uncond = None
    if uncond_input_ids is not None:
        uncond = (
            uncond_input_ids,
            torch.ones_like(uncond_input_ids) if uncond_attention_mask is None else uncond_attention_mask,
        )
    vocab = model.get_output_embeddings().weight.shape[0]
    lo, hi = (0, vocab) if id_range is None else id_range
    _check(
        model, input_ids, attention_mask, num_tokens, (lo, hi), temperature, top_k, top_p, seeds, uncond, prompt_hidden
    )
    _check_copy(copy_ids, copy_bias, (input_ids.shape[0], num_tokens), (lo, hi))
    b, device = input_ids.shape[0], input_ids.device

    # Drawn up front, on the CPU, one generator per row: a row's draws depend only on its seed.
    if seeds is None:
        uniforms = torch.rand(b, num_tokens)
    else:
        uniforms = torch.stack([torch.rand(num_tokens, generator=torch.Generator().manual_seed(s)) for s in seeds])
    uniforms = uniforms.to(device)  # (B, N)

    ids, mask = input_ids, attention_mask
    if uncond is not None:
        length = max(ids.shape[1], uncond[0].shape[1])
        u_ids, u_mask = _left_pad(*uncond, length)
        c_ids, c_mask = _left_pad(ids, mask, length)
        ids, mask = torch.cat([u_ids, c_ids]), torch.cat([u_mask, c_mask])  # (2B, L)
    cond_rows = slice(ids.shape[0] - b, None)

    decoder, head = model.get_decoder(), model.get_output_embeddings()
    # Only the allowed rows of the LM head: 65,536 of ~217k for BLIP3o-NEXT.
    weight = head.weight[lo:hi]
    bias = None if head.bias is None else head.bias[lo:hi]

    def next_logits(h: Tensor) -> Tensor:
        """(R, H) last hidden states → (B, hi − lo) float32 logits, guided when unconditional rows exist."""
        logits = F.linear(h, weight, bias).float()
        if uncond is None:
            return logits
        return cfg_combine(logits[:b], logits[b:], guidance_scale)

    rows = torch.arange(b, device=device)
    copy_cols = None if copy_ids is None or copy_bias == 0 else (copy_ids.to(device) - lo)

    def pick(logits: Tensor, t: int) -> Tensor:
        if copy_cols is not None:
            logits[rows, copy_cols[:, t]] += copy_bias
        return pick_tokens(logits, uniforms[:, t], temperature=temperature, top_k=top_k, top_p=top_p) + lo

    cache = DynamicCache(config=model.config)
    out = decoder(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions_from_mask(mask),
        past_key_values=cache,
        use_cache=True,
    )
    h = out.last_hidden_state  # (R, L, H)
    hidden = h.new_empty(b, prompt_hidden + num_tokens, h.shape[-1])
    hidden[:, :prompt_hidden] = h[cond_rows, h.shape[1] - prompt_hidden :]
    tokens = torch.empty(b, num_tokens, dtype=torch.long, device=device)
    tokens[:, 0] = pick(next_logits(h[:, -1]), 0)

    # Step t feeds token t: its hidden state is kept, and (but for the last) its logits give token t + 1.
    for t in range(num_tokens):
        step = tokens[:, t : t + 1]
        if uncond is not None:
            step = torch.cat([step, step])  # (2B, 1): each unconditional row follows its conditional row
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = decoder(
            input_ids=step,
            attention_mask=mask,
            position_ids=mask.long().sum(-1, keepdim=True) - 1,
            past_key_values=cache,
            use_cache=True,
        )
        h = out.last_hidden_state[:, -1]  # (R, H)
        hidden[:, prompt_hidden + t] = h[cond_rows]
        if t + 1 < num_tokens:
            tokens[:, t + 1] = pick(next_logits(h), t + 1)
    return ARSample(tokens=tokens, hidden=hidden)
