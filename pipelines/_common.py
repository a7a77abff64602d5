"""Helpers shared by the pipeline scripts: output handling, provenance, block writing.

Not a public module: the scripts import it from their own folder (Python puts a script's
folder first on ``sys.path``); tests put ``pipelines/`` on the path themselves.
"""

from __future__ import annotations

import hashlib
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import unicon_dist
from unicon_dist.data.store import PairStore

GROUP_MODES = ("none", "class")


def log(message: str) -> None:
    """One progress line on stderr (stdout stays free for results)."""
    print(message, file=sys.stderr, flush=True)


def sha256_file(path, block: int = 2**20) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def debian_package_version(package: str) -> str | None:
    """Installed version of a Debian package, or ``None`` off Debian / when not installed."""
    try:
        done = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package],
                              capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def base_provenance(script: str, argv=None, **extra) -> dict:
    """Provenance fields common to every pipeline (JSON-serialisable)."""
    prov = {
        "builder": f"pipelines/{script}",
        "argv": None if argv is None else [str(a) for a in argv],
        "built": datetime.now(timezone.utc).isoformat(),
        "unicon_dist_version": unicon_dist.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    prov.update(extra)
    return prov


class StagedOutput:
    """Build a store in ``<out>.partial`` and move it to ``out`` only when complete.

    A crash or Ctrl-C therefore never leaves a half-written store under the final name,
    and an existing store at ``out`` survives until its replacement is finished.

    Parameters
    ----------
    out : path
        Final location of the store.
    overwrite : bool
        Whether an existing pair store at ``out`` may be replaced.  Anything at ``out``
        that is not a pair store is never touched.
    """

    def __init__(self, out, overwrite: bool = False):
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + ".partial")
        if self.out.exists():
            if not overwrite:
                raise FileExistsError(f"{self.out} already exists; pass --overwrite to replace it")
            if not _is_store_or_empty(self.out):
                raise FileExistsError(f"refusing to replace {self.out}: it is not a pair store")
        if self.partial.exists():
            # left by an interrupted earlier run of a pipeline: safe to discard if it is ours
            if not _is_store_or_empty(self.partial):
                raise FileExistsError(f"{self.partial} exists and is not a pair store; remove it by hand")
            shutil.rmtree(self.partial)
        self.out.parent.mkdir(parents=True, exist_ok=True)

    def commit(self) -> PairStore:
        """Move the finished store into place (replacing the old one) and reopen it."""
        old = None
        if self.out.exists():
            old = self.out.with_name(self.out.name + ".old")
            if old.exists():
                # a leftover of an interrupted commit, unless someone put something else there
                if not _is_store_or_empty(old):
                    raise FileExistsError(f"{old} exists and is not a pair store; remove it by hand "
                                          f"(the new store is complete in {self.partial})")
                shutil.rmtree(old)
            self.out.rename(old)
        self.partial.rename(self.out)
        if old is not None:
            shutil.rmtree(old)
        return PairStore.open(self.out)


def _is_store_or_empty(path: Path) -> bool:
    if path.is_dir() and not any(path.iterdir()):
        return True
    try:
        PairStore.open(path)
    except (ValueError, FileNotFoundError, OSError):
        return False
    return True


def append_blocks(store: PairStore, x, y, labels, groups=None, *, block_rows: int,
                  source: str) -> None:
    """Append rows in blocks of ``block_rows`` rows, logging progress.

    Block edges fall on multiples of ``block_rows``; callers pass a multiple of the
    store's ``chunk_rows`` so that every block fills whole chunks (no chunk is rewritten).
    """
    n = len(x)
    t0 = time.perf_counter()
    for a in range(0, n, block_rows):
        b = min(n, a + block_rows)
        store.append(x[a:b], y[a:b], None if groups is None else groups[a:b],
                     labels=labels[a:b], source=f"{source} rows {a}:{b}")
        log(f"  {b:,}/{n:,} rows written ({time.perf_counter() - t0:.1f} s)")


def block_rows_for(chunk_rows: int, target_rows: int = 8192) -> int:
    """The multiple of ``chunk_rows`` closest to ``target_rows`` (at least one chunk)."""
    return chunk_rows * max(1, round(target_rows / chunk_rows))


def class_groups(labels: np.ndarray, mode: str):
    """Row order and group ids for a ``--groups`` mode.

    ``"none"``: rows keep their order, no groups (one-to-one pairs).  ``"class"``: the
    class is the positive group; rows are stably sorted by class so that each group is
    one contiguous run (the solver handles contiguous groups cheaply).

    Returns
    -------
    order : ndarray of int64 or None
        Source index of each output row, or ``None`` when rows are not reordered.
    groups : ndarray of int64 or None
    """
    if mode == "none":
        return None, None
    if mode == "class":
        order = np.argsort(labels, kind="stable").astype(np.int64)
        return order, labels[order].astype(np.int64)
    raise ValueError(f"unknown groups mode {mode!r}; expected one of {list(GROUP_MODES)}")


def write_labelled_store(staged: "StagedOutput", x, y, labels, group_ids, order, *, label_names, dtype,
                         chunk_rows, provenance, source: str, pipeline: str, t0: float) -> PairStore:
    """Create the staged store, append the rows in chunk-aligned blocks, record the original
    row order (when rows were sorted into groups) and the build time, and commit it."""
    store = PairStore.create(staged.partial, x.shape[1], y.shape[1], dtype=dtype, groups=group_ids is not None,
                             labels=True, label_names=list(label_names), chunk_rows=chunk_rows,
                             provenance=provenance)
    append_blocks(store, x, y, labels, group_ids, block_rows=block_rows_for(store.chunk_rows), source=source)
    if order is not None:
        store.put_array("source_index", order,
                        attrs={"meaning": "row k of the store is row source_index[k] of the source"})
    store.add_history({"pipeline": pipeline, "rows": len(store), "seconds": round(time.perf_counter() - t0, 1)})
    return staged.commit()
