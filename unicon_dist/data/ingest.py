"""Stream paired feature files into a :class:`~unicon_dist.data.store.PairStore`, out of core.

Sources (``x``, ``y`` and the optional per-row ``groups`` / ``labels``) are named by a
path with an optional ``:key`` suffix:

=============================  ====================================================
``a.npy``                      read block by block with ``pread`` at the header's
                               offset (Fortran order: memory-mapped)
``a.npz`` / ``a.npz:key``      a member of the archive (default: its only array);
                               stored members are read in place like ``.npy``,
                               deflated ones decompressed as one forward stream
``a.parquet:col``              a list-of-numbers column (one row = one vector) or a
                               single numeric column
``a.parquet:c1,c2,...``        several numeric columns side by side; ``:*`` = all
``a.zarr:path/in/group``       a Zarr (v2 or v3) array; or the path of the array
                               itself; a pair store's arrays give its committed rows
=============================  ====================================================

A numpy or dask array may be passed in place of a path.  Every source becomes a
``dask.array`` whose chunks are the ingest blocks (``da.from_zarr`` for Zarr,
``da.from_array`` over a row reader otherwise); blocks are computed one at a time, so
memory is O(block), never O(n): no whole-array ``compute``, and no memory map for
C-ordered files, whose mapped pages would pile up in the resident set.
(``dask.array.from_npy_stack`` is not used: its ``info`` file is a pickle.)

Failure semantics.  All metadata checks (files exist, numeric 2-D ``x``/``y`` and 1-D
integer ``groups``/``labels``, equal row counts, dims/dtype/groups/labels matching an
existing store) run before anything is written.  Values are then validated block by
block, and each block is committed by one atomic :meth:`PairStore.append`; a bad value
(NaN/Inf, out of range for the storage dtype, a label outside ``label_names``, a
null in a parquet column) stops the ingest with an :class:`IngestError` that names the
source file and its row numbers.  The store then holds, valid and readable, every
row before the failing block, and the error says which source row to resume from
(``start_row=``, CLI ``--append --start-row``).
"""

from __future__ import annotations

import logging
import math
import os
import struct
import sys
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import dask
import dask.array as da
import numpy as np
import zarr

from .store import STORE_DTYPES, PairStore, _is_pair_store, cast_to_storage, storage_itemsize

__all__ = ["ingest", "IngestError", "open_source"]

log = logging.getLogger(__name__)

_ROLES_2D = ("x", "y")
_BLOCK_BYTES = 128 * 2**20  # a block's source rows plus their casts; peak is about twice this
_ZIP_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # PKZIP local file header, 30 bytes


def _row_range(key, n: int):
    """(key as a tuple, start, stop) of a contiguous row slice; dask asks for nothing else."""
    key = key if isinstance(key, tuple) else (key,)
    if not isinstance(key[0], slice) or key[0].step not in (None, 1):
        raise TypeError(f"only contiguous row slices are supported, got {key!r}")
    a, b, _ = key[0].indices(n)
    return key, a, max(a, b)


class IngestError(ValueError):
    """A block failed validation or reading after earlier blocks were committed.

    Attributes
    ----------
    resume_row : int
        Source row of the first uncommitted row: pass ``start_row=resume_row,
        append=True`` to continue once the input is fixed.
    rows_committed : int
        Rows this ingest committed before the failure (all readable).
    store_path : pathlib.Path
        The store written to.
    """

    def __init__(self, message: str, *, resume_row: int, rows_committed: int, store_path: Path):
        super().__init__(message)
        self.resume_row = resume_row
        self.rows_committed = rows_committed
        self.store_path = store_path


