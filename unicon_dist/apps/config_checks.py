"""Checks shared by the TOML files of the apps layer: job files and study (grid) files.

Each check appends readable lines to a list of errors instead of raising, so a file's
loader can report every problem at once (see :func:`unicon_dist.apps.job_config.load_job`
and :func:`unicon_dist.apps.study_config.load_study`).
"""

from __future__ import annotations

import difflib
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..data.store import PairStore

__all__ = [
    "StoreInfo", "open_store", "read_toml", "split_tables", "unknown_keys", "resolve_path", "type_name", "is_int",
    "is_number",
]


def type_name(v) -> str:
    """The TOML name of a parsed value's type ("integer", "array", "table", ...)."""
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}.get(
        type(v), type(v).__name__
    )


def is_int(v) -> bool:
    """True for an integer that is not a boolean (TOML keeps them apart; Python does not)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    """True for an integer or float that is not a boolean."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def unknown_keys(table: str, keys, valid) -> list[str]:
    """One line per key of ``keys`` not in ``valid``, with the closest valid key as a hint."""
    out = []
    for k in keys:
        if k not in valid:
            close = difflib.get_close_matches(k, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            out.append(f"[{table}] unknown key {k!r}{hint}; valid keys: {', '.join(valid)}")
    return out


def split_tables(raw: dict, valid, errors: list[str]) -> dict:
    """The tables ``valid`` of a parsed TOML file ({} for an absent or malformed one),
    appending to ``errors`` a line per unknown top-level key and per key that is no table."""
    for key, value in raw.items():
        if key not in valid:
            errors.append(f"unknown table [{key}]; valid tables: {', '.join('[' + t + ']' for t in valid)}")
        elif not isinstance(value, dict):
            errors.append(f"{key} must be a table [{key}], got {type_name(value)}")
    return {t: raw.get(t, {}) if isinstance(raw.get(t, {}), dict) else {} for t in valid}


def read_toml(path: Path, kind: str, error: type) -> dict:
    """The parsed TOML file ``path``.

    Parameters
    ----------
    path : Path
    kind : str
        What the file is, for the missing-file message ("job", "grid").
    error : type
        Raised as ``error(path, [line])`` for a file that is not UTF-8 TOML
        (:class:`~unicon_dist.apps.job_spec.JobError` or a subclass).

    Raises
    ------
    FileNotFoundError
        No such file.
    """
    if not path.is_file():
        raise FileNotFoundError(f"no such {kind} file: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise error(path, [f"invalid TOML: {exc}"]) from None
    except UnicodeDecodeError as exc:
        raise error(path, [f"not UTF-8 text: {exc}"]) from None


def resolve_path(base: Path, value: str) -> Path:
    """``value`` as an absolute path, a relative one taken against ``base`` (the file's folder)."""
    p = Path(value).expanduser()
    return Path(os.path.abspath(p if p.is_absolute() else base / p))  # normalises "..", keeps symlinks


@dataclass(frozen=True)
class StoreInfo:
    """Schema of a pair store as read from its attributes (no rows are read)."""

    path: Path
    n_rows: int
    dim_x: int
    dim_y: int
    dtype: str
    chunk_rows: int
    has_groups: bool
    has_labels: bool

    @classmethod
    def from_store(cls, store) -> "StoreInfo":
        return cls(
            path=Path(store.path), n_rows=len(store), dim_x=store.dim_x, dim_y=store.dim_y, dtype=store.dtype,
            chunk_rows=store.chunk_rows, has_groups=store.has_groups,
            has_labels=bool(getattr(store, "has_labels", False)),
        )

    def describe(self) -> str:
        extras = [name for name, on in (("groups", self.has_groups), ("labels", self.has_labels)) if on]
        return (f"{self.path} ({self.n_rows:,} rows, x {self.dim_x} + y {self.dim_y} {self.dtype}"
                f"{', with ' + ' and '.join(extras) if extras else ''})")


def open_store(table: str, key: str, path: Path, errors: list[str]) -> StoreInfo | None:
    """The schema of the pair store at ``path`` (opened read-only), or None with a line in ``errors``."""
    if not path.exists():
        errors.append(f"[{table}] {key}: no pair store at {path}")
        return None
    try:
        store = PairStore.open(path, mode="r")
    except (ValueError, FileNotFoundError, OSError) as exc:
        errors.append(f"[{table}] {key}: {exc}")
        return None
    info = StoreInfo.from_store(store)
    if info.n_rows < 2:
        errors.append(f"[{table}] {key}: pair store {path} has {info.n_rows} rows; at least 2 pairs are needed")
    return info
