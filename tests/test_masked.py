"""Discrete flow matching with a masked source: the path, the loss, the unmasking sampler, layout cell ids."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from blip3o.diffusion.masked import gumbel, mask_cells, masked_ce, unmask_sample
from blip3o.diffusion.sampler import sigma_schedule
from blip3o.models.heads import LAYOUT_VOCAB, ids_to_layout, layout_to_ids, snap_layout
from blip3o.world.spec import NUM_CLASS_IDS, NUM_COLOUR_IDS


def test_layout_ids_name_every_class_in_every_colour_and_invert_the_snapped_layout():
    assert LAYOUT_VOCAB == 1 + (NUM_CLASS_IDS - 1) * (NUM_COLOUR_IDS - 1)
    ids = torch.arange(LAYOUT_VOCAB).view(1, 1, -1)
    layout = ids_to_layout(ids)
    assert torch.equal(layout_to_ids(layout), ids)
    kind, colour = layout[:, :NUM_CLASS_IDS].argmax(1), layout[:, NUM_CLASS_IDS:].argmax(1)
    assert kind[0, 0, 0] == colour[0, 0, 0] == 0  # id 0 is background in the background colour
    assert len(set(zip(kind.flatten().tolist(), colour.flatten().tolist(), strict=True))) == LAYOUT_VOCAB
    scores = torch.randn(3, NUM_CLASS_IDS + NUM_COLOUR_IDS, 5, 5)
    snapped = snap_layout(scores, NUM_CLASS_IDS)
    assert torch.equal(ids_to_layout(layout_to_ids(snapped)), snapped)
    assert torch.equal(layout_to_ids(scores), layout_to_ids(snapped))


def test_mask_cells_masks_each_cell_with_probability_sigma():
    ids = torch.randint(0, 7, (4, 64, 64))
    sigma = torch.tensor([0.0, 0.25, 0.7, 1.0])
    x, masked = mask_cells(ids, sigma, 7, torch.Generator().manual_seed(0))
    assert torch.equal(x == 7, masked) and torch.equal(x[~masked], ids[~masked])
    n = 64 * 64
    share = masked.flatten(1).float().mean(1)
    for s, got in zip(sigma.tolist(), share.tolist(), strict=True):
        assert abs(got - s) <= 5 * math.sqrt(s * (1 - s) / n) + 1e-9


def test_masked_ce_averages_the_true_ids_cross_entropy_over_the_masked_cells():
    logits, ids = torch.randn(2, 6, 3, 3), torch.randint(0, 6, (2, 3, 3))
    masked = torch.rand(2, 3, 3) < 0.5
    masked[0, 0, 0] = True
    want = F.cross_entropy(logits.permute(0, 2, 3, 1)[masked], ids[masked])
    torch.testing.assert_close(masked_ce(logits, ids, masked), want)


def test_each_cell_is_revealed_at_the_step_whose_interval_holds_its_reveal_time_and_keeps_its_id():
    """The network answers the step's index everywhere, so a cell's final id is the step it was revealed at;
    it also checks that revealed cells are passed back unchanged and masked ones as the mask id."""
    steps, vocab, mask_id = 6, 8, 8
    sigmas = sigma_schedule(steps, shift=2.0)
    reveal = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(1))
    calls = []

    def logits_fn(ids, sigma, cond):
        step = len(calls)
        calls.append(ids.clone())
        assert torch.all(sigma == sigmas[step])
        return F.one_hot(torch.full_like(ids, step), vocab + 1).permute(0, 3, 1, 2).float() * 50

    ids = unmask_sample(
        logits_fn, reveal, torch.zeros(3, vocab, 4, 4), None, mask_id=mask_id, num_steps=steps, shift=2.0
    )
    # step k reveals the cells with σ_{k+1} ≤ u < σ_k
    want = (sigmas[1:].view(-1, 1, 1, 1) > reveal).sum(0)
    assert torch.equal(ids, want)
    for k, seen in enumerate(calls):
        assert torch.equal(seen, torch.where(want < k, want, mask_id))


def test_revealed_ids_follow_the_predicted_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().view(1, 4, 1, 1).expand(1, 4, 100, 100)
    u = torch.rand(1, 4, 100, 100, generator=torch.Generator().manual_seed(0))
    ids = unmask_sample(lambda x, s, c: logits, torch.zeros(1, 100, 100), gumbel(u), None, mask_id=4, num_steps=1)
    freq = torch.bincount(ids.flatten(), minlength=4).float() / ids.numel()
    assert torch.all((freq - probs).abs() <= 5 * (probs * (1 - probs) / ids.numel()).sqrt())
    cold = unmask_sample(
        lambda x, s, c: logits, torch.zeros(1, 100, 100), gumbel(u), None, mask_id=4, num_steps=1, temperature=1e-3
    )
    assert torch.all(cold == 0)  # a temperature near 0 takes the most likely id


def test_guidance_combines_the_branches_log_probabilities_in_one_batched_call():
    torch.manual_seed(0)
    lu, lc = torch.randn(2, 5, 3, 3), torch.randn(2, 5, 3, 3)
    noise = gumbel(torch.rand(2, 5, 3, 3))
    batches = []

    def logits_fn(ids, sigma, cond):
        batches.append(ids.shape[0])
        return torch.where(cond.view(-1, 1, 1, 1) > 0, torch.cat([lc, lc]), torch.cat([lu, lu]))

    cond, uncond = torch.ones(2), torch.zeros(2)
    ids = unmask_sample(
        logits_fn, torch.zeros(2, 3, 3), noise, cond, uncond=uncond, mask_id=5, num_steps=1, guidance_scale=3.0
    )
    pu, pc = lu.log_softmax(1), lc.log_softmax(1)
    assert torch.equal(ids, (pu + 3.0 * (pc - pu) + noise).argmax(1))
    assert batches == [4]
    with pytest.raises(ValueError, match="uncond"):
        unmask_sample(logits_fn, torch.zeros(2, 3, 3), noise, cond, mask_id=5, guidance_scale=3.0)
    with pytest.raises(ValueError, match="temperature"):
        unmask_sample(logits_fn, torch.zeros(2, 3, 3), noise, cond, mask_id=5, temperature=0)
