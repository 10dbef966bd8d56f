"""BLIP3o-NEXT over layout codes (``next.image_codes=layout``): the tokenizer, the config checks, a tiny run."""

from __future__ import annotations

import json
import os
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blip3o.config import ConfigError
from blip3o.config.io import apply_overrides
from blip3o.config.model import LAYOUT_VOCAB
from blip3o.config.presets import get_preset, shapes_next_model, tiny_debug, with_next
from blip3o.data.processing import to_images, to_pixels
from blip3o.data.world_data import load_split
from blip3o.infer.next_pipeline import NextPipeline, load_pipeline
from blip3o.models.build import clip_map
from blip3o.models.heads import ids_to_layout, map_to_tokens, pool_layout, snap_layout, tokens_to_map
from blip3o.models.image_tokenizer import LayoutTokenizer
from blip3o.world.spec import NUM_CLASS_IDS, NUM_COLOUR_IDS


def test_layout_tokenizer_numbers_cells_by_class_and_colour_and_decodes_exactly():
    tok = LayoutTokenizer(4)
    g = torch.Generator().manual_seed(0)
    layout = snap_layout(torch.randn(3, NUM_CLASS_IDS + NUM_COLOUR_IDS, 4, 4, generator=g), NUM_CLASS_IDS)
    ids = tok.encode(layout)
    assert ids.shape == (3, 16) and tok.num_tokens() == 16
    # The id of a cell, by hand: 0 for background, else 1 + (class − 1)·(object colours) + (colour − 1).
    kind = layout[:, :NUM_CLASS_IDS].argmax(1).flatten(1)
    colour = layout[:, NUM_CLASS_IDS:].argmax(1).flatten(1)
    want = torch.where(kind > 0, 1 + (kind - 1) * (NUM_COLOUR_IDS - 1) + colour - 1, 0)
    assert torch.equal(ids, want)
    assert torch.equal(tok.decode(ids), layout)
    # The codebook: one distinct one-hot (±1) cell per id, one class and one colour hot each.
    book = tok.codebook_vectors()
    assert book.shape == (LAYOUT_VOCAB, NUM_CLASS_IDS + NUM_COLOUR_IDS)
    assert torch.equal((book > 0).sum(1), torch.full((LAYOUT_VOCAB,), 2))
    assert len({tuple(row.tolist()) for row in book}) == LAYOUT_VOCAB
    assert torch.equal(book, ids_to_layout(torch.arange(LAYOUT_VOCAB).view(1, 1, -1))[0, :, 0].T)
    with pytest.raises(ValueError, match=r"ids must be \(B, 16\)"):
        tok.decode(ids[:, :5])
    with pytest.raises(ValueError, match="one scale"):
        tok.num_tokens(1)


def test_the_layout_preset_is_wired_to_the_reading_and_bad_configs_are_refused():
    cfg = get_preset("shapes-next-layout")
    side = cfg.model.vision.target_grid * cfg.model.vision.grounding_cells // 2  # a code for 2×2 cells
    assert cfg.next.layout_pool == 2 and cfg.next.edit_blend and cfg.next.copy_bias == 3
    assert cfg.recipe.stages == ["clip", "vae", "reader", "decoder", "next", "instruct"]
    assert (cfg.next.image_codes, cfg.next.codebook_size, cfg.next.image_tokens) == ("layout", LAYOUT_VOCAB, side**2)
    assert cfg.next.connector_dim == NUM_CLASS_IDS + NUM_COLOUR_IDS and cfg.next.spatial
    assert cfg.recipe.instruct.trainable == ["backbone", "connector", "dit"] and cfg.next.ar_guidance_scale == 1.5
    # Every shared part is the layout BLIP3-o preset's, so --reuse can link its stages.
    blip3o = get_preset("shapes-blip3o-layout")
    for part in ("vision", "vae", "decoder"):
        assert getattr(cfg.model, part) == getattr(blip3o.model, part)
    with pytest.raises(ConfigError, match=r"recipe\.stages: next\.image_codes=layout has no image tokenizer"):
        apply_overrides(cfg, ["recipe.stages=[clip,vae,reader,decoder,image_tokenizer,next]"])
    with pytest.raises(ConfigError, match=r"next\.codebook_size: is 1024, but layout codes .* need 61"):
        apply_overrides(cfg, ["next.codebook_size=1024"])
    with pytest.raises(ConfigError, match=r"next\.image_codes: .* set model\.generation\.target=layout"):
        apply_overrides(cfg, ["model.generation.target=clip", "model.generation.objective=flow"])
    with pytest.raises(ConfigError, match=r"next\.image_codes: must be one of"):
        apply_overrides(cfg, ["next.image_codes=pixels"])


