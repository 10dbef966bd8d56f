"""BLIP3o-NEXT configuration: run-level checks, presets wired to the shared parts, and sampling settings."""

from __future__ import annotations

import pytest

from blip3o.config import RunConfig
from blip3o.config.checks import ConfigError
from blip3o.config.io import apply_overrides, dumps_yaml, from_dict, to_dict
from blip3o.config.next import NextConfig, shapes_next
from blip3o.config.presets import resolve
from blip3o.config.recipe import RecipeConfig
from blip3o.train.recipe import stage_config


def test_next_stages_need_a_next_model():
    with pytest.raises(ConfigError, match=r"recipe\.stages: stages \['image_tokenizer', 'next'\] need a BLIP3o-NEXT"):
        RunConfig(recipe=RecipeConfig(stages=["clip", "image_tokenizer", "next"]))
    with pytest.raises(ConfigError, match="stages must keep the order"):
        RunConfig(next=shapes_next(), recipe=RecipeConfig(stages=["next", "image_tokenizer"]))


@pytest.mark.parametrize("name", ["shapes-next", "tiny-next"])
def test_next_presets_match_their_shared_parts(name):
    cfg = resolve(name)
    model, nxt = cfg.model, cfg.next
    assert nxt.image_tokens == model.vision.target_grid**2
    assert nxt.connector_dim == model.vision.hidden_size
    assert nxt.sana == model.decoder.dit
    assert (nxt.latent_channels, nxt.latent_side, nxt.latent_side) == model.latent_shape
    assert nxt.sana_in_channels == 2 * nxt.latent_channels + nxt.connector_dim
    assert cfg.recipe.stages == ["clip", "vae", "decoder", "image_tokenizer", "next", "instruct"]
    for stage in ("next", "instruct"):
        expected = ["backbone", "connector", *(f"dit.{p}" for p in nxt.train_sana)]
        assert stage_config(cfg, stage).trainable == expected
    everything = apply_overrides(cfg, ["next.train_sana=[caption_projection,transformer_blocks]"])
    assert stage_config(everything, "next").trainable[2:] == ["dit.caption_projection", "dit.transformer_blocks"]
    # A run config round-trips through YAML with its next section.
    assert from_dict(RunConfig, to_dict(cfg)) == cfg
    assert "next:" in dumps_yaml(cfg)


def test_next_overrides_and_errors():
    cfg = apply_overrides(resolve("shapes-next"), ["next.top_k=50", "next.temperature=0.7"])
    assert (cfg.next.top_k, cfg.next.temperature) == (50, 0.7)
    with pytest.raises(ConfigError, match=r"next\.top_p"):
        NextConfig(top_p=1.5)
    with pytest.raises(ConfigError, match=r"edit_fraction \+ understanding_fraction"):
        NextConfig(edit_fraction=0.7, understanding_fraction=0.5)
    with pytest.raises(ConfigError, match=r"next\.pool_factors: needs one pool factor per scale token"):
        NextConfig(num_scales=2)
    with pytest.raises(ConfigError, match=r"next\.spatial: spatial conditioning needs a square"):
        NextConfig(spatial=True, image_tokens=15)
    assert NextConfig(num_scales=2, pool_factors=[1, 2]).tokenizer_config().pool_factors == (1, 2)


def test_sana_must_be_the_pixel_decoders_dit_when_the_next_stage_starts_from_it():
    cfg = resolve("shapes-next-layout")
    assert cfg.next.sana == cfg.model.decoder.dit and cfg.next.sana.num_layers == 4
    with pytest.raises(ConfigError, match=r"next\.sana: .*'num_layers': 4.*model\.decoder\.dit is .*'num_layers': 2"):
        apply_overrides(cfg, ["model.decoder.dit.num_layers=2"])
    shallow = apply_overrides(cfg, ["model.decoder.dit.num_layers=2", "next.sana.num_layers=2"])
    assert shallow.next.sana == shallow.model.decoder.dit and shallow.next.sana.num_layers == 2
    apply_overrides(cfg, ["model.decoder.dit.num_layers=2", "recipe.stages=[clip,vae,reader,decoder]"])  # no next
