"""What the baseline estimators share: parameters, input checks, the validation split, encoding.

Nothing here is specific to one method.  The estimators follow scikit-learn's conventions
(keyword-only constructor arguments stored untouched, validation once in ``fit``, learned
state in names ending in ``_``) and all return unit-norm embeddings, so retrieval scores
are cosine similarities.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import torch

from ..math.metrics import retrieval_metrics
from ..data.rows import inverse_norms
from ..math.validation import check_matrix, check_same_rows

__all__ = ["BaselineEstimator", "MAX_VALIDATION_PAIRS"]

#: validation retrieval is scored on at most this many pairs (it costs n² scores)
MAX_VALIDATION_PAIRS = 5000


# ----------------------------------------------------------------------------- parameter checks
def check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_nonnegative(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_rank(rank, d_x: int, d_y: int) -> int:
    rank = check_int("rank", rank, 1)
    if rank > min(d_x, d_y):
        raise ValueError(f"rank={rank} exceeds min(d_x, d_y) = min({d_x}, {d_y}) = {min(d_x, d_y)}")
    return rank


# ----------------------------------------------------------------------------- data
def check_views(X, Y, names=("X", "Y"), min_rows: int = 2):
    """(X, Y) as finite 2-D floating tensors (where they already are) with equal row counts."""
    X = check_matrix(X, names[0])
    Y = check_matrix(Y, names[1])
    n = check_same_rows(**{names[0]: X, names[1]: Y})
    if n < min_rows:
        raise ValueError(f"{names[0]} and {names[1]} hold {n} pair(s); need at least {min_rows}")
    return X, Y


def split_validation(validation, X: torch.Tensor, Y: torch.Tensor, seed: int):
    """Training and validation pairs from the ``validation`` argument.

    Parameters
    ----------
    validation : float in (0, 1), (X_val, Y_val), or None
        A fraction of the rows held out (drawn with ``np.random.default_rng(seed)``),
        separate validation pairs, or no validation.
    X, Y : torch.Tensor, shape (n, d_x), (n, d_y)
        Checked by :func:`check_views`.

    Returns
    -------
    X_train, Y_train, X_val, Y_val, train_rows, val_rows
        ``X_val``/``Y_val`` are None without validation; ``train_rows`` and ``val_rows``
        index the rows of X (sorted; ``val_rows`` is None unless a fraction was held out,
        ``train_rows`` None when every row trains).
    """
    n = X.shape[0]
    if validation is None:
        return X, Y, None, None, None, None
    if isinstance(validation, (tuple, list)):
        if len(validation) != 2:
            raise ValueError(f"validation must be a fraction in (0, 1) or a pair (X_val, Y_val), got a sequence of "
                             f"length {len(validation)}")
        Xv, Yv = check_views(validation[0], validation[1], names=("validation X_val", "validation Y_val"))
        for name, A, B in (("X_val", Xv, X), ("Y_val", Yv, Y)):
            if A.shape[1] != B.shape[1]:
                raise ValueError(f"validation {name} has {A.shape[1]} features, the training view has {B.shape[1]}")
        return X, Y, Xv, Yv, None, None
    if isinstance(validation, bool) or not isinstance(validation, (float, np.floating)) \
            or not 0.0 < validation < 1.0:
        raise ValueError(f"validation must be a fraction in (0, 1), a pair (X_val, Y_val) or None, got {validation!r}")
    n_val = int(round(float(validation) * n))
    if n_val < 2 or n - n_val < 2:
        raise ValueError(f"validation={validation} holds out {n_val} of {n} pairs; need at least 2 validation and "
                         f"2 training pairs")
    order = np.random.default_rng(seed).permutation(n)
    val_rows, train_rows = np.sort(order[:n_val]), np.sort(order[n_val:])
    vi = torch.as_tensor(val_rows, device=X.device)
    ti = torch.as_tensor(train_rows, device=X.device)
    return X[ti], Y[ti], X[vi], Y[vi], train_rows, val_rows


def cap_validation(X_val, Y_val, seed: int, limit: int = MAX_VALIDATION_PAIRS):
    """At most ``limit`` validation pairs: a sorted seeded subset when there are more."""
    if X_val is None or X_val.shape[0] <= limit:
        return X_val, Y_val
    rows = np.sort(np.random.default_rng(seed).choice(X_val.shape[0], size=limit, replace=False))
    idx = torch.as_tensor(rows, device=X_val.device)
    return X_val[idx], Y_val[idx]


def retrieval_score(z_x, z_y) -> float:
    """Mean R@1 of both retrieval directions (x→y and y→x), a number in [0, 1]."""
    m = retrieval_metrics(z_x, z_y, ks=(1,))
    return 0.5 * (m["x2y_R@1"] + m["y2x_R@1"])


def normalize_rows(Z: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm (zero rows stay zero)."""
    return Z * inverse_norms(Z)[:, None]


