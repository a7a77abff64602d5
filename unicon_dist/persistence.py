"""Atomic, pickle-free artifact files: one .npz holding arrays and a JSON header.

A model is a single file so that ``os.replace`` makes its write atomic: a reader sees
the old file or the new one, never a torn write.  The JSON travels inside the archive
as a unicode array, which ``np.load(..., allow_pickle=False)`` reads.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["atomic_save_npz", "load_npz"]

_HEADER = "__header_json__"


def atomic_save_npz(path, header: dict, arrays: dict) -> Path:
    """Write ``arrays`` and the JSON-serialisable ``header`` to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for k, v in arrays.items():
        if np.asarray(v).dtype == object:
            raise TypeError(f"array {k!r} has dtype object, which cannot be saved without pickle")
    payload = {k: np.asarray(v) for k, v in arrays.items()}
    payload[_HEADER] = np.array(json.dumps(header, sort_keys=True))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def load_npz(path) -> tuple[dict, dict]:
    """Read a file written by :func:`atomic_save_npz`: (header, arrays)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such model file: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            if _HEADER not in data.files:
                raise ValueError(f"{path} is not a unicon_dist artifact (no header)")
            header = json.loads(str(data[_HEADER]))
            arrays = {k: data[k] for k in data.files if k != _HEADER}
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    return header, arrays