def _tiny_layout_next():
    base = tiny_debug()
    model = replace(base.model, generation=replace(base.model.generation, target="layout"))
    nxt = replace(shapes_next_model(), image_codes="layout", top_k=None)
    nxt = replace(nxt, backbone=replace(nxt.backbone, hidden_size=32, num_layers=1, head_dim=8, intermediate_size=64))
    return with_next(replace(base, model=model), nxt, "tiny-next-layout")


@pytest.fixture(scope="module")
def layout_run(tmp_path_factory):
    from blip3o.train.recipe import run_recipe

    out = tmp_path_factory.mktemp("next-layout") / "run"
    return out, run_recipe(_tiny_layout_next(), out, progress=False)


def test_a_layout_run_trains_without_a_tokenizer_stage_and_reads_images_as_cells(layout_run):
    out, summaries = layout_run
    assert list(summaries) == ["clip", "vae", "decoder", "next", "instruct"]
    assert not (out / "image_tokenizer").exists()
    pipe = load_pipeline(out)
    assert isinstance(pipe, NextPipeline) and isinstance(pipe.image_tokenizer, LayoutTokenizer)
    pixels = to_pixels(load_split(out / "world", "heldout").images[:4])
    # The codes are the cells of the tower's grounded reading: its per-patch head, read cell by cell.
    enc = pipe.encoders
    raw = clip_map(enc.vision, pixels, enc.pool)  # (B, D, g, g)
    logits = enc.grounding(raw.flatten(2).mT).mT.unflatten(-1, raw.shape[-2:])  # one cell a patch here
    kind = logits[:, :NUM_CLASS_IDS].argmax(1)
    colour = logits[:, NUM_CLASS_IDS + 1 :].argmax(1)
    want = torch.where(kind > 0, 1 + (kind - 1) * (NUM_COLOUR_IDS - 1) + colour, 0).flatten(1)
    assert torch.equal(pipe.codes(pixels), want)
    # Image-token embeddings start distinct (from the one-hot cells), not as one mean row.
    first = pipe.model.vocab.code_range[0]
    rows = pipe.model.backbone.get_input_embeddings().weight[first : first + LAYOUT_VOCAB]
    assert torch.cdist(rows, rows).add(torch.eye(LAYOUT_VOCAB)).min() > 0


def _assert_batch_is_single_prompts(pipe) -> None:
    """Prompts of different lengths in one batch give the images each gives alone with the same seed."""
    prompts = ["a photo of a red circle", "a photo of two blue stars and a green square"]
    batch = pipe(prompts, seed=[5, 9])
    alone = [pipe(p, seed=s)[0] for p, s in zip(prompts, [5, 9], strict=True)]
    for a, b in zip(batch, alone, strict=True):
        np.testing.assert_allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), atol=1)


def test_layout_codes_batch_like_single_prompts_and_blend_edits_cell_by_cell(layout_run, copy_reference_codes):
    out, _ = layout_run
    pipe = load_pipeline(out)
    _assert_batch_is_single_prompts(pipe)
    # A blended edit whose written cells all equal the reference's is the reference itself, not its VAE
    # reconstruction.
    copy_reference_codes(pipe)
    source = to_images(to_pixels(load_split(out / "world", "heldout").images[:1]))[0]
    recon = to_images(pipe.encoders.decode(pipe.encoders.latents(to_pixels([source]))))[0]
    pipe.apply_sampling(apply_overrides(_tiny_layout_next(), ["next.edit_blend=true"]))
    blended = pipe.edit(source, "make the red circle blue", seed=0)[0]
    np.testing.assert_array_equal(np.asarray(blended), np.asarray(source))
    assert np.abs(np.asarray(recon, dtype=float) - np.asarray(source, dtype=float)).max() > 10


