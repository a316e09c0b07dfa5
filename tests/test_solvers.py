"""Solvers and masks against their definitions, on small random layers with correlated inputs."""

import pytest
import torch

from oneshot.constraint import Constraint
from oneshot.masks import apply_mask, check_constraint, lowest_k, n_pruned, nm_mask, positive_zeros, select_mask
from oneshot.solvers import SOLVERS, Stats
from oneshot.solvers.sparsegpt import NMPatterns, group_mask, inverse_hessian_factor


def _layer(out_features=64, in_features=128, tokens=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    # correlated inputs with uneven channel scales, as real activations have
    mix = torch.randn(in_features, in_features, generator=g) / in_features**0.5
    scales = torch.rand(in_features, generator=g) * 3 + 0.1
    x = (torch.randn(tokens, in_features, generator=g) @ mix + 0.3 * torch.randn(tokens, in_features,
                                                                                 generator=g)) * scales
    w = torch.randn(out_features, in_features, generator=g)
    stats = Stats(tokens=tokens, sq_norms=(x * x).sum(0), hessian=x.t() @ x)
    return w, x, stats


def _error(w, w_hat, x):
    return float(torch.linalg.norm(x @ (w - w_hat).t()) / torch.linalg.norm(x @ w.t()))


OPTIONS = {"blocksize": 32, "dampening": 0.01, "magnitude_scope": "layer"}


@pytest.mark.parametrize("constraint", [Constraint(0.5), Constraint(0.5, 2, 4), Constraint(0.5, 4, 8), Constraint(0.7)])
def test_error_ordering_sparsegpt_wanda_magnitude(constraint):
    """At the same constraint the layer-output error orders sparsegpt < wanda < magnitude."""
    w, x, stats = _layer()
    errors = {name: _error(w, SOLVERS[name].fn(w, stats, constraint, OPTIONS).weight, x)
              for name in ("sparsegpt", "wanda", "magnitude")}
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


@pytest.mark.parametrize("name", ["sparsegpt", "wanda", "magnitude"])
@pytest.mark.parametrize("constraint", [Constraint(0.5, 2, 4), Constraint(0.5, 4, 8), Constraint(0.25, 3, 4)])
def test_nm_masks_exact_in_every_group(name, constraint):
    w, _, stats = _layer(seed=1)
    result = SOLVERS[name].fn(w, stats, constraint, OPTIONS)
    groups = result.mask.reshape(w.shape[0], -1, constraint.m).sum(-1)
    assert (groups == constraint.m - constraint.n).all()
    assert (result.weight[result.mask] == 0).all()
    assert check_constraint(result.weight, constraint) is None


@pytest.mark.parametrize("name,scope", [("sparsegpt", "row"), ("sparsegpt", "block"), ("wanda", "row"),
                                        ("magnitude", "layer"), ("magnitude", "row")])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.8])
def test_unstructured_count_exact(name, scope, sparsity):
    w, _, stats = _layer(out_features=48, in_features=96, seed=2)
    options = dict(OPTIONS, sparsegpt_scope=scope, magnitude_scope=scope)
    result = SOLVERS[name].fn(w, stats, Constraint(sparsity), options)
    if scope == "row":  # every output row exact
        assert (result.mask.sum(1) == n_pruned(96, sparsity)).all()
        expected = 48 * n_pruned(96, sparsity)
    else:  # one count per layer
        expected = n_pruned(w.numel(), sparsity)
        assert result.mask.sum(1).unique().numel() > 1  # rows differ: the comparison spans the layer/block
    assert int(result.mask.sum()) == expected
    assert int((result.weight == 0).sum()) == expected


