"""What a study writes besides its run records: the tidy table and the plots.

``results.csv`` and ``results.parquet`` hold one row per run record in ``output/runs``
(:func:`flatten_record`), rewritten atomically after every point; ``plots/*.png`` are
drawn at the end (time against ``n``, error measures, loss and R@1 against each varying
numeric option).  pyarrow and matplotlib are imported only here, when writing.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

from ..io.artifacts import atomic_write
from .config_checks import is_int, is_number
from .jobs import atomic_write_text
from .study_config import Study, read_record

__all__ = ["flatten_record", "write_table", "table_rows", "make_plots"]

# leading columns of the tidy table; the rest follow in first-seen order
_LEAD = ("id", "status", "error")
_NOT_IN_TABLE = ("history", "traceback")


def _is_scalar(v) -> bool:
    return v is None or isinstance(v, (str, bool, int, float))


def flatten_record(record: dict) -> dict:
    """One table row from a run record.

    Nested dicts become dotted column names (``diagnostics.svd.spectral_gap``), lists of
    scalars JSON strings; lists holding dicts or lists (per-iteration histories), and
    ``history`` and ``traceback``, stay in the JSON only.
    """
    row = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, list):
            if all(_is_scalar(v) for v in value):
                row[prefix] = json.dumps(value)
        else:
            row[prefix] = value

    walk("", {k: v for k, v in record.items() if k not in _NOT_IN_TABLE})
    return row


def _columns(rows: list[dict], first=()) -> list[str]:
    seen = dict.fromkeys(c for c in (*_LEAD, *first) if any(c in r for r in rows))
    for r in rows:
        seen.update(dict.fromkeys(r))
    return list(seen)


def _arrow_column(values: list):
    import pyarrow as pa

    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return pa.array(values, pa.bool_())
    if present and all(is_int(v) for v in present):
        return pa.array(values, pa.int64())
    if present and all(is_number(v) for v in present):
        return pa.array([None if v is None else float(v) for v in values], pa.float64())
    return pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v) for v in values], pa.string())


def write_table(rows: list[dict], folder: Path, first=()) -> None:
    """``results.csv`` and ``results.parquet`` in ``folder``, each replaced atomically.

    Columns: ``id``, ``status``, ``error``, then ``first`` (the grid's columns), then the
    others in the order they first appear.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = _columns(rows, first)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        writer.writerow(["" if r.get(c) is None else r[c] for c in columns])
    atomic_write_text(folder / "results.csv", text.getvalue())
    table = pa.table({c: _arrow_column([r.get(c) for r in rows]) for c in columns})
    with atomic_write(folder / "results.parquet", "wb") as fh:
        pq.write_table(table, fh)


def table_rows(study: Study) -> list[dict]:
    """Rows of every run record in the folder: this grid's points in grid order, then the others by id."""
    order = {p.id: i for i, p in enumerate(study.points)}
    records = [r for r in map(read_record, sorted(study.runs.glob("*.json"))) if isinstance(r, dict) and "id" in r]
    records.sort(key=lambda r: (order.get(r["id"], len(order)), r["id"]))
    return [flatten_record(r) for r in records]


# --------------------------------------------------------------------------- plots
def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "", name)


def _finite(v) -> bool:
    return is_number(v) and math.isfinite(v)


def _line_plot(path: Path, rows: list[dict], x: str, y: str, by: list[str], xlabel: str, *, log_y: bool,
               log_x: bool | None = None) -> None:
    """``y`` against ``x``, one line per combination of the ``by`` columns (log x when ``log_x``,
    or by default when x spans more than a decade)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lines = {}
    for r in rows:
        if _finite(r.get(x)) and _finite(r.get(y)):
            lines.setdefault(" ".join(f"{c.removeprefix('options.')}={r.get(c)}" for c in by), []).append(
                (r[x], r[y]))
    if not lines:
        return
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, pts in sorted(lines.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label or None)
    xs = [p[0] for pts in lines.values() for p in pts]
    if min(xs) > 0 and (max(xs) / min(xs) > 10 if log_x is None else log_x):
        ax.set_xscale("log")
    ys = [p[1] for pts in lines.values() for p in pts]
    if log_y and min(ys) > 0:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(y)
    ax.set_title(f"{y} vs {xlabel}", fontsize="medium")
    ax.grid(True, which="both", alpha=0.3)
    if 1 < len(lines) <= 12:
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)


def make_plots(study: Study, rows: list[dict]) -> list[Path]:
    """The study's plots from its table rows (this grid's finished points); returns the files written.

    ``plots/time_vs_n.png`` when ``n`` varies, and ``plots/<metric>_vs_<option>.png`` for
    each error measure (``rel_error``/``residual`` columns), the loss and R@1 against each
    varying numeric option, one line per combination of the other varying options.

    Raises
    ------
    ImportError
        matplotlib is not installed.
    """
    import matplotlib  # noqa: F401 - the clear error first

    ids = {p.id for p in study.points}
    rows = [r for r in rows if r.get("status") == "ok" and r["id"] in ids]
    column = study.columns()
    varying = study.varying()
    folder = study.output / "plots"
    folder.mkdir(exist_ok=True)
    written = []
    if "n" in varying:
        by = [column[k] for k in varying if k != "n"]
        _line_plot(folder / "time_vs_n.png", rows, "n", "seconds", by, "n (rows fitted)", log_y=True, log_x=True)
        written.append(folder / "time_vs_n.png")
    metrics = sorted({c for r in rows for c in r if ("rel_error" in c or "residual" in c) and _finite(r[c])})
    metrics += [m for m in ("loss", "retrieval.R@1") if any(_finite(r.get(m)) for r in rows)]
    for p in varying:
        if p == "n" or not all(is_number(v) for v in study.grid[p]):
            continue
        by = [column[k] for k in varying if k != p]
        for m in metrics:
            path = folder / f"{_slug(m)}_vs_{p}.png"
            _line_plot(path, rows, column[p], m, by, p, log_y="rel_error" in m or "residual" in m)
            if path.exists():
                written.append(path)
    return [p for p in written if p.exists()]

