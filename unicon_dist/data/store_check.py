"""Consistency check of a pair store on disk (``unicon-dist check-store``), like ``fsck``.

:func:`check_store` reads a :class:`~unicon_dist.data.store.PairStore` chunk by chunk
(O(chunk) memory, O(n) time) through the store's own readers and reports every problem
it finds, each naming the array, the chunk key and the rows:

* the schema attributes (format, version, dims, dtype, chunk_rows, n_rows, flags,
  label_names, the auxiliary-array registry);
* the row arrays ``x``, ``y``, ``groups``, ``labels``: present, with the schema's dtype,
  width and chunking, and at least ``n_rows`` long;
* every chunk below ``n_rows`` of every row array: present, decodable (zstd frame
  checksums catch flipped bytes), float rows finite, labels within ``label_names``;
* every registered auxiliary array: present with its registered shape and dtype, and
  decodable;
* stray files: zarr write temporaries (``*.partial``, left by a killed write),
  auxiliary arrays that are not in the registry (left by an interrupted ``put_array``),
  and unknown files at the top level or among an array's chunks.  The writer lock file
  ``.writer.lock`` belongs there.

The check is a reader: it takes no lock and writes nothing.  It looks at the rows
committed when it starts; a writer running at the same time is noted in the report,
and its in-flight temporaries are then listed as notes, not problems.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import zarr

from .store import PairStore
from .store_format import AUX_GROUP, FORMAT, SCHEMA_VERSION, STORE_DTYPES
from .store_lock import LOCK_FILE, PARTIAL_FILE, describe_holder, partial_files, read_lock_holder
from .store_read import ChunkError, chunk_key

__all__ = ["check_store", "StoreProblem", "StoreCheckReport"]


@dataclass
class StoreProblem:
    """One finding of :func:`check_store`.

    Attributes
    ----------
    kind : str
        ``"schema"``, ``"array"`` (a row array missing or of the wrong layout),
        ``"short-array"`` (fewer rows than ``n_rows``), ``"missing-chunk"``,
        ``"corrupt-chunk"``, ``"non-finite"``, ``"label-range"``, ``"aux"``,
        ``"stray-partial"``, ``"stray-aux"`` or ``"stray-file"``.
    message : str
        What is wrong, naming the place.
    array : str or None
        The array concerned (``"x"``, ..., or an auxiliary array's name).
    chunk : int or None
        Chunk index along the rows.
    key : str or None
        Store key of the chunk or file, relative to the store.
    rows : list of int or None
        ``[first, last]`` committed rows concerned.
    """

    kind: str
    message: str
    array: str | None = None
    chunk: int | None = None
    key: str | None = None
    rows: list[int] | None = None


@dataclass
class StoreCheckReport:
    """What :func:`check_store` found.

    Attributes
    ----------
    path : str
        The store.
    n_rows : int or None
        Committed rows (None when the attribute itself is unusable).
    chunk_rows : int or None
    row_arrays : list of str
        Row arrays whose chunks were checked.
    chunks_checked : int
        Chunks read and decoded, over all row arrays.
    aux_arrays : list of str
        Registered auxiliary arrays checked.
    problems : list of StoreProblem
        Everything wrong; empty for a sound store.
    notes : list of str
        Facts that are not damage (a writer running, uncommitted rows past ``n_rows``).
    """

    path: str
    n_rows: int | None = None
    chunk_rows: int | None = None
    row_arrays: list[str] = field(default_factory=list)
    chunks_checked: int = 0
    aux_arrays: list[str] = field(default_factory=list)
    problems: list[StoreProblem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def to_dict(self) -> dict:
        """JSON-serialisable form (``ok`` included)."""
        return {**asdict(self), "ok": self.ok}

    def format(self) -> str:
        """The report as text: counts, notes, then one line per problem."""
        rows = "?" if self.n_rows is None else f"{self.n_rows:,}"
        lines = [f"pair store {self.path}",
                 f"  rows: {rows} committed, chunk_rows {self.chunk_rows if self.chunk_rows is not None else '?'}",
                 f"  checked: {len(self.row_arrays)} row arrays ({', '.join(self.row_arrays) or 'none'}), "
                 f"{self.chunks_checked:,} chunks; {len(self.aux_arrays)} auxiliary "
                 f"array{'s' * (len(self.aux_arrays) != 1)}"
                 + (f" ({', '.join(self.aux_arrays)})" if self.aux_arrays else "")]
        lines += [f"  note: {n}" for n in self.notes]
        if self.problems:
            lines.append(f"  problems: {len(self.problems)}")
            lines += [f"    {p.kind}: {p.message}" for p in self.problems]
            lines.append(f"result: DAMAGED ({len(self.problems)} problem{'s' * (len(self.problems) != 1)})")
        else:
            lines.append("result: OK")
        return "\n".join(lines)


def check_store(path) -> StoreCheckReport:
    """Check a pair store on disk and return every problem found (see the module docstring).

    Parameters
    ----------
    path : str or Path
        The store directory.

    Returns
    -------
    StoreCheckReport
        ``report.ok`` is True for a sound store; ``report.problems`` lists the damage.

    Raises
    ------
    FileNotFoundError
        Nothing exists at ``path``.
    ValueError
        ``path`` is not a pair store (no Zarr v3 group with the pair-store format
        attribute).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no pair store at {path}")
    attrs = _group_attrs(path)
    rep = StoreCheckReport(path=str(path))
    schema = _check_schema(attrs, rep)
    running = _note_writer(path, rep)
    if schema is None:  # without dims, dtype, chunk_rows and n_rows there is nothing to read by
        _check_strays(path, attrs, rep, None, running)
        return rep
    n, ch = schema["n_rows"], schema["chunk_rows"]
    rep.n_rows, rep.chunk_rows = n, ch
    group = zarr.open_group(path, mode="r", zarr_format=3)
    arrays, limits = _open_row_arrays(group, schema, rep)
    store = PairStore(path, group, "r", arrays=arrays)
    for name in arrays:
        _check_chunks(store, name, limits[name], schema, rep)
    _check_aux(store, schema["aux"], rep)
    _check_strays(path, attrs, rep, schema["aux"], running)
    return rep


# ---------------------------------------------------------------------- pieces
def _group_attrs(path: Path) -> dict:
    meta_file = path / "zarr.json"
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} is not a pair store (no {meta_file.name})") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a pair store ({meta_file} unreadable: {exc})") from None
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
        raise ValueError(f"{path} is not a pair store (no Zarr v3 group in {meta_file})")
    attrs = meta.get("attributes")
    if not isinstance(attrs, dict) or attrs.get("format") != FORMAT:
        got = attrs.get("format") if isinstance(attrs, dict) else None
        raise ValueError(f"{path} is not a pair store (format attribute {got!r})")
    return attrs


