"""Sensitivity-weighted k-means per output channel (SqueezeLLM, Kim et al., 2023, sec. 3).

For a weight W [K, N] (y = x W), each output channel n (a column of W) gets its own codebook of
C = 2^bits values, and each weight w[k, n] is replaced by its nearest codebook entry. SqueezeLLM
picks the codebook by minimizing the sensitivity-weighted squared error of the channel

    sum_k  s_k · (w[k, n] - c[a(k), n])²,     a(k) = the entry w[k, n] is assigned to,

with s the diagonal of the Fisher information (sec. 3.1). A compiler pass has no gradients (no
loss, no labels), so `kompakt` uses the second-order proxy s_k = H_kk = E[x_k²], the diagonal of
the calibration inputs' Hessian XᵀX/n (the layer-wise objective of GPTQ/OBQ): the layer's output
error for a weight change Δ is tr(ΔᵀHΔ), whose diagonal part is exactly sum_k H_kk |Δ_k|². It is
also what the Fisher diagonal reduces to within one channel: F[k, n] = E[(g_n x_k)²] with g_n
the loss gradient at output n, ≈ E[g_n²] · E[x_k²] if the two are independent, and the factor
E[g_n²] scales channel n's whole objective without moving its minimizer. What is lost is the
weighting *across* channels, which a per-channel codebook never uses.

The k-means is Lloyd's algorithm in one dimension, run on all N channels at once:
- initialization: weighted quantiles of the channel's weights (deterministic);
- assignment: the codebook is kept sorted, so the nearest entry is found by a binary search
  among the midpoints between neighbouring entries (no [K, N, C] distance tensor);
- update: each entry becomes the sensitivity-weighted mean of its members; an entry left empty
  is moved to the member with the largest weighted error, so no entry is wasted on a duplicate;
- stop after `iterations` rounds, or earlier once no assignment changes.
Channels with at most C distinct values get exactly those values (zero error); an all-zero
channel gets an all-zero codebook. Every division is guarded, so no input produces NaN.
"""

from __future__ import annotations

import torch

SENSITIVITY_FLOOR = 0.01
"""Added to every sensitivity, as a fraction of their mean: an input channel that was never
active in the calibration data still gets some weight (the data may simply not have exercised
it), and a layer whose inputs were all zero falls back to plain k-means."""

CHANNEL_CHUNK = 4096
"""Output channels clustered together: bounds the temporaries to a few [K, CHANNEL_CHUNK]."""


def sensitivities(hessian_diagonal: torch.Tensor) -> torch.Tensor:
    """The k-means weights s_k from diag(H), floored so that none is zero (see the floor)."""
    d = hessian_diagonal.float().clamp_min(0)
    mean = float(d.mean()) if d.numel() else 0.0
    if not mean > 0:
        return torch.ones_like(d)
    return d + SENSITIVITY_FLOOR * mean


