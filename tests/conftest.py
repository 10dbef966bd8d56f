"""Shared fixtures: offline hub, a tiny world made once per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest

from blip3o.config import get_preset


@pytest.fixture(scope="session")
def tiny_cfg():
    return get_preset("tiny-debug")


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory, tiny_cfg):
    from blip3o.world.shards import make_world

    out = tmp_path_factory.mktemp("world")
    make_world(tiny_cfg.world, out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_next_run(tmp_path_factory):
    """A trained ``tiny-next`` recipe: (run directory, stage summaries)."""
    from blip3o.config.presets import resolve
    from blip3o.train.recipe import run_recipe

    out = tmp_path_factory.mktemp("next") / "run"
    summaries = run_recipe(resolve("tiny-next"), out, progress=False)
    return out, summaries


@pytest.fixture
def copy_reference_codes(monkeypatch):
    """Make a NEXT pipeline write each edit's reference codes as its own (the sampled draw is replaced), the
    case where a blended edit has to return the reference; returns the patched ``sample_tokens``."""
    import torch

    def patch(pipe):
        sample_tokens = pipe.sample_tokens

        def copying(input_ids, attention_mask, seeds, cfg, references=None):
            sample = sample_tokens(input_ids, attention_mask, seeds, cfg, references)
            sample.tokens = torch.tensor(references) + pipe.model.vocab.first_code_id
            return sample

        monkeypatch.setattr(pipe, "sample_tokens", copying)
        return copying

    return patch