# ---------------------------------------------------------------------- sources
@dataclass
class Source:
    """One opened input: an array-like (lazy) plus where it came from.

    ``array`` supports ``shape``, ``dtype``, ``ndim`` and basic slicing, and reads only
    what a slice asks for.  Build with :func:`open_source`.
    """

    role: str
    spec: str
    format: str
    array: object
    path: Path | None = None
    key: str | None = None
    _closers: list = field(default_factory=list, repr=False)

    @property
    def shape(self) -> tuple:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    @property
    def label(self) -> str:
        """How errors name this source: ``x (/data/a.npy)``."""
        return f"{self.role} ({self.spec})"

    def to_dask(self, start: int, row_chunks: tuple[int, ...]) -> da.Array:
        """Rows ``[start, start + sum(row_chunks))`` as a dask array chunked by ``row_chunks``."""
        stop = start + sum(row_chunks)
        chunks = (row_chunks,) + tuple((d,) for d in self.shape[1:])
        meta = np.empty((0,) * len(self.shape), dtype=self.dtype)
        # an explicit name: dask would otherwise tokenize the source, hashing (reading) its data
        name = f"ingest-{self.role}-{uuid.uuid4().hex}"
        if isinstance(self.array, da.Array):
            return self.array[start:stop].rechunk(chunks)
        if self.format == "zarr":
            # read in the source's own chunks, then regrouped into the ingest blocks
            return da.from_zarr(self.array, chunks=self.array.chunks, name=name)[start:stop].rechunk(chunks)
        # always wrapped: from_array copies whole any array-like with a .copy method (a memmap too)
        view = _RowWindow(self.array, start, stop)
        lock = isinstance(self.array, _NpzStream)  # one decompression stream: serialise reads
        return da.from_array(view, chunks=chunks, name=name, lock=lock, asarray=True, fancy=False, meta=meta)

    def describe(self) -> dict:
        """JSON provenance: spec, absolute path, key, format, bytes on disk, mtime, shape, dtype."""
        out = {"spec": self.spec, "format": self.format, "shape": list(self.shape), "dtype": self.dtype.name}
        if self.path is not None:
            p = self.path.resolve()
            out.update(path=str(p), key=self.key, bytes=_disk_bytes(p),
                       mtime=datetime.fromtimestamp(p.stat().st_mtime, timezone.utc).isoformat())
        return out

    def close(self) -> None:
        for close in self._closers:
            close()
        self._closers.clear()


class _RowWindow:
    """Rows ``[start, stop)`` of an array-like, so dask's chunk offsets start at 0.

    It deliberately has no ``copy`` method: ``dask.array.from_array`` copies (reads
    whole) any array-like that has one, memory maps included.
    """

    def __init__(self, array, start: int, stop: int):
        self._a, self._start = array, start
        self.shape = (stop - start,) + tuple(array.shape[1:])
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        rows = key[0]
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError(f"only contiguous row slices are supported, got {key!r}")
        a, b, _ = rows.indices(self.shape[0])
        return self._a[(slice(self._start + a, self._start + max(a, b)),) + key[1:]]


def _split_spec(spec: str) -> tuple[Path, str | None]:
    """``path[:key]`` -> (path, key); a path that exists as written wins over a split."""
    p = Path(spec)
    if p.exists():
        return p, None
    head, sep, key = spec.rpartition(":")
    if sep and head and Path(head).exists():
        return Path(head), key or None
    raise FileNotFoundError(f"no such file: {head if sep and head else spec}"
                            + (f" (from source {spec!r})" if sep and head else ""))


def open_source(spec, role: str) -> Source:
    """Open ``spec`` (see the module docstring) lazily, checking only its metadata.

    Parameters
    ----------
    spec : str, Path, numpy array or dask array
        The source.
    role : {"x", "y", "groups", "labels"}
        What it feeds: ``x``/``y`` must be 2-D numeric, ``groups``/``labels`` 1-D integer.

    Returns
    -------
    Source
    """
    if isinstance(spec, (np.ndarray, da.Array)):
        src = Source(role, f"<{type(spec).__name__} {spec.shape}>", "array", spec)
    else:
        text = os.fspath(spec)
        path, key = _split_spec(text)
        suffix = path.suffix.lower()
        if suffix == ".npy":
            if key is not None:
                raise ValueError(f"{role} ({text}): a .npy file holds one array; drop the ':{key}'")
            try:
                with open(path, "rb") as f:
                    shape, fortran, dtype, offset = _npy_header(f, f"{role} ({text})")
            except (ValueError, OSError) as exc:
                raise ValueError(f"{role} ({text}): cannot read {path} as .npy: {exc}") from None
            src = _file_source(role, text, "npy", path, None, offset, shape, fortran, dtype)
        elif suffix == ".npz":
            src = _open_npz(role, text, path, key)
        elif suffix in (".parquet", ".pq"):
            src = _open_parquet(role, text, path, key)
        elif path.is_dir() or suffix == ".zarr":
            src = _open_zarr(role, text, path, key)
        else:
            raise ValueError(f"{role} ({text}): unknown source type {suffix or path.name!r}; expected "
                             ".npy, .npz, .parquet or a Zarr array (directory)")
    try:
        _check_kind(src)
    except (TypeError, ValueError):
        src.close()
        raise
    return src