# ----------------------------------------------------------------------------- estimator base
class BaselineEstimator:
    """Parameters, fitted check and encoders shared by the baselines.

    A subclass sets ``_fitted_attr`` (an attribute that exists after ``fit``) and
    implements ``_projection(which)`` returning ``(weights (d, r), mean (d,) or None)``:
    the embedding of a row a is normalise((a − mean) @ weights).
    """

    #: every baseline returns unit-norm embeddings: retrieval scores are cosines
    similarity = "cosine"
    _fitted_attr = "fit_seconds_"

    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values()
                if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]

    def get_params(self, deep: bool = True) -> dict:
        """Constructor arguments, as given (``type(self)(**get_params())`` is an unfitted copy)."""
        return {k: getattr(self, k) for k in self._param_names()}

    def set_params(self, **params):
        """Set constructor arguments; returns self."""
        names = self._param_names()
        for k, v in params.items():
            if k not in names:
                raise ValueError(f"unknown parameter {k!r} for {type(self).__name__}")
            setattr(self, k, v)
        return self

    def __repr__(self):
        sig = inspect.signature(type(self).__init__)
        changed = []
        for k, v in self.get_params().items():
            p = sig.parameters.get(k)
            default = p.default if p is not None else inspect.Parameter.empty
            if p is None or default is inspect.Parameter.empty or not _same(v, default):
                changed.append(f"{k}={_short(v)}")
        return f"{type(self).__name__}({', '.join(changed)})"

    def check_fitted(self):
        """Raise RuntimeError unless the model is fitted (or loaded)."""
        if not hasattr(self, self._fitted_attr):
            raise RuntimeError(f"this {type(self).__name__} model is not fitted yet; call fit() first")

    def _projection(self, which: str):  # pragma: no cover - abstract
        raise NotImplementedError

    def _encode(self, A, which: str):
        self.check_fitted()
        name, n_inputs = ("X", self.n_inputs_x_) if which == "x" else ("Y", self.n_inputs_y_)
        was_tensor = isinstance(A, torch.Tensor)
        A = check_matrix(A, name)
        if A.shape[1] != n_inputs:
            raise ValueError(f"{name} has {A.shape[1]} features, the model was fitted on {n_inputs}")
        dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
        weights, mean = self._projection(which)
        A = A.to(dtype)
        if mean is not None:
            A = A - torch.as_tensor(mean, device=A.device).to(dtype)
        Z = normalize_rows(A @ torch.as_tensor(weights, device=A.device).to(dtype))
        return Z if was_tensor else Z.cpu().numpy()

    def encode_x(self, X):
        """Unit-norm embeddings of the first view.

        Parameters
        ----------
        X : array_like or torch.Tensor, shape (n, d_x)

        Returns
        -------
        ndarray or torch.Tensor, shape (n, rank)
            Same kind (and device) as ``X``; float64 for float64 input, else float32.
        """
        return self._encode(X, "x")

    def encode_y(self, Y):
        """Unit-norm embeddings of the second view.

        Parameters
        ----------
        Y : array_like or torch.Tensor, shape (n, d_y)

        Returns
        -------
        ndarray or torch.Tensor, shape (n, rank)
            Same kind (and device) as ``Y``; float64 for float64 input, else float32.
        """
        return self._encode(Y, "y")

    def similarity_matrix(self, X, Y):
        """Cosine similarities of the encoded views, shape (n_x, n_y)."""
        return self.encode_x(X) @ self.encode_y(Y).T


def _same(a, b) -> bool:
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return a is b
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):
        return a is b


def _short(v) -> str:
    if isinstance(v, (tuple, list)) and any(hasattr(x, "shape") for x in v):
        return "(" + ", ".join(f"<{type(x).__name__} {tuple(x.shape)}>" if hasattr(x, "shape") else repr(x)
                               for x in v) + ")"
    return repr(v)
