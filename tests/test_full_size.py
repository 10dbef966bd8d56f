"""Full-size BLIP3-o presets build on the meta device with the official shapes."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2ForCausalLM

from blip3o.config import get_preset
from blip3o.models.heads import FlowHead
from blip3o.models.parts import Projector, build_backbone
from blip3o.models.unified import BLIP3o


def _build(name: str) -> BLIP3o:
    cfg = get_preset(name).model
    with torch.device("meta"):
        backbone = build_backbone(cfg.backbone, cfg.vocab_size)
        channels, side, _ = cfg.target_shape
        head = FlowHead(cfg.generation.dit, channels, side, cfg.backbone.hidden_size)
        projector = Projector(cfg.vision.hidden_size, cfg.backbone.hidden_size)
        return BLIP3o(backbone, torch.nn.Identity(), projector, head, cfg.generation.num_queries, image_token_id=0)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(("name", "width", "backbone_params"), [("blip3o-8b", 3584, 7.6e9), ("blip3o-4b", 2048, 3.1e9)])
def test_full_size_preset_shapes(name, width, backbone_params, capsys):
    model = _build(name)
    assert isinstance(model.backbone, Qwen2ForCausalLM)
    assert model.queries.shape == (64, width)
    dit = model.head.dit
    assert (dit.config.in_channels, dit.config.sample_size, dit.config.patch_size) == (1792, 8, 1)
    assert (dit.config.hidden_size, dit.config.num_layers, dit.config.num_attention_heads) == (1792, 24, 28)
    assert dit.layers[0].feed_forward.linear_1.out_features == 4 * 1792  # the official FFN width, 7168
    assert model.head.cond_proj[0].in_features == width
    assert get_preset(name).model.target_shape == (1792, 8, 8)
    n_backbone, n_head = _count(model.backbone), _count(model.head)
    assert n_backbone == pytest.approx(backbone_params, rel=0.1)
    assert n_head == pytest.approx(1.7e9, rel=0.15)  # ~1.7B, as in official-blip3o.md §2.4
    with capsys.disabled():
        print(
            f"\n{name}: backbone {n_backbone / 1e9:.2f}B, generation head {n_head / 1e9:.2f}B, "
            f"queries {model.queries.numel() / 1e6:.2f}M"
        )
