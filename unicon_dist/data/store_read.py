"""Reading the committed rows of a pair store, chunk by chunk, with every chunk checked.

:class:`StoreReadsMixin` holds the reading half of :class:`~unicon_dist.data.store.PairStore`
(``read``, ``read_labels``, ``read_groups``, ``iter_blocks``); readers take no lock and
see the rows below the handle's ``n_rows``, never a partial append.

Missing chunks.  Zarr returns the fill value for a chunk file that does not exist, so a
deleted chunk would read back silently.  The arrays are written with
``write_empty_chunks=True`` (so every chunk below ``n_rows`` exists on disk, even an
all-zero one), and each read first asks the store that the chunk keys it needs exist.
The float arrays also use NaN as fill value and reads check finiteness (append never
stores non-finite values), which catches a chunk lost between that check and the read.
Corrupt chunks fail zstd decoding (the frame checksum catches flipped bytes); the error
is re-raised as a :class:`ChunkError` naming the array, the chunk key and its row range.
"""

from __future__ import annotations

import asyncio

import numpy as np
import zarr
from zarr.core.sync import sync

from .store_format import DECODE_ERRORS, bad_rows, bf16_values

__all__ = ["ChunkError", "StoreReadsMixin", "chunk_key", "keys_exist"]


class ChunkError(ValueError):
    """A chunk of a row array below ``n_rows`` is missing, undecodable or non-finite.

    Attributes
    ----------
    array : str
        ``"x"``, ``"y"``, ``"groups"`` or ``"labels"``.
    chunk : int
        Chunk index along the rows.
    key : str
        Its store key, e.g. ``"x/c/3/0"``.
    rows : tuple of int
        First and last committed row it holds.
    reason : {"missing", "corrupt", "non-finite"}
    detail : str
        What was found (e.g. the decoder's error).
    """

    def __init__(self, message: str, *, array: str, chunk: int, key: str, rows: tuple[int, int], reason: str,
                 detail: str):
        super().__init__(message)
        self.array, self.chunk, self.key, self.rows = array, chunk, key, rows
        self.reason, self.detail = reason, detail


def chunk_key(arr, chunk: int) -> str:
    """Store key of row chunk ``chunk`` of the Zarr array ``arr``, e.g. ``"x/c/3/0"``."""
    coords = (chunk,) + (0,) * (arr.ndim - 1)
    return f"{arr.store_path.path}/{arr.metadata.encode_chunk_key(coords)}"


def keys_exist(store, keys) -> list[bool]:
    """Whether each of ``keys`` exists in the Zarr ``store`` (asked concurrently)."""
    return sync(_exist_all(store, keys))


async def _exist_all(store, keys):
    return await asyncio.gather(*(store.exists(k) for k in keys))


class StoreReadsMixin:
    """The readers of :class:`~unicon_dist.data.store.PairStore`.

    Uses the store's ``path``, ``_arrays`` (name -> Zarr array), ``chunk_rows``,
    ``dim_x``, ``dim_y``, ``dtype``, ``itemsize`` and ``len``.
    """

    def read_buffer_bytes(self) -> int:
        """Bytes a :meth:`read` holds beyond the rows it returns, at most.

        Zarr decodes up to ``async.concurrency`` chunks of one array at a time, each as
        its compressed bytes and its decoded chunk (the rows are then gathered from them).
        """
        concurrency = int(zarr.config.get("async.concurrency") or 1)
        chunk = self.chunk_rows * max(self.dim_x, self.dim_y) * self.itemsize
        return 2 * min(concurrency, -(-len(self) // self.chunk_rows) or 1) * chunk

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
        keys = [chunk_key(arr, c) for c in chunk_ids]
        found = keys_exist(arr.store_path.store, keys)
        for c, ok in zip(chunk_ids, found):
            if not ok:
                raise self._chunk_error(name, c, "chunk file not found", "missing")
        try:
            out = arr[sel] if isinstance(sel, slice) else arr.oindex[sel]
        except DECODE_ERRORS as exc:
            for c in chunk_ids:  # find which chunk fails to decode
                try:
                    arr[c * self.chunk_rows:min(len(self), (c + 1) * self.chunk_rows)]
                except DECODE_ERRORS as inner:
                    raise self._chunk_error(name, c, inner, "corrupt") from inner
            raise ValueError(f"pair store {self.path}: reading array {name!r} failed: {exc}") from exc
        if self.dtype == "bfloat16" and name in ("x", "y"):
            out = bf16_values(out)
        if out.dtype.kind == "f" and not np.isfinite(out).all():
            bad = rows[bad_rows(out.reshape(out.shape[0], -1))]
            raise self._chunk_error(name, int(bad[0]) // self.chunk_rows,
                                    f"non-finite values in committed rows {bad[:5].tolist()}", "non-finite")
        return out

    def _chunk_error(self, name: str, chunk: int, cause, reason: str) -> ChunkError:
        a = chunk * self.chunk_rows
        b = min(len(self), a + self.chunk_rows) - 1
        key = chunk_key(self._arrays[name], chunk)
        return ChunkError(f"pair store {self.path}: array {name!r} chunk {chunk} (key {key!r}, "
                          f"rows {a}\u2013{b}) is missing or corrupt: {cause}",
                          array=name, chunk=chunk, key=key, rows=(a, b), reason=reason, detail=str(cause))
