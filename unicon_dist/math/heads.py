"""A fitted view's encoder as a plain ``torch.nn`` module: raw input features in, embeddings out.

A head is ``nn.Sequential(features, nn.Linear(m, r), UnitRows())`` with every fitted stage
folded in:

- ``features``: :class:`NystroemFeatures` (φ(x) = k(x, L)·N, the Nyström map of
  :class:`~unicon_dist.math.nystrom.NystroemMap`) for a kernel, ``nn.Identity`` for the
  linear kernel;
- the linear layer: centring and whitening (φ − μ)·A followed by the projection Fᵀ are one
  affine map, weight F·Aᵀ and bias −μ·A·Fᵀ, formed in float64 and then cast;
- :class:`UnitRows` (L2 normalisation, zero rows to zero) for cosine similarity,
  ``nn.Identity`` for "dot".

The modules hold only tensors and numbers, so they script (``torch.jit.script``), export
(``torch.export``, ONNX) and move to any device and dtype like any module; nothing in their
forward pass refers back to this package.  A head is described by :func:`head_state`
(a JSON config plus named tensors, what a safetensors file stores) and rebuilt by
:func:`head_from_state`.

Precision: the library's own encoder forms Nyström features in float64 (rounding in
k(x, L)·N is amplified by up to 1/√λ_min of K_LL) and casts them; a head computes in its
own dtype, so a float32 head with a badly conditioned K_LL loses those digits.  Build it in
float64 (``dtype=torch.float64``) to reproduce ``encode_x``/``encode_y`` to float64 round-off.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .kernels import Kernel

__all__ = ["HEAD_FORMAT", "HEAD_KERNELS", "NystroemFeatures", "UnitRows", "build_head", "head_state",
           "head_from_state"]

HEAD_FORMAT = "unicon_dist.heads/1"
# the kernels a head evaluates itself (every kernel of unicon_dist.math.kernels.KERNELS)
HEAD_KERNELS = ("linear", "rbf", "laplacian", "polynomial", "cosine", "angular", "arccos")


def _unit(A: torch.Tensor) -> torch.Tensor:
    n = torch.linalg.norm(A, dim=1, keepdim=True)
    return torch.where(n > 0, A / n.clamp_min(1e-300 if A.dtype == torch.float64 else 1e-30), torch.zeros_like(A))


class UnitRows(nn.Module):
    """z / ‖z‖ row by row; a zero row stays zero (as :meth:`UniCon.encode_x` does)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return _unit(z)


