"""How much of each decoder layer to prune (``--allocation uniform|owl``).

OWL (Yin et al., ICML 2024, "Outlier Weighed Layerwise sparsity"): layers with more outliers keep
more weights. A layer's outlier density is the fraction of its Wanda scores |W_ij|·‖X_j‖₂ (over all
its linears) above M times their mean, measured on the dense model. Densities are scaled to
[0, 2λ]; layer l gets sparsity target + mean(d) − d_l, so sparsities stay within target ± λ. Here
the mean is weighted by each layer's pruned parameters, so the parameter-weighted mean sparsity
equals the target exactly (the reference uses the plain mean: the same when all layers are equal).
"""

from __future__ import annotations

import torch

ALLOCATIONS = ("uniform", "owl")


def outlier_density(weights: list[torch.Tensor], sq_norms: list[torch.Tensor], m: float) -> float:
    """Fraction of the layer's Wanda scores above ``m`` × their mean."""
    scores = torch.cat([(w.abs().float() * n.sqrt().unsqueeze(0)).flatten() for w, n in zip(weights, sq_norms)])
    return float((scores > m * scores.mean()).float().mean())


def owl_sparsities(densities: list[float], params: list[int], target: float, lam: float) -> list[float]:
    """Per-layer sparsities with parameter-weighted mean exactly ``target``, within ``target ± lam``."""
    d = torch.tensor(densities, dtype=torch.float64)
    p = torch.tensor(params, dtype=torch.float64)
    spread = float(d.max() - d.min())
    scaled = (d - d.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(d)
    mean = float((scaled * p).sum() / p.sum())
    sparsity = target + mean - scaled
    if float(sparsity.min()) < 0 or float(sparsity.max()) >= 1:
        raise ValueError(f"OWL with lambda {lam} gives sparsities outside [0, 1) around {target}; lower --owl-lambda")
    return sparsity.tolist()
