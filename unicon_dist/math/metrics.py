"""Retrieval metrics, computed in query blocks so n × n scores are never held."""

from __future__ import annotations

import torch

from .positives import canonical_groups
from .validation import check_matrix, check_same_rows

__all__ = ["retrieval_metrics"]


def _recall(q: torch.Tensor, c: torch.Tensor, labels, ks, block: int) -> dict:
    """Fraction of queries whose best-scoring positive ranks within the top k.

    A query's rank is the number of candidates scoring strictly higher than its best
    positive, so ties count in the query's favour.
    """
    n = q.shape[0]
    hits = {k: 0 for k in ks}
    for i0 in range(0, n, block):
        i1 = min(i0 + block, n)
        scores = q[i0:i1] @ c.T
        if labels is None:
            rows = torch.arange(i1 - i0, device=q.device)
            best = scores[rows, rows + i0]
        else:
            pos = labels[i0:i1, None] == labels[None, :]
            best = scores.masked_fill(~pos, -torch.inf).amax(1)
        higher = (scores > best[:, None]).sum(1)
        for k in ks:
            hits[k] += int((higher < k).sum())
    return {k: hits[k] / n for k in ks}


def retrieval_metrics(z_x, z_y, ks=(1, 5, 10), groups=None, block_size: int = 1024) -> dict:
    """Recall@k of cross-modal retrieval in both directions.

    Parameters
    ----------
    z_x, z_y : array_like, shape (n, r)
        Paired embeddings; scores are inner products (pass normalised embeddings for
        cosine retrieval).
    ks : sequence of int
        Cut-offs.
    groups : array_like of int, shape (n,), optional
        A retrieved item is correct iff its group equals the query's (default: only
        the query's own partner).
    block_size : int
        Queries scored at once.

    Returns
    -------
    dict
        ``{"x2y_R@k": ..., "y2x_R@k": ...}`` for each k, fractions in [0, 1].
    """
    zx = check_matrix(z_x, "z_x")
    zy = check_matrix(z_y, "z_y")
    n = check_same_rows(z_x=zx, z_y=zy)
    if zx.shape[1] != zy.shape[1]:
        raise ValueError(f"z_x and z_y must have the same width, got {zx.shape[1]} and {zy.shape[1]}")
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    dtype = torch.promote_types(zx.dtype, zy.dtype)
    zx, zy = zx.to(dtype), zy.to(dtype)
    labels = canonical_groups(groups, n)
    lab = None if labels is None else torch.as_tensor(labels, device=zx.device)
    out = {}
    for name, q, c in (("x2y", zx, zy), ("y2x", zy, zx)):
        for k, v in _recall(q, c, lab, ks, block_size).items():
            out[f"{name}_R@{k}"] = v
    return out