def test_wanda_equals_closed_form():
    w, x, stats = _layer(seed=3)
    result = SOLVERS["wanda"].fn(w, stats, Constraint(0.5), OPTIONS)
    score = w.abs() * x.norm(dim=0)  # |W_ij| * ||X_j||_2
    expected = torch.zeros_like(w, dtype=torch.bool)  # the lower half of each row
    order = score.argsort(dim=1)[:, : w.shape[1] // 2]
    expected.scatter_(1, order, True)
    assert torch.equal(result.mask, expected)
    assert torch.equal(result.weight, torch.where(expected, torch.zeros(()), w))


def test_magnitude_layer_scope_is_one_threshold():
    w, _, _ = _layer(seed=4)
    result = SOLVERS["magnitude"].fn(w, None, Constraint(0.5), {"magnitude_scope": "layer"})
    assert w.abs()[result.mask].max() <= w.abs()[~result.mask].min()
    rows = SOLVERS["magnitude"].fn(w, None, Constraint(0.5), {"magnitude_scope": "row"})
    assert (rows.mask.sum(1) == w.shape[1] // 2).all()


def test_sparsegpt_with_diagonal_hessian_is_masking_by_obs_score():
    """With a diagonal H the OBS update of the other weights is zero: result = masked weight."""
    w, _, _ = _layer(out_features=8, in_features=16, seed=5)
    diag = torch.rand(16) + 0.5
    stats = Stats(tokens=1, sq_norms=diag, hessian=torch.diag(diag))
    result = SOLVERS["sparsegpt"].fn(w, stats, Constraint(0.5, 2, 4), {"blocksize": 4, "dampening": 0.0})
    assert torch.allclose(result.weight, apply_mask(w, result.mask), atol=1e-6)
    # with diagonal H the OBS score is w^2 * H_jj: the two smallest per group go
    expected = nm_mask(w**2 * diag, 2, 4)
    assert torch.equal(result.mask, expected)


def test_sparsegpt_dead_inputs_pruned_first():
    w, x, _ = _layer(out_features=16, in_features=32, seed=6)
    x[:, :5] = 0
    stats = Stats(tokens=x.shape[0], sq_norms=(x * x).sum(0), hessian=x.t() @ x)
    result = SOLVERS["sparsegpt"].fn(w, stats, Constraint(0.5), OPTIONS)
    assert (result.weight[:, :5] == 0).all() and result.info["dead_inputs"] == 5
    assert int((result.weight == 0).sum()) == n_pruned(w.numel(), 0.5)


def test_cholesky_failure_retries_then_reports():
    h = torch.ones(8, 8)  # rank one: no Cholesky without dampening
    with pytest.raises(torch.linalg.LinAlgError):
        inverse_hessian_factor(h, 0.0)
    factor, info = inverse_hessian_factor(h, 0.01)  # dampening makes it positive definite
    assert torch.isfinite(factor).all() and "fallback" not in info
    # an indefinite H fails at the requested dampening and succeeds at 10x, and says so
    indefinite = torch.eye(8)
    indefinite[0, 0] = -0.05  # mean diag ~0.87; 1% damp leaves it negative, 10% fixes it
    factor, info = inverse_hessian_factor(indefinite, 0.01)
    assert info["dampening"] == pytest.approx(0.1) and "fallback" in info
    assert torch.isfinite(factor).all()


def test_inverse_hessian_factor_is_the_cholesky_factor_of_the_inverse():
    _, _, stats = _layer(in_features=96)
    h = stats.hessian / stats.tokens
    factor, info = inverse_hessian_factor(h, 0.01)
    damped = h.double() + 0.01 * h.diagonal().mean().double() * torch.eye(96, dtype=torch.float64)
    expected = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)
    assert torch.equal(factor, factor.triu()) and info["dampening"] == 0.01
    assert torch.allclose(factor.double(), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("m,pruned", [(4, 2), (8, 4), (4, 1)])
def test_group_mask_picks_the_cheapest_pattern_of_the_solver_steps(m, pruned):
    """Brute force: run the solver's column steps for every pattern of every row (prune column t with
    error e_t = w_t/u_tt, cost e_t², move the later columns by -e_t·u_t,·) and keep the cheapest."""
    from itertools import combinations

    g = torch.Generator().manual_seed(m + pruned)
    rows = 9
    w = torch.randn(m, rows, generator=g)
    u = torch.randn(m, m, generator=g).triu()
    u.diagonal().copy_(torch.rand(m, generator=g) + 0.5)
    mask, err = group_mask(w, u, NMPatterns(m, pruned, "cpu"))
    assert mask.shape == err.shape == (m, rows) and (mask.sum(0) == pruned).all()
    for r in range(rows):
        best = None
        for chosen in combinations(range(m), pruned):
            cur, e = w[:, r].double().clone(), torch.zeros(m, dtype=torch.float64)
            for t in chosen:
                e[t] = cur[t] / u[t, t]
                cur[t + 1:] -= e[t] * u[t, t + 1:].double()
            cost = float((e * e).sum())
            if best is None or cost < best[0]:
                best = (cost, chosen, e)
        assert mask[:, r].nonzero().flatten().tolist() == list(best[1]), r
        assert torch.allclose(err[:, r].double(), best[2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("constraint", [Constraint(0.5, 2, 4), Constraint(0.5, 4, 8)])
def test_sparsegpt_nm_options_keep_groups_exact(constraint):
    """Act-order moves whole N:M groups, exact selection and saliency ranks both keep every group
    exact along the original input dimension; on uneven input scales act-order lowers the error."""
    w, x, stats = _layer(in_features=256, seed=8)
    errors = {}
    for order in ("natural", "hessian"):
        for select in ("exact", "saliency"):
            stats.cache = {}
            result = SOLVERS["sparsegpt"].fn(w, stats, constraint, dict(OPTIONS, sparsegpt_order=order,
                                                                        nm_select=select))
            assert check_constraint(result.weight, constraint) is None
            assert torch.equal(result.weight == 0, result.mask)
            errors[order, select] = _error(w, result.weight, x)
    assert errors["hessian", "exact"] < errors["natural", "exact"], errors


def test_sparsegpt_never_silently_identity():
    w = torch.randn(4, 8)
    stats = Stats(tokens=1, sq_norms=torch.ones(8), hessian=-torch.eye(8) * 5)  # negative definite
    with pytest.raises(torch.linalg.LinAlgError):
        SOLVERS["sparsegpt"].fn(w, stats, Constraint(0.5), {"dampening": 0.01})


def test_masks_helpers():
    score = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.6, 0.7, 0.8]])
    assert nm_mask(score, 2, 4).tolist() == [[False, True, False, True, True, True, False, False]]
    assert lowest_k(score, 3).sum() == 3
    assert select_mask(score, Constraint(0.25), scope="row").sum() == 2
    neg = torch.tensor([-0.0, 1.0, -2.0])
    assert not torch.signbit(positive_zeros(neg)[0])
    assert not torch.signbit(apply_mask(torch.tensor([-3.0]), torch.tensor([True]))).any()
    with pytest.raises(ValueError):
        nm_mask(torch.ones(2, 6), 2, 4)
    assert check_constraint(torch.tensor([[1.0, 1.0, 1.0, 0.0]]), Constraint(0.5, 2, 4)) is not None


@pytest.mark.parametrize("dim", [64, 577, 1030, 1601])  # 1, 2, 3 and 4 blocks
def test_block_triangular_hessian_accumulation_equals_full(dim):
    from oneshot.engine.statistics import accumulate_hessian, finish_hessian, hessian_blocks

    assert len(hessian_blocks(dim)) - 1 == {64: 1, 577: 2, 1030: 3, 1601: 4}[dim]
    x = torch.randn(300, dim, dtype=torch.float64)
    h = torch.zeros(dim, dim, dtype=torch.float64)
    accumulate_hessian(h, x[:100])
    accumulate_hessian(h, x[100:])
    finish_hessian(h)
    assert torch.allclose(h, x.t() @ x)


@pytest.mark.parametrize("m,k", [(4, 2), (8, 4), (4, 3), (16, 8)])
def test_lowest_k_small_equals_topk_and_keeps_counts_with_ties(m, k):
    from oneshot.masks import lowest_k, lowest_k_small

    score = torch.randn(m, 500, generator=torch.Generator().manual_seed(m + k))
    assert torch.equal(lowest_k_small(score, k), lowest_k(score, k, dim=0))
    ties = torch.randint(0, 2, (m, 500), generator=torch.Generator().manual_seed(1)).float()
    mask = lowest_k_small(ties, k)
    assert (mask.sum(0) == k).all()
    for c in range(500):  # every pruned score is <= every kept one, per column
        assert ties[mask[:, c], c].max() <= ties[~mask[:, c], c].min()
