"""What a model was fitted on, and the checks before it is re-solved on a grown store.

A fit from a pair store records the store (resolved path, creation time, dims, dtype), the
number of rows it covered and a digest of a sample of those rows.  A re-solve
(:meth:`unicon_dist.UniCon.refit`) accepts the store only if it is the same store grown by
appends: same schema and creation time, at least as many rows, and the same sampled rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io.checkpoints import array_digest

__all__ = ["store_provenance", "check_appended", "SAMPLE_ROWS"]

# rows hashed to tell whether the rows a model covered are still the same
SAMPLE_ROWS = 256


def _sample(n: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, min(n, SAMPLE_ROWS)).round().astype(np.int64))


def _digest(store, n: int) -> str:
    x, y, _ = store.read(_sample(n))
    return array_digest(np.concatenate([x, y], axis=1), max_rows=SAMPLE_ROWS)


def store_provenance(store, n: int) -> dict:
    """The data part of a model fitted on the first ``n`` rows of ``store``."""
    return {
        "source": "store",
        "store": str(Path(store.path).resolve()),
        "created": store.attrs.get("created"),
        "n_rows": int(n),
        "dim_x": int(store.dim_x),
        "dim_y": int(store.dim_y),
        "dtype": str(store.dtype),
        "rows_digest": _digest(store, n),
    }


def check_appended(data: dict | None, store) -> None:
    """Raise ValueError unless ``store`` is the store ``data`` describes, grown by appends."""
    if not data or data.get("source") != "store":
        raise ValueError("refit needs a model fitted from a pair store (this one was fitted on in-memory arrays "
                         "or saved by an older unicon_dist)")
    for key, now in (("dim_x", store.dim_x), ("dim_y", store.dim_y), ("dtype", store.dtype)):
        if data[key] != now:
            raise ValueError(f"pair store {store.path}: {key} is {now!r} but the model was fitted on {data[key]!r}")
    if data.get("created") != store.attrs.get("created"):
        raise ValueError(f"pair store {store.path} was created at {store.attrs.get('created')}, not at "
                         f"{data.get('created')} like the store the model was fitted on (recreated or replaced)")
    if len(store) < data["n_rows"]:
        raise ValueError(f"pair store {store.path} holds {len(store)} rows, fewer than the {data['n_rows']} the "
                         "model was fitted on")
    if _digest(store, data["n_rows"]) != data["rows_digest"]:
        raise ValueError(f"pair store {store.path}: the first {data['n_rows']} rows, which the model was fitted "
                         "on, have changed (sampled rows differ)")