def _check_kind(src: Source) -> None:
    kind = src.dtype.kind
    if src.role in _ROLES_2D:
        if kind not in "fiu":
            raise TypeError(f"{src.label}: must be numeric, got dtype {src.dtype}")
        if len(src.shape) != 2:
            raise ValueError(f"{src.label}: must be 2-D (rows, features), got shape {src.shape}")
    else:
        if kind not in "iu":
            raise TypeError(f"{src.label}: {src.role} must be integers, got dtype {src.dtype}")
        if len(src.shape) != 1:
            raise ValueError(f"{src.label}: {src.role} must be 1-D (one per row), got shape {src.shape}")


def _disk_bytes(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


# .npz ------------------------------------------------------------------------------
def _open_npz(role: str, text: str, path: Path, key: str | None) -> Source:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"{role} ({text}): cannot read {path} as .npz: {exc}") from None
    keys = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    if key is None:
        if len(keys) != 1:
            zf.close()
            raise ValueError(f"{role} ({text}): {path} holds {len(keys)} arrays {keys}; name one as {path}:KEY")
        key = keys[0]
    if key not in keys:
        zf.close()
        raise ValueError(f"{role} ({text}): {path} has no array {key!r}; it has {keys}")
    info = zf.getinfo(key + ".npy")
    with zf.open(info) as f:
        shape, fortran, dtype, header = _npy_header(f, f"{role} ({text})")
    if info.compress_type == zipfile.ZIP_STORED:
        # the member's bytes lie verbatim in the archive: read them in place
        with open(path, "rb") as fh:
            fh.seek(info.header_offset)
            fields = _ZIP_LOCAL_HEADER.unpack(fh.read(_ZIP_LOCAL_HEADER.size))
        offset = info.header_offset + _ZIP_LOCAL_HEADER.size + fields[-2] + fields[-1] + header
        zf.close()
        return _file_source(role, text, "npz", path, key, offset, shape, fortran, dtype)
    if fortran and len(shape) > 1:
        zf.close()
        raise ValueError(f"{role} ({text}): a compressed Fortran-order array cannot be read by rows "
                         "without decompressing it whole; save it C-ordered or as .npy")
    stream = _NpzStream(zf, info, shape, dtype, header)
    return Source(role, text, "npz", stream, path, key, [stream.close])


def _file_source(role, text, fmt, path, key, offset, shape, fortran, dtype) -> Source:
    """Raw array bytes at ``offset`` of ``path``: C order is read by ``pread``, row blocks only.

    ``pread`` rather than a memory map: mapped pages count in the process's resident
    memory until the kernel reclaims them, so an ingest would look O(n) in RSS.
    Fortran order has no contiguous rows; it is memory-mapped instead.
    """
    size = os.path.getsize(path)
    need = offset + np.dtype(dtype).itemsize * math.prod(shape)
    if size < need:
        raise ValueError(f"{role} ({text}): {path} is truncated: {size} bytes, the header of shape "
                         f"{tuple(shape)} {np.dtype(dtype)} needs {need}")
    if fortran and len(shape) > 1:
        arr = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape), order="F")
        return Source(role, text, fmt, arr, path, key)
    reader = _FileRows(path, offset, shape, dtype)
    return Source(role, text, fmt, reader, path, key, [reader.close])


class _FileRows:
    """C-ordered array bytes in a file, read by rows with ``os.pread`` (thread-safe)."""

    def __init__(self, path, offset: int, shape, dtype):
        self._fd = os.open(path, os.O_RDONLY)
        self._offset = offset
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), len(shape)
        self._row_bytes = self.dtype.itemsize * math.prod(self.shape[1:])

    def __getitem__(self, key):
        key, a, b = _row_range(key, self.shape[0])
        out = np.empty((b - a,) + self.shape[1:], dtype=self.dtype)
        if out.size == 0:
            return out[(slice(None),) + key[1:]]
        view, pos, got = memoryview(out.view(np.uint8).reshape(-1)), self._offset + a * self._row_bytes, 0
        while got < view.nbytes:  # a read may return fewer bytes than asked
            if hasattr(os, "preadv"):  # straight into the output buffer
                n = os.preadv(self._fd, [view[got:]], pos + got)
            else:
                chunk = os.pread(self._fd, view.nbytes - got, pos + got)
                view[got:got + len(chunk)] = chunk
                n = len(chunk)
            if n == 0:
                raise ValueError(f"unexpected end of file reading rows {a}-{b - 1}")
            got += n
        return out[(slice(None),) + key[1:]]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _npy_header(f, label: str):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:  # 3.0 exists only for structured dtypes with non-latin1 field names
        raise ValueError(f"{label}: unsupported .npy format version {version}")
    if dtype.hasobject:
        raise TypeError(f"{label}: object arrays are not supported (they need pickle)")
    return shape, fortran, dtype, f.tell()


