"""Input checks shared by the public functions: one place that words the errors."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["as_tensor", "check_finite", "check_matrix", "check_same_rows", "resolve_dtype", "resolve_device"]

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    if isinstance(dtype, type) or isinstance(dtype, np.dtype):
        name = np.dtype(dtype).name
        if name in _DTYPES:
            return _DTYPES[name]
    raise ValueError(f"unsupported dtype {dtype!r}; expected one of {sorted(_DTYPES)}")


def resolve_device(device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"invalid device {device!r}: {exc}") from None


def as_tensor(x, *, name: str, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """Convert array-likes to a tensor without copying when possible."""
    if isinstance(x, torch.Tensor):
        t = x
    else:
        arr = np.asarray(x)
        if arr.dtype == object:
            raise TypeError(f"{name} must be a numeric array, got dtype object")
        if arr.dtype.kind not in "fiub":
            raise TypeError(f"{name} must be a numeric array, got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if dtype is not None or device is not None:
        t = t.to(dtype=dtype or t.dtype, device=device or t.device)
    return t


def check_finite(t: torch.Tensor, name: str, row_offset: int = 0) -> None:
    """Raise ValueError naming the first rows that hold NaN or Inf."""
    # the sum is finite when every entry is (no n × d boolean temporary); a non-finite
    # sum can also be an overflow of finite values, so only then check entry by entry
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.sum())):
        bad = ~torch.isfinite(t)
        if not bool(bad.any()):
            return
        rows = torch.nonzero(bad.reshape(bad.shape[0], -1).any(1)).flatten()
        shown = ", ".join(str(int(r) + row_offset) for r in rows[:10])
        more = f" (and {rows.numel() - 10} more)" if rows.numel() > 10 else ""
        raise ValueError(f"{name} holds NaN or Inf in {rows.numel()} row(s): rows {shown}{more}")


def check_matrix(x, name: str, *, dtype=None, device=None) -> torch.Tensor:
    """A finite 2-D floating matrix with at least one row and column, detached from autograd.

    A tensor with ``requires_grad=True`` is detached (no copy): the fixed point and the
    encoders need no gradient, and the in-place and ``out=`` kernels of the streamed
    passes refuse tensors that require one.  The result of ``encode_x``/``encode_y``
    therefore carries no gradient to its input either.  (:func:`as_tensor` keeps the
    graph, so that :func:`unicon_dist.contrastive_loss` stays differentiable.)
    """
    t = as_tensor(x, name=name)
    if t.requires_grad:
        t = t.detach()
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    check_finite(t, name)
    return t.to(dtype=dtype or t.dtype, device=device or t.device)


def check_same_rows(**arrays) -> int:
    ns = {k: int(v.shape[0]) for k, v in arrays.items()}
    if len(set(ns.values())) != 1:
        desc = ", ".join(f"{k} has {v}" for k, v in ns.items())
        raise ValueError(f"mismatched number of rows: {desc}")
    return next(iter(ns.values()))