class NystroemFeatures(nn.Module):
    """Nyström features φ(x) = k(x, L)·N of a fitted map, in the module's dtype.

    Parameters
    ----------
    kernel : str
        One of :data:`HEAD_KERNELS`.
    landmarks : torch.Tensor, shape (m, d)
    normalization : torch.Tensor, shape (m, k)
        U_k Λ_k^{-1/2} of K_LL.
    bandwidth, gamma, coef0 : float
        σ of "rbf"/"laplacian"; γ and c of "polynomial" (unused otherwise).
    degree : int
        Of "polynomial"; for "arccos" its order (0 or 1).

    The kernel formulas are those of :mod:`unicon_dist.math.kernels`, written with the
    same operations so a float64 head reproduces the library's features to round-off:
    ‖a − b‖² through ‖a‖² + ‖b‖² − 2aᵀb clipped at 0, angles through the half-angle form
    2·atan2(‖â − b̂‖, ‖â + b̂‖) (arccos of the cosine loses half the digits near 0).
    """

    def __init__(self, kernel: str, landmarks: torch.Tensor, normalization: torch.Tensor, *,
                 bandwidth: float = 1.0, gamma: float = 1.0, coef0: float = 0.0, degree: int = 1):
        super().__init__()
        if kernel not in HEAD_KERNELS:
            raise ValueError(f"a head cannot evaluate kernel {kernel!r}; supported: {HEAD_KERNELS}")
        self.kernel = kernel
        self.bandwidth, self.gamma, self.coef0, self.degree = float(bandwidth), float(gamma), float(coef0), int(degree)
        # ONNX has no pairwise-distance operator: an exported head forms the L1 and the
        # half-angle distances from broadcast differences instead (the same arithmetic as
        # torch.cdist without the matrix-product shortcut, in batch × m × d memory)
        self.broadcast_distances = False
        self.register_buffer("landmarks", landmarks.detach().clone())
        self.register_buffer("normalization", normalization.detach().clone())

    def _distances(self, a: torch.Tensor, b: torch.Tensor, p: float) -> torch.Tensor:
        if self.broadcast_distances:
            diff = (a[:, None, :] - b[None, :, :]).abs()
            return diff.sum(-1) if p == 1.0 else (diff * diff).sum(-1).sqrt()
        if p == 1.0:
            return torch.cdist(a, b, p=1.0)
        return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")

    def _angles(self, x: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
        ux, ul = _unit(x), _unit(L)
        a, b = self._distances(ux, ul, 2.0), self._distances(ux, -ul, 2.0)
        if self.broadcast_distances and a.dtype == torch.float64:
            # ONNX Runtime has no double Atan kernel: an exported float64 head takes the
            # angle in float32 (relative error 6e-8 in θ)
            theta = 2.0 * torch.atan2(a.float(), b.float()).to(a.dtype)
        else:
            theta = 2.0 * torch.atan2(a, b)
        zero = (torch.linalg.norm(x, dim=1)[:, None] == 0) | (torch.linalg.norm(L, dim=1)[None, :] == 0)
        return torch.where(zero, torch.full_like(theta, math.pi / 2), theta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L = self.landmarks
        x = x.to(L.dtype)
        if self.kernel == "linear":  # a Nyström map of the linear kernel (kernel_x="linear" with landmarks)
            K = x @ L.T
        elif self.kernel == "rbf":
            d = (x * x).sum(1)[:, None] + (L * L).sum(1)[None, :] - 2.0 * (x @ L.T)
            K = torch.exp(d.clamp(min=0.0) * (-0.5 / self.bandwidth ** 2))
        elif self.kernel == "laplacian":
            K = torch.exp(self._distances(x, L, 1.0) * (-1.0 / self.bandwidth))
        elif self.kernel == "polynomial":
            K = torch.pow(self.gamma * (x @ L.T) + self.coef0, self.degree)
        elif self.kernel == "cosine":
            K = (_unit(x) @ _unit(L).T).clamp(-1.0, 1.0)
        elif self.degree == 0:  # "angular", arc-cosine of order 0
            K = 1.0 - self._angles(x, L) / math.pi
        else:  # arc-cosine of order 1
            theta = self._angles(x, L)
            norms = torch.linalg.norm(x, dim=1)[:, None] * torch.linalg.norm(L, dim=1)[None, :]
            K = norms * (torch.sin(theta) + (math.pi - theta) * torch.cos(theta)) / math.pi
        return K @ self.normalization

    def extra_repr(self) -> str:
        return f"kernel={self.kernel!r}, landmarks={tuple(self.landmarks.shape)}, features={self.normalization.shape[1]}"


def _kernel_config(kernel: Kernel) -> dict:
    """The numbers a :class:`NystroemFeatures` needs for a (resolved) kernel."""
    p = kernel.params()
    name = p["name"]
    if name == "linear":
        return {"kernel": name}
    if name in ("rbf", "laplacian"):
        return {"kernel": name, "bandwidth": float(p["bandwidth"])}
    if name == "polynomial":
        return {"kernel": name, "gamma": float(p["gamma"]), "coef0": float(p["coef0"]), "degree": int(p["degree"])}
    if name == "cosine":
        return {"kernel": name}
    if name == "angular":
        return {"kernel": name, "degree": 0}
    if name == "arccos":
        return {"kernel": name, "degree": int(p["order"])}
    raise ValueError(f"a head cannot evaluate kernel {name!r}; supported: {HEAD_KERNELS}")


def head_state(fmap, F, similarity: str) -> tuple[dict, dict]:
    """(config, float64 tensors) of one view's head.

    Parameters
    ----------
    fmap : NystroemMap, FeatureWhitening or None
        The view's fitted map (``model.map_x_``).
    F : array-like, shape (r, m)
        The view's encoder (``model.F1_``).
    similarity : {"cosine", "dot"}

    Returns
    -------
    config : dict
        ``n_inputs``, ``rank``, ``normalize`` and, for a kernel, ``nystrom`` (kernel name
        and numbers, landmark and feature counts).
    tensors : dict
        ``weight`` (r, d or m), ``bias`` (r,), and for a kernel ``landmarks``, ``normalization``.
    """
    F = torch.as_tensor(F).detach().to("cpu", torch.float64)
    base, mean, matrix = fmap, None, None
    if hasattr(fmap, "mean") and hasattr(fmap, "base"):  # a FeatureWhitening stage
        base, mean, matrix = fmap.base, fmap.mean, fmap.matrix
    weight = F if matrix is None else F @ torch.as_tensor(matrix).to("cpu", torch.float64).T
    bias = torch.zeros(F.shape[0], dtype=torch.float64) if mean is None else \
        -(weight @ torch.as_tensor(mean).to("cpu", torch.float64))
    config = {"rank": int(F.shape[0]), "normalize": similarity == "cosine"}
    tensors = {"weight": weight.contiguous(), "bias": bias.contiguous()}
    if base is None:
        config["n_inputs"] = int(F.shape[1])
    else:
        landmarks = base.landmarks.detach().to("cpu", torch.float64)
        config["n_inputs"] = int(landmarks.shape[1])
        config["nystrom"] = {**_kernel_config(base.kernel), "n_landmarks": int(landmarks.shape[0]),
                             "n_features": int(base.normalization.shape[1]),
                             "library_kernel": base.kernel.params()}
        tensors["landmarks"] = landmarks.contiguous()
        tensors["normalization"] = base.normalization.detach().to("cpu", torch.float64).contiguous()
    return config, tensors


def head_from_state(config: dict, tensors: dict, *, dtype=torch.float32, device=None) -> nn.Sequential:
    """The head of :func:`head_state`'s output, in ``dtype`` on ``device``."""
    weight, bias = tensors["weight"], tensors["bias"]
    nys = config.get("nystrom")
    if nys is None:
        features = nn.Identity()
    else:
        features = NystroemFeatures(nys["kernel"], tensors["landmarks"], tensors["normalization"],
                                    **{k: nys[k] for k in ("bandwidth", "gamma", "coef0", "degree") if k in nys})
    # built in float64 and cast once: copying into a float32 layer first would round it
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=True, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    head = nn.Sequential(features, linear, UnitRows() if config["normalize"] else nn.Identity())
    return head.to(device=device, dtype=dtype).eval().requires_grad_(False)


def build_head(fmap, F, similarity: str, *, dtype=torch.float32, device=None) -> nn.Sequential:
    """One view's head from its fitted map and encoder (see the module docstring)."""
    config, tensors = head_state(fmap, F, similarity)
    return head_from_state(config, tensors, dtype=dtype, device=device)

