"""Distribution metrics on feature vectors: Fréchet distance and within-prompt diversity.

The Fréchet distance between Gaussians fitted to two feature sets (FID's formula, here on mini-CLIP
features instead of Inception ones):

    FD = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁^½ Σ₂ Σ₁^½)^½)

computed with symmetric eigendecompositions in float64 (no SciPy needed).
"""

from __future__ import annotations

import torch


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to features a (N, D) and b (M, D)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected (N, D) and (M, D) features, got {tuple(a.shape)} and {tuple(b.shape)}")
    if min(len(a), len(b)) < 2:
        raise ValueError("need at least two samples on each side")
    a, b = a.double(), b.double()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = torch.cov(a.T), torch.cov(b.T)
    r1 = _sqrtm_psd(s1)
    cross = _sqrtm_psd(r1 @ s2 @ r1)
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * torch.trace(cross))


def diversity(features: torch.Tensor) -> float:
    """Mean pairwise cosine distance within groups: features (G, K, D) → scalar (K ≥ 2 images per prompt)."""
    if features.ndim != 3 or features.shape[1] < 2:
        raise ValueError(f"expected (groups, images ≥ 2, dim), got {tuple(features.shape)}")
    f = torch.nn.functional.normalize(features.double(), dim=-1)
    sim = f @ f.transpose(1, 2)  # (G, K, K)
    k = f.shape[1]
    off = (sim.sum((1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(-1)) / (k * (k - 1))
    return float((1 - off).mean())
