"""Fréchet distance and diversity against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from blip3o.eval.distribution import diversity, frechet_distance


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    n, d = 200_000, 3
    a = torch.randn(n, d, generator=g) * torch.tensor([1.0, 2.0, 0.5]) + torch.tensor([0.0, 1.0, 0.0])
    b = torch.randn(n, d, generator=g) * torch.tensor([2.0, 1.0, 0.5])
    # diagonal covariances: FD = |μ1 − μ2|² + Σ (σ1 − σ2)²
    expected = 1.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0.0
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match="features"):
        frechet_distance(torch.zeros(4, 3), torch.zeros(4, 2))


def test_diversity_closed_form():
    same = torch.ones(2, 3, 4)
    assert diversity(same) == pytest.approx(0.0, abs=1e-12)
    orth = torch.eye(3).expand(5, 3, 3)  # three orthogonal vectors per group: cosine distance 1
    assert diversity(orth) == pytest.approx(1.0)
    pair = torch.tensor([[[1.0, 0.0], [math.cos(1.0), math.sin(1.0)]]])
    assert diversity(pair) == pytest.approx(1 - math.cos(1.0))
