"""Benchmark: reading a PairStore, and how much of an out-of-core fit is I/O.

Parts (each prints a Markdown table and writes ``benchmarks/results/store_io_<part>.json``):

``build``
    Writes the synthetic store: n = 1,000,000 pairs, d = 512 per view, float32,
    clustered (64 centres; y = a fixed random rotation of the centre plus noise), so
    the two arrays hold 4.1 GB before compression.  Appended in blocks of 65,536
    rows; reports the write rate.  The store is kept under ``data/bench/`` (ignored
    by git) for the other parts.

``read``
    Streaming read rate of the store (``PairStore.iter_blocks``: zstd decoding,
    checksums, chunk-existence and finiteness checks) next to the raw rate of the same
    files read with plain ``read()`` calls (no decoding) and to zarr reading the two
    arrays by itself in the same blocks, each with a cold page cache (the files evicted
    with ``posix_fadvise(DONTNEED)`` first) and a warm one.  Rates are in GB/s
    of array data (4 bytes per value), and for the raw read also of bytes on disk.

``fit``
    Fits from the store with a 1 GiB memory budget (the store is 4x larger), in a
    fresh process per configuration, starting from a cold page cache (after a warm-up fit
    on 5,000 rows, so that the peak-RSS increment is the fit's working set and not the
    one-off allocations of torch and zarr):
    ``negatives=4096, batch_split="contiguous"`` on all 1M pairs, and full negatives on
    the first 100,000 pairs (a store of 410 MB under a 256 MiB budget).  Reports wall
    time, the time spent inside ``PairStore.read`` (the I/O share), the panel plan,
    panel loads and peak RSS.

Usage::

    python benchmarks/bench_store_io.py all          # build (if missing), read, fit: ~15 min on 2 cores
    python benchmarks/bench_store_io.py read --n 200000   # a smaller store for a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _harness as H  # noqa: E402

H.use_checkout()

DIM = 512
BLOCK = 65536
BENCH_DIR = H.REPO / "data" / "bench"


def store_path(n: int) -> Path:
    return BENCH_DIR / f"clustered-{n}x{DIM}.zarr"


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def evict(path: Path) -> None:
    """Drop the store's files from the page cache (clean pages only; no root needed)."""
    for p in _files(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------ build
def build(n: int) -> dict:
    import unicon_dist as ud

    path = store_path(n)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((64, DIM)).astype(np.float32)
    rotation = np.linalg.qr(rng.standard_normal((DIM, DIM)))[0].astype(np.float32)
    store = ud.PairStore.create(path, DIM, DIM, overwrite=True,
                                provenance={"generator": "benchmarks/bench_store_io.py", "n": n, "clusters": 64})
    seconds = 0.0
    for a in range(0, n, BLOCK):
        b = min(n, a + BLOCK)
        c = rng.integers(0, 64, b - a)
        x = centres[c] + 0.5 * rng.standard_normal((b - a, DIM), dtype=np.float32)
        y = centres[c] @ rotation + 0.5 * rng.standard_normal((b - a, DIM), dtype=np.float32)
        t0 = time.perf_counter()
        store.append(x, y, source=f"block {a // BLOCK}")
        seconds += time.perf_counter() - t0
    disk = sum(p.stat().st_size for p in _files(path))
    row = {"part": "build", "n": n, "dim": DIM, "array_bytes": 2 * n * DIM * 4, "disk_bytes": disk,
           "chunk_rows": store.chunk_rows, "append_seconds": seconds,
           "write_GBps": 2 * n * DIM * 4 / seconds / 1e9}
    return row


# ------------------------------------------------------------------------------- read
def read(n: int) -> list[dict]:
    import unicon_dist as ud

    path = store_path(n)
    store = ud.PairStore.open(path)
    files = _files(path)
    disk = sum(p.stat().st_size for p in files)
    logical = 2 * len(store) * DIM * 4
    rows = []
    for cache in ("cold", "warm"):
        if cache == "cold":
            evict(path)
        with H.Timer() as t:
            total = 0
            for fp in files:
                with open(fp, "rb", buffering=0) as fh:
                    while chunk := fh.read(8 << 20):
                        total += len(chunk)
        rows.append({"part": "read", "what": "raw file read (no decoding)", "cache": cache, "seconds": t.seconds,
                     "disk_GBps": total / t.seconds / 1e9, "array_GBps": logical / t.seconds / 1e9})
    for cache in ("cold", "warm"):
        if cache == "cold":
            evict(path)
        with H.Timer() as t:
            for _ in store.iter_blocks(block_rows=store.chunk_rows * 32):
                pass
        rows.append({"part": "read", "what": "PairStore.iter_blocks", "cache": cache, "seconds": t.seconds,
                     "disk_GBps": disk / t.seconds / 1e9, "array_GBps": logical / t.seconds / 1e9,
                     "cpu_utilisation": t.cpu / t.seconds})
    import zarr

    arrays = [zarr.open_array(path / name, mode="r") for name in ("x", "y")]
    step = store.chunk_rows * 32
    for cache in ("cold", "warm"):
        if cache == "cold":
            evict(path)
        with H.Timer() as t:
            for a in range(0, len(store), step):
                for arr in arrays:
                    arr[a:a + step]
        rows.append({"part": "read", "what": "zarr arrays alone (same blocks)", "cache": cache, "seconds": t.seconds,
                     "disk_GBps": disk / t.seconds / 1e9, "array_GBps": logical / t.seconds / 1e9,
                     "cpu_utilisation": t.cpu / t.seconds})
    for r in rows:
        r.update(n=len(store), disk_bytes=disk, array_bytes=logical)
    return rows


# -------------------------------------------------------------------------------- fit
FITS = [
    # (name, n rows used, model options)
    ("negatives=4096 contiguous", None, dict(negatives=4096, batch_split="contiguous", memory_budget=1 << 30)),
    ("full negatives", 100_000, dict(memory_budget=256 << 20)),
]


def fit_worker(params: dict) -> dict:
    import torch

    import unicon_dist as ud

    path = Path(params["path"])
    store = ud.PairStore.open(path)
    if params["rows"]:
        # a prefix of the big store as its own store would cost a copy; instead read
        # through a view that exposes the first rows only
        store = _Prefix(store, params["rows"])
    timed = _TimedReads(store)
    options = dict(rank=64, temperature=0.1, max_iter=2, tol=0.0, **params["options"])
    model, t, base, warm_peak = measured_fit(timed, path, options)
    return {
        "part": "fit", "name": params["name"], "n": len(timed), "store_bytes": 2 * len(timed) * DIM * 4,
        "memory_budget": params["options"]["memory_budget"], "panel_rows": model.plan_.panel_rows,
        "reads": timed.calls, "rows_read": timed.rows, "read_seconds": timed.seconds, "wall_seconds": t.seconds,
        "io_share": timed.seconds / t.seconds, "read_GBps": timed.rows * 2 * DIM * 4 / max(timed.seconds, 1e-9) / 1e9,
        "peak_rss_mib": H.maxrss_mib(), "rss_before_mib": base, "rss_increment_mib": H.maxrss_mib() - base,
        "peak_of_warmup_mib": warm_peak, "cpu_utilisation": t.utilisation,
        "threads": torch.get_num_threads(), "history": model.history_,
    }


def measured_fit(store, path: Path, options: dict):
    """Fit ``ud.UniCon(**options)`` on ``store`` from a cold page cache, its peak RSS its own.

    A warm-up fit on 5,000 rows first: torch's and zarr's one-off allocations (thread pools,
    BLAS workspaces, about 100 MiB here) belong to the process, not to the fit's working set.
    Returns (model, Timer, RSS before the fit in MiB, peak RSS of the warm-up in MiB).
    """
    import unicon_dist as ud

    ud.UniCon(**{**options, "max_iter": 1}).fit(_Prefix(store, 5000), groups=False)
    warm_peak = H.maxrss_mib()
    evict(path)
    H.reset_peak()
    base = H.maxrss_mib()
    model = ud.UniCon(**options)
    with H.Timer() as t:
        model.fit(store)
    return model, t, base, warm_peak


class _TimedReads:
    """A PairStore whose reads are timed (the fit's I/O: chunk reads, decoding, checks)."""

    def __init__(self, store):
        self._store, self.seconds, self.calls, self.rows = store, 0.0, 0, 0

    def __getattr__(self, name):
        return getattr(self._store, name)

    def __len__(self):
        return len(self._store)

    def read(self, rows):
        t0 = time.perf_counter()
        out = self._store.read(rows)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        self.rows += out[0].shape[0]
        return out


class _Prefix:
    """The first ``n`` rows of a store."""

    def __init__(self, store, n):
        self._store, self._n = store, n

    def __getattr__(self, name):
        return getattr(self._store, name)

    def __len__(self):
        return self._n

    def read(self, rows):
        if isinstance(rows, slice):
            rows = slice(*rows.indices(self._n))
        elif np.asarray(rows).size and int(np.max(rows)) >= self._n:
            raise IndexError("row beyond the prefix")
        return self._store.read(rows)


def fit(n: int) -> list[dict]:
    out = []
    for name, rows, options in FITS:
        row = H.spawn(Path(__file__), "fit", {"path": str(store_path(n)), "rows": rows and min(rows, n),
                                              "name": name, "options": options})
        out.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "history"}), flush=True)
    return out


