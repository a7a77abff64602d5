"""The inputs of :func:`~unicon_dist.data.ingest.ingest`: paired feature files opened lazily, read by rows.

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

:func:`open_source` checks only metadata (the file exists, its type, shape and dtype);
the readers raise ``ValueError`` naming the source file and its rows for what only a
read can find (a truncated file, nulls or ragged lists in a parquet column).
"""

from __future__ import annotations

import math
import os
import struct
import threading
import uuid
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import dask.array as da
import numpy as np
import zarr

from .store import PairStore

__all__ = ["Source", "open_source", "MATRIX_ROLES", "format_rows"]

# sources that feed x and y: 2-D numeric; the others (groups, labels) are 1-D integers
MATRIX_ROLES = ("x", "y")
_ZIP_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # PKZIP local file header, 30 bytes


def _row_range(key, n: int):
    """(key as a tuple, start, stop) of a contiguous row slice; dask asks for nothing else."""
    key = key if isinstance(key, tuple) else (key,)
    if not isinstance(key[0], slice) or key[0].step not in (None, 1):
        raise TypeError(f"only contiguous row slices are supported, got {key!r}")
    a, b, _ = key[0].indices(n)
    return key, a, max(a, b)


def format_rows(rows: np.ndarray, offset: int) -> str:
    """Source rows ``rows + offset`` for messages: ``rows 3, 7 and 2 more`` (five shown)."""
    shown = ", ".join(str(int(r) + offset) for r in rows[:5])
    return f"rows {shown}" + (f" and {rows.size - 5} more" if rows.size > 5 else "")


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
    if src.role in MATRIX_ROLES:
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
        if role not in MATRIX_ROLES:
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
        shape = (n, len(cols)) if role in MATRIX_ROLES else (n,)
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
                raise ValueError(f"{self._label}: null (missing) values in {format_rows(null_rows, a)}")
            lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
            if (bad := np.flatnonzero(lengths != self.shape[1])).size:
                raise ValueError(f"{self._label}: rows must all hold {self.shape[1]} values (as the first); "
                                 f"lengths {lengths[bad[:5]].tolist()} in {format_rows(bad, a)}")
            values = col.flatten()
            if values.null_count:
                parents = pc.list_parent_indices(col).to_numpy(zero_copy_only=False)
                null_rows = np.unique(parents[values.is_null().to_numpy(zero_copy_only=False)])
                raise ValueError(f"{self._label}: null (missing) values in {format_rows(null_rows, a)}")
            out = values.to_numpy(zero_copy_only=False).astype(self.dtype, copy=False).reshape(b - a, self.shape[1])
        else:
            parts = []
            for c in self._cols:
                col = table.column(c)
                if col.null_count:
                    null_rows = np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))
                    raise ValueError(f"{self._label}: null (missing) values in column {c!r}, "
                                     f"{format_rows(null_rows, a)}")
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
