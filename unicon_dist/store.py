"""Paired feature rows on disk: a Zarr v3 group with arrays ``x``, ``y`` and optional ``groups``.

Layout: ``x`` (n, dim_x) and ``y`` (n, dim_y) in one float dtype, ``groups`` (n,) int64,
all chunked by rows only (one chunk = ``chunk_rows`` full rows, zstd with a frame checksum).
The chunks are the shards that streaming passes and workers read.  The group attributes
hold the schema (format, schema_version, dims, dtype, chunk_rows), provenance, the append
log and ``n_rows``, the committed row count.

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
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import zarr
from zarr.core.sync import sync

__all__ = ["PairStore", "default_chunk_rows"]

FORMAT = "unicon_dist.pairstore"
SCHEMA_VERSION = 1
_DTYPES = ("float32", "float16", "float64")
_MIN_CHUNK_BYTES = 2**20
_WRITE_CONFIG = {"write_empty_chunks": True}
# what decoding a damaged chunk raises: numcodecs zstd -> RuntimeError, bad sizes -> ValueError
_DECODE_ERRORS = (RuntimeError, ValueError, OSError)


def default_chunk_rows(dim_x: int, dim_y: int, dtype="float32") -> int:
    """Rows per chunk so that a chunk of the wider array holds at least 1 MiB.

    Rounded up to a multiple of 64, and at least 64.
    """
    itemsize = np.dtype(dtype).itemsize
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
        for name, tail in (("x", (self.dim_x,)), ("y", (self.dim_y,)), ("groups", ())):
            if name == "groups" and not self.has_groups:
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
               overwrite: bool = False) -> "PairStore":
        """Create an empty store at the local directory ``path``.

        Parameters
        ----------
        path : str or Path
            Directory of the Zarr v3 group.
        dim_x, dim_y : int
            Feature dimensions of ``x`` and ``y``.
        dtype : {"float32", "float16", "float64"}
            Storage dtype of both arrays.
        groups : bool
            Whether rows carry an int64 group label (many-to-many positives).
        chunk_rows : int, optional
            Rows per chunk; default :func:`default_chunk_rows` (chunks of at least 1 MiB).
        provenance : dict, optional
            JSON-serialisable description of where the data came from.
        overwrite : bool
            Replace an existing pair store at ``path``.  A non-empty directory that is not
            a pair store is never replaced.
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
                 "created": _now(), "appends": []}
        group = zarr.open_group(path, mode="w", zarr_format=3, attributes=attrs)
        zstd = zarr.codecs.ZstdCodec(level=3, checksum=True)
        for name, d in (("x", dim_x), ("y", dim_y)):
            group.create_array(name, shape=(0, int(d)), chunks=(int(chunk_rows), int(d)), dtype=dtype,
                               fill_value=np.nan, compressors=zstd, config=_WRITE_CONFIG)
        if groups:
            group.create_array("groups", shape=(0,), chunks=(int(chunk_rows),), dtype="int64",
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
                f"dim_y={self.dim_y}, dtype={self.dtype!r}, has_groups={self.has_groups})")

    dim_x = property(lambda self: int(self._attrs["dim_x"]), doc="Columns of ``x``.")
    dim_y = property(lambda self: int(self._attrs["dim_y"]), doc="Columns of ``y``.")
    dtype = property(lambda self: str(self._attrs["dtype"]), doc="Storage dtype name.")
    has_groups = property(lambda self: bool(self._attrs["has_groups"]), doc="Whether rows carry group labels.")
    chunk_rows = property(lambda self: int(self._attrs["chunk_rows"]), doc="Rows per chunk (shard).")
    provenance = property(lambda self: dict(self._attrs["provenance"]), doc="Provenance given at creation.")
    attrs = property(lambda self: json.loads(json.dumps(self._attrs)), doc="Copy of all group attributes.")

    # ------------------------------------------------------------------ writing
    def append(self, x, y, groups=None, *, source: str | None = None) -> tuple[int, int]:
        """Validate and append rows; returns the new committed row range ``(start, stop)``.

        Nothing is written unless all of ``x``, ``y`` and ``groups`` pass: 2-D numeric
        arrays with equal row counts and the store's dims, finite after casting to the
        store dtype, and one integer label per row iff the store has groups.
        """
        if self.mode == "r":
            raise PermissionError(f"pair store {self.path} is open read-only; open it with mode='r+'")
        start = len(self)
        data = self._validate(x, y, groups, start)
        n = data["x"].shape[0]
        if n == 0:
            return start, start
        stop = start + n
        for name, arr in data.items():
            self._write(name, start, arr)
        log = list(self._attrs["appends"]) + [{"rows": [start, stop], "time": _now()}]
        if source is not None:
            log[-1]["source"] = str(source)
        self._group.update_attributes({"n_rows": stop, "appends": log})  # the commit point
        self._attrs = self._group.attrs.asdict()
        return start, stop

    def _write(self, name: str, start: int, data: np.ndarray) -> None:
        arr = self._arrays[name]
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
                cast = a.astype(self.dtype)
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
            g = np.asarray(groups)
            if g.dtype.kind not in "iu":
                raise TypeError(f"groups must be integer labels, got dtype {g.dtype}")
            if g.ndim != 1 or g.shape[0] != n:
                raise ValueError(f"groups must be 1-D with one label per row ({n}), got shape {g.shape}")
            if g.dtype.kind == "u" and n and g.max() > np.iinfo(np.int64).max:
                raise ValueError("groups labels do not fit in int64")
            out["groups"] = g.astype(np.int64)
        return out

    # ------------------------------------------------------------------ reading
    def read(self, rows=slice(None)):
        """Committed rows as numpy arrays ``(x, y, groups or None)``.

        ``rows`` is a slice, an integer, an integer array (any order, repeats and negative
        indices allowed) or a boolean mask of length ``len(self)``.
        """
        n = len(self)
        scalar = False
        if isinstance(rows, slice):
            start, stop, step = rows.indices(n)
            if step == 1:
                return self._read(slice(start, max(start, stop)))
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
        out = self._read(idx)
        return tuple(None if a is None else (a[0] if scalar else a) for a in out)

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

    def _read(self, sel):
        if isinstance(sel, slice):
            rows = np.arange(sel.start, sel.stop)
            chunk_ids = range(sel.start // self.chunk_rows, -(-sel.stop // self.chunk_rows)) if rows.size else ()
        else:
            rows = sel
            chunk_ids = np.unique(sel // self.chunk_rows).tolist()
        return tuple(self._read_array(name, sel, rows, chunk_ids) if name in self._arrays else None
                     for name in ("x", "y", "groups"))

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


def _positive_int(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, np.integer)) and v >= 1


def _is_pair_store(path: Path) -> bool:
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("attributes", {}).get("format") == FORMAT
