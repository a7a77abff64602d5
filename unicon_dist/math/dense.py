"""Dense (n × n) loss and similarity weights S(γ) = −∂L/∂s, for small n and as references.

These functions hold the whole similarity matrix and are meant for n up to a few
thousand: the reference that the streamed passes of :mod:`unicon_dist.solver.operator` are
tested against, and a convenient way to inspect S(γ).  ``contrastive_loss`` on a
torch tensor is differentiable, so autograd gives an independent check of
``similarity_weights``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .losses import ContrastiveLoss, get_loss
from .positives import canonical_groups
from .validation import as_tensor, check_finite

__all__ = ["contrastive_loss", "similarity_weights"]


def _prepare(s, groups):
    was_numpy = not isinstance(s, torch.Tensor)
    s_t = as_tensor(s, name="s", dtype=None if not was_numpy else torch.float64)
    if s_t.ndim != 2 or s_t.shape[0] != s_t.shape[1]:
        raise ValueError(f"s must be a square (n, n) similarity matrix, got shape {tuple(s_t.shape)}")
    if not s_t.is_floating_point():
        s_t = s_t.double()
    check_finite(s_t.detach(), "s")
    n = s_t.shape[0]
    labels = canonical_groups(groups, n)
    if labels is None:
        mask = torch.eye(n, dtype=torch.bool, device=s_t.device)
    else:
        lab = torch.as_tensor(labels, device=s_t.device)
        mask = lab[:, None] == lab[None, :]
    return s_t, mask, was_numpy


def _positive_slots(mask: torch.Tensor):
    """Column indices of each row's positives, padded: (idx (n, p), valid (n, p), count (n,))."""
    count = mask.sum(1)
    p = int(count.max())
    # a stable sort of ~mask puts each row's positive columns first, in column order
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    idx = order[:, :p]
    valid = torch.arange(p, device=mask.device)[None, :] < count[:, None]
    return idx, valid, count


def _anchor_terms(s, mask, loss: ContrastiveLoss):
    """Per (anchor i, positive slot q): φ(A_iq), and the row part of ∂L/∂s times 2n.

    Returns the summed anchor loss Σ_i 1/|P(i)| Σ_k φ(A_ik) and G with
    G_ij = 2n ∂(row-anchor part of L)/∂s_ij.
    """
    idx, valid, count = _positive_slots(mask)
    s_pos = s.gather(1, idx)
    inv_count = 1.0 / count.to(s.dtype)
    nu, eps = loss.nu, loss.epsilon
    if loss.exponential:
        tau = loss.temperature
        t = s / tau
        t_pos = s_pos / tau
        lneg = torch.logsumexp(t.masked_fill(mask, -math.inf), dim=1)
        ldenom = torch.logaddexp(lneg[:, None], t_pos)  # log(N_i + e^{t_ik})
        phi_a = tau * (math.log(eps) - nu * t_pos + ldenom)
        total = (phi_a * valid * inv_count[:, None]).sum()
        # negatives: e^{t_ij} · mean_k 1/(N_i + e^{t_ik}); positives: (σ_ik − ν)/|P(i)|
        log_a = torch.logsumexp((-ldenom).masked_fill(~valid, -math.inf), dim=1) - torch.log(count.to(s.dtype))
        grad = torch.exp(t + log_a[:, None])
        sigma = torch.exp(t_pos - ldenom)
        pos_val = (sigma - nu) * inv_count[:, None]
    else:
        p = idx.shape[1]
        phi_a = torch.zeros_like(s_pos)
        grad = torch.zeros_like(s)
        pos_val = torch.zeros_like(s_pos)
        neg = (~mask).to(s.dtype)
        for q in range(p):
            x = s - nu * s_pos[:, q : q + 1]
            a = eps * (loss.psi(x) * neg).sum(1) + eps * loss.psi((1.0 - nu) * s_pos[:, q])
            d = eps * (loss.dpsi(x) * neg).sum(1)
            c = loss.dphi(a) * inv_count * valid[:, q]
            phi_a[:, q] = loss.phi(a)
            grad = grad + c[:, None] * eps * loss.dpsi(x) * neg
            pos_val[:, q] = c * (-nu * d + (1.0 - nu) * eps * loss.dpsi((1.0 - nu) * s_pos[:, q]))
        total = (phi_a * valid * inv_count[:, None]).sum()
    grad = grad.masked_fill(mask, 0.0)
    grad = grad.scatter_add(1, idx, pos_val * valid)
    return total, grad


def _resolve(loss, temperature, nu):
    return get_loss(loss, temperature=temperature, nu=nu)


def contrastive_loss(s, loss="clip", temperature: float = 0.07, nu: float = 1.0, groups=None):
    """The symmetric contrastive loss L(s) of DESIGN §2.

    Parameters
    ----------
    s : array_like or torch.Tensor, shape (n, n)
        Similarities s_ij = <f(x_i), g(y_j)>; row i is anchor x_i, column j is y_j.
    loss : str or ContrastiveLoss
        "clip" (InfoNCE), "triplet", "sigmoid", or a loss object.
    temperature, nu : float
        τ (the smoothing width for "triplet") and the positive weight ν.
    groups : array_like of int, shape (n,), optional
        Group ids; x_i and y_j are positives iff g_i = g_j.  Default: one-to-one.

    Returns
    -------
    float or torch.Tensor
        A Python float for array input; a 0-d tensor (differentiable) for tensor input.
    """
    lossobj = _resolve(loss, temperature, nu)
    s_t, mask, was_numpy = _prepare(s, groups)
    n = s_t.shape[0]
    row, _ = _anchor_terms(s_t, mask, lossobj)
    col, _ = _anchor_terms(s_t.T, mask, lossobj)
    value = (row + col) / (2 * n)
    return float(value) if was_numpy else value


def similarity_weights(s, loss="clip", temperature: float = 0.07, nu: float = 1.0, groups=None):
    """The contrastive similarity weight matrix S(γ) = −∂L/∂s, dense.

    Closed forms (not autograd).  For one-to-one CLIP this is
    S = (2νI − P − P̄)/(2n) with P, P̄ the row and column softmax of s/τ.

    Parameters
    ----------
    s, loss, temperature, nu, groups
        As in :func:`contrastive_loss`.

    Returns
    -------
    ndarray or torch.Tensor, shape (n, n)
        Same kind as ``s`` (float64 for array input).
    """
    lossobj = _resolve(loss, temperature, nu)
    s_t, mask, was_numpy = _prepare(s, groups)
    n = s_t.shape[0]
    with torch.no_grad():
        _, g_row = _anchor_terms(s_t, mask, lossobj)
        _, g_col = _anchor_terms(s_t.T, mask, lossobj)
        S = -(g_row + g_col.T) / (2 * n)
    return S.cpu().numpy() if was_numpy else S


def dense_cross_product(phi_x, phi_y, s, loss="clip", temperature=0.07, nu=1.0, groups=None):
    """Φ_Xᵀ S(s) Φ_Y with S formed densely (reference for the streamed product)."""
    S = similarity_weights(np.asarray(s, dtype=np.float64), loss, temperature, nu, groups)
    return np.asarray(phi_x, dtype=np.float64).T @ S @ np.asarray(phi_y, dtype=np.float64)