class _NpzStream:
    """A deflated ``.npz`` member read as rows through one forward decompression stream.

    Seeking backwards restarts decompression, so rows should be asked for in order (the
    ingest does); each read holds only the requested rows.
    """

    def __init__(self, zf: zipfile.ZipFile, info: zipfile.ZipInfo, shape, dtype, header: int):
        self._zf, self._f = zf, zf.open(info)
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), len(shape)
        self._header = header
        self._row_bytes = self.dtype.itemsize * math.prod(self.shape[1:])
        self._lock = threading.Lock()

    def __getitem__(self, key):
        key, a, b = _row_range(key, self.shape[0])
        with self._lock:
            self._f.seek(self._header + a * self._row_bytes)
            buf = self._f.read((b - a) * self._row_bytes)
        if len(buf) != (b - a) * self._row_bytes:
            raise ValueError(f"truncated .npz member: rows {a}-{b - 1} are past its end")
        rows = np.frombuffer(buf, dtype=self.dtype).reshape((b - a,) + self.shape[1:])
        return rows[(slice(None),) + key[1:]]

    def close(self) -> None:
        self._f.close()
        self._zf.close()


# .parquet ----------------------------------------------------------------------------
def _open_parquet(role: str, text: str, path: Path, key: str | None) -> Source:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        raise ImportError("reading .parquet sources needs pyarrow (pip install pyarrow)") from None
    import pyarrow as pa

    label = f"{role} ({text})"
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{label}: cannot read {path} as parquet: {exc}") from None
    schema = pf.schema_arrow
    names = list(schema.names)
    if key is None and len(names) == 1:
        cols = names
    elif key is None:
        pf.close()
        raise ValueError(f"{label}: {path} has columns {names}; name them as {path}:COL, {path}:C1,C2 or {path}:*")
    else:
        cols = names if key == "*" else [c.strip() for c in key.split(",")]
        missing = [c for c in cols if c not in names]
        if missing:
            pf.close()
            raise ValueError(f"{label}: {path} has no column {missing[0]!r}; it has {names}")
    types = [schema.field(c).type for c in cols]
    listy = [pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t) for t in types]
    if any(listy):
        if len(cols) != 1:
            pf.close()
            raise ValueError(f"{label}: list column {cols[listy.index(True)]!r} must be the only column named")
        if role not in _ROLES_2D:
            pf.close()
            raise TypeError(f"{label}: {role} must be a column of integers, got a list column {cols[0]!r}")
        value_type = types[0].value_type
        numeric = [value_type]
    else:
        numeric = types
    for c, t in zip(cols, numeric):
        if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
            pf.close()
            raise TypeError(f"{label}: column {c!r} must hold numbers, got {t}")
    dtype = np.result_type(*[np.dtype(t.to_pandas_dtype()) for t in numeric])
    n = pf.metadata.num_rows
    if any(listy):
        if pa.types.is_fixed_size_list(types[0]):
            dim = types[0].list_size
        elif n:  # variable-length lists: the first row sets the width, each block checks it
            first = next(pf.iter_batches(batch_size=1, columns=cols)).column(0)
            dim = 0 if first.is_null()[0].as_py() else len(first[0])
        else:
            dim = 0
        shape = (n, dim)
    else:
        shape = (n, len(cols)) if role in _ROLES_2D else (n,)
    reader = _ParquetRows(pf, cols, any(listy), shape, dtype, label)
    return Source(role, text, "parquet", reader, path, key, [reader.close])


