"""What a pair store holds and how it lies on disk: schema, dtypes and their casts, chunking.

A pair store is a Zarr v3 group with row arrays ``x`` (n, dim_x) and ``y`` (n, dim_y) in
one float dtype (:data:`STORE_DTYPES`), and optional ``groups`` (n,) and ``labels`` (n,)
int64, all chunked by rows only (one chunk = ``chunk_rows`` full rows, zstd with a frame
checksum).  The group attributes hold the schema (``format`` = :data:`FORMAT`,
``schema_version``, dims, dtype, chunk_rows, has_groups, has_labels), ``label_names``,
provenance, the append log, the ingest history, the registry of auxiliary arrays and
``n_rows``, the committed row count.  Stores written before labels and auxiliary arrays
existed lack those attributes and read as having neither.

bfloat16 has no numpy dtype: its arrays hold the 16-bit patterns as uint16 (bits 16-31
of the float32 of the same value), and reads decode them to float32, which is exact.

The checks here are those of values a store accepts (row counts, integer labels, class
names); they raise ``TypeError``/``ValueError`` with the messages the store's methods give.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import zarr

__all__ = [
    "FORMAT", "SCHEMA_VERSION", "STORE_DTYPES", "ROW_ARRAYS", "AUX_GROUP", "IDENTITY_ATTRS", "BF16_NAN_BITS",
    "WRITE_CONFIG", "DECODE_ERRORS", "storage_itemsize", "cast_to_storage", "bf16_bits", "bf16_values",
    "default_chunk_rows", "open_group", "is_pair_store", "timestamp", "positive_int", "bad_rows", "rows_text",
    "check_label_names", "check_int_rows",
]

FORMAT = "unicon_dist.pairstore"
SCHEMA_VERSION = 1
STORE_DTYPES = ("float32", "float16", "float64", "bfloat16")
ROW_ARRAYS = ("x", "y", "groups", "labels")
AUX_GROUP = "aux"
# attributes that identify a store; a change means it was re-created under the handle
IDENTITY_ATTRS = ("created", "dim_x", "dim_y", "dtype", "chunk_rows", "has_groups", "has_labels")
# the fill value of bfloat16 arrays: a NaN, so that a lost chunk reads as non-finite
BF16_NAN_BITS = 0x7FC0
# every chunk below n_rows exists on disk, even an all-zero one, so a missing file means damage
WRITE_CONFIG = {"write_empty_chunks": True}
# what decoding a damaged chunk raises: numcodecs zstd -> RuntimeError, bad sizes -> ValueError
DECODE_ERRORS = (RuntimeError, ValueError, OSError)
_MIN_CHUNK_BYTES = 2**20


# --------------------------------------------------------------------------- dtypes
def storage_itemsize(dtype: str) -> int:
    """Bytes per stored value of a store dtype name (bfloat16 included)."""
    return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize


def cast_to_storage(a: np.ndarray, dtype: str) -> np.ndarray:
    """``a`` rounded to the store dtype, as the values a read returns (bfloat16: float32
    arrays of bfloat16 values, rounded to nearest even by torch's cast)."""
    if dtype != "bfloat16":
        return a.astype(dtype, copy=False)
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    return t.to(torch.bfloat16).to(torch.float32).numpy()


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """uint16 patterns of float32 values that are already bfloat16 (see cast_to_storage)."""
    return (np.ascontiguousarray(values, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)


def bf16_values(bits: np.ndarray) -> np.ndarray:
    """float32 values of stored bfloat16 patterns (the inverse of :func:`bf16_bits`)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


# --------------------------------------------------------------------------- layout
def default_chunk_rows(dim_x: int, dim_y: int, dtype="float32") -> int:
    """Rows per chunk so that a chunk of the wider array holds at least 1 MiB.

    Rounded up to a multiple of 64, and at least 64.
    """
    itemsize = storage_itemsize(dtype)
    rows = math.ceil(_MIN_CHUNK_BYTES / (max(dim_x, dim_y) * itemsize))
    return max(64, -(-rows // 64) * 64)


def open_group(path: Path, mode: str):
    """``(group, attrs)`` of the pair store at ``path``, or an error saying why it is not one."""
    if not path.exists():
        raise FileNotFoundError(f"no pair store at {path}")
    try:
        group = zarr.open_group(path, mode=mode, zarr_format=3)
    except (zarr.errors.GroupNotFoundError, FileNotFoundError, ValueError) as exc:
        raise ValueError(f"{path} is not a pair store (no Zarr v3 group: {exc})") from None
    attrs = group.attrs.asdict()
    if attrs.get("format") != FORMAT:
        raise ValueError(f"{path} is not a pair store (format attribute {attrs.get('format')!r})")
    if attrs.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"pair store {path} has unknown schema_version {attrs.get('schema_version')!r};"
                         f" this unicon_dist reads version {SCHEMA_VERSION}")
    return group, attrs


def is_pair_store(path: Path) -> bool:
    """Whether ``path`` holds a Zarr group whose attributes name the pair-store format.

    Reads only ``zarr.json``; used before replacing a directory, so that a directory that
    is not a pair store is never overwritten.
    """
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("attributes", {}).get("format") == FORMAT


def timestamp() -> str:
    """Now, as the ISO time (UTC) the attributes record."""
    return datetime.now(timezone.utc).isoformat()


# --------------------------------------------------------------------------- value checks
def positive_int(v) -> bool:
    """Whether ``v`` is an integer >= 1 (bool excluded)."""
    return not isinstance(v, bool) and isinstance(v, (int, np.integer)) and v >= 1


def bad_rows(a: np.ndarray) -> np.ndarray:
    """Indices of the rows of 2-D ``a`` holding a NaN or an Inf."""
    return np.flatnonzero(~np.isfinite(a).all(axis=1))


def rows_text(rows: np.ndarray, offset: int) -> str:
    """``rows`` of an append starting at store row ``offset``, for messages (at most five shown)."""
    shown = rows[:5]
    more = f" and {rows.size - 5} more" if rows.size > 5 else ""
    glob = ", ".join(str(int(r) + offset) for r in shown)
    local = ", ".join(str(int(r)) for r in shown)
    return f"rows {glob}{more} (of this append: {local})"


def check_label_names(names) -> list[str]:
    """``names`` as a non-empty list of str, or a TypeError/ValueError."""
    if isinstance(names, (str, bytes)) or not hasattr(names, "__iter__"):
        raise TypeError(f"label_names must be a list of str, got {type(names).__name__}")
    names = list(names)
    bad = [i for i, v in enumerate(names) if not isinstance(v, str)]
    if bad:
        raise TypeError(f"label_names must be a list of str; entry {bad[0]} is {names[bad[0]]!r}")
    if not names:
        raise ValueError("label_names must name at least one class")
    return names


def check_int_rows(name: str, a, n: int) -> np.ndarray:
    """One integer per row as int64, or a TypeError/ValueError naming ``name``."""
    a = np.asarray(a)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integer labels, got dtype {a.dtype}")
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with one label per row ({n}), got shape {a.shape}")
    if a.dtype.kind == "u" and n and a.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} labels do not fit in int64")
    return a.astype(np.int64)
