"""Stream paired feature files into a :class:`~unicon_dist.data.store.PairStore`, out of core.

Sources (``x``, ``y`` and the optional per-row ``groups`` / ``labels``) are files named
by a path with an optional ``:key`` suffix -- ``.npy``, ``.npz[:key]``,
``.parquet:col[,col...]``, ``.zarr[:array]`` -- or numpy/dask arrays; their readers are in
:mod:`~unicon_dist.data.ingest_sources`.  Every source becomes a ``dask.array`` whose
chunks are the ingest blocks, computed one at a time: memory is O(block), never O(n).

Failure semantics.  All metadata checks (files exist, numeric 2-D ``x``/``y`` and 1-D
integer ``groups``/``labels``, equal row counts, dims/dtype/groups/labels matching an
existing store) run before anything is written.  Values are then validated block by
block, and each block is committed by one atomic :meth:`PairStore.append`; a bad value
(NaN/Inf, out of range for the storage dtype, a label outside ``label_names``, a
null in a parquet column) stops the ingest with an :class:`IngestError` that names the
source file and its row numbers.  The store then holds, valid and readable, every
row before the failing block, and the error says which source row to resume from
(``start_row=``, CLI ``--append --start-row``).

This module and :mod:`~unicon_dist.data.ingest_sources` import dask; nothing that
``import unicon_dist`` loads imports either.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import dask
import numpy as np

from .ingest_sources import MATRIX_ROLES, Source, format_rows, open_source
from .store import PairStore
from .store_format import STORE_DTYPES, cast_to_storage, is_pair_store, storage_itemsize

__all__ = ["ingest", "IngestError", "open_source"]

log = logging.getLogger(__name__)

_BLOCK_BYTES = 128 * 2**20  # a block's source rows plus their casts; peak is about twice this


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
    if src.role in MATRIX_ROLES:
        if block.dtype.kind == "f" and (bad := np.flatnonzero(~np.isfinite(block).all(axis=1))).size:
            raise ValueError(f"{src.label}: non-finite values in {format_rows(bad, row0)}")
        with np.errstate(over="ignore", invalid="ignore"):
            cast = cast_to_storage(block, store.dtype)
        if (bad := np.flatnonzero(~np.isfinite(cast).all(axis=1))).size:
            raise ValueError(f"{src.label}: values out of range for {store.dtype} in {format_rows(bad, row0)}")
        return cast
    if block.dtype.kind == "u" and block.size and block.max() > np.iinfo(np.int64).max:
        bad = np.flatnonzero(block > np.iinfo(np.int64).max)
        raise ValueError(f"{src.label}: values too large for int64 in {format_rows(bad, row0)}")
    block = block.astype(np.int64, copy=False)
    names = store.label_names if src.role == "labels" else None
    if names is not None and (bad := np.flatnonzero((block < 0) | (block >= len(names)))).size:
        raise ValueError(f"{src.label}: labels outside [0, {len(names)}) (the store's label_names) in "
                         f"{format_rows(bad, row0)}: values {block[bad[:5]].tolist()}")
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
        if store_path.exists() and not (store_path.is_dir() and (is_pair_store(store_path)
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