class _ParquetRows:
    """Rows of parquet columns as a 2-D (or 1-D) array, reading only the row groups needed."""

    def __init__(self, pf, cols, is_list: bool, shape, dtype, label: str):
        self._pf, self._cols, self._is_list, self._label = pf, cols, is_list, label
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), len(shape)
        sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self._lock = threading.Lock()

    def __getitem__(self, key):
        import pyarrow.compute as pc

        key, a, b = _row_range(key, self.shape[0])
        if a == b:
            return np.empty((0,) + self.shape[1:], dtype=self.dtype)[(slice(None),) + key[1:]]
        g0 = int(np.searchsorted(self._starts, a, side="right")) - 1
        g1 = int(np.searchsorted(self._starts, b, side="left"))
        with self._lock:
            table = self._pf.read_row_groups(list(range(g0, g1)), columns=self._cols)
        table = table.slice(a - int(self._starts[g0]), b - a)
        if self._is_list:
            col = table.column(0).combine_chunks()
            null_rows = np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))
            if null_rows.size:
                raise ValueError(f"{self._label}: null (missing) values in {_rows(null_rows, a)}")
            lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
            if (bad := np.flatnonzero(lengths != self.shape[1])).size:
                raise ValueError(f"{self._label}: rows must all hold {self.shape[1]} values (as the first); "
                                 f"lengths {lengths[bad[:5]].tolist()} in {_rows(bad, a)}")
            values = col.flatten()
            if values.null_count:
                parents = pc.list_parent_indices(col).to_numpy(zero_copy_only=False)
                null_rows = np.unique(parents[values.is_null().to_numpy(zero_copy_only=False)])
                raise ValueError(f"{self._label}: null (missing) values in {_rows(null_rows, a)}")
            out = values.to_numpy(zero_copy_only=False).astype(self.dtype, copy=False).reshape(b - a, self.shape[1])
        else:
            parts = []
            for c in self._cols:
                col = table.column(c)
                if col.null_count:
                    null_rows = np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))
                    raise ValueError(f"{self._label}: null (missing) values in column {c!r}, {_rows(null_rows, a)}")
                parts.append(col.to_numpy())
            out = np.stack(parts, axis=1).astype(self.dtype, copy=False) if self.ndim == 2 else parts[0]
        return out[(slice(None),) + key[1:]]

    def close(self) -> None:
        self._pf.close()


# zarr ----------------------------------------------------------------------------------
def _open_zarr(role: str, text: str, path: Path, key: str | None) -> Source:
    label = f"{role} ({text})"
    try:
        node = zarr.open(path, mode="r")
        if key is not None:
            node = node[key]
    except (KeyError, FileNotFoundError, ValueError, zarr.errors.BaseZarrError) as exc:
        raise ValueError(f"{label}: no Zarr array at {path}{f' key {key!r}' if key else ''}: {exc}") from None
    if isinstance(node, zarr.Group):
        arrays = sorted(node.array_keys())
        if len(arrays) != 1:
            raise ValueError(f"{label}: {path} is a Zarr group with arrays {arrays}; name one as {path}:ARRAY")
        key, node = arrays[0], node[arrays[0]]
    # a pair store's arrays may hold uncommitted rows past n_rows: take only the committed ones
    root = path if key is not None else path.parent
    if (root / "zarr.json").is_file():
        try:
            n = len(PairStore.open(root))
        except ValueError:
            n = None  # a plain Zarr group
        if n is not None:
            lazy = da.from_zarr(node, chunks=node.chunks, name=f"ingest-store-{uuid.uuid4().hex}")[:n]
            return Source(role, text, "array", lazy, path, key)
    return Source(role, text, "zarr", node, path, key)


# ---------------------------------------------------------------------- progress
class _RowProgress:
    """``rows done/total`` with a rate on ``stream``.

    A carriage-return line redrawn at most every 0.2 s on a terminal; otherwise one line
    per ~10% of the rows, so logs stay short.
    """

    def __init__(self, stream=None, clock: Callable[[], float] = time.monotonic):
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._t0 = self._last = None
        self._next_decile = 1
        self._width = 0

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = self.clock()
        if self._t0 is None:
            self._t0 = self._last = now
        end = done >= total
        if self.tty:
            if not end and now - self._last < 0.2:
                return
        else:
            decile = 10 * done // max(total, 1)
            if not end and decile < self._next_decile:
                return
            self._next_decile = decile + 1
        self._last = now
        elapsed = now - self._t0
        rate = done / elapsed if elapsed > 0 else float("nan")
        pct = 100.0 * done / total if total else 100.0
        line = f"{stage}: {done:,}/{total:,} rows ({pct:.0f}%), {rate:,.0f} rows/s, {elapsed:.1f}s"
        if self.tty:  # pad so a shorter line wipes the end of the previous one
            self.stream.write("\r" + line.ljust(self._width) + ("\n" if end else ""))
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _progress_callable(progress):
    if progress is True:
        return _RowProgress()
    if progress is False or progress is None:
        return lambda stage, done, total: None
    if callable(progress):
        return progress
    raise TypeError(f"progress must be a bool or a callable(stage, done, total), got {progress!r}")


