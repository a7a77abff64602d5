"""Paired feature rows on disk: a Zarr v3 group with arrays ``x``, ``y`` and optional ``groups``, ``labels``.

Layout: ``x`` (n, dim_x) and ``y`` (n, dim_y) in one float dtype, ``groups`` (n,) int64
(which rows are positives of each other) and ``labels`` (n,) int64 (a class per row, for
evaluation and zero-shot classification), all chunked by rows only (one chunk =
``chunk_rows`` full rows, zstd with a frame checksum).  The chunks are the shards that
streaming passes and workers read.  The group attributes hold the schema (format,
schema_version, dims, dtype, chunk_rows, has_groups, has_labels), ``label_names``,
provenance, the append log, the ingest history, the registry of auxiliary arrays and
``n_rows``, the committed row count.  Stores written before labels and auxiliary arrays
existed lack those attributes and read as having neither.

Auxiliary arrays.  Small per-store side arrays (e.g. ``label_embeddings_y``, one y-side
vector per class) live under ``aux/`` as ``aux/<name>-<random hex>``; the ``aux``
attribute maps each name to its current path.  :meth:`PairStore.put_array` writes a new
array under a fresh path and then makes it visible by rewriting that attribute, so a
reader sees the old version or the new one, never a partial write; the replaced version
(and any orphan left by an interrupted put) is deleted afterwards.

Commit protocol.  ``append`` validates everything first, writes the new rows past
``n_rows`` (growing the arrays as needed), and only then rewrites the group attributes
with the new ``n_rows``.  Every Zarr object is written with write-to-temporary-then-rename
by ``zarr.storage.LocalStore``, so a chunk holding committed rows is replaced whole or not
at all, and the attribute update is the single commit point.  Readers only ever see rows
below ``n_rows``; an interrupted append leaves extra physical rows that the next append
overwrites.  There is no lock: one writer at a time.

Missing chunks.  Zarr returns the fill value for a chunk file that does not exist, so a
deleted chunk would read back silently.  The arrays are written with
``write_empty_chunks=True`` (so every chunk below ``n_rows`` exists on disk, even an
all-zero one), and each read first asks the store that the chunk keys it needs exist.
The float arrays also use NaN as fill value and reads check finiteness (append never
stores non-finite values), which catches a chunk lost between that check and the read.
Corrupt chunks fail zstd decoding (the frame checksum catches flipped bytes); the error
is re-raised naming the array, the chunk key and its row range.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.core.sync import sync

__all__ = ["PairStore", "default_chunk_rows", "cast_to_storage", "storage_itemsize"]

FORMAT = "unicon_dist.pairstore"
SCHEMA_VERSION = 1
STORE_DTYPES = _DTYPES = ("float32", "float16", "float64", "bfloat16")
# bfloat16 has no numpy dtype: its arrays hold the 16-bit patterns as uint16 (bits 16-31 of
# the float32 of the same value), and reads decode them to float32, which is exact
_BF16_NAN_BITS = 0x7FC0
_MIN_CHUNK_BYTES = 2**20
_WRITE_CONFIG = {"write_empty_chunks": True}
# what decoding a damaged chunk raises: numcodecs zstd -> RuntimeError, bad sizes -> ValueError
_DECODE_ERRORS = (RuntimeError, ValueError, OSError)
_ROW_ARRAYS = ("x", "y", "groups", "labels")
_AUX_NAME = re.compile(r"[a-z0-9_]+")
_AUX_GROUP = "aux"
_AUX_CHUNK_BYTES = 4 * 2**20


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


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    """uint16 patterns of float32 values that are already bfloat16 (see cast_to_storage)."""
    return (np.ascontiguousarray(values, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _bf16_values(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def default_chunk_rows(dim_x: int, dim_y: int, dtype="float32") -> int:
    """Rows per chunk so that a chunk of the wider array holds at least 1 MiB.

    Rounded up to a multiple of 64, and at least 64.
    """
    itemsize = storage_itemsize(dtype)
    rows = math.ceil(_MIN_CHUNK_BYTES / (max(dim_x, dim_y) * itemsize))
    return max(64, -(-rows // 64) * 64)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _rows_text(rows: np.ndarray, offset: int) -> str:
    shown = rows[:5]
    more = f" and {rows.size - 5} more" if rows.size > 5 else ""
    glob = ", ".join(str(int(r) + offset) for r in shown)
    local = ", ".join(str(int(r)) for r in shown)
    return f"rows {glob}{more} (of this append: {local})"


def _bad_rows(a: np.ndarray) -> np.ndarray:
    return np.flatnonzero(~np.isfinite(a).all(axis=1))


def _check_label_names(names) -> list[str]:
    if isinstance(names, (str, bytes)) or not hasattr(names, "__iter__"):
        raise TypeError(f"label_names must be a list of str, got {type(names).__name__}")
    names = list(names)
    bad = [i for i, v in enumerate(names) if not isinstance(v, str)]
    if bad:
        raise TypeError(f"label_names must be a list of str; entry {bad[0]} is {names[bad[0]]!r}")
    if not names:
        raise ValueError("label_names must name at least one class")
    return names


def _check_int_rows(name: str, a, n: int) -> np.ndarray:
    """One integer per row as int64, or a TypeError/ValueError naming ``name``."""
    a = np.asarray(a)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integer labels, got dtype {a.dtype}")
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with one label per row ({n}), got shape {a.shape}")
    if a.dtype.kind == "u" and n and a.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} labels do not fit in int64")
    return a.astype(np.int64)


async def _exist_all(store, keys):
    return await asyncio.gather(*(store.exists(k) for k in keys))


class PairStore:
    """Append-only Zarr v3 store of paired rows (x_i, y_i[, group_i]).

    Build with :meth:`create` or :meth:`open`, not the constructor.

    Examples
    --------
    >>> store = PairStore.create("pairs.zarr", 512, 768)           # doctest: +SKIP
    >>> store.append(x, y, source="batch-0")                        # doctest: +SKIP
    (0, 1000)
    >>> x, y, groups = PairStore.open("pairs.zarr").read(slice(0, 10))  # doctest: +SKIP
    """

    def __init__(self, path, group, mode: str):
        self.path = Path(path)
        self.mode = mode
        self._group = group
        self._attrs = group.attrs.asdict()
        self._arrays = {}
        for name, tail in (("x", (self.dim_x,)), ("y", (self.dim_y,)), ("groups", ()), ("labels", ())):
            if (name == "groups" and not self.has_groups) or (name == "labels" and not self.has_labels):
                continue
            if name not in group:
                raise ValueError(f"pair store {self.path}: array {name!r} is missing")
            arr = self._arrays[name] = group[name].with_config(_WRITE_CONFIG)
            if tuple(arr.shape[1:]) != tail or arr.shape[0] < len(self):
                raise ValueError(f"pair store {self.path}: array {name!r} has shape {arr.shape}, "
                                 f"expected ({len(self)} or more{''.join(f', {t}' for t in tail)})")

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, path, dim_x: int, dim_y: int, *, dtype="float32", groups: bool = False,
               chunk_rows: int | None = None, provenance: dict | None = None,
               overwrite: bool = False, labels: bool = False,
               label_names: list[str] | None = None) -> "PairStore":
        """Create an empty store at the local directory ``path``.

        Parameters
        ----------
        path : str or Path
            Directory of the Zarr v3 group.
        dim_x, dim_y : int
            Feature dimensions of ``x`` and ``y``.
        dtype : {"float32", "float16", "float64", "bfloat16"}
            Storage dtype of both arrays.  Rows are rounded to it when appended and
            read back as that dtype (bfloat16: float32 arrays of the bfloat16 values,
            stored as their 16-bit patterns).
        groups : bool
            Whether rows carry an int64 group label (many-to-many positives).
        chunk_rows : int, optional
            Rows per chunk; default :func:`default_chunk_rows` (chunks of at least 1 MiB).
        provenance : dict, optional
            JSON-serialisable description of where the data came from.
        overwrite : bool
            Replace an existing pair store at ``path``.  A non-empty directory that is not
            a pair store is never replaced.
        labels : bool
            Whether rows carry an int64 class label (array ``labels``, read with
            :meth:`read_labels`), for evaluation and zero-shot classification.
        label_names : list of str, optional
            Class names; label ``k`` is ``label_names[k]``, and appended labels must then
            lie in ``[0, len(label_names))``.  Needs ``labels=True``; may also be set
            later with :meth:`set_label_names`.
        """
        path = Path(path)
        dtype = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
        if dtype not in _DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; expected one of {list(_DTYPES)}")
        if chunk_rows is None and _positive_int(dim_x) and _positive_int(dim_y):
            chunk_rows = default_chunk_rows(dim_x, dim_y, dtype)
        for name, v in (("dim_x", dim_x), ("dim_y", dim_y), ("chunk_rows", chunk_rows)):
            if not _positive_int(v):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if label_names is not None:
            label_names = _check_label_names(label_names)
            if not labels:
                raise ValueError("label_names needs a store with labels=True")
        provenance = dict(provenance or {})
        try:
            json.dumps(provenance)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"provenance must be JSON-serialisable: {exc}") from None
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
            if not (path.is_dir() and (not any(path.iterdir()) or _is_pair_store(path))):
                raise FileExistsError(f"refusing to overwrite {path}: it is not a pair store")
        attrs = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "dim_x": int(dim_x),
                 "dim_y": int(dim_y), "dtype": dtype, "has_groups": bool(groups),
                 "chunk_rows": int(chunk_rows), "n_rows": 0, "provenance": provenance,
                 "created": _now(), "appends": [], "has_labels": bool(labels),
                 "label_names": label_names, "aux": {}, "history": []}
        group = zarr.open_group(path, mode="w", zarr_format=3, attributes=attrs)
        zstd = zarr.codecs.ZstdCodec(level=3, checksum=True)
        for name, d in (("x", dim_x), ("y", dim_y)):
            bf16 = dtype == "bfloat16"
            group.create_array(name, shape=(0, int(d)), chunks=(int(chunk_rows), int(d)),
                               dtype="uint16" if bf16 else dtype, fill_value=_BF16_NAN_BITS if bf16 else np.nan,
                               compressors=zstd, config=_WRITE_CONFIG)
        for name, wanted in (("groups", groups), ("labels", labels)):
            if wanted:
                group.create_array(name, shape=(0,), chunks=(int(chunk_rows),), dtype="int64",
                                   fill_value=0, compressors=zstd, config=_WRITE_CONFIG)
        return cls(path, group, "r+")

    @classmethod
    def open(cls, path, mode: str = "r") -> "PairStore":
        """Open an existing store, read-only (``"r"``) or for appending (``"r+"``)."""
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
        path = Path(path)
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
        return cls(path, group, mode)

    def refresh(self) -> "PairStore":
        """Re-read the committed state from disk (to see another process's appends)."""
        fresh = type(self).open(self.path, self.mode)
        self.__dict__.update(fresh.__dict__)
        return self

    # ------------------------------------------------------------------ properties
    def __len__(self) -> int:
        return int(self._attrs["n_rows"])

    def __repr__(self) -> str:
        return (f"PairStore({str(self.path)!r}, n_rows={len(self)}, dim_x={self.dim_x}, "
                f"dim_y={self.dim_y}, dtype={self.dtype!r}, has_groups={self.has_groups}, "
                f"has_labels={self.has_labels})")

    dim_x = property(lambda self: int(self._attrs["dim_x"]), doc="Columns of ``x``.")
    dim_y = property(lambda self: int(self._attrs["dim_y"]), doc="Columns of ``y``.")
    dtype = property(lambda self: str(self._attrs["dtype"]), doc="Storage dtype name.")
    itemsize = property(lambda self: storage_itemsize(self.dtype), doc="Bytes per stored value.")
    has_groups = property(lambda self: bool(self._attrs["has_groups"]), doc="Whether rows carry group labels.")
    chunk_rows = property(lambda self: int(self._attrs["chunk_rows"]), doc="Rows per chunk (shard).")
    provenance = property(lambda self: dict(self._attrs["provenance"]), doc="Provenance given at creation.")
    attrs = property(lambda self: json.loads(json.dumps(self._attrs)), doc="Copy of all group attributes.")
    has_labels = property(lambda self: bool(self._attrs.get("has_labels", False)),
                          doc="Whether rows carry class labels (array ``labels``).")

    @property
    def label_names(self) -> list[str] | None:
        """Class names (label ``k`` is ``label_names[k]``), or None when not set."""
        names = self._attrs.get("label_names")
        return None if names is None else list(names)

    @property
    def history(self) -> list[dict]:
        """Records added with :meth:`add_history` (e.g. one per ingest run), oldest first."""
        return json.loads(json.dumps(self._attrs.get("history", [])))

    def _require_writable(self) -> None:
        if self.mode == "r":
            raise PermissionError(f"pair store {self.path} is open read-only; open it with mode='r+'")

    def _update_attrs(self, new: dict) -> None:
        self._group.update_attributes(new)
        self._attrs = self._group.attrs.asdict()

    def set_label_names(self, names: list[str] | None) -> None:
        """Set (or with None, remove) the class names, in one atomic attribute update.

        The committed labels are checked first (chunk by chunk): every one must lie in
        ``[0, len(names))``.

        Raises
        ------
        ValueError
            If the store has no labels, or a committed label is out of range (the error
            names the rows).
        """
        self._require_writable()
        if names is not None:
            names = _check_label_names(names)
            if not self.has_labels:
                raise ValueError(f"pair store {self.path} was created without labels; label_names needs labels")
            k = len(names)
            shown, n_bad = [], 0
            for a in range(0, len(self), self.chunk_rows):  # chunk by chunk: O(chunk) memory
                b = min(len(self), a + self.chunk_rows)
                lab = self._read_array("labels", slice(a, b), np.arange(a, b), [a // self.chunk_rows])
                bad = np.flatnonzero((lab < 0) | (lab >= k))
                shown += (bad[:5 - len(shown)] + a).tolist()
                n_bad += bad.size
            if n_bad:
                raise ValueError(f"pair store {self.path}: committed labels outside [0, {k}) in rows "
                                 f"{', '.join(map(str, shown))}{f' and {n_bad - 5} more' if n_bad > 5 else ''};"
                                 f" cannot set {k} label_names")
        self._update_attrs({"label_names": names})

    def add_history(self, record: dict) -> None:
        """Append a JSON-serialisable record to :attr:`history` (one attribute update).

        Used by :func:`unicon_dist.ingest.ingest` to log each run: sources, sizes, time,
        command and rows written.  Does not change the committed rows.
        """
        self._require_writable()
        try:
            record = json.loads(json.dumps(dict(record)))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"history record must be a JSON-serialisable dict: {exc}") from None
        self._update_attrs({"history": list(self._attrs.get("history", [])) + [record]})

    # ------------------------------------------------------------------ writing
    def append(self, x, y, groups=None, *, labels=None, source: str | None = None) -> tuple[int, int]:
        """Validate and append rows; returns the new committed row range ``(start, stop)``.

        Nothing is written unless all of ``x``, ``y``, ``groups`` and ``labels`` pass:
        2-D numeric arrays with equal row counts and the store's dims, finite after
        casting to the store dtype, one integer group per row iff the store has groups,
        and one integer label per row iff the store has labels (within
        ``[0, len(label_names))`` when :attr:`label_names` is set).  All arrays are
        committed together by one attribute update.
        """
        self._require_writable()
        start = len(self)
        data = self._validate(x, y, groups, start)
        data.update(self._validate_labels(labels, data["x"].shape[0], start))
        n = data["x"].shape[0]
        if n == 0:
            return start, start
        stop = start + n
        for name, arr in data.items():
            self._write(name, start, arr)
        log = list(self._attrs["appends"]) + [{"rows": [start, stop], "time": _now()}]
        if source is not None:
            log[-1]["source"] = str(source)
        self._update_attrs({"n_rows": stop, "appends": log})  # the commit point
        return start, stop

    def _write(self, name: str, start: int, data: np.ndarray) -> None:
        arr = self._arrays[name]
        if self.dtype == "bfloat16" and name in ("x", "y"):
            data = _bf16_bits(data)
        stop = start + data.shape[0]
        if arr.shape[0] < stop:
            arr.resize((stop,) + tuple(arr.shape[1:]))
        arr[start:stop] = data

    def _validate(self, x, y, groups, offset: int) -> dict:
        out = {}
        for name, a, dim in (("x", x, self.dim_x), ("y", y, self.dim_y)):
            try:
                a = np.asarray(a)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"{name} is not convertible to a numeric array: {exc}") from None
            if a.dtype.kind not in "fiu":
                raise TypeError(f"{name} must be a numeric array castable to {self.dtype}, got dtype {a.dtype}")
            if a.ndim != 2:
                raise ValueError(f"{name} must be 2-D (n, {dim}), got shape {a.shape}")
            if a.shape[1] != dim:
                raise ValueError(f"{name} has {a.shape[1]} columns but the store's dim_{name} is {dim}")
            if a.dtype.kind == "f" and (bad := _bad_rows(a)).size:
                raise ValueError(f"{name} has non-finite values in {_rows_text(bad, offset)}")
            with np.errstate(over="ignore", invalid="ignore"):
                cast = cast_to_storage(a, self.dtype)
            if (bad := _bad_rows(cast)).size:
                raise ValueError(f"{name} has values out of range for {self.dtype} in {_rows_text(bad, offset)}")
            out[name] = cast
        if out["x"].shape[0] != out["y"].shape[0]:
            raise ValueError(f"mismatched number of rows: x has {out['x'].shape[0]}, y has {out['y'].shape[0]}")
        n = out["x"].shape[0]
        if self.has_groups != (groups is not None):
            raise ValueError(f"pair store {self.path} has groups: pass groups= with one label per row"
                             if self.has_groups else
                             f"pair store {self.path} was created without groups; do not pass groups=")
        if groups is not None:
            out["groups"] = _check_int_rows("groups", groups, n)
        return out

    def _validate_labels(self, labels, n: int, offset: int) -> dict:
        if self.has_labels != (labels is not None):
            raise ValueError(f"pair store {self.path} has labels: pass labels= with one label per row"
                             if self.has_labels else
                             f"pair store {self.path} was created without labels; do not pass labels=")
        if labels is None:
            return {}
        lab = _check_int_rows("labels", labels, n)
        names = self.label_names
        if names is not None and (bad := np.flatnonzero((lab < 0) | (lab >= len(names)))).size:
            raise ValueError(f"labels must lie in [0, {len(names)}) (the store has {len(names)} "
                             f"label_names); out of range in {_rows_text(bad, offset)}")
        return {"labels": lab}

    # ------------------------------------------------------------------ reading
    def read(self, rows=slice(None)):
        """Committed rows as numpy arrays ``(x, y, groups or None)``.

        ``rows`` is a slice, an integer, an integer array (any order, repeats and negative
        indices allowed) or a boolean mask of length ``len(self)``.
        """
        sel, scalar = self._selection(rows)
        out = self._read(sel)
        return tuple(None if a is None else (a[0] if scalar else a) for a in out)

    def read_labels(self, rows=slice(None)) -> np.ndarray:
        """Committed class labels (int64) of ``rows``, selected as in :meth:`read`.

        Raises
        ------
        ValueError
            If the store has no labels, or a labels chunk is missing or corrupt (the
            error names the chunk and its rows).
        """
        if not self.has_labels:
            raise ValueError(f"pair store {self.path} has no labels (created with labels=False)")
        sel, scalar = self._selection(rows)
        out = self._read(sel, names=("labels",))[0]
        return out[0] if scalar else out

    def read_groups(self, rows=slice(None)) -> np.ndarray:
        """Committed group labels (int64) of ``rows``, selected as in :meth:`read`.

        Reads only the ``groups`` array (an out-of-core fit needs all n labels, not the rows).
        """
        if not self.has_groups:
            raise ValueError(f"pair store {self.path} has no groups (created with groups=False)")
        sel, scalar = self._selection(rows)
        out = self._read(sel, names=("groups",))[0]
        return out[0] if scalar else out

    def _selection(self, rows):
        """Normalise ``rows`` to a contiguous slice or an array of non-negative indices."""
        n = len(self)
        scalar = False
        if isinstance(rows, slice):
            start, stop, step = rows.indices(n)
            if step == 1:
                return slice(start, max(start, stop)), False
            idx = np.arange(start, stop, step)
        else:
            idx = np.asarray(rows)
            scalar = idx.ndim == 0
            idx = idx.astype(np.int64) if idx.size == 0 else idx  # read([]) is fine
            if idx.dtype == bool:
                if idx.shape != (n,):
                    raise IndexError(f"boolean row mask has shape {idx.shape}, store has {n} rows")
                idx = np.flatnonzero(idx)
            if idx.dtype.kind not in "iu" or idx.ndim > 1:
                raise IndexError(f"rows must be a slice, an integer or a 1-D integer array, got {rows!r}")
            idx = np.atleast_1d(idx).astype(np.int64)
            if idx.size and (idx.min() < -n or idx.max() >= n):
                bad = idx[(idx < -n) | (idx >= n)]
                raise IndexError(f"row index {int(bad[0])} out of range for pair store {self.path} with {n} rows")
            idx = np.where(idx < 0, idx + n, idx)
        return idx, scalar

    def iter_blocks(self, block_rows: int | None = None, start: int = 0, stop: int | None = None):
        """Yield ``(row_start, x, y, groups)`` over committed rows ``[start, stop)``.

        Block edges sit at multiples of ``block_rows`` (default ``chunk_rows``, so each
        block is one chunk); the first and last blocks may be shorter.
        """
        n = len(self)
        stop = n if stop is None else stop
        block_rows = self.chunk_rows if block_rows is None else block_rows
        if not 0 <= start <= stop <= n:
            raise IndexError(f"block range [{start}, {stop}) out of range for pair store with {n} rows")
        if block_rows < 1:
            raise ValueError(f"block_rows must be positive, got {block_rows}")
        a = start
        while a < stop:
            b = min(stop, (a // block_rows + 1) * block_rows)
            yield (a, *self._read(slice(a, b)))
            a = b

    def _read(self, sel, names=("x", "y", "groups")):
        if isinstance(sel, slice):
            rows = np.arange(sel.start, sel.stop)
            chunk_ids = range(sel.start // self.chunk_rows, -(-sel.stop // self.chunk_rows)) if rows.size else ()
        else:
            rows = sel
            chunk_ids = np.unique(sel // self.chunk_rows).tolist()
        return tuple(self._read_array(name, sel, rows, chunk_ids) if name in self._arrays else None
                     for name in names)

    def _read_array(self, name: str, sel, rows: np.ndarray, chunk_ids) -> np.ndarray:
        arr = self._arrays[name]
        chunk_ids = list(chunk_ids)
        keys = [self._key(arr, c) for c in chunk_ids]
        found = sync(_exist_all(arr.store_path.store, keys))
        for c, ok in zip(chunk_ids, found):
            if not ok:
                raise self._chunk_error(name, c, "chunk file not found")
        try:
            out = arr[sel] if isinstance(sel, slice) else arr.oindex[sel]
        except _DECODE_ERRORS as exc:
            for c in chunk_ids:  # find which chunk fails to decode
                try:
                    arr[c * self.chunk_rows:min(len(self), (c + 1) * self.chunk_rows)]
                except _DECODE_ERRORS as inner:
                    raise self._chunk_error(name, c, inner) from inner
            raise ValueError(f"pair store {self.path}: reading array {name!r} failed: {exc}") from exc
        if self.dtype == "bfloat16" and name in ("x", "y"):
            out = _bf16_values(out)
        if out.dtype.kind == "f" and not np.isfinite(out).all():
            bad = rows[_bad_rows(out.reshape(out.shape[0], -1))]
            raise self._chunk_error(name, int(bad[0]) // self.chunk_rows,
                                    f"non-finite values in committed rows {bad[:5].tolist()}")
        return out

    @staticmethod
    def _key(arr, chunk: int) -> str:
        coords = (chunk,) + (0,) * (arr.ndim - 1)
        return f"{arr.store_path.path}/{arr.metadata.encode_chunk_key(coords)}"

    def _chunk_error(self, name: str, chunk: int, cause) -> ValueError:
        a = chunk * self.chunk_rows
        b = min(len(self), a + self.chunk_rows) - 1
        key = self._key(self._arrays[name], chunk)
        return ValueError(f"pair store {self.path}: array {name!r} chunk {chunk} (key {key!r}, "
                          f"rows {a}\u2013{b}) is missing or corrupt: {cause}")

    # ------------------------------------------------------------------ auxiliary arrays
    def array_names(self) -> list[str]:
        """Names of the auxiliary arrays, sorted."""
        return sorted(self._attrs.get("aux", {}))

    def array_attrs(self, name: str) -> dict:
        """The ``attrs`` given to :meth:`put_array` for auxiliary array ``name``."""
        return dict(self._aux_entry(name).get("attrs", {}))

    def put_array(self, name: str, array, *, attrs: dict | None = None) -> None:
        """Store (or replace) a small auxiliary array, atomically.

        Parameters
        ----------
        name : str
            Lower-case letters, digits and underscores (``[a-z0-9_]+``), not one of the
            row arrays ``x``, ``y``, ``groups``, ``labels``; e.g. ``"label_embeddings_y"``
            (n_classes, dim_y), the y-side representation of each class for zero-shot.
        array : array-like of shape (n, ...)
            Numeric (bool, integer or float) with at least one dimension; float values
            must be finite.  Kept in its own dtype.
        attrs : dict, optional
            JSON-serialisable metadata, returned by :meth:`array_attrs`.

        Notes
        -----
        The data are written under a fresh path first; one update of the group's ``aux``
        attribute then makes them visible, so readers see the previous version or this
        one, never a mix.  The previous version is deleted after that commit.
        """
        self._require_writable()
        if not isinstance(name, str) or not _AUX_NAME.fullmatch(name):
            raise ValueError(f"auxiliary array name must match [a-z0-9_]+, got {name!r}")
        if name in _ROW_ARRAYS or name == _AUX_GROUP:
            raise ValueError(f"auxiliary array name {name!r} clashes with the store's own arrays "
                             f"{list(_ROW_ARRAYS)}")
        a = np.asarray(array)
        if a.dtype.kind not in "biuf":
            raise TypeError(f"auxiliary array {name!r} must be numeric (bool, int or float), got dtype {a.dtype}")
        if a.ndim < 1:
            raise ValueError(f"auxiliary array {name!r} must have at least one dimension, got a scalar")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            bad = np.flatnonzero(~np.isfinite(a.reshape(a.shape[0], -1)).all(axis=1))
            raise ValueError(f"auxiliary array {name!r} has non-finite values in rows {bad[:5].tolist()}"
                             f"{f' and {bad.size - 5} more' if bad.size > 5 else ''}")
        try:
            attrs = json.loads(json.dumps(dict(attrs or {})))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"attrs of auxiliary array {name!r} must be JSON-serialisable: {exc}") from None
        registry = dict(self._attrs.get("aux", {}))
        aux = self._group.require_group(_AUX_GROUP)
        live = {e["path"].split("/", 1)[1] for e in registry.values()}
        for orphan in set(aux.array_keys()) - live:  # left by an interrupted put_array
            del aux[orphan]
        node = f"{name}-{uuid.uuid4().hex[:12]}"
        row_bytes = max(1, a.dtype.itemsize * math.prod(a.shape[1:]))
        chunks = (max(1, min(a.shape[0], _AUX_CHUNK_BYTES // row_bytes)),) + tuple(max(1, d) for d in a.shape[1:])
        arr = aux.create_array(node, shape=a.shape, chunks=chunks, dtype=a.dtype,
                               fill_value=np.nan if a.dtype.kind == "f" else 0,
                               compressors=zarr.codecs.ZstdCodec(level=3, checksum=True), config=_WRITE_CONFIG)
        if a.size:
            arr[...] = a
        old = registry.get(name)
        registry[name] = {"path": f"{_AUX_GROUP}/{node}", "shape": list(a.shape), "dtype": a.dtype.name,
                          "attrs": attrs, "time": _now()}
        self._update_attrs({"aux": registry})  # the commit point
        if old is not None:
            self._delete_node(old["path"])

    def get_array(self, name: str) -> np.ndarray:
        """Read auxiliary array ``name`` (stored by :meth:`put_array`).

        Raises
        ------
        KeyError
            If there is no such array (the message lists the ones there are).
        ValueError
            If its data are missing or corrupt on disk.
        """
        entry = self._aux_entry(name)
        where = f"pair store {self.path}: auxiliary array {name!r} ({entry['path']})"
        try:
            arr = self._group[entry["path"]]
        except KeyError:
            raise ValueError(f"{where} is missing") from None
        if list(arr.shape) != list(entry["shape"]):
            raise ValueError(f"{where} has shape {arr.shape}, the registry says {tuple(entry['shape'])}")
        if arr.size:
            n_chunks = -(-arr.shape[0] // arr.chunks[0])
            keys = [self._key(arr, c) for c in range(n_chunks)]
            found = sync(_exist_all(arr.store_path.store, keys))
            if not all(found):
                raise ValueError(f"{where}: chunk file {keys[found.index(False)]!r} not found")
        try:
            out = arr[...]
        except _DECODE_ERRORS as exc:
            raise ValueError(f"{where} is corrupt: {exc}") from exc
        if out.dtype.kind == "f" and not np.isfinite(out).all():
            raise ValueError(f"{where} holds non-finite values (a chunk is damaged)")
        return out

    def delete_array(self, name: str) -> None:
        """Remove auxiliary array ``name`` (unregistered first, then its data deleted)."""
        self._require_writable()
        entry = self._aux_entry(name)
        registry = dict(self._attrs.get("aux", {}))
        del registry[name]
        self._update_attrs({"aux": registry})
        self._delete_node(entry["path"])

    def _aux_entry(self, name: str) -> dict:
        registry = self._attrs.get("aux", {})
        if name not in registry:
            raise KeyError(f"pair store {self.path} has no auxiliary array {name!r}; "
                           f"it has {sorted(registry) or 'none'}")
        return registry[name]

    def _delete_node(self, path: str) -> None:
        parent, _, node = path.rpartition("/")
        grp = self._group[parent]
        if node in grp:
            del grp[node]


def _positive_int(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, np.integer)) and v >= 1


def _is_pair_store(path: Path) -> bool:
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("attributes", {}).get("format") == FORMAT