def weighted_kmeans(
    w: torch.Tensor,
    sensitivity: torch.Tensor,
    bits: int,
    iterations: int = 30,
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column codebooks for W [K, N] under row weights ``sensitivity`` [K] (all > 0).

    ``exclude`` [K, N] (bool) marks weights stored elsewhere (the sparse outliers of SqueezeLLM's
    dense-and-sparse split, sec. 4): they do not pull on the codebook, and their indices are
    arbitrary.

    Returns (codebook [2^bits, N] float32, sorted along dim 0; indices [K, N] uint8), so that
    ``codebook.gather(0, indices.long())`` approximates W.
    """
    k, n = w.shape
    if sensitivity.shape != (k,):
        raise ValueError(f"sensitivity of shape {list(sensitivity.shape)} does not match K={k}")
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf")
    if not (torch.isfinite(sensitivity).all() and (sensitivity > 0).all()):
        raise ValueError("sensitivities must be finite and positive")
    if exclude is not None and exclude.shape != w.shape:
        raise ValueError(f"exclude mask of shape {list(exclude.shape)} does not match {[k, n]}")
    codebooks, indices = [], []
    for start in range(0, n, CHANNEL_CHUNK):
        chunk = slice(start, start + CHANNEL_CHUNK)
        columns = w[:, chunk].float().T.contiguous()  # [n, K]
        weights = sensitivity.float().expand_as(columns).clone()
        if exclude is not None:
            columns, weights = _without(columns, weights, exclude[:, chunk].T)
        c, a = _cluster_rows(columns, weights, 1 << bits, iterations)
        codebooks.append(c.T)
        indices.append(a.T)
    return torch.cat(codebooks, 1).contiguous(), torch.cat(indices, 1).to(torch.uint8).contiguous()


def lookup(codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """W ≈ codebook[indices[k, n], n]: what GatherElements(codebook, indices, axis=0) computes."""
    return codebook.gather(0, indices.long())


def weighted_error(w: torch.Tensor, approx: torch.Tensor, sensitivity: torch.Tensor) -> float:
    """The k-means objective sum_k,n s_k (w - ŵ)²."""
    return float((sensitivity.float()[:, None] * (w.float() - approx.float()).pow(2)).sum())


def _without(x: torch.Tensor, weights: torch.Tensor, excluded: torch.Tensor):
    """Excluded elements get weight 0 and the value of the row's heaviest kept element, so they
    add no new distinct value to the row either."""
    weights = weights.masked_fill(excluded, 0.0)
    filler = x.gather(1, weights.argmax(1, keepdim=True))
    return torch.where(excluded, filler, x), weights


def _cluster_rows(
    x: torch.Tensor, weights: torch.Tensor, clusters: int, iterations: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted 1-D k-means of each row of x [n, K] (weights [n, K]): ([n, C], [n, K] int64)."""
    centroids = _weighted_quantiles(x, weights, clusters)
    previous = None
    for _ in range(iterations):
        assign = _nearest(x, centroids)
        if previous is not None and torch.equal(assign, previous):
            break  # converged: the same members give the same means (and the same reseeds)
        centroids = _update(x, weights, assign, centroids)
        previous = assign
    centroids = _use_distinct_values(x, centroids)
    return centroids, _nearest(x, centroids)


def _weighted_quantiles(x: torch.Tensor, weights: torch.Tensor, clusters: int) -> torch.Tensor:
    """Initial centroids: the values at cumulative weight (i + 1/2) / C of each row, sorted."""
    values, order = x.sort(dim=1)
    cumulative = weights.gather(1, order).cumsum(1)
    # a row whose elements are all excluded has zero total weight: its codebook is unused
    cumulative = cumulative / cumulative[:, -1:].clamp_min(torch.finfo(x.dtype).tiny)
    levels = (torch.arange(clusters, dtype=x.dtype) + 0.5) / clusters
    position = torch.searchsorted(cumulative, levels.expand(x.shape[0], -1).contiguous())
    return values.gather(1, position.clamp_max(x.shape[1] - 1))


def _nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the (sorted) centroids for every element of x [n, K]."""
    midpoints = (centroids[:, 1:] + centroids[:, :-1]) / 2
    return torch.searchsorted(midpoints.contiguous(), x.contiguous())


def _update(
    x: torch.Tensor, weights: torch.Tensor, assign: torch.Tensor, centroids: torch.Tensor
) -> torch.Tensor:
    """Lloyd's update: weighted means of the members; empty entries reseeded; result sorted."""
    total = torch.zeros_like(centroids).scatter_add_(1, assign, weights * x)
    mass = torch.zeros_like(centroids).scatter_add_(1, assign, weights)
    empty = mass == 0
    updated = torch.where(empty, centroids, total / mass.clamp_min(torch.finfo(x.dtype).tiny))
    if empty.any():
        updated = _reseed(x, weights, updated, assign, empty)
    return updated.sort(dim=1).values


def _reseed(x, weights, centroids, assign, empty) -> torch.Tensor:
    """Moves each row's empty entries onto its members with the largest weighted error: those
    are the points a spare entry lowers the objective the most for."""
    error = weights * (x - centroids.gather(1, assign)).pow(2)
    spare = int(empty.sum(1).max())
    worst_error, worst = error.topk(min(spare, x.shape[1]), dim=1)
    # the j-th empty entry of a row (in index order) takes the row's j-th worst point
    rank = (empty.cumsum(1) - 1).clamp(0, worst.shape[1] - 1)
    candidate = x.gather(1, worst).gather(1, rank)
    useful = empty & (worst_error.gather(1, rank) > 0)  # a zero-error point gains nothing
    return torch.where(useful, candidate, centroids)


def _use_distinct_values(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Rows with at most C distinct values get those values as their codebook: exact (k-means
    could still merge two of them when the initialization put no entry near one)."""
    clusters = centroids.shape[1]
    values = x.sort(dim=1).values
    new = torch.ones_like(values, dtype=torch.bool)
    new[:, 1:] = values[:, 1:] != values[:, :-1]
    distinct = new.sum(1)
    few = distinct <= clusters
    if not few.any():
        return centroids
    rank = (new.cumsum(1) - 1).clamp_max(clusters - 1)
    exact = torch.zeros_like(centroids).scatter_(1, rank, values)  # each rank's value
    # pad with the largest value, so the codebook stays sorted and every entry is a real value
    pad = torch.arange(clusters)[None, :] >= distinct[:, None]
    exact = torch.where(pad, values[:, -1:], exact)
    return torch.where(few[:, None], exact, centroids)