def _is_count(v, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _check_schema(attrs: dict, rep: StoreCheckReport) -> dict | None:
    """The usable schema, or None when the rows cannot be read; problems go to ``rep``."""
    def bad(message):
        rep.problems.append(StoreProblem("schema", f"attribute {message}", key="zarr.json"))

    if attrs.get("schema_version") != SCHEMA_VERSION:
        bad(f"schema_version is {attrs.get('schema_version')!r}; this unicon_dist reads version {SCHEMA_VERSION}")
        return None
    fatal = False
    for name, low in (("dim_x", 1), ("dim_y", 1), ("chunk_rows", 1), ("n_rows", 0)):
        if not _is_count(attrs.get(name), low):
            bad(f"{name} is {attrs.get(name)!r}, not an integer >= {low}")
            fatal = True
    if attrs.get("dtype") not in STORE_DTYPES:
        bad(f"dtype is {attrs.get('dtype')!r}, not one of {list(STORE_DTYPES)}")
        fatal = True
    flags = {}
    for name, default in (("has_groups", None), ("has_labels", False)):
        v = attrs.get(name, default)
        if not isinstance(v, bool):
            bad(f"{name} is {v!r}, not true/false")
            fatal = True
        flags[name] = v
    names = attrs.get("label_names")
    if names is not None:
        if not (isinstance(names, list) and names and all(isinstance(v, str) for v in names)):
            bad(f"label_names is {names!r}, not a non-empty list of strings")
            names = None
        elif flags["has_labels"] is False:
            bad("label_names is set but the store has no labels (has_labels false)")
    registry = attrs.get("aux", {})
    if not isinstance(registry, dict):
        bad(f"aux (the auxiliary-array registry) is {type(registry).__name__}, not a mapping")
        registry = {}
    good = {}
    for name, entry in registry.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("path"), str)
                and entry["path"].startswith(f"{AUX_GROUP}/") and isinstance(entry.get("shape"), list)
                and isinstance(entry.get("dtype"), str)):
            bad(f"aux entry {name!r} is {entry!r}, not {{'path': 'aux/...', 'shape': [...], 'dtype': ...}}")
        else:
            good[name] = entry
    for name, kind in (("appends", list), ("history", list), ("provenance", dict)):
        if name in attrs and not isinstance(attrs[name], kind):
            bad(f"{name} is {type(attrs[name]).__name__}, not a {kind.__name__}")
    if fatal:
        return None
    return {"n_rows": attrs["n_rows"], "chunk_rows": attrs["chunk_rows"], "dim_x": attrs["dim_x"],
            "dim_y": attrs["dim_y"], "dtype": attrs["dtype"], "label_names": names, "aux": good, **flags}


