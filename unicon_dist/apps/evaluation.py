"""Evaluation of a fitted model: retrieval and classification on a store or on arrays.

What is measured on the evaluated rows (all rows, or a seeded random subset when there
are more than ``max_rows``: retrieval over n rows scores n² pairs):

- **instance retrieval** -- a query x_i must retrieve its own partner y_i among all
  evaluated y (and back): :func:`unicon_dist.retrieval_metrics`;
- **group retrieval** (stores with groups) -- any y_j with g_j = g_i counts;
- **class retrieval** (rows with labels) -- any y_j of the same class counts;
- **zero-shot classification** (labels and y-side class representations e_c, the store's
  auxiliary array ``label_embeddings_y``) -- predict argmax_c ⟨f(x_i), g(e_c)⟩;
- **prototype classification** (labels but no class representations) -- predict the
  class whose mean embedding of this store's y rows, (1/|c|) Σ_{j ∈ c} g(y_j), scores
  highest with f(x_i).  This uses the evaluated rows' labels, so it is *not* zero-shot.

Each is reported for the model and, when both views have the same dimension, for the
unaligned baseline: the identity map on L2-normalised inputs (cosine of raw features).
Top-k counts a query as correct when fewer than k candidates score strictly higher than
its best correct one (ties count in the query's favour, as in ``retrieval_metrics``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data.store import PairStore
from ..math.metrics import retrieval_metrics
from ..solver.estimator import UniCon

__all__ = [
    "evaluate_store", "evaluate_arrays", "format_evaluation", "subset_rows", "LABEL_EMBEDDINGS", "BASELINE",
    "DEFAULT_MAX_ROWS",
]

# rows evaluated at most unless told otherwise: retrieval over n rows scores n² pairs
DEFAULT_MAX_ROWS = 10_000
LABEL_EMBEDDINGS = "label_embeddings_y"
_CLASS_KS = (1, 5)
BASELINE = "unaligned (identity)"


def _normalise(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    return np.where(norms > 0, a / np.maximum(norms, np.finfo(np.float32).tiny), 0.0).astype(np.float32)


def _check_options(ks, block_rows, max_rows, seed):
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    if block_rows is not None and (isinstance(block_rows, bool) or not isinstance(block_rows, (int, np.integer))
                                   or block_rows < 1):
        raise ValueError(f"block_rows must be a positive integer or None, got {block_rows!r}")
    max_rows = DEFAULT_MAX_ROWS if max_rows is None else max_rows
    if isinstance(max_rows, bool) or not isinstance(max_rows, (int, np.integer)) or max_rows < 2:
        raise ValueError(f"max_rows must be an integer >= 2, got {max_rows!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    return tuple(sorted({int(k) for k in ks})), block_rows, int(max_rows), int(seed)


def subset_rows(n: int, max_rows: int, seed: int) -> np.ndarray | None:
    """The rows an evaluation of ``n`` rows takes: a sorted seeded sample of ``max_rows``, or None for all.

    Parameters
    ----------
    n : int
        Rows available.
    max_rows : int
        At most this many are evaluated.
    seed : int
        Seed of the sample (``numpy.random.default_rng``).

    Returns
    -------
    ndarray of int, shape (max_rows,), or None
        Sorted row indices; None when ``n <= max_rows`` (every row).
    """
    if n <= max_rows:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False))


def _load_model(model):
    if isinstance(model, (str, Path)):
        return UniCon.load(model)
    if not (hasattr(model, "encode_x") and hasattr(model, "encode_y")):
        raise TypeError(f"model must be a fitted model with encode_x and encode_y (or a saved UniCon's path), "
                        f"got {type(model).__name__}")
    # UniCon and the baselines say when they are not fitted; other encoders are taken as they are
    check_fitted = getattr(model, "check_fitted", None)
    if check_fitted is not None:
        check_fitted()
    return model


class _Collector:
    """Encodes blocks of rows and keeps what the metrics need (evaluated rows only)."""

    def __init__(self, model, baseline: bool):
        self.model = model
        self.baseline = baseline
        self.parts = {k: [] for k in ("zx", "zy", "bx", "by", "groups", "labels")}

    def add(self, x, y, groups=None, labels=None):
        p = self.parts
        p["zx"].append(np.asarray(self.model.encode_x(x), dtype=np.float32))
        p["zy"].append(np.asarray(self.model.encode_y(y), dtype=np.float32))
        if self.baseline:
            p["bx"].append(_normalise(x))
            p["by"].append(_normalise(y))
        if groups is not None:
            p["groups"].append(np.asarray(groups))
        if labels is not None:
            p["labels"].append(np.asarray(labels))

    def arrays(self) -> dict:
        return {k: (np.concatenate(v) if v else None) for k, v in self.parts.items()}


def _topk_accuracy(scores: np.ndarray, truth: np.ndarray, ks) -> dict:
    true_score = scores[np.arange(len(truth)), truth]
    higher = (scores > true_score[:, None]).sum(1)
    return {f"top{k}": float((higher < k).mean()) for k in ks}


def _class_prototypes(z: np.ndarray, codes: np.ndarray, n_classes: int, normalise: bool) -> np.ndarray:
    sums = np.zeros((n_classes, z.shape[1]), dtype=np.float64)
    np.add.at(sums, codes, z)
    means = (sums / np.bincount(codes, minlength=n_classes)[:, None]).astype(np.float32)
    return _normalise(means) if normalise else means


def _metrics(model, a: dict, *, ks, label_embeddings, label_names, baseline: bool) -> dict:
    """All metrics from the collected arrays of the evaluated rows."""
    name = f"UniCon r={model.rank}"
    reps = {name: (a["zx"], a["zy"])}
    if baseline:
        reps = {BASELINE: (a["bx"], a["by"]), **reps}
    out = {"methods": list(reps), "retrieval": {}}
    out["retrieval"]["instance"] = {m: retrieval_metrics(zx, zy, ks=ks) for m, (zx, zy) in reps.items()}
    if a["groups"] is not None:
        out["retrieval"]["group"] = {m: retrieval_metrics(zx, zy, ks=ks, groups=a["groups"])
                                     for m, (zx, zy) in reps.items()}
    labels = a["labels"]
    if labels is None:
        return out
    out["retrieval"]["class"] = {m: retrieval_metrics(zx, zy, ks=ks, groups=labels) for m, (zx, zy) in reps.items()}
    if label_embeddings is not None:
        E = np.asarray(label_embeddings)
        n_classes = E.shape[0]
        bad = np.flatnonzero((labels < 0) | (labels >= n_classes))
        if bad.size:
            raise ValueError(f"labels must index the {n_classes} rows of {LABEL_EMBEDDINGS}; "
                             f"label {int(labels[bad[0]])} is out of range")
        truth = labels.astype(np.int64)
        classes = {name: np.asarray(model.encode_y(E), dtype=np.float32)}
        if baseline:
            classes = {BASELINE: _normalise(E), **classes}
        kind, description = "zero-shot", (
            f"argmax over the {n_classes} classes of <f(x), g(e_c)>, e_c the rows of {LABEL_EMBEDDINGS}")
    else:
        values, truth = np.unique(labels, return_inverse=True)
        n_classes = len(values)
        cosine = str(model.similarity) == "cosine"
        classes = {m: _class_prototypes(zy, truth, n_classes, cosine or m == BASELINE)
                   for m, (_, zy) in reps.items()}
        kind, description = "prototype", (
            f"not zero-shot: argmax over the {n_classes} classes of <f(x), mean of g(y) over the class's rows "
            "of this same data>")
    ks_c = tuple(k for k in _CLASS_KS if k == 1 or k < n_classes)
    out["classification"] = {
        "kind": kind,
        "description": description,
        "n_classes": int(n_classes),
        "label_names": None if label_names is None else list(label_names),
        "accuracy": {m: _topk_accuracy(reps[m][0] @ classes[m].T, truth, ks_c) for m in reps},
    }
    return out


def _result(model, n: int, subset, seed: int, max_rows: int, ks, metrics: dict) -> dict:
    m = n if subset is None else len(subset)
    res = {"n_rows": int(n), "evaluated_rows": int(m), "ks": list(ks)}
    if subset is None:
        res["subset"] = None
    else:
        res["subset"] = {
            "seed": seed, "rows": int(m), "of": int(n),
            "note": (f"evaluated on a seeded random subset of {m:,} of the {n:,} rows (max_rows = {max_rows:,}, "
                     f"seed {seed}): retrieval over n rows scores n² pairs; every metric uses the same rows"),
        }
    res["model"] = {"rank": int(model.rank), "similarity": str(model.similarity),
                    "n_inputs_x": int(model.n_inputs_x_), "n_inputs_y": int(model.n_inputs_y_)}
    res.update(metrics)
    return res


def evaluate_store(model, store, *, ks=(1, 5, 10), block_rows=None, max_rows=None, seed: int = 0,
                   baseline: bool | None = None) -> dict:
    """Retrieval and classification metrics of ``model`` on the rows of a pair store.

    Parameters
    ----------
    model : UniCon or path
        A fitted model, or the ``.npz`` file of one.
    store : PairStore or path
        Opened read-only when a path; its dims must match the model's inputs.
    ks : sequence of int
        Recall cut-offs of the retrieval metrics.
    block_rows : int, optional
        Rows read and encoded at once (default: the store's chunk, via
        ``store.iter_blocks``).
    max_rows : int, optional
        At most this many rows are evaluated (default 10,000); larger stores are
        evaluated on a sorted random subset drawn with ``seed``, and the result says so.
    seed : int
        Seed of that subset.
    baseline : bool, optional
        Include the unaligned baseline (identity map, normalised); default: when
        ``dim_x == dim_y``.

    Returns
    -------
    dict
        ``n_rows``, ``evaluated_rows``, ``subset`` (None, or seed, rows and a note),
        ``ks``, ``model``, ``methods`` (row names), ``retrieval`` ("instance", and
        "group" and "class" where the store has groups or labels; each maps a method to
        ``retrieval_metrics`` output), and ``classification`` where the store has labels
        (``kind`` "zero-shot" when it holds ``label_embeddings_y``, else "prototype";
        ``accuracy`` maps a method to ``{"top1": ..., "top5": ...}``), plus ``store``.
    """
    ks, block_rows, max_rows, seed = _check_options(ks, block_rows, max_rows, seed)
    model = _load_model(model)
    if not isinstance(store, PairStore):
        store = PairStore.open(store, mode="r")
    if (store.dim_x, store.dim_y) != (model.n_inputs_x_, model.n_inputs_y_):
        raise ValueError(f"pair store {store.path} has dims (x {store.dim_x}, y {store.dim_y}); the model was "
                         f"fitted on (x {model.n_inputs_x_}, y {model.n_inputs_y_})")
    n = len(store)
    if n < 2:
        raise ValueError(f"pair store {store.path} has {n} rows; retrieval needs at least 2")
    if baseline is None:
        baseline = store.dim_x == store.dim_y
    has_labels = bool(getattr(store, "has_labels", False))
    label_embeddings = None
    if has_labels and LABEL_EMBEDDINGS in store.array_names():
        label_embeddings = store.get_array(LABEL_EMBEDDINGS)
        if label_embeddings.ndim != 2 or label_embeddings.shape[1] != store.dim_y:
            raise ValueError(f"pair store {store.path}: {LABEL_EMBEDDINGS} has shape {label_embeddings.shape}, "
                             f"expected (n_classes, {store.dim_y})")
    subset = subset_rows(n, max_rows, seed)
    collector = _Collector(model, baseline)
    if subset is None:
        for start, x, y, groups in store.iter_blocks(block_rows):
            labels = store.read_labels(slice(start, start + len(x))) if has_labels else None
            collector.add(x, y, groups, labels)
    else:
        step = block_rows or store.chunk_rows
        for i in range(0, len(subset), step):
            rows = subset[i:i + step]
            x, y, groups = store.read(rows)
            collector.add(x, y, groups, store.read_labels(rows) if has_labels else None)
    metrics = _metrics(model, collector.arrays(), ks=ks, label_embeddings=label_embeddings,
                       label_names=getattr(store, "label_names", None) if has_labels else None, baseline=baseline)
    return {"store": str(store.path), **_result(model, n, subset, seed, max_rows, ks, metrics)}


def evaluate_arrays(model, x, y, *, labels=None, groups=None, label_embeddings=None, label_names=None,
                    ks=(1, 5, 10), block_rows=None, max_rows=None, seed: int = 0,
                    baseline: bool | None = None) -> dict:
    """:func:`evaluate_store` on in-memory arrays.

    Parameters
    ----------
    model : UniCon or path
    x : array_like, shape (n, d_x)
    y : array_like, shape (n, d_y)
    labels : array_like of int, shape (n,), optional
        Class of each pair (class retrieval; prototype or zero-shot accuracy).
    groups : array_like of int, shape (n,), optional
        Positive groups (group retrieval).
    label_embeddings : array_like, shape (n_classes, d_y), optional
        y-side representation of each class; ``labels`` index its rows (zero-shot).
    label_names : sequence of str, optional
    ks, block_rows, max_rows, seed, baseline
        As in :func:`evaluate_store` (``block_rows`` default 4096).

    Returns
    -------
    dict
        As :func:`evaluate_store`, without ``store``.
    """
    ks, block_rows, max_rows, seed = _check_options(ks, block_rows, max_rows, seed)
    model = _load_model(model)
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must be 2-D with the same number of rows, got shapes {x.shape} and {y.shape}")
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"retrieval needs at least 2 pairs, got {n}")
    for name, v in (("labels", labels), ("groups", groups)):
        if v is not None and np.shape(v) != (n,):
            raise ValueError(f"{name} must have one entry per row ({n}), got shape {np.shape(v)}")
    if label_embeddings is not None:
        if labels is None:
            raise ValueError("label_embeddings need labels (the class of each row)")
        label_embeddings = np.asarray(label_embeddings)
        if label_embeddings.ndim != 2 or label_embeddings.shape[1] != y.shape[1]:
            raise ValueError(f"label_embeddings must have shape (n_classes, {y.shape[1]}), "
                             f"got {label_embeddings.shape}")
    if baseline is None:
        baseline = x.shape[1] == y.shape[1]
    subset = subset_rows(n, max_rows, seed)
    rows = np.arange(n) if subset is None else subset
    collector = _Collector(model, baseline)
    step = block_rows or 4096
    for i in range(0, len(rows), step):
        r = rows[i:i + step]
        collector.add(x[r], y[r], None if groups is None else np.asarray(groups)[r],
                      None if labels is None else np.asarray(labels)[r])
    metrics = _metrics(model, collector.arrays(), ks=ks, label_embeddings=label_embeddings,
                       label_names=label_names, baseline=baseline)
    return _result(model, n, subset, seed, max_rows, ks, metrics)


# --------------------------------------------------------------------------- printing
_TITLES = {
    "instance": "instance retrieval (a query must retrieve its own partner)",
    "group": "group retrieval (any partner in the query's group counts)",
    "class": "class retrieval (any partner of the query's class counts)",
}


def _table(rows: dict, keys: list[str]) -> list[str]:
    width = max(len(m) for m in rows)
    lines = [f"  {'':<{width}}  " + "  ".join(f"{k:>9}" for k in keys)]
    for m, values in rows.items():
        lines.append(f"  {m:<{width}}  " + "  ".join(f"{values[k]:>9.3f}" for k in keys))
    return lines


def format_evaluation(result: dict) -> str:
    """The result of :func:`evaluate_store` / :func:`evaluate_arrays` as text tables."""
    lines = []
    where = f" of {result['store']}" if result.get("store") else ""
    if result["subset"] is None:
        lines.append(f"evaluated all {result['evaluated_rows']:,} rows{where}")
    else:
        lines.append((f"{result['store']}: " if result.get("store") else "") + result["subset"]["note"])
    ks = result["ks"]
    keys = [f"{d}_R@{k}" for d in ("x2y", "y2x") for k in ks]
    for kind, rows in result["retrieval"].items():
        lines += ["", _TITLES.get(kind, kind) + ":"] + _table(rows, keys)
    cls = result.get("classification")
    if cls is not None:
        title = "zero-shot classification" if cls["kind"] == "zero-shot" else "prototype accuracy"
        lines += ["", f"{title} ({cls['description']}):"]
        first = next(iter(cls["accuracy"].values()))
        lines += _table(cls["accuracy"], list(first))
    return "\n".join(lines)