def test_image_rows_run_in_length_groups_whose_losses_are_the_whole_batch(layout_run):
    """Text-to-image rows apart from the longer edit rows, each group trimmed to its longest row: the loss is
    the one forward over the whole padded batch gives. Several ranks keep one group."""
    from blip3o.train.next_tasks import length_groups
    from blip3o.train.recipe import make_task

    out, _ = layout_run
    task = make_task("next", _tiny_layout_next(), out)
    model = task.build_model().eval()
    batch = next(b for step in range(20) if len((b := task.batch(step, 0, 0, 1)).get("groups", [])) == 2)
    (_, split, first), (_, rows, second) = batch["groups"]
    width = batch["image"]["input_ids"].shape[1]
    assert first != second and max(first, second) == width  # one group is trimmed
    whole = {**batch, "groups": [(0, rows, width)], "flow_rows": [torch.arange(rows)]}
    with torch.no_grad():
        grouped, single = task.loss(model, batch), task.loss(model, whole)
    for key in ("loss", "ce", "flow"):
        torch.testing.assert_close(grouped[key], single[key], rtol=1e-5, atol=1e-6)
    assert length_groups(batch["image"]["attention_mask"], split, world_size=2) == [(0, rows, width)]


def test_flow_fraction_takes_the_flow_loss_on_the_first_rows_of_each_kind(layout_run):
    """With ``next.flow_fraction`` f the flow loss is the mean of the per-row losses of the first ⌈f · n⌉
    text-to-image rows and the first ⌈f · m⌉ edit rows, each what the whole batch's forward gives that row;
    CE is unchanged."""
    import math

    from blip3o.diffusion.flow import flow_loss
    from blip3o.train.next_tasks import flow_step
    from blip3o.train.recipe import make_task

    out, _ = layout_run
    cfg = _tiny_layout_next()
    task = make_task("next", cfg, out)
    model = task.build_model().eval()
    step = next(s for s in range(20) if len(task.batch(s, 0, 0, 1).get("groups", [])) == 2)
    batch = task.batch(step, 0, 0, 1)
    (_, written, _), (_, rows, _) = batch["groups"]

    def batch_rows(flow_rows: list[torch.Tensor]) -> torch.Tensor:  # each group's row indices, in the batch
        return torch.cat([f + start for (start, _, _), f in zip(batch["groups"], flow_rows, strict=True)])

    assert written >= 2 and rows - written >= 2 and torch.equal(batch_rows(batch["flow_rows"]), torch.arange(rows))
    half = make_task("next", apply_overrides(cfg, ["next.flow_fraction=0.5"]), out)
    flow_rows = half.batch(step, 0, 0, 1)["flow_rows"]
    chosen = torch.cat(
        [torch.arange(math.ceil(0.5 * written)), written + torch.arange(math.ceil(0.5 * (rows - written)))]
    )
    assert torch.equal(batch_rows(flow_rows), chosen)
    with torch.no_grad():
        full, part = task.loss(model, batch), half.loss(model, {**batch, "flow_rows": flow_rows})
        # Each row's flow loss from one forward over the whole batch, the same noise and σ.
        ids, mask = batch["image"]["input_ids"], batch["image"]["attention_mask"]
        sigma, x_t, target, keep = flow_step(cfg.next.cond_dropout, 1.0, "uniform", batch["latents"], batch["seed"])
        v = model(
            ids,
            mask,
            latents=x_t,
            sigma=sigma,
            keep=keep,
            reference=batch["reference"],
            num_tokens=cfg.next.image_tokens,
        ).velocity
        per_row = flow_loss(v, target, reduction="per_sample")
    torch.testing.assert_close(part["flow"], per_row[chosen].mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(full["flow"], per_row.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(part["ce"], full["ce"])
    with pytest.raises(ConfigError, match=r"next\.flow_fraction"):
        apply_overrides(cfg, ["next.flow_fraction=0"])


def _starts_by_hand(grid: torch.Tensor) -> torch.Tensor:
    """Object cells whose left and upper neighbours are background or outside, cell by cell."""
    s = grid.shape[0]
    out = torch.zeros_like(grid, dtype=torch.bool)
    for r in range(s):
        for c in range(s):
            clear_left = c == 0 or grid[r, c - 1] == 0
            clear_up = r == 0 or grid[r - 1, c] == 0
            out[r, c] = bool(grid[r, c] != 0) and clear_left and clear_up
    return out


@pytest.mark.parametrize("train_prompt_text", [False, True])
def test_start_cells_weigh_where_objects_begin(layout_run, train_prompt_text):
    """The start-cell mask marks, in every labelled image block (edit references included when the prompt is
    trained), the cells a cell-by-cell scan finds; the weighted loss is the hand-weighted CE and equals the
    plain one at weight 1."""
    import torch.nn.functional as F

    from blip3o.train.next_tasks import start_cells
    from blip3o.train.recipe import make_task
    from blip3o.train.tasks import causal_lm_loss

    out, _ = layout_run
    cfg = apply_overrides(_tiny_layout_next(), [f"next.train_prompt_text={str(train_prompt_text).lower()}"])
    task = make_task("next", cfg, out)
    batch = next(b for step in range(20) if len((b := task.batch(step, 0, 0, 1)).get("groups", [])) == 2)
    labels, vocab = batch["image"]["labels"], task.vocab
    side = task.image_tokenizer.side
    mask = start_cells(labels, vocab, side)
    target = labels[:, 1:]
    for row in range(len(labels)):
        codes = target[row][vocab.is_code(target[row])] - vocab.first_code_id
        assert len(codes) % side**2 == 0 and len(codes) >= side**2
        want = torch.cat([_starts_by_hand(block.view(side, side)).flatten() for block in codes.split(side**2)])
        assert torch.equal(mask[row][vocab.is_code(target[row])], want)
        assert not mask[row][~vocab.is_code(target[row])].any()
    assert mask.any()
    logits = torch.randn(*labels.shape, len(task.tokenizer))
    weights = 1 + 4.0 * mask
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(), ignore_index=-100, reduction="none")
    by_hand = (ce * weights.flatten()).sum() / (target != -100).sum()
    torch.testing.assert_close(causal_lm_loss(logits, labels, weights), by_hand)
    plain_ce = causal_lm_loss(logits, labels)
    torch.testing.assert_close(causal_lm_loss(logits, labels, torch.ones_like(weights)), plain_ce)
    # In training, a weight above 1 raises the CE by the start cells' extra weight.
    model = task.build_model().eval()
    heavy = make_task("next", apply_overrides(cfg, ["next.start_cell_weight=5"]), out)
    with torch.no_grad():
        plain, weighted = task.loss(model, batch), heavy.loss(model, batch)
    assert weighted["ce"] > plain["ce"]
    torch.testing.assert_close(weighted["flow"], plain["flow"])


def test_start_cell_weight_needs_layout_codes():
    with pytest.raises(ConfigError, match=r"next\.start_cell_weight: weighs layout cells") as err:
        apply_overrides(get_preset("shapes-next"), ["next.start_cell_weight=5"])
    assert "next.next" not in str(err.value)  # the section's own checks name the field in full already
    with pytest.raises(ConfigError, match=r"next\.start_cell_weight"):
        apply_overrides(get_preset("shapes-next-layout"), ["next.start_cell_weight=0.5"])


def _nearest_share(codes: torch.Tensor, rows: torch.Tensor, truth: torch.Tensor, first: int) -> float:
    """The share of ``codes`` whose nearest of ``rows`` (by cosine, indices counted from ``first``) is ``truth``."""
    nearest = torch.nn.functional.cosine_similarity(codes[:, None], rows[None], dim=-1).argmax(1) + first
    return (nearest == truth).float().mean().item()


def test_name_init_points_every_code_at_its_class_and_colour_words(layout_run):
    """``next.name_init``: a code's embedding, less the mean code row, is nearest its own colour's word row and
    its own class's (both forms together, as in ``vector_names``); the singular or the plural alone still
    names the class far above chance, and a random projection (the default) names them near chance."""
    from blip3o.models.heads import id_factors
    from blip3o.models.image_tokenizer import LayoutTokenizer
    from blip3o.models.next import word_rows
    from blip3o.train.recipe import make_task
    from blip3o.world.spec import COLOR_NAMES, SHAPES, plural

    out, _ = layout_run
    cfg = _tiny_layout_next()
    names = LayoutTokenizer.vector_names()
    classes = names[1 : 1 + len(SHAPES)]
    assert classes[SHAPES.index("cross")] == "cross crosses"
    plurals = [plural(s) for s in SHAPES]
    hits = {}
    for flag in ("true", "false"):
        torch.manual_seed(0)  # the init's random rows, whatever ran before
        task = make_task("next", apply_overrides(cfg, [f"next.name_init={flag}"]), out)
        model = task.build_model()
        table = model.backbone.get_input_embeddings().weight.detach()
        lo, hi = model.vocab.code_range
        codes = table[lo + 1 : hi]  # the object cells
        codes = codes - codes.mean(0)
        _, kind, colour = id_factors(torch.arange(1, LAYOUT_VOCAB))

        # (words, the true index per code, the index of the words' first entry): colours count from 0,
        # classes from 1 (0 is the background).
        checks = [(COLOR_NAMES, colour, 0), (classes, kind, 1), (SHAPES, kind, 1), (plurals, kind, 1)]
        hits[flag] = [
            _nearest_share(codes, word_rows(task.tokenizer, table, list(words)), truth, first)
            for words, truth, first in checks
        ]
    assert hits["true"][:2] == [1.0, 1.0]
    assert min(hits["true"][2:]) >= 0.8
    assert max(hits["false"]) < 0.6


def _pooled_by_hand(ids: torch.Tensor, pool: int) -> torch.Tensor:
    """Block by block: the most frequent object id (the lowest on a tie) when half the block is objects."""
    b, h, w = ids.shape
    out = torch.zeros(b, h // pool, w // pool, dtype=torch.long)
    for i in range(b):
        for r in range(h // pool):
            for c in range(w // pool):
                block = ids[i, r * pool : (r + 1) * pool, c * pool : (c + 1) * pool].flatten().tolist()
                objects = [v for v in block if v != 0]
                if 2 * len(objects) >= pool * pool:
                    out[i, r, c] = min(set(objects), key=lambda v: (-objects.count(v), v))
    return out


def test_pooled_layout_codes_take_each_blocks_main_object():
    from blip3o.models.heads import pool_ids

    g = torch.Generator().manual_seed(0)
    # Sparse random layouts with a few ids, so that blocks hold ties, single cells and mixtures.
    ids = torch.randint(1, 5, (6, 8, 8), generator=g) * (torch.rand(6, 8, 8, generator=g) < 0.5)
    for pool in (2, 4):
        assert torch.equal(pool_ids(ids, pool), _pooled_by_hand(ids, pool))
    assert torch.equal(pool_ids(ids, 1), ids)
    by_hand = torch.tensor([[[3, 3, 0, 7], [0, 0, 0, 0]]])  # [3, 3] over [0, 0]: half objects → 3
    assert pool_ids(by_hand, 2).tolist() == [[[3, 0]]]  # [0, 7] over [0, 0]: one cell of four → background
    assert pool_ids(torch.tensor([[[9, 4], [4, 9]]]), 2).tolist() == [[[4]]]  # a tie goes to the lower id
    with pytest.raises(ValueError, match="pool 3 must divide the layout's 8×8 cells"):
        pool_ids(ids, 3)

    tok = LayoutTokenizer(8, pool=2)
    layout = ids_to_layout(ids)
    codes = tok.encode(layout)
    assert tok.side == 4 and tok.num_tokens() == 16 and codes.shape == (6, 16)
    assert torch.equal(codes, _pooled_by_hand(ids, 2).flatten(1))
    assert torch.equal(tok.decode(codes), ids_to_layout(codes.view(6, 4, 4)))
    with pytest.raises(ValueError, match=r"layout must be \(B, classes \+ colours, 8, 8\)"):
        tok.encode(layout[..., :4, :4])
    with pytest.raises(ValueError, match="pool 3 must divide the reading's side 8"):
        LayoutTokenizer(8, pool=3)
    # A pooled layout is what SANA's spatial input makes of the codes: decoded, upsampled to the reading.
    assert torch.equal(pool_layout(layout, 2), F.interpolate(tok.decode(codes), scale_factor=2, mode="nearest"))
    assert torch.equal(pool_layout(layout, 1), layout)


def test_a_pooled_decoder_draws_each_training_layout_at_one_of_its_block_sides(layout_run):
    from blip3o.train.recipe import make_task

    out, _ = layout_run
    task = make_task("decoder", apply_overrides(_tiny_layout_next(), ["model.decoder.layout_pools=[1,2]"]), out)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 9, (64, 8, 8), generator=g) * (torch.rand(64, 8, 8, generator=g) < 0.6)
    layout = ids_to_layout(ids)
    pooled = tokens_to_map(task.pooled(map_to_tokens(layout), torch.Generator().manual_seed(1)))
    same = (pooled == layout).flatten(1).all(1)
    blocks = (pooled == pool_layout(layout, 2)).flatten(1).all(1)
    assert (same ^ blocks).all()  # each sample is one or the other (random layouts always change when pooled)
    assert 16 < int(blocks.sum()) < 48  # both sides are drawn, about half each
    again = tokens_to_map(task.pooled(map_to_tokens(layout), torch.Generator().manual_seed(1)))
    assert torch.equal(again, pooled)  # the draw is the batch seed's, so a resumed run repeats it
    # The stage trains on the pooled layouts: its loss sees them.
    batch = task.batch(0, 0, 0, 1)
    assert torch.isfinite(task.loss(task.build_model(), batch)["loss"])


def test_decoder_layout_pools_are_checked():
    cfg = get_preset("shapes-blip3o-layout")
    with pytest.raises(ConfigError, match=r"decoder\.layout_pools: \[1, 3\] must all divide the 16×16 reading"):
        apply_overrides(cfg, ["model.decoder.layout_pools=[1,3]"])
    with pytest.raises(ConfigError, match=r"decoder\.layout_pools: pools layouts, and this decoder reads CLIP maps"):
        apply_overrides(get_preset("shapes-blip3o"), ["model.decoder.layout_pools=[1,2]"])
    with pytest.raises(ConfigError, match=r"decoder\.layout_pools: needs at least one block side"):
        apply_overrides(cfg, ["model.decoder.layout_pools=[]"])
    with pytest.raises(ConfigError, match=r"decoder\.layout_pools"):
        apply_overrides(cfg, ["model.decoder.layout_pools=[0]"])


def test_layout_pool_sets_the_token_count_and_bad_pools_are_refused():
    one = ["next.layout_pool=1", "next.upsample_codes=false"]  # one code a cell: nothing to upsample
    cfg = apply_overrides(get_preset("shapes-next-layout"), [*one, "next.image_tokens=256"])
    assert (cfg.next.layout_pool, cfg.next.image_tokens) == (1, 256)
    with pytest.raises(ConfigError, match=r"next\.image_tokens: is 64, but .* 16×16 reading pooled by 1 need 256"):
        apply_overrides(get_preset("shapes-next-layout"), one)
    with pytest.raises(ConfigError, match=r"next\.layout_pool: must divide the reading's side 16, got 3"):
        apply_overrides(get_preset("shapes-next-layout"), ["next.layout_pool=3", "next.image_tokens=16"])
    with pytest.raises(ConfigError, match=r"next\.layout_pool: pools layout cells, so it needs image_codes='layout'"):
        apply_overrides(get_preset("shapes-next"), ["next.layout_pool=2"])
    with pytest.raises(ConfigError, match=r"next\.spatial: .* their side must divide latent_side 16"):
        apply_overrides(get_preset("shapes-next"), ["next.image_tokens=36"])


@pytest.fixture(scope="module")
def pooled_run(layout_run):
    """The tiny layout run's shared stages, with NEXT writing each 2×2 block of the reading as one code."""
    from blip3o.train.recipe import run_recipe

    out, _ = layout_run
    cfg = apply_overrides(_tiny_layout_next(), ["next.layout_pool=2", "next.image_tokens=4"])
    pooled = out.parent / "pooled"
    run_recipe(cfg, pooled, progress=False, reuse=out)
    return pooled, cfg


def test_pooled_layout_runs_write_block_codes_and_keep_batching_and_blending(
    layout_run, pooled_run, copy_reference_codes
):
    out, _ = layout_run
    pooled, cfg = pooled_run
    pipe, full = load_pipeline(pooled), load_pipeline(out)
    assert pipe.model.vocab.codebook_size == LAYOUT_VOCAB and pipe.image_tokenizer.side == 2
    pixels = to_pixels(load_split(out / "world", "heldout").images[:4])
    assert torch.equal(pipe.codes(pixels), _pooled_by_hand(full.codes(pixels).view(4, 4, 4), 2).flatten(1))
    _assert_batch_is_single_prompts(pipe)
    # Blending at block resolution: written blocks equal to the reference's keep the reference's pixels.
    copy_reference_codes(pipe)
    source = to_images(pixels[:1])[0]
    pipe.apply_sampling(apply_overrides(cfg, ["next.edit_blend=true"]))
    np.testing.assert_array_equal(np.asarray(pipe.edit(source, "make the red circle blue", seed=0)[0]), source)


@pytest.fixture(scope="module")
def upsampled_run(layout_run):
    """The pooled run, with SANA drawing from the reading its code upsampler puts back."""
    from blip3o.train.recipe import run_recipe

    out, _ = layout_run
    overrides = ["next.layout_pool=2", "next.image_tokens=4", "next.upsample_codes=true"]
    cfg = apply_overrides(_tiny_layout_next(), overrides)
    up = out.parent / "upsampled"
    run_recipe(cfg, up, progress=False, reuse=out)
    return up, cfg


def test_the_code_upsampler_learns_the_reading_and_feeds_sanas_spatial_input(upsampled_run):
    from safetensors.torch import load_file

    from blip3o.models.heads import CodeUpsampler, layout_to_ids, pool_ids
    from blip3o.train.recipe import make_task, stage_config

    up, cfg = upsampled_run
    # The upsampler trains in `next` (its cross-entropy falls) and `instruct` leaves it as `next` wrote it.
    assert "upsampler" in stage_config(cfg, "next").trainable
    assert "upsampler" not in stage_config(cfg, "instruct").trainable
    metrics = [json.loads(line) for line in (up / "next" / "metrics.jsonl").read_text().splitlines()]
    cells = [m["cells"] for m in metrics if "cells" in m]
    assert len(cells) > 1 and cells[-1] < cells[0]
    weights = {stage: load_file(str(up / stage / "model.safetensors")) for stage in ("next", "instruct")}
    ups = [k for k in weights["next"] if k.startswith("upsampler.")]
    assert ups and all(torch.equal(weights["next"][k], weights["instruct"][k]) for k in ups)
    # The task's codes are the tokenizer's (the pool of the cells it keeps), its spatial input the true reading.
    task = make_task("instruct", cfg, up)
    task.enc.vae.encode = task.enc.vision.forward = None  # instruct reads what the run's cache holds
    e = task.encoded
    del task.enc.vae.encode, task.enc.vision.forward
    assert sorted(f.name.split("-")[0] for f in (up / "cache").iterdir()) == ["cells", "cells", "latent", "latent"]
    pixels = to_pixels(task.data.images[:8])
    tok = task.image_tokenizer
    reading = task.enc.layout(pixels)
    assert torch.equal(e["codes"][:8], tok.encode(reading)) and torch.equal(
        e["cells"][:8].long(), layout_to_ids(reading)
    )
    batch = task.batch(0, 0, 0, 1)
    assert "upsample" not in batch  # instruct keeps the upsampler as it is, so it draws no readings for it
    batch = make_task("next", cfg, up).batch(0, 0, 0, 1)
    assert torch.equal(batch["upsample"]["codes"], pool_ids(batch["upsample"]["cells"], 2).flatten(1))
    side = tok.reading_side
    assert batch["spatial"].shape[1:] == (NUM_CLASS_IDS + NUM_COLOUR_IDS, side, side)
    assert set(batch["spatial"].unique().tolist()) == {-1.0, 1.0}
    # At sampling SANA's spatial channels hold the upsampler's reading of the written codes, zeros when dropped.
    pipe = load_pipeline(up)
    model = pipe.model
    assert isinstance(model.upsampler, CodeUpsampler)
    codes = pipe.codes(pixels[:2])
    spatial = model.upsampler.layout(codes)
    assert torch.equal(spatial, ids_to_layout(model.upsampler(codes).argmax(1)))
    g = torch.Generator().manual_seed(0)
    latent = cfg.next.latent_side
    x, sigma = torch.randn(2, cfg.next.latent_channels, latent, latent, generator=g), torch.tensor([0.3, 0.8])
    cond = torch.randn(2, 5, cfg.next.connector_dim, generator=g)
    grid = F.interpolate(spatial, size=(latent, latent), mode="nearest")
    want = model.dit(torch.cat([x, grid, torch.zeros_like(x)], 1), cond, 1000 * sigma).sample
    torch.testing.assert_close(model.velocity(x, sigma, cond, spatial=spatial), want)
    with pytest.raises(ValueError, match="takes SANA's spatial input as `spatial`"):
        model.velocity(x, sigma, cond)
    _assert_batch_is_single_prompts(pipe)


def test_upsample_codes_needs_pooled_spatial_layout_codes():
    with pytest.raises(ConfigError, match=r"next\.upsample_codes: .* layout_pool > 1 and spatial=true"):
        apply_overrides(
            get_preset("shapes-next-layout"),
            ["next.layout_pool=1", "next.image_tokens=256"],  # the preset upsamples
        )
