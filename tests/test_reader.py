"""The layout reader (``model.vision.reader_width``): its stage, its arithmetic, and where runs read layouts with it."""

from __future__ import annotations

import os
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from blip3o.config import ConfigError
from blip3o.config.io import apply_overrides
from blip3o.config.presets import get_preset, tiny_debug
from blip3o.data.processing import to_pixels
from blip3o.data.tokenizer import load_tokenizer
from blip3o.data.world_data import load_split
from blip3o.infer.pipeline import load_encoders
from blip3o.models.build import Encoders, clip_map, load_weights
from blip3o.models.heads import LayoutReader, snap_layout
from blip3o.train.recipe import make_task, run_recipe
from blip3o.world.spec import NUM_CLASS_IDS, NUM_COLOUR_IDS

LABELS = NUM_CLASS_IDS + NUM_COLOUR_IDS


def _tiny_reader_config(stages: str = "[clip,vae,reader]"):
    base = tiny_debug()
    model = replace(
        base.model,
        vision=replace(base.model.vision, grounding_cells=2, reader_width=16),
        generation=replace(base.model.generation, target="layout"),
    )
    return apply_overrides(replace(base, model=model), [f"recipe.stages={stages}"])


@pytest.fixture(scope="module")
def reader_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reader") / "run"
    return out, run_recipe(_tiny_reader_config(), out, progress=False)


def test_the_reader_labels_each_patch_cell_from_two_convolutions_over_the_map():
    torch.manual_seed(0)
    reader, cells = LayoutReader(8, 12, 2), 2
    x = torch.randn(3, 8, 4, 4)
    (c1, _, c2, _, c3) = reader.net
    h = F.gelu(F.conv2d(F.gelu(F.conv2d(x, c1.weight, c1.bias, padding=1)), c2.weight, c2.bias, padding=1))
    per_patch = F.conv2d(h, c3.weight, c3.bias)  # (B, K·c·c, g, g): label k of cell (i, j) at k·c² + i·c + j
    b, _, g, _ = per_patch.shape
    want = per_patch.view(b, LABELS, cells, cells, g, g).permute(0, 1, 4, 2, 5, 3).reshape(b, LABELS, g * 2, g * 2)
    got = reader(x)
    assert got.shape == (3, LABELS, 8, 8)
    torch.testing.assert_close(got, want)
    # Cell (i, j) of patch (p, q) sits at row p·c + i, column q·c + j.
    assert torch.equal(got[:, :, 1 * 2 + 1, 3 * 2 + 0], per_patch[:, [k * 4 + 1 * 2 + 0 for k in range(LABELS)], 1, 3])


def test_the_reader_stage_needs_a_reader_width_and_the_layout_preset_has_both():
    with pytest.raises(ConfigError, match=r"recipe\.stages: the reader stage .*reader_width, which is 0"):
        apply_overrides(tiny_debug(), ["recipe.stages=[clip,vae,reader]"])
    for name in ("shapes-blip3o-layout", "shapes-next-layout"):
        cfg = get_preset(name)
        assert cfg.model.vision.reader_width == 128 and cfg.recipe.stages[:4] == ["clip", "vae", "reader", "decoder"]
    # Presets without a reader keep their stages.
    assert "reader" not in get_preset("shapes-blip3o").recipe.stages
    assert "reader" not in get_preset("shapes-next").recipe.stages


def test_the_reader_stage_fits_the_cells_and_the_run_reads_layouts_with_it(reader_run):
    out, summaries = reader_run
    assert list(summaries) == ["clip", "vae", "reader"]
    cfg = _tiny_reader_config()
    enc = load_encoders(out, cfg.model, len(load_tokenizer(out / "tokenizer")))
    assert isinstance(enc.reader, LayoutReader)
    pixels = to_pixels(load_split(out / "world", "heldout").images[:4])
    reader = LayoutReader(cfg.model.vision.hidden_size, 16, 2)
    load_weights(reader, out / "reader" / "model.safetensors")
    want = snap_layout(reader(clip_map(enc.vision, pixels, enc.pool)), NUM_CLASS_IDS)
    assert torch.equal(enc.layout(pixels), want)
    # A config that asks for a reader refuses to fall back to the linear head when the run has none.
    bare = Encoders(enc.vision, enc.vae, enc.pool, enc.scales, enc.grounding, needs_reader=True)
    with pytest.raises(ValueError, match="train the reader stage first"):
        bare.layout(pixels)


def test_the_reader_task_learns_its_batch(reader_run):
    out, _ = reader_run
    task = make_task("reader", _tiny_reader_config(), out)
    torch.manual_seed(0)
    model = task.build_model()
    batch = task.batch(0, 0, 0, 1)
    side = task.cfg.layout_side
    assert batch["maps"].shape[-1] * 2 == side and batch["classes"].shape[1:] == (side, side)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    first = task.loss(model, batch)["loss"].item()
    for _ in range(60):
        loss = task.loss(model, batch)
        opt.zero_grad()
        loss["loss"].backward()
        opt.step()
    assert loss["loss"].item() < first / 4 and loss["object_cell_acc"] > 0.9