# ----------------------------------------------------------------------------- output
def table(rows: list[dict], keys: list[str]) -> str:
    head = "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys)
    body = []
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k, "")
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        body.append("| " + " | ".join(cells) + " |")
    return head + "\n" + "\n".join(body)


def save(part: str, rows) -> None:
    out = HERE / "results" / f"store_io_{part}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": H.machine_line(), "rows": rows}, indent=1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", nargs="?", choices=("all", "build", "read", "fit"), default="all")
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--worker")
    parser.add_argument("--params")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(fit_worker(json.loads(args.params))))
        return 0
    print(H.machine_line())
    if args.part in ("all", "build") and (args.part == "build" or not store_path(args.n).exists()):
        row = build(args.n)
        save("build", [row])
        print(table([row], ["n", "dim", "array_bytes", "disk_bytes", "chunk_rows", "append_seconds", "write_GBps"]))
    if args.part in ("all", "read"):
        rows = read(args.n)
        save("read", rows)
        print(table(rows, ["what", "cache", "seconds", "array_GBps", "disk_GBps"]))
    if args.part in ("all", "fit"):
        rows = fit(args.n)
        save("fit", rows)
        print(table(rows, ["name", "n", "store_bytes", "memory_budget", "panel_rows", "reads", "wall_seconds",
                           "read_seconds", "io_share", "rss_before_mib", "peak_rss_mib", "rss_increment_mib",
                           "cpu_utilisation"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
