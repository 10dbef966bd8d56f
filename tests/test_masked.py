"""Discrete flow matching with a masked source: the path, the loss, the unmasking sampler, layout cell ids."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from blip3o.diffusion.masked import corrupt_cells, gumbel, mask_cells, masked_ce, unmask_sample
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


def test_confidence_order_reveals_the_schedules_count_of_the_most_probable_cells_first():
    """With ``order="confidence"`` and no perturbation, step k leaves round(N·σ_{k+1}) cells masked and reveals
    the masked cells whose drawn ids are most probable; the network's confidence here is fixed per cell."""
    steps, vocab, mask_id, side = 5, 3, 3, 4
    n = side * side
    confidence = torch.randperm(n, generator=torch.Generator().manual_seed(0)).float().view(1, side, side)
    sigmas = sigma_schedule(steps, shift=2.0)
    calls = []

    def logits_fn(ids, sigma, cond):  # id 1 with probability rising with the cell's confidence
        calls.append(ids.clone())
        p1 = 0.5 + 0.4 * confidence / n
        return torch.stack([(1 - p1) / 2, p1, (1 - p1) / 2], 1).log().expand(len(ids), -1, -1, -1)

    reveal = torch.rand(2, side, side, generator=torch.Generator().manual_seed(1))
    cold = gumbel(torch.full((2, vocab, side, side), 0.5))  # equal noise for every id: argmax takes id 1
    ids = unmask_sample(
        logits_fn,
        reveal,
        cold,
        None,
        mask_id=mask_id,
        num_steps=steps,
        shift=2.0,
        order="confidence",
        confidence_noise=0.0,
    )
    assert torch.all(ids == 1)
    order = confidence.flatten().argsort(descending=True)
    for k, seen in enumerate(calls[1:]):
        revealed = n - round(float(sigmas[k + 1]) * n)
        want = torch.full((n,), mask_id)
        want[order[:revealed]] = 1
        assert torch.equal(seen, want.view(1, side, side).expand(2, -1, -1)), k
    with pytest.raises(ValueError, match="order"):
        unmask_sample(logits_fn, reveal, cold, None, mask_id=mask_id, order="raster")


def test_refinement_masks_again_the_cells_the_network_doubts_and_redraws_them_given_the_rest():
    """One step writes id 1 everywhere; the refining network, reading the finished map, gives id 1 a
    probability of 0.025 on the cells of S (id 0 there at 0.95): exactly those are masked and redrawn, at σ = the
    share masked, and become 0; the rest keep 1."""
    vocab, mask_id, side = 3, 3, 4
    n = side * side
    doubted = torch.zeros(2, side, side, dtype=torch.bool)
    doubted[0, 1:3, 1:3] = doubted[1, 0, :] = True
    calls = []

    def logits_fn(ids, sigma, cond):
        calls.append((ids.clone(), sigma.clone()))
        if len(calls) == 1:  # the sampling step
            p = torch.tensor([0.01, 0.98, 0.01]).view(1, 3, 1, 1).expand(len(ids), -1, side, side)
        else:
            there, elsewhere = torch.tensor([0.95, 0.025, 0.025]), torch.tensor([0.025, 0.95, 0.025])
            p = torch.where(doubted[:, None], there.view(1, 3, 1, 1), elsewhere.view(1, 3, 1, 1))
        return p.log()

    cold = gumbel(torch.full((2, vocab, side, side), 0.5))
    ids = unmask_sample(logits_fn, torch.zeros(2, side, side), cold, None, mask_id=mask_id, num_steps=1, refine_steps=1)
    assert torch.equal(ids, torch.where(doubted, 0, 1))
    (read, read_sigma), (redraw, redraw_sigma) = calls[1], calls[2]
    assert torch.all(read == 1) and torch.allclose(read_sigma, torch.full((2,), 1 / n))
    assert torch.equal(redraw, torch.where(doubted, mask_id, 1))
    torch.testing.assert_close(redraw_sigma, doubted.flatten(1).float().mean(1))
    with pytest.raises(ValueError, match="refine_threshold"):
        unmask_sample(logits_fn, torch.zeros(2, side, side), cold, None, mask_id=mask_id, refine_threshold=1.5)


def test_corrupt_cells_replaces_revealed_cells_at_the_rate_by_uniform_ids_and_leaves_masks_alone():
    ids = torch.randint(0, 5, (4, 64, 64), generator=torch.Generator().manual_seed(0))
    x, masked = mask_cells(ids, torch.full((4,), 0.5), 61, torch.Generator().manual_seed(1))
    y, corrupted = corrupt_cells(x, masked, 0.2, 61, torch.Generator().manual_seed(2))
    assert not (corrupted & masked).any() and torch.equal(y[~corrupted], x[~corrupted])
    n = int((~masked).sum())
    share = corrupted.sum().item() / n
    assert abs(share - 0.2) <= 5 * math.sqrt(0.2 * 0.8 / n)
    freq = torch.bincount(y[corrupted], minlength=61).float() / corrupted.sum()
    assert freq.shape == (61,) and (freq - 1 / 61).abs().max() < 5 * math.sqrt(1 / 61 / corrupted.sum())
    assert torch.equal(corrupt_cells(x, masked, 0.0, 61, torch.Generator().manual_seed(2))[0], x)