def _expected_arrays(schema: dict) -> dict:
    """name -> (stored dtype, row width or None for 1-D)."""
    stored = "uint16" if schema["dtype"] == "bfloat16" else schema["dtype"]
    out = {"x": (stored, schema["dim_x"]), "y": (stored, schema["dim_y"])}
    if schema["has_groups"]:
        out["groups"] = ("int64", None)
    if schema["has_labels"]:
        out["labels"] = ("int64", None)
    return out


def _open_row_arrays(group, schema: dict, rep: StoreCheckReport):
    """Arrays fit to read chunk by chunk, and the rows of each that can be checked."""
    n, ch = schema["n_rows"], schema["chunk_rows"]
    arrays, limits = {}, {}
    for name, (dtype, width) in _expected_arrays(schema).items():
        try:
            arr = group[name]
        except KeyError:
            rep.problems.append(StoreProblem("array", f"array {name!r} is missing", array=name, key=name))
            continue
        except (ValueError, TypeError, OSError) as exc:  # unreadable array metadata
            rep.problems.append(StoreProblem("array", f"array {name!r} has unreadable metadata: {exc}",
                                             array=name, key=f"{name}/zarr.json"))
            continue
        if not isinstance(arr, zarr.Array):
            rep.problems.append(StoreProblem("array", f"{name!r} is a group, not an array", array=name, key=name))
            continue
        tail, chunks = ((width,), (ch, width)) if width is not None else ((), (ch,))
        wrong = []
        if str(arr.dtype) != dtype:
            wrong.append(f"dtype {arr.dtype} (expected {dtype})")
        if tuple(arr.shape[1:]) != tail:
            wrong.append(f"shape {arr.shape} (expected (rows{''.join(f', {t}' for t in tail)}))")
        if tuple(arr.chunks) != chunks:
            wrong.append(f"chunks {arr.chunks} (expected {chunks})")
        if wrong:
            rep.problems.append(StoreProblem("array", f"array {name!r} has {', '.join(wrong)}", array=name,
                                             key=f"{name}/zarr.json"))
            continue
        if arr.shape[0] < n:
            rep.problems.append(StoreProblem(
                "short-array", f"array {name!r} has {arr.shape[0]:,} rows but n_rows is {n:,}: committed rows "
                f"{arr.shape[0]}\u2013{n - 1} are not stored", array=name, key=f"{name}/zarr.json",
                rows=[int(arr.shape[0]), n - 1]))
        elif arr.shape[0] > n:
            rep.notes.append(f"array {name!r} holds {arr.shape[0] - n:,} uncommitted rows past n_rows "
                             "(an interrupted append; the next append overwrites them)")
        arrays[name] = arr
        limits[name] = min(n, arr.shape[0])
    return arrays, limits