# ---------------------------------------------------------------------- ingest
def _rows(rows: np.ndarray, offset: int) -> str:
    shown = ", ".join(str(int(r) + offset) for r in rows[:5])
    return f"rows {shown}" + (f" and {rows.size - 5} more" if rows.size > 5 else "")


def _plan_blocks(store_start: int, n: int, block_rows: int) -> tuple[int, ...]:
    """Row counts of the blocks; store-row edges sit on multiples of ``block_rows``.

    The first block only fills up to the next edge, so after a partial earlier append
    every later append writes whole chunks instead of rewriting a half-full one.
    """
    sizes, a = [], store_start
    while a < store_start + n:
        b = min(store_start + n, (a // block_rows + 1) * block_rows)
        sizes.append(b - a)
        a = b
    return tuple(sizes)


def _default_block_rows(sources: list[Source], store_dtype: str, chunk_rows: int) -> int:
    row_bytes = sum(max(1, math.prod(s.shape[1:])) * (s.dtype.itemsize + storage_itemsize(store_dtype))
                    for s in sources)
    return chunk_rows * max(1, _BLOCK_BYTES // (row_bytes * chunk_rows))


def _check_block(src: Source, block: np.ndarray, row0: int, store: PairStore) -> np.ndarray:
    """Validate one block of a source; returns it cast to what the store stores."""
    if src.role in _ROLES_2D:
        if block.dtype.kind == "f" and (bad := np.flatnonzero(~np.isfinite(block).all(axis=1))).size:
            raise ValueError(f"{src.label}: non-finite values in {_rows(bad, row0)}")
        with np.errstate(over="ignore", invalid="ignore"):
            cast = cast_to_storage(block, store.dtype)
        if (bad := np.flatnonzero(~np.isfinite(cast).all(axis=1))).size:
            raise ValueError(f"{src.label}: values out of range for {store.dtype} in {_rows(bad, row0)}")
        return cast
    if block.dtype.kind == "u" and block.size and block.max() > np.iinfo(np.int64).max:
        bad = np.flatnonzero(block > np.iinfo(np.int64).max)
        raise ValueError(f"{src.label}: values too large for int64 in {_rows(bad, row0)}")
    block = block.astype(np.int64, copy=False)
    names = store.label_names if src.role == "labels" else None
    if names is not None and (bad := np.flatnonzero((block < 0) | (block >= len(names)))).size:
        raise ValueError(f"{src.label}: labels outside [0, {len(names)}) (the store's label_names) in "
                         f"{_rows(bad, row0)}: values {block[bad[:5]].tolist()}")
    return block


def _same_path(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def ingest(x_source, y_source, store_path, *, groups=None, labels=None, dtype=None,
           chunk_rows: int | None = None, overwrite: bool = False, append: bool = False,
           label_names: list[str] | None = None, block_rows: int | None = None,
           start_row: int = 0, progress=True, provenance: dict | None = None,
           command: list[str] | str | None = None) -> PairStore:
    """Stream paired features from files into a pair store, block by block.

    Parameters
    ----------
    x_source, y_source : str, Path, numpy array or dask array
        ``x`` (n, dim_x) and ``y`` (n, dim_y) numeric sources (see the module docstring
        for ``.npy``, ``.npz[:key]``, ``.parquet:col[,col...]`` and ``.zarr[:array]``).
    store_path : str or Path
        Directory of the pair store to create or append to.
    groups, labels : source, optional
        1-D integer sources with one entry per row: positive-pair groups and class
        labels.  An existing store must have groups (labels) iff these are given.
    dtype : {"float32", "float16", "float64"}, optional
        Storage dtype of a new store: float32 (default), float16, float64 or bfloat16
        (see :meth:`PairStore.create`).  When appending, it must be
        the store's dtype if given.
    chunk_rows : int, optional
        Rows per chunk of a new store (default :func:`unicon_dist.data.store.default_chunk_rows`); when
        appending it must match the store if given.
    overwrite : bool
        Replace an existing store at ``store_path`` (only after every check passed).
    append : bool
        Append to the store at ``store_path`` (it is created if missing).  Without
        ``append`` or ``overwrite`` an existing store is an error.
    label_names : list of str, optional
        Class names for ``labels``; label values must lie in ``[0, len(label_names))``.
        When appending to a store that has names they must be equal.
    block_rows : int, optional
        Rows per block (per append), used as given: memory use is O(block_rows),
        independent of n.  A multiple of the store's ``chunk_rows`` is best: then every
        append writes whole chunks, while other values make each block boundary inside a
        chunk rewrite that chunk (a warning says so and names a multiple to use).
        Default: a multiple of ``chunk_rows`` of about 128 MiB of source rows plus their
        casts (peak memory is about twice the block).  The value used is recorded in the
        history record (``"block_rows"``).
    start_row : int
        First source row to ingest (the ``resume_row`` of an earlier
        :class:`IngestError`; the rows before it are skipped).
    progress : bool or callable
        True: rows done/total and rate on stderr.  A callable is called as
        ``progress("ingest", rows_done, rows_total)`` after each block
        (the :class:`unicon_dist.solver.progress.Progress` protocol).
    provenance : dict, optional
        Extra JSON-serialisable provenance for a new store; the ingest's own record
        (sources with paths, sizes, mtimes, shapes, dtypes; time; command) is stored
        under ``provenance["ingest"]`` and appended to :attr:`PairStore.history` on
        every run, failed runs included.
    command : str or list of str, optional
        Command line to record (default ``sys.argv``).

    Returns
    -------
    PairStore
        The store, open for appending.

    Raises
    ------
    FileNotFoundError
        A source does not exist.
    FileExistsError
        ``store_path`` exists and neither ``append`` nor ``overwrite`` is set.
    TypeError, ValueError
        Bad sources or arguments, found before anything is written.
    IngestError
        A block failed after ``rows_committed`` rows were committed; those rows are
        readable and ingest can resume at ``resume_row``.

    Examples
    --------
    >>> ingest("img.npy", "txt.parquet:embedding", "pairs.zarr",          # doctest: +SKIP
    ...        labels="meta.parquet:class_id", label_names=names)
    PairStore('pairs.zarr', n_rows=1000000, ...)
    """
    if append and overwrite:
        raise ValueError("append and overwrite exclude each other")
    if dtype is not None and not isinstance(dtype, str):
        dtype = np.dtype(dtype).name
    if isinstance(start_row, bool) or not isinstance(start_row, (int, np.integer)) or start_row < 0:
        raise ValueError(f"start_row must be a non-negative integer, got {start_row!r}")
    if block_rows is not None and (isinstance(block_rows, bool) or not isinstance(block_rows, (int, np.integer))
                                   or block_rows < 1):
        raise ValueError(f"block_rows must be a positive integer, got {block_rows!r}")
    store_path = Path(store_path)
    report = _progress_callable(progress)
    started = datetime.now(timezone.utc).isoformat()
    sources: list[Source] = []
    try:
        for role, spec in (("x", x_source), ("y", y_source), ("groups", groups), ("labels", labels)):
            if spec is not None:
                sources.append(open_source(spec, role))
        src = {s.role: s for s in sources}
        _check_sources(src, store_path, start_row)
        store, new = _prepare_store(src, store_path, dtype=dtype, chunk_rows=chunk_rows, append=append,
                                    overwrite=overwrite, label_names=label_names)
        record = {"kind": "ingest", "time": started, "command": command if command is not None else list(sys.argv),
                  "sources": {s.role: s.describe() for s in sources}, "start_row": int(start_row)}
        if new:
            store = PairStore.create(store_path, src["x"].shape[1], src["y"].shape[1], dtype=dtype or "float32",
                                     groups="groups" in src, labels="labels" in src, chunk_rows=chunk_rows,
                                     label_names=label_names, overwrite=overwrite,
                                     provenance={**(provenance or {}), "ingest": record})
        elif label_names is not None and store.label_names is None:
            store.set_label_names(label_names)
        _stream(src, store, start_row, block_rows, report, record)
        return store
    finally:
        for s in sources:
            s.close()


def _check_sources(src: dict, store_path: Path, start_row: int) -> None:
    n = src["x"].shape[0]
    for s in src.values():
        if s.shape[0] != n:
            raise ValueError(f"mismatched number of rows: {src['x'].label} has {n}, {s.label} has {s.shape[0]}")
        if s.path is not None and _same_path(s.path, store_path):
            raise ValueError(f"{s.label}: the source lies inside the target store {store_path}")
    if start_row > n:
        raise ValueError(f"start_row {start_row} is past the end of the sources ({n} rows)")


def _prepare_store(src: dict, store_path: Path, *, dtype, chunk_rows, append, overwrite, label_names):
    """Check the target; returns ``(store or None, create_new)``.  Writes nothing."""
    if label_names is not None and "labels" not in src:
        raise ValueError("label_names needs a labels source")
    if not store_path.exists() or overwrite:
        if store_path.exists() and not (store_path.is_dir() and (_is_pair_store(store_path)
                                                                 or not any(store_path.iterdir()))):
            raise FileExistsError(f"refusing to overwrite {store_path}: it is not a pair store")
        if dtype is not None and dtype not in STORE_DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; expected one of {', '.join(STORE_DTYPES)}")
        if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, (int, np.integer))
                                       or chunk_rows < 1):
            raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
        return None, True
    if not append:
        raise FileExistsError(f"{store_path} already exists; pass append=True (--append) to add rows "
                              "or overwrite=True (--overwrite) to replace it")
    store = PairStore.open(store_path, mode="r+")
    where = f"pair store {store_path}"
    for name, dim in (("x", store.dim_x), ("y", store.dim_y)):
        if src[name].shape[1] != dim:
            raise ValueError(f"{src[name].label}: has {src[name].shape[1]} columns but {where} has dim_{name} {dim}")
    if dtype is not None and dtype != store.dtype:
        raise ValueError(f"dtype {dtype} differs from {where}'s dtype {store.dtype}")
    if chunk_rows is not None and chunk_rows != store.chunk_rows:
        raise ValueError(f"chunk_rows {chunk_rows} differs from {where}'s chunk_rows {store.chunk_rows}")
    for role, has in (("groups", store.has_groups), ("labels", store.has_labels)):
        if has != (role in src):
            raise ValueError(f"{where} has {role}: pass a {role} source" if has
                             else f"{where} was created without {role}; do not pass a {role} source")
    if label_names is not None and store.label_names is not None and list(label_names) != store.label_names:
        raise ValueError(f"label_names differ from {where}'s {len(store.label_names)} label_names")
    return store, False


def _stream(src: dict, store: PairStore, start_row: int, block_rows, report, record: dict) -> None:
    n = src["x"].shape[0] - start_row
    sources = list(src.values())
    ch = store.chunk_rows
    if block_rows is None:
        block_rows = _default_block_rows(sources, store.dtype, ch)
    elif block_rows % ch:
        # honoured (it is the caller's memory bound), but not silently slower
        better = max(ch, block_rows // ch * ch)
        log.warning("block_rows %d is not a multiple of the store's chunk_rows %d: blocks of %d rows are used as "
                    "given, but each block boundary inside a chunk rewrites that chunk; block_rows %d would "
                    "write whole chunks", block_rows, ch, block_rows, better)
    block_rows = int(block_rows)
    record["block_rows"] = block_rows
    store_start = len(store)
    sizes = _plan_blocks(store_start, n, block_rows)
    lazy = {role: s.to_dask(start_row, sizes) for role, s in src.items()} if sizes else {}
    done = 0
    report("ingest", 0, n)
    for i, size in enumerate(sizes):
        row0 = start_row + done
        try:
            # one compute per block: x, y, groups and labels are read side by side
            blocks = dask.compute(*(lazy[r].blocks[i] for r in src), scheduler="threads")
            data = {r: _check_block(src[r], np.asarray(b), row0, store) for r, b in zip(src, blocks)}
            store.append(data["x"], data["y"], data.get("groups"), labels=data.get("labels"),
                         source=f"ingest rows {row0}-{row0 + size - 1} of {src['x'].spec}")
        except (ValueError, TypeError, OSError, RuntimeError) as exc:
            msg = (f"{exc}\ningest stopped at source row {row0}: {done} rows of this run (source rows "
                   f"{start_row}-{row0 - 1}) are committed to {store.path} and readable; fix the input and "
                   f"resume with start_row={row0}, append=True (CLI: --append --start-row {row0})"
                   if done else
                   f"{exc}\ningest stopped at source row {row0} before committing any row of this run; "
                   f"fix the input and rerun with start_row={row0}, append=True (CLI: --append --start-row {row0})")
            _log(store, record, store_start, done, f"failed at source row {row0}: {exc}")
            raise IngestError(msg, resume_row=row0, rows_committed=done, store_path=store.path) from exc
        done += size
        report("ingest", done, n)
    _log(store, record, store_start, done, "complete")


def _log(store: PairStore, record: dict, store_start: int, done: int, status: str) -> None:
    entry = {**record, "rows": [store_start, store_start + done], "status": status,
             "finished": datetime.now(timezone.utc).isoformat()}
    try:
        store.add_history(entry)
    except OSError:  # the history is a courtesy: never let it hide the ingest's own outcome
        pass
