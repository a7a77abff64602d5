"""Independent dense references used by the tests (written for clarity, not speed).

Nothing here calls into ``unicon_dist`` except through the loss objects' elementwise
functions where a test says so explicitly.
"""

from __future__ import annotations

import math

import numpy as np
import torch


# --------------------------------------------------------------------------------------
# elementwise members of the loss family, written from the docstrings / DESIGN §2
# --------------------------------------------------------------------------------------
class RefClip:
    def __init__(self, temperature, nu=1.0, epsilon=1.0):
        self.t, self.nu, self.epsilon = temperature, nu, epsilon

    def psi(self, x):
        return torch.exp(x / self.t)

    def phi(self, a):
        return self.t * torch.log(a)


class RefTriplet:
    """φ(a) = a, ψ(x) = h(x + margin), h the quadratically smoothed hinge of width δ."""

    def __init__(self, smoothing, margin=0.2, nu=1.0, epsilon=1.0):
        self.d, self.margin, self.nu, self.epsilon = smoothing, margin, nu, epsilon

    def psi(self, x):
        u = x + self.margin
        uv = float(u.detach())
        if uv <= 0.0:
            return u * 0.0
        if uv < self.d:
            return u * u / (2.0 * self.d)
        return u - self.d / 2.0

    def phi(self, a):
        return a


class RefSigmoid:
    """φ(a) = a, ψ(x) = τ log(1 + exp(x/τ + b))."""

    def __init__(self, temperature, bias=0.0, nu=1.0, epsilon=1.0):
        self.t, self.b, self.nu, self.epsilon = temperature, bias, nu, epsilon

    def psi(self, x):
        u = x / self.t + self.b
        # log1p(exp(u)) written stably: max(u, 0) + log1p(exp(-|u|))
        return self.t * (torch.clamp(u, min=0.0) + torch.log1p(torch.exp(-torch.abs(u))))

    def phi(self, a):
        return a


def ref_loss_object(name, temperature, nu, epsilon=1.0):
    if name == "clip":
        return RefClip(temperature, nu=nu, epsilon=epsilon)
    if name == "triplet":
        return RefTriplet(temperature, nu=nu, epsilon=epsilon)
    if name == "sigmoid":
        return RefSigmoid(temperature, nu=nu, epsilon=epsilon)
    raise KeyError(name)


def naive_loss(s, fam, groups=None):
    """DESIGN §2's L(s), literally, as nested Python loops over torch scalars.

    ``fam`` provides ``psi``, ``phi`` (acting on 0-d tensors), ``nu`` and ``epsilon``.
    Differentiable when ``s`` requires grad.
    """
    n = s.shape[0]
    g = list(range(n)) if groups is None else [int(v) for v in np.asarray(groups)]
    nu, eps = float(fam.nu), float(fam.epsilon)
    total = s.new_zeros(())
    for mat in (s, s.T):  # rows as anchors, then columns as anchors
        for i in range(n):
            pos = [j for j in range(n) if g[j] == g[i]]
            neg = [j for j in range(n) if g[j] != g[i]]
            acc = s.new_zeros(())
            for k in pos:
                inner = s.new_zeros(())
                for j in neg:
                    inner = inner + eps * fam.psi(mat[i, j] - nu * mat[i, k])
                inner = inner + eps * fam.psi((1.0 - nu) * mat[i, k])
                acc = acc + fam.phi(inner)
            total = total + acc / len(pos)
    return total / (2 * n)


def naive_weights(s, fam, groups=None):
    """−∂L/∂s of :func:`naive_loss` through torch autograd (float64)."""
    st = torch.as_tensor(np.asarray(s, dtype=np.float64)).clone().requires_grad_(True)
    val = naive_loss(st, fam, groups)
    (grad,) = torch.autograd.grad(val, st)
    return -grad.numpy(), float(val.detach())


# --------------------------------------------------------------------------------------
# linear algebra references
# --------------------------------------------------------------------------------------
def svd_truncate(C, r):
    U, s, Vt = np.linalg.svd(np.asarray(C, dtype=np.float64), full_matrices=False)
    return (U[:, :r] * s[:r]) @ Vt[:r]


def tangent_projection(Z, W, r):
    """P_T(Z) = UUᵀZ + ZVVᵀ − UUᵀZVVᵀ at the rank-r matrix W."""
    U, _, Vt = np.linalg.svd(W, full_matrices=False)
    U, V = U[:, :r], Vt[:r].T
    PU, PV = U @ U.T, V @ V.T
    return PU @ Z + Z @ PV - PU @ Z @ PV


def batches(n, B, seed):
    perm = np.random.default_rng(seed).permutation(n)
    return [perm[a : a + B] for a in range(0, n, B)]


def rel_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def uneven_groups(sizes, rng=None, shuffle=False):
    """Group labels with the given group sizes; optionally in shuffled row order and with
    non-contiguous, non-zero-based label values."""
    labels = np.concatenate([np.full(sz, 10 * (gi + 1) + 3) for gi, sz in enumerate(sizes)])
    if shuffle:
        rng = np.random.default_rng(0) if rng is None else rng
        labels = labels[rng.permutation(labels.size)]
    return labels.astype(np.int64)