def _check_chunks(store: PairStore, name: str, limit: int, schema: dict, rep: StoreCheckReport) -> None:
    """Read every chunk of ``name`` below ``limit`` with the store's own reader."""
    ch = schema["chunk_rows"]
    names = schema["label_names"] if name == "labels" else None
    rep.row_arrays.append(name)
    for c in range(-(-limit // ch)):
        a, b = c * ch, min(limit, (c + 1) * ch)
        rep.chunks_checked += 1
        try:
            out = store._read_array(name, slice(a, b), np.arange(a, b), [c])
        except ChunkError as exc:
            kind = {"missing": "missing-chunk", "corrupt": "corrupt-chunk"}.get(exc.reason, exc.reason)
            rep.problems.append(StoreProblem(kind, f"array {name!r} chunk {c} (key {exc.key!r}, rows "
                                             f"{a}\u2013{b - 1}): {exc.detail}", array=name, chunk=c,
                                             key=exc.key, rows=[a, b - 1]))
            continue
        except (ValueError, OSError) as exc:
            key = chunk_key(store._arrays[name], c)
            rep.problems.append(StoreProblem("corrupt-chunk", f"array {name!r} chunk {c} (key {key!r}, rows "
                                             f"{a}\u2013{b - 1}): {exc}", array=name, chunk=c, key=key,
                                             rows=[a, b - 1]))
            continue
        if names is not None:
            bad = np.flatnonzero((out < 0) | (out >= len(names)))
            if bad.size:
                shown = ", ".join(str(int(r) + a) for r in bad[:5])
                more = f" and {bad.size - 5} more" if bad.size > 5 else ""
                key = chunk_key(store._arrays[name], c)
                rep.problems.append(StoreProblem(
                    "label-range", f"array 'labels' chunk {c} (key {key!r}, rows {a}\u2013{b - 1}): labels "
                    f"outside [0, {len(names)}) (the store's label_names) in rows {shown}{more}: values "
                    f"{out[bad[:5]].tolist()}", array=name, chunk=c, key=key, rows=[a + int(bad[0]), a + int(bad[-1])]))


def _check_aux(store: PairStore, registry: dict, rep: StoreCheckReport) -> None:
    for name in sorted(registry):
        entry = registry[name]
        rep.aux_arrays.append(name)
        try:
            out = store.get_array(name)  # presence, registered shape, chunk files, decoding, finiteness
        except (ValueError, OSError) as exc:
            rep.problems.append(StoreProblem("aux", str(exc).removeprefix(f"pair store {store.path}: "),
                                             array=name, key=entry["path"]))
            continue
        if out.dtype.name != entry["dtype"]:
            rep.problems.append(StoreProblem("aux", f"auxiliary array {name!r} ({entry['path']}) has dtype "
                                             f"{out.dtype.name}, the registry says {entry['dtype']}",
                                             array=name, key=entry["path"]))


def _note_writer(path: Path, rep: StoreCheckReport) -> bool:
    """Note whether a writer holds the lock now (a non-blocking probe) or died holding it."""
    lock = path / LOCK_FILE
    if not lock.exists():
        return False
    held = False
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        # a shared lock for an instant: the check never waits, and a writer that asks
        # in that instant gets the lock at the unlock that follows
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        held = True
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF, errno.EINVAL):
            raise
    finally:
        os.close(fd)
    holder = read_lock_holder(lock)
    if held:
        rep.notes.append(f"a writer is running: the lock is held {describe_holder(holder)}; rows it commits "
                         "after this check started are not checked")
    elif holder is not None:
        who = describe_holder(holder).removeprefix("by ")
        rep.notes.append(f"the last writer did not finish cleanly (it was {who}); the next writer removes the "
                         "temporaries it left")
    return held


_CHUNK_2D = re.compile(r"c/\d+/0")
_CHUNK_1D = re.compile(r"c/\d+")


def _check_strays(path: Path, attrs: dict, rep: StoreCheckReport, registry: dict | None, running: bool) -> None:
    """Temporaries, unregistered auxiliary arrays (not when ``registry`` is None:
    unusable) and unknown files."""
    for f in partial_files(path):
        key = f.relative_to(path).as_posix()
        if running:
            rep.notes.append(f"{key}: a write temporary, probably of the running writer")
        else:
            rep.problems.append(StoreProblem("stray-partial", f"{key}: a write temporary left by an interrupted "
                                             "write (the next writer removes it)", key=key))
    expected = {"zarr.json", LOCK_FILE, "x", "y", AUX_GROUP}
    for name in ("groups", "labels"):
        if attrs.get(f"has_{name}", False) is not False:  # true, or unusable (reported as a schema problem)
            expected.add(name)
    partial = PARTIAL_FILE.fullmatch  # reported above
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.name not in expected and not partial(entry.name):
            what = "directory" if entry.is_dir() else "file"
            why = (f" (the store was created with has_{entry.name} false)" if entry.name in ("groups", "labels")
                   else "")
            rep.problems.append(StoreProblem("stray-file", f"{entry.name}: unknown {what} at the top level{why}",
                                             key=entry.name))
    for name, pattern in (("x", _CHUNK_2D), ("y", _CHUNK_2D), ("groups", _CHUNK_1D), ("labels", _CHUNK_1D)):
        if name not in expected or not (path / name).is_dir():
            continue
        for dirpath, _, files in os.walk(path / name):
            for f in files:
                rel = (Path(dirpath) / f).relative_to(path / name).as_posix()
                if rel != "zarr.json" and not pattern.fullmatch(rel) and not partial(f):
                    rep.problems.append(StoreProblem("stray-file", f"{name}/{rel}: not a chunk of array {name!r}",
                                                     array=name, key=f"{name}/{rel}"))
    aux = path / AUX_GROUP
    if registry is not None and aux.is_dir():
        live = {e["path"].split("/", 1)[1] for e in registry.values()}
        for entry in sorted(os.scandir(aux), key=lambda e: e.name):
            if entry.name == "zarr.json" or partial(entry.name):
                continue
            if entry.is_dir() and entry.name not in live:
                rep.problems.append(StoreProblem(
                    "stray-aux", f"{AUX_GROUP}/{entry.name}: an auxiliary array not in the registry (left by an "
                    "interrupted put_array; the next put_array removes it)", key=f"{AUX_GROUP}/{entry.name}"))
            elif not entry.is_dir():
                rep.problems.append(StoreProblem("stray-file", f"{AUX_GROUP}/{entry.name}: unknown file in "
                                                 f"{AUX_GROUP}/", key=f"{AUX_GROUP}/{entry.name}"))
