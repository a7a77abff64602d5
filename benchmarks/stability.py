"""Benchmark: the error of UniCon's solves against the same solve in float64 (issue 8).

Every configuration is solved twice on Fashion-MNIST halves (392 + 392 pixels, seeded
training subsets): as configured (tiles in float32 unless the row says otherwise, inputs in
their storage precision) and in float64 (``dtype="float64"``, float64 inputs: the exact
pixel values k/255).  Rank r = 32; each of the two solves runs to its own certified fixed
point (issue 18): the library's default solver (safeguarded Anderson), its default ``tol``
(1e-5 on the residual of float32 tiles, 1e-7 for the float64 solve), ``max_iter`` 40; the
library's defaults otherwise.  Recorded per row:

- per solve: ``converged_``, ``stop_reason_``, ``n_iter_``, ``tol_``, the residual of the last
  iterate (``history_[-1]["residual"]``, the fixed-point certificate), the smallest residual
  and that of the iterate kept (``best_iteration_``); a solve that stops at ``max_iter`` is
  marked "no (its last residual)";

- the verifier's relative error of C and of its top-r singular values
  (``UniCon(verify=...)``: the working operator against its float64 twin over the same
  inputs and encoders, ``diagnostics_["verify"]``);
- the error of the solution against the float64 solve: ‖W − W₆₄‖_F/‖W₆₄‖_F and the largest
  principal angle between the column (and row) spaces of W and W₆₄, both in the model's
  feature coordinates; the same two measures for the test embeddings, which are
  coordinate-free: the unnormalised score matrix Z_x Z_yᵀ = Φ̃_x W Φ̃_yᵀ of 2,000 seeded test
  pairs ("emb err") and the span of Z_x (and Z_y) in R^2000 ("emb angle"), evaluated in
  float64 from each model's maps and factors; and the change of the test mean R@1
  (``retrieval_metrics`` on ``encode_x``/``encode_y``, in the inputs' precision);
- ``diagnostics_``: Nyström spectrum of K_LL, whitening spectrum, last-step spectral gap and
  log-sum-exp range, log-space batches, safeguards fired;
- whether the solve broke: an exception, non-finite W or loss, or an embedding error > 0.5.

Nyström feature bases (eigenvectors of K_LL) are defined up to signs and rotations, so the
W columns are only comparable for the linear kernel; for RBF rows the embedding columns
are the measure.

Sweeps (``run`` takes any of them; default all):

``precision``
    Input storage float64 / float32 / float16 / bfloat16 (``study.round_to_storage``) ×
    tile dtype float32 / float64; linear kernel, n = 4,000.  All against the float64 solve
    of the unrounded inputs (the verifier only sees the tile arithmetic).
``tau``
    τ ∈ {1, 0.3, 0.1, 0.05, 0.03, 0.01}, cosine similarity; and τ = 0.01 with
    ``similarity="dot"`` (whose |s|/τ overflows float32 at every τ tried, 0.05 to 0.01: one
    row suffices, and each costs about two minutes).  float32 tiles, linear, n = 4,000.
``n``
    n ∈ {1,000, 4,000, 10,000} with full negatives (the six-step map's 16,000 and 60,000 with
    ``negatives=4096`` are left out: at 40 iterations a solve they cost more than the rest).
``nystrom``
    RBF kernel (median-heuristic bandwidth), ``n_landmarks`` ∈ {128, 512, 2048} ×
    ``eig_floor`` ∈ {0, 1e-12, 1e-10, 1e-8, 1e-6, 1e-4}, n = 4,000 (the six-step map's
    m = 2048 and its svd check are left out for time; ``Scale.landmarks`` brings them back).  Floors that drop the
    same eigenvalues of K_LL as another floor (in both the float32 and the float64 solve)
    give the same map bit for bit, hence the same solve: such rows are solved once and say
    ``same as``.  At m = 2048 the verifier compares a seeded sample of 16 tiles (each of its
    tiles forms a 2048 × 2048 part of C: the full check costs 22 s).  Also ``svd="exact"``
    against ``svd="auto"`` (which picks the matrix-free randomized SVD above 1024 features) at
    m = 2048: the first step in float64 and the full float32 solve, how far apart the two
    rank-r solutions are and what each reaches (loss, R@1, seconds).
``bandwidth``
    RBF with bandwidth c × h, h the median-heuristic bandwidth of each view (as
    ``Kernel.resolve`` sets it on the training rows), c ∈ {0.1, 0.3, 1, 3, 10, 30};
    512 landmarks, default floor, n = 4,000.  c = 1 is ``kernel="rbf"`` itself (resolved in
    each fit), the solve of ``nystrom`` at m = 512 and the default floor.
``duplicates``
    Nyström maps built with ``NystroemMap.from_landmarks`` from 512 uniform landmarks of which
    20 % are replaced by copies of other landmarks plus δ·N(0, 1) (δ ∈ {0, 1e-8, 1e-6, 1e-4,
    1e-2}; per view, seeded), eig_floor 1e-10 (default) and 0; n = 4,000.  The maps'
    features (float64, like ``transform``) are fitted with the linear kernel, as the model
    does inside: float32 storage of the inputs and landmarks for the working solve, float64
    for the reference.
``safeguards``
    What each safeguard buys: log-space statistics off (``CrossProductOperator._direct``
    patched to return True in this process, for the working solve only) where a solve of
    ``tau`` used them; float64 accumulation of C against summing the tile products
    (``tile_keys``/``tile_product``) in float32, at the encoders of the n = 4,000 baseline
    on 10,000 and 60,000 rows (full negatives); whitening off (``whiten=None``).  The
    eigenvalue floor's rows are those of ``duplicates``.

Usage::

    flock /tmp/bench.lock python benchmarks/stability.py run   # all sweeps (wall time: RESULTS §9)
    python benchmarks/stability.py run tau safeguards   # some; rows merge into the JSON by sweep
    python benchmarks/stability.py run --quick          # smoke run -> results/stability_quick.json
    python benchmarks/stability.py report               # Markdown tables + results/stability_<sweep>.png
    # the tau sweep with room to converge: 120 iterations, tol 1e-5 for the float64 solves too
    flock /tmp/bench.lock python benchmarks/stability.py run tau --max-iter 120 --ref-tol 1e-5 \
        --out stability_tau_long.json
    python benchmarks/stability.py report --out stability_tau_long.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _harness as H  # noqa: E402

H.use_checkout()

import torch  # noqa: E402

import unicon_dist as ud  # noqa: E402
from unicon_dist.data.datasets import load_fashion_mnist_halves  # noqa: E402
from unicon_dist.math.kernels import Kernel  # noqa: E402
from unicon_dist.math.nystrom import NystroemMap, uniform_landmarks  # noqa: E402
from unicon_dist.data.rows import embed  # noqa: E402
from unicon_dist.solver.operator import CrossProductOperator  # noqa: E402
from unicon_dist.apps.study import round_to_storage  # noqa: E402

SWEEPS = ("precision", "tau", "n", "nystrom", "bandwidth", "duplicates", "safeguards")
STORAGES = ("float64", "float32", "float16", "bfloat16")
TAUS = (1.0, 0.3, 0.1, 0.05, 0.03, 0.01)
DOT_TAUS = (0.01,)
FLOORS = (0.0, 1e-12, 1e-10, 1e-8, 1e-6, 1e-4)
DEFAULT_FLOOR = 1e-10
BANDWIDTH_FACTORS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
DELTAS = (0.0, 1e-8, 1e-6, 1e-4, 1e-2)
DUP_FRACTION = 0.2
BROKEN = 0.5  # an embedding error above this counts as a broken solve
SEED = 0


@dataclass(frozen=True)
class Scale:
    """Sizes of a run: the full benchmark or the smoke run (``--quick``)."""

    n: int = 4_000  # 10,000 in the six-step map: cut so that every solve can run 40 iterations
    n_test: int = 2_000
    sizes: tuple = (1_000, 4_000, 10_000)
    batched_from: int = 60_000  # n at which negatives=4096 replaces full negatives
    landmarks: tuple = (128, 512)
    sampled_from: int = 2048  # landmarks from which the verifier samples tiles
    sample_tiles: int = 16
    bandwidth_landmarks: int = 512
    dup_n: int = 4_000
    dup_landmarks: int = 512
    accumulation_n: tuple = (10_000, 60_000)
    rank: int = 32
    max_iter: int = 40  # each solve stops at its certified fixed point (default tol) or here
    svd_check_from: int = 1025  # landmarks from which ``svd_check`` runs (svd="auto" is randomized there)
    ref_tol: float | None = None  # tol of the float64 solve (None: the library's 1e-7)

    def base(self) -> dict:
        return dict(rank=self.rank, max_iter=self.max_iter, seed=SEED)


FULL = Scale()
QUICK = Scale(n=1_500, n_test=500, sizes=(500, 1_500, 3_000), batched_from=3_000, landmarks=(64, 128),
              sampled_from=128, sample_tiles=2, bandwidth_landmarks=64, dup_n=1_000, dup_landmarks=64,
              accumulation_n=(1_500, 3_000), rank=8, max_iter=8, svd_check_from=128)


# ----------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=None)
def fashion(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Left and right halves as exact float64 pixel values k/255 (the loader's float32 arrays
    hold k/255 rounded to float32; k is recovered exactly)."""
    left, right, _ = load_fashion_mnist_halves(split)
    return tuple(np.round(a.astype(np.float64) * 255.0) / 255.0 for a in (left, right))


def train_rows(n: int) -> np.ndarray:
    total = len(fashion("train")[0])
    return np.arange(total) if n >= total else np.sort(np.random.default_rng([SEED, n]).choice(total, n, replace=False))


def test_rows(n_test: int) -> np.ndarray:
    total = len(fashion("test")[0])
    return np.sort(np.random.default_rng([SEED, 1, n_test]).choice(total, n_test, replace=False))


@dataclass
class Inputs:
    """Training and test arrays of the working solve and of its float64 reference."""

    work: tuple  # (X, Y, X_test, Y_test)
    ref: tuple
    work_key: str
    ref_key: str
    info: dict = field(default_factory=dict)


@functools.lru_cache(maxsize=None)
def stored(n: int, n_test: int, storage: str) -> Inputs:
    """Fashion-MNIST rows as stored in ``storage`` (work) and exact in float64 (reference)."""
    X, Y = (a[train_rows(n)] for a in fashion("train"))
    Xt, Yt = (a[test_rows(n_test)] for a in fashion("test"))
    ref = (X, Y, Xt, Yt)
    return Inputs(tuple(round_to_storage(a, storage) for a in ref), ref, f"fashion n={n} storage={storage}",
                  f"fashion n={n} storage=float64")


def _duplicated_landmarks(A: np.ndarray, m: int, delta: float, fraction: float, seed) -> np.ndarray:
    """m uniform landmark rows of A, ``fraction`` of them replaced by copies of the others + δ·N(0, 1)."""
    L = A[uniform_landmarks(len(A), m, SEED)].copy()
    k = int(round(fraction * m))
    if k:
        rng = np.random.default_rng(seed)
        replaced = rng.choice(m, k, replace=False)
        source = rng.choice(np.setdiff1d(np.arange(m), replaced), k)
        L[replaced] = L[source] + delta * rng.standard_normal((k, A.shape[1]))
    return L


@functools.lru_cache(maxsize=None)
def duplicated(n: int, n_test: int, m: int, fraction: float, delta: float, floor: float) -> Inputs:
    """Features of Nyström maps with duplicated landmarks: the working side maps float32-stored
    inputs through landmarks rounded to float32, the reference float64 ones through float64
    landmarks (each with its own median-heuristic bandwidth, as a fit would)."""
    base = stored(n, n_test, "float32")
    sides, info = {}, {}
    for name, arrays in (("work", base.work), ("ref", base.ref)):
        dtype = torch.float32 if name == "work" else torch.float64
        feats = [], []
        for v in range(2):
            A = arrays[v]
            L = _duplicated_landmarks(base.ref[v], m, delta, fraction, [SEED, v, 7])
            kernel = ud.get_kernel("rbf").resolve(torch.as_tensor(A), seed=SEED)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # the floor's warning: recorded below
                fmap = NystroemMap.from_landmarks(kernel, L.astype(A.dtype), floor)
            info[f"{name}_{'xy'[v]}"] = fmap.spectrum
            for i, M in enumerate((A, arrays[v + 2])):
                feats[i].append(fmap.transform(torch.as_tensor(M), dtype=dtype).numpy())
        sides[name] = (feats[0][0], feats[0][1], feats[1][0], feats[1][1])
    key = f"duplicated n={n} m={m} fraction={fraction} delta={delta:g} floor={floor:g}"
    return Inputs(sides["work"], sides["ref"], key + " float32", key + " float64", info)


# ----------------------------------------------------------------------------- solving
@dataclass
class Solve:
    """One fit: its JSON record, and (when it did not raise) the model and test embeddings."""

    record: dict
    model: object = None
    zx: np.ndarray | None = None  # unnormalised test embeddings Φ̃F1ᵀ, float64
    zy: np.ndarray | None = None


def jsonable(value):
    if isinstance(value, Kernel):
        return value.params()
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


@contextlib.contextmanager
def patched(patch: str | None):
    """``no-log-space``: pass 1 always takes the direct (plain e^{s/τ}) path."""
    if patch is None:
        yield
        return
    if patch != "no-log-space":
        raise ValueError(f"unknown patch {patch!r}")
    saved = CrossProductOperator._direct
    CrossProductOperator._direct = lambda self, U: True
    try:
        yield
    finally:
        CrossProductOperator._direct = saved


def _raw_embeddings(model, A: np.ndarray, side: str) -> np.ndarray:
    """Φ̃(A) Fᵀ in float64 (before the cosine normalisation)."""
    fmap, F = (model.map_x_, model.F1_) if side == "x" else (model.map_y_, model.F2_)
    A = torch.as_tensor(A)
    phi = A.double() if fmap is None else fmap.transform(A, dtype=torch.float64)
    return (phi @ torch.as_tensor(F, dtype=torch.float64).T).numpy()


def solve(options: dict, arrays: tuple, patch: str | None = None) -> Solve:
    X, Y, Xt, Yt = arrays
    rec = {"options": jsonable(options), "patch": patch, "input_dtype": str(X.dtype)}
    model = None
    with warnings.catch_warnings(record=True) as caught, patched(patch), H.Timer() as t:
        warnings.simplefilter("always")
        try:
            model = ud.UniCon(**options).fit(X, Y)
        except Exception as exc:  # a solve that breaks is a result here: recorded with its message
            rec["error"] = f"{type(exc).__name__}: {exc}"
    rec.update(seconds=t.seconds, cpu_utilisation=t.utilisation,
               warnings=sorted({str(w.message)[:400] for w in caught}))
    if model is None:
        return Solve(rec)
    history = model.history_
    residuals = [h["residual"] for h in history]
    finite_res = [r for r in residuals if r is not None and math.isfinite(r)]
    rec.update(converged=bool(model.converged_), tol=model.tol_, residual=residuals[-1],
               min_residual=min(finite_res) if finite_res else None,
               kept_residual=residuals[model.best_iteration_ - 1], residuals=residuals,
               steps=[h.get("step") for h in history])
    rec.update(n_iter=model.n_iter_, stop_reason=model.stop_reason_, best_iteration=model.best_iteration_,
               loss=model.loss_, initial_loss=model.initial_loss_, losses=[h["loss"] for h in history],
               iteration_seconds=[h["seconds"] for h in history],
               n_features=[model.n_features_x_, model.n_features_y_], svd_solver=model.svd_solver_,
               diagnostics=jsonable(model.diagnostics_))
    finite = bool(np.isfinite(model.W_).all() and math.isfinite(model.loss_))
    rec["finite"] = finite
    if not finite:
        return Solve(rec, model)
    zx, zy = _raw_embeddings(model, Xt, "x"), _raw_embeddings(model, Yt, "y")
    ex, ey = model.encode_x(Xt), model.encode_y(Yt)
    if np.isfinite(ex).all() and np.isfinite(ey).all():
        r = ud.retrieval_metrics(ex, ey, ks=(1,))
        rec["R@1"] = 0.5 * (r["x2y_R@1"] + r["y2x_R@1"])
    return Solve(rec, model, zx, zy)


def relative(a: np.ndarray, b: np.ndarray) -> float:
    den = float(np.linalg.norm(b))
    return float(np.linalg.norm(a - b)) / den if den > 0 else float("inf")


def max_angle_deg(A: np.ndarray, B: np.ndarray) -> float:
    """Largest principal angle between span(A) and span(B), from its sine (accurate when small)."""
    Qa, Qb = np.linalg.qr(A)[0], np.linalg.qr(B)[0]
    sine = np.linalg.norm(Qb - Qa @ (Qa.T @ Qb), 2)
    return math.degrees(math.asin(min(1.0, float(sine))))


def compare(work: Solve, ref: Solve) -> dict:
    """The working solve's errors against the float64 one (empty when either has no finite model)."""
    out: dict = {}
    if work.zx is None or ref.zx is None:
        return out
    mw, mr = work.model, ref.model
    if mw.W_.shape == mr.W_.shape:
        out["w_rel_error"] = relative(mw.W_, mr.W_)
        out["w_angle_deg"] = max(max_angle_deg(mw.F1_.T, mr.F1_.T), max_angle_deg(mw.F2_.T, mr.F2_.T))
    else:
        out["w_shapes"] = [list(mw.W_.shape), list(mr.W_.shape)]
    scores, scores64 = work.zx @ work.zy.T, ref.zx @ ref.zy.T
    out["emb_rel_error"] = relative(scores, scores64) if np.isfinite(scores).all() else float("inf")
    if np.isfinite(scores).all():
        out["emb_angle_deg"] = max(max_angle_deg(work.zx, ref.zx), max_angle_deg(work.zy, ref.zy))
    if work.record.get("R@1") is not None and ref.record.get("R@1") is not None:
        out["R@1_delta"] = work.record["R@1"] - ref.record["R@1"]
    return out


def broke(work: Solve, ref: Solve, errors: dict) -> str | None:
    for name, s in (("", work), ("reference: ", ref)):
        if "error" in s.record:
            return f"{name}exception {s.record['error'][:200]}"
        if not s.record.get("finite", False):
            return f"{name}non-finite W or loss"
    e = errors.get("emb_rel_error")
    if e is None or not math.isfinite(e):
        return "non-finite embeddings"
    if e > BROKEN:
        return f"embedding error {e:.2g} > {BROKEN}"
    return None


@dataclass
class Case:
    """One row: a configuration solved as configured and in float64."""

    sweep: str
    label: str
    config: dict
    inputs: object  # () -> Inputs
    options: dict = field(default_factory=dict)
    dtype: str = "float32"
    verify: object = "full"
    patch: str | None = None


def _same(a, b) -> bool:
    if isinstance(a, str) and isinstance(b, str):  # UniCon's similarity default is a str subclass
        return str(a) == str(b)
    return type(a) is type(b) and a == b


class Runner:
    """Solves cases, sharing fits between rows (a baseline appears in several sweeps)."""

    def __init__(self, scale: Scale):
        self.scale = scale
        self.fits: dict[str, Solve] = {}

    def fit(self, data_key: str, options: dict, arrays: tuple, patch=None) -> Solve:
        # options equal to the library's defaults are left out of the key: the same solve
        # spelled two ways (τ 0.1 given or not) is fitted once
        defaults = ud.UniCon().get_params()
        given = {k: v for k, v in options.items() if not (k in defaults and _same(defaults[k], v))}
        key = json.dumps(jsonable([data_key, given, patch]), sort_keys=True)
        if key not in self.fits:
            self.fits[key] = solve(options, arrays, patch)
        return self.fits[key]

    def run(self, case: Case) -> dict:
        inputs = case.inputs()
        base = self.scale.base()
        ref_options = {**base, **case.options, "dtype": "float64"}
        if self.scale.ref_tol is not None:
            ref_options["tol"] = self.scale.ref_tol
        ref = self.fit(inputs.ref_key, ref_options, inputs.ref)
        is_ref = case.dtype == "float64" and inputs.work_key == inputs.ref_key and case.patch is None
        if is_ref:
            work = ref
        else:
            options = {**base, **case.options, "dtype": case.dtype, "verify": case.verify}
            work = self.fit(inputs.work_key, options, inputs.work, case.patch)
        errors = compare(work, ref)
        row = {"sweep": case.sweep, "label": case.label, "config": jsonable(case.config), "is_reference": is_ref,
               "work": work.record, "reference": ref.record, "errors": errors, "broke": broke(work, ref, errors),
               "info": jsonable(inputs.info)}
        _print_row(row)
        return row


def _print_row(row: dict) -> None:
    e, w = row["errors"], row["work"]
    ver = (w.get("diagnostics") or {}).get("verify") or {}
    print(f"[{row['sweep']}] {row['label']}: C err {_g(ver.get('c_rel_error'))}, W err {_g(e.get('w_rel_error'))}, "
          f"emb err {_g(e.get('emb_rel_error'))}, R@1 {_g(w.get('R@1'))} (d {_g(e.get('R@1_delta'))}), "
          f"{_conv(w)} / {_conv(row['reference'])}, {w.get('n_iter')} / {row['reference'].get('n_iter')} it, "
          f"{w.get('seconds', 0):.1f} s + ref {row['reference'].get('seconds', 0):.1f} s"
          + (f"; BROKE: {row['broke']}" if row["broke"] else ""), flush=True)


# ----------------------------------------------------------------------------- sweeps
def precision_cases(s: Scale) -> list[Case]:
    cases = [Case("precision", f"{storage} storage, {tiles} tiles", {"storage": storage, "tiles": tiles},
                  lambda storage=storage: stored(s.n, s.n_test, storage), dtype=tiles)
             for storage in STORAGES for tiles in ("float32", "float64")]
    return cases


def baseline_case(s: Scale, sweep="tau") -> Case:
    return Case(sweep, "cosine, tau 0.1", {"similarity": "cosine", "temperature": 0.1},
                lambda: stored(s.n, s.n_test, "float32"), {"temperature": 0.1})


def tau_cases(s: Scale) -> list[Case]:
    return [Case("tau", f"{sim}, tau {tau:g}", {"similarity": sim, "temperature": tau},
                 lambda: stored(s.n, s.n_test, "float32"), {"temperature": tau, "similarity": sim})
            for sim, taus in (("cosine", TAUS), ("dot", DOT_TAUS)) for tau in taus]


def n_cases(s: Scale) -> list[Case]:
    cases = []
    for n in s.sizes:
        options = {"temperature": 0.1}
        if n >= s.batched_from:
            options["negatives"] = 4096
        cases.append(Case("n", f"n {n:,}", {"n": n, "negatives": options.get("negatives", "full")},
                          lambda n=n: stored(n, s.n_test, "float32"), options))
    return cases


def _floored(X: np.ndarray, m: int, floors) -> list[int]:
    """Eigenvalues of K_LL dropped at each floor for the landmarks a fit on X draws."""
    Xt = torch.as_tensor(X)
    kernel = ud.get_kernel("rbf").resolve(Xt, seed=SEED)
    L = Xt[torch.as_tensor(uniform_landmarks(len(X), m, SEED))].double()
    evals = torch.linalg.eigvalsh(kernel(L, L))
    return [int((evals <= f * evals.max()).sum()) for f in floors]


def nystrom_cases(s: Scale) -> list[Case]:
    """One case per (m, floor); floors that drop what another floor drops alias its solve."""
    cases = []
    inputs = stored(s.n, s.n_test, "float32")
    for m in s.landmarks:
        counts = list(zip(*(_floored(A, m, FLOORS) for A in (*inputs.work[:2], *inputs.ref[:2]))))
        solved: dict = {}
        order = sorted(range(len(FLOORS)), key=lambda i: FLOORS[i] != DEFAULT_FLOOR)  # the default first
        for i in order:
            floor = FLOORS[i]
            config = {"n_landmarks": m, "eig_floor": floor, "floored": list(counts[i])}
            rep = solved.setdefault(counts[i], floor)
            config["same_as"] = None if rep == floor else rep
            cases.append(Case("nystrom", f"m {m}, floor {floor:g}", config,
                              lambda: stored(s.n, s.n_test, "float32"),
                              {"kernel": "rbf", "n_landmarks": m, "eig_floor": rep},
                              verify=s.sample_tiles if m >= s.sampled_from else "full"))
    return sorted(cases, key=lambda c: (c.config["n_landmarks"], c.config["eig_floor"]))


def kernel_values(X: np.ndarray, bandwidth: float, m: int) -> dict:
    """How small K(X, L) gets for view X at a bandwidth (L: the landmarks a fit draws), and what
    float32 keeps of it: the rows' largest kernel value (median, and the fraction below 1e-6),
    and the fractions of entries that are 0 or subnormal once cast to float32."""
    Xt = torch.as_tensor(X).double()
    L = Xt[torch.as_tensor(uniform_landmarks(len(X), m, SEED))]
    K = ud.get_kernel("rbf", bandwidth=bandwidth)(Xt, L)
    K32 = K.float()
    top = K.max(1).values
    return {"median_row_max": float(top.median()), "rows_max_below_1e-6": float((top < 1e-6).double().mean()),
            "float32_zero": float((K32 == 0).double().mean()),
            "float32_subnormal": float(((K32 != 0) & (K32.abs() < torch.finfo(torch.float32).tiny)).double().mean())}


def bandwidth_cases(s: Scale) -> list[Case]:
    X, Y = stored(s.n, s.n_test, "float32").ref[:2]
    h = [ud.get_kernel("rbf").resolve(torch.as_tensor(A), seed=SEED).bandwidth for A in (X, Y)]
    cases = []
    for c in BANDWIDTH_FACTORS:
        # c = 1: the library's own choice (kernel="rbf", resolved in each fit)
        kernels = ({"kernel": "rbf"} if c == 1 else
                   dict(zip(("kernel_x", "kernel_y"), (ud.get_kernel("rbf", bandwidth=c * hv) for hv in h))))
        cases.append(Case("bandwidth", f"c {c:g}", {"factor": c, "bandwidth": [c * h[0], c * h[1]],
                                                    "median_bandwidth": h,
                                                    "kernel_x": kernel_values(X, c * h[0], s.bandwidth_landmarks)},
                          lambda: stored(s.n, s.n_test, "float32"),
                          {**kernels, "n_landmarks": s.bandwidth_landmarks}))
    return cases


def duplicates_cases(s: Scale) -> list[Case]:
    m = s.dup_landmarks
    cases = [Case("duplicates", "no duplicates, floor 1e-10", {"fraction": 0.0, "delta": None, "eig_floor": 1e-10},
                  lambda: duplicated(s.dup_n, s.n_test, m, 0.0, 0.0, 1e-10))]
    for delta in DELTAS:
        for floor in (DEFAULT_FLOOR, 0.0):
            cases.append(Case("duplicates", f"delta {delta:g}, floor {floor:g}",
                              {"fraction": DUP_FRACTION, "delta": delta, "eig_floor": floor},
                              lambda delta=delta, floor=floor: duplicated(s.dup_n, s.n_test, m, DUP_FRACTION, delta,
                                                                          floor)))
    return cases


def _log_space_used(row: dict) -> bool:
    return bool(((row["work"].get("diagnostics") or {}).get("log_space_batches") or 0)
                or ((row["reference"].get("diagnostics") or {}).get("log_space_batches") or 0))


def safeguard_rows(runner: Runner, s: Scale) -> list[dict]:
    rows = []
    # log-space statistics: off where a tau solve used them
    for case in tau_cases(s):
        if case.config["temperature"] > 0.05:
            continue
        on = runner.run(case)
        if not _log_space_used(on):
            continue
        rows.append({**on, "sweep": "safeguards", "safeguard": "log-space statistics", "state": "on"})
        off = Case("safeguards", case.label + ", log space off", case.config, case.inputs, case.options,
                   patch="no-log-space")
        rows.append({**runner.run(off), "safeguard": "log-space statistics", "state": "off"})
    # whitening
    on = runner.run(baseline_case(s, "safeguards"))
    rows.append({**on, "safeguard": "whitening", "state": "on"})
    off = Case("safeguards", "cosine, tau 0.1, whiten=None", {"whiten": None}, on_inputs(s), {"temperature": 0.1,
                                                                                             "whiten": None})
    rows.append({**runner.run(off), "safeguard": "whitening", "state": "off"})
    # accumulation of C, at the encoders of the baseline
    key = next(k for k, v in runner.fits.items() if v.record is on["work"])
    model = runner.fits[key].model
    for n in s.accumulation_n:
        rows.append(accumulation(model, n, s))
    return rows


def on_inputs(s: Scale):
    return lambda: stored(s.n, s.n_test, "float32")


def _sv_error(C: torch.Tensor, C64: torch.Tensor, r: int) -> float:
    sv, sv64 = torch.linalg.svdvals(C.double())[:r], torch.linalg.svdvals(C64)[:r]
    return float(((sv - sv64).abs() / sv64).max())


def accumulation(model, n: int, s: Scale) -> dict:
    """C at the model's encoders over n rows (full negatives): the library's pass (tile products
    summed into C in float64), the tile products summed in float64 and in float32, and the
    float64 operator; relative errors of each against the last."""
    X64, Y64 = (a[train_rows(n)] for a in fashion("train"))
    F1, F2 = torch.as_tensor(model.F1_), torch.as_tensor(model.F2_)

    def operator(dtype, X, Y):
        phi = [fmap.transform(torch.as_tensor(A), dtype=dtype) for fmap, A in ((model.map_x_, X), (model.map_y_, Y))]
        return CrossProductOperator(*embed(phi[0], phi[1], F1, F2, str(model.similarity)), loss=model.loss_fn_,
                                    seed=SEED)

    t0 = time.perf_counter()
    op = operator(torch.float32, X64.astype(np.float32), Y64.astype(np.float32))
    library = op.materialize()
    keys = op.tile_keys()
    sum64 = torch.zeros_like(library)
    sum32 = torch.zeros(library.shape, dtype=torch.float32)
    for key in keys:
        part = op.tile_product(key)
        sum64 += part
        sum32 += part.float()
    op.release()
    op64 = operator(torch.float64, X64, Y64)
    C64 = op64.materialize()
    op64.release()
    variants = {"library pass (float64 accumulation)": library, "tile products summed in float64": sum64,
                "tile products summed in float32": sum32}
    out = {name: {"c_rel_error": relative(C.double().numpy(), C64.numpy()), "sv_rel_error": _sv_error(C, C64, s.rank)}
           for name, C in variants.items()}
    row = {"sweep": "safeguards", "safeguard": "float64 accumulation of C", "label": f"C over {n:,} rows",
           "config": {"n": n, "tiles": len(keys)}, "accumulation": out, "seconds": time.perf_counter() - t0}
    print(f"[safeguards] accumulation n={n:,} ({len(keys)} tiles): "
          + ", ".join(f"{k}: {_g(v['c_rel_error'])}" for k, v in out.items()), flush=True)
    return row


def svd_check(s: Scale) -> list[dict]:
    """``svd="exact"`` (LAPACK) against ``svd="auto"`` (the matrix-free randomized SVD above 1024
    features) at the largest m: the first step alone (s = 0: regularised CCA on the whitened
    RBF features) in float64, and the sweep's full solve in float32."""
    arrays = stored(s.n, s.n_test, "float32")
    m = max(s.landmarks)
    out = []
    for label, max_iter, dtype, inputs in (("first step", 1, "float64", arrays.ref),
                                           (f"{s.max_iter} iterations", s.max_iter, "float32", arrays.work)):
        solves = {}
        for svd in ("exact", "auto"):
            options = {**s.base(), "kernel": "rbf", "n_landmarks": m, "max_iter": max_iter, "svd": svd,
                       "dtype": dtype}
            solves[svd] = solve(options, inputs)
        a, b = solves["exact"], solves["auto"]
        row = {"sweep": "nystrom", "kind": "svd check", "label": f"{label}, m {m}, {dtype}: svd exact vs auto",
               "config": {"n_landmarks": m, "n": s.n, "max_iter": max_iter, "dtype": dtype},
               "exact": a.record, "auto": b.record}
        if a.model is not None and b.model is not None:
            row["comparison"] = {
                "w_rel_error": relative(b.model.W_, a.model.W_),
                "w_angle_deg": max(max_angle_deg(b.model.F1_.T, a.model.F1_.T),
                                   max_angle_deg(b.model.F2_.T, a.model.F2_.T)),
                "emb_rel_error": relative(b.zx @ b.zy.T, a.zx @ a.zy.T),
                "singular_values_of_W": {k: np.linalg.svd(v.model.W_, compute_uv=False)[: s.rank + 1].tolist()
                                         for k, v in solves.items()},
            }
        print(f"[nystrom] svd check, {label}: " + json.dumps({k: v for k, v in row.get("comparison", {}).items()
                                                             if k != "singular_values_of_W"}), flush=True)
        out.append(row)
    return out


CASES = {"precision": precision_cases, "tau": tau_cases, "n": n_cases, "nystrom": nystrom_cases,
         "bandwidth": bandwidth_cases, "duplicates": duplicates_cases}


# ----------------------------------------------------------------------------- driver
def results_path(quick: bool, out: str | None = None) -> Path:
    if out:
        return HERE / "results" / out
    return HERE / "results" / ("stability_quick.json" if quick else "stability.json")


def save(path: Path, sweep: str, rows: list[dict], timing: dict, scale: Scale, commit: str) -> None:
    data = json.loads(path.read_text()) if path.exists() else {"rows": [], "runs": {}}
    data["rows"] = [r for r in data["rows"] if r["sweep"] != sweep] + rows
    data["runs"][sweep] = {**timing, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                           "commit": commit, "machine": H.machine_line(), "scale": scale.__dict__}
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def run(args) -> int:
    logging.getLogger("unicon_dist").setLevel(logging.ERROR)  # non-convergence is in each record
    scale = QUICK if args.quick else FULL
    if args.max_iter is not None:
        scale = dataclasses.replace(scale, max_iter=args.max_iter)
    if args.ref_tol is not None:
        scale = dataclasses.replace(scale, ref_tol=args.ref_tol)
    path = results_path(args.quick, args.out)
    runner = Runner(scale)
    commit = H.git_commit()  # the code this process imported (HEAD may move while it runs)
    print(H.machine_line(), commit, file=sys.stderr)
    t_all, cpu_all = time.perf_counter(), H.cpu_s()
    for sweep in args.sweeps or SWEEPS:
        # wall and CPU seconds, and the load average (1 min) before and after: another process
        # on the 2 cores stretches the wall time (not the errors, which are deterministic)
        load0, cpu0, t0 = os.getloadavg()[0], H.cpu_s(), time.perf_counter()
        if sweep == "safeguards":
            rows = safeguard_rows(runner, scale)
        else:
            rows = [runner.run(case) for case in CASES[sweep](scale)]
        if sweep == "nystrom" and max(scale.landmarks) >= scale.svd_check_from:
            rows += svd_check(scale)
        timing = {"seconds": time.perf_counter() - t0, "cpu_seconds": H.cpu_s() - cpu0,
                  "loadavg_before_after": [load0, os.getloadavg()[0]]}
        save(path, sweep, rows, timing, scale, commit)
        print(f"== {sweep}: {len(rows)} rows in {timing['seconds']:.0f} s ({timing['cpu_seconds']:.0f} CPU s)",
              file=sys.stderr, flush=True)
    total, cpu = time.perf_counter() - t_all, H.cpu_s() - cpu_all
    print(f"== total {total:.0f} s ({total / 60:.1f} min), {cpu:.0f} CPU s; wrote {path.relative_to(H.REPO)}",
          file=sys.stderr)
    data = json.loads(path.read_text())
    data.setdefault("total_runs", []).append({"sweeps": list(args.sweeps or SWEEPS), "seconds": total,
                                              "cpu_seconds": cpu, "date": datetime.date.today().isoformat(),
                                              "commit": commit})
    path.write_text(json.dumps(data, indent=1))
    if not args.out:
        plot_all(data, args.quick)
    return 0


# ----------------------------------------------------------------------------- report
def _g(v, spec=".2g") -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return format(v, spec)


def _diag(row: dict, side: str = "work") -> dict:
    return row[side].get("diagnostics") or {}


def _verify(row: dict) -> dict:
    return _diag(row).get("verify") or {}


def _safeguard_names(row: dict, side: str = "work") -> str:
    names = [s["name"] for s in _diag(row, side).get("safeguards") or []]
    short = {"nystrom eigenvalue floor": "floor", "whitening eigenvalue clip": "clip",
             "log-space statistics": "log space", "small spectral gap": "small gap",
             "lowest-loss iterate kept": "lowest-loss"}
    return ", ".join(short.get(n, n) for n in names) or "—"


COMMON_HEAD = ("converged (work / f64) | iters (work / f64) | residual (work / f64) | "
               "verifier C err | verifier σ err | W err | W ∠° | emb err | emb ∠° | R@1 f64 | ΔR@1 | "
               "gap σ_r/σ_r+1 | fixed-pt resid (kept) | safeguards fired | broke")


def _conv(rec: dict) -> str:
    """"yes", or "no (last residual)" for a solve stopped short of its tolerance."""
    if "error" in rec or rec.get("converged") is None:
        return "—"
    return "yes" if rec["converged"] else f"no ({_g(rec.get('residual'))})"


def _solve_cells(row: dict) -> list[str]:
    """Convergence, iterations and last residual of the working and the float64 solve."""
    w, ref = row["work"], row["reference"]
    if row.get("is_reference"):
        return [f"{_conv(ref)} (f64)", f"{ref.get('n_iter', '—')} (f64)", f"{_g(ref.get('residual'))} (f64)"]
    iters = " / ".join(str(r.get("n_iter", "—")) if "error" not in r else "—" for r in (w, ref))
    return [f"{_conv(w)} / {_conv(ref)}", iters, f"{_g(w.get('residual'))} / {_g(ref.get('residual'))}"]


def common_cells(row: dict) -> str:
    if row.get("is_reference"):
        ref, last = row["reference"], _diag(row, "reference").get("last_step") or {}
        cells = _solve_cells(row) + ["(the float64 reference)"] + [""] * 5 + [
            _g(ref.get("R@1"), ".3f"), "", _g(last.get("spectral_gap"), ".4g"), _g(ref.get("kept_residual")),
            _safeguard_names(row, "reference"), "no"]
        return " | ".join(cells)
    e, w, ver = row["errors"], row["work"], _verify(row)
    last = _diag(row).get("last_step") or {}
    sampled = f" ({ver['tiles']}/{ver['tiles_total']} tiles)" if ver.get("mode") == "sample" else ""
    w_err = _g(e.get("w_rel_error")) if "w_shapes" not in e else "shapes differ"
    cells = _solve_cells(row) + [
        _g(ver.get("c_rel_error")) + sampled, _g(ver.get("sv_rel_error")), w_err, _g(e.get("w_angle_deg")),
        _g(e.get("emb_rel_error")), _g(e.get("emb_angle_deg")), _g(row["reference"].get("R@1"), ".3f"),
        _g(e.get("R@1_delta"), "+.3f"),
        _g(last.get("spectral_gap"), ".4g"), _g(w.get("kept_residual")), _safeguard_names(row),
        f"**{row['broke']}**" if row["broke"] else "no",
    ]
    return " | ".join(cells)


def _table(title: str, head: str, rows: list[dict], first) -> list[str]:
    columns = head.count("|") + COMMON_HEAD.count("|") + 2
    out = [f"**{title}**", "", f"| {head} | {COMMON_HEAD} |", "|" + "---|" * columns]
    for r in rows:
        out.append(f"| {first(r)} | {common_cells(r)} |")
    return out + [""]


def _ny(row: dict, key: str, spec=".3g") -> str:
    ny = _diag(row).get("nystrom") or {}
    vals = [(ny.get(v) or {}).get(key) for v in ("x", "y")]
    if all(v is None for v in vals):
        return "—"
    return " / ".join(_g(v, spec) for v in vals)


def _dup_spec(row: dict, key: str, spec=".3g") -> str:
    """View X's map spectrum value in the float32 and the float64 solve."""
    info = row.get("info") or {}
    return " / ".join(_g((info.get(f"{side}_x") or {}).get(key), spec) for side in ("work", "ref"))


def svd_check_table(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        c = r.get("comparison") or {}
        out += [f"**{r['label']}** (auto = matrix-free randomized SVD, q = 2, p = 10): "
                f"W differs by {_g(c.get('w_rel_error'))} (relative), largest principal angle "
                f"{_g(c.get('w_angle_deg'), '.3g')}°, test scores by {_g(c.get('emb_rel_error'))}", "",
                "| svd | SVD residual (last step) | spectral gap (last step) | loss (kept iterate) | R@1 | σ_1(W) | σ_r(W) | seconds |",
                "|---|---|---|---|---|---|---|---|"]
        for name in ("exact", "auto"):
            rec = r[name]
            last = (rec.get("diagnostics") or {}).get("last_step") or {}
            sv = c.get("singular_values_of_W", {}).get(name) or [None] * 32
            rank = rec.get("options", {}).get("rank", 32)
            out.append(f"| {name} | {_g(last.get('svd_residual'), '.3g')} | {_g(last.get('spectral_gap'), '.5g')} | "
                       f"{_g(rec.get('loss'), '.4f')} | {_g(rec.get('R@1'), '.3f')} | {_g(sv[0], '.4f')} | "
                       f"{_g(sv[rank - 1], '.4f')} | {rec.get('seconds', 0):.0f} |")
        out.append("")
    return out


def _by_sweep(rows: list[dict]) -> dict:
    """The solve rows of each sweep (rows with a "kind" are reported on their own)."""
    return {s: [r for r in rows if r["sweep"] == s and "kind" not in r] for s in SWEEPS}


def report_tables(data: dict) -> str:
    rows = data["rows"]
    by = _by_sweep(rows)
    out = []
    runs = data.get("runs", {})
    if runs:
        out.append("| sweep | rows | wall s | CPU s | load avg before / after | commit |")
        out.append("|---|---|---|---|---|---|")
        for s in SWEEPS:
            if s in runs:
                v = runs[s]
                load = " / ".join(f"{x:.1f}" for x in v.get("loadavg_before_after", []))
                out.append(f"| {s} | {len(by[s])} | {v['seconds']:.0f} | {_g(v.get('cpu_seconds'), '.0f')} | "
                           f"{load or '—'} | {v['commit']} |")
        out.append(f"| **all** | {len(rows)} | {sum(v['seconds'] for v in runs.values()):.0f} | "
                   f"{sum(v.get('cpu_seconds', 0) for v in runs.values()):.0f} | | |")
        out.append("")
    if by["precision"]:
        out += _table("Input storage × tile precision (linear, n = 4,000, τ 0.1)", "storage | tiles",
                      by["precision"], lambda r: f"{r['config']['storage']} | {r['config']['tiles']}")
    if by["tau"]:
        out += _table("Temperature (linear, float32 tiles and storage, n = 4,000)", "similarity | τ | LSE range | "
                      "log-space batches", by["tau"],
                      lambda r: f"{r['config']['similarity']} | {r['config']['temperature']:g} | "
                                f"{_lse(r)} | {_diag(r).get('log_space_batches', '—')}")
    if by["n"]:
        out += _table("Rows n (linear, float32, τ 0.1)", "n | negatives | work s | ref s", by["n"],
                      lambda r: f"{r['config']['n']:,} | {r['config']['negatives']} | {r['work']['seconds']:.0f} | "
                                f"{r['reference']['seconds']:.0f}")
    if by["nystrom"]:
        out += _table("Nyström landmarks m × eigenvalue floor (RBF, median bandwidth, n = 4,000)",
                      "m | eig_floor | cond K_LL x / y | eff. rank x / y | same as", by["nystrom"],
                      lambda r: f"{r['config']['n_landmarks']} | {r['config']['eig_floor']:g} | "
                                f"{_ny(r, 'condition_number')} | {_eff_rank(r)} | "
                                f"{_g(r['config'].get('same_as'), 'g')}")
        out += svd_check_table([r for r in rows if r.get("kind") == "svd check"])
    if by["bandwidth"]:
        out += _table("RBF bandwidth c × median heuristic (512 landmarks, floor 1e-10, n = 4,000)",
                      "c | h x / y | cond K_LL x / y | eff. rank x / y | K(X, L): median row max | "
                      "K(X, L) 0 / subnormal in float32", by["bandwidth"],
                      lambda r: f"{r['config']['factor']:g} | {r['config']['bandwidth'][0]:.3g} / "
                                f"{r['config']['bandwidth'][1]:.3g} | {_ny(r, 'condition_number')} | {_eff_rank(r)} | "
                                f"{_g(r['config']['kernel_x']['median_row_max'])} | "
                                f"{_g(r['config']['kernel_x']['float32_zero'])} / "
                                f"{_g(r['config']['kernel_x']['float32_subnormal'])}")
    if by["duplicates"]:
        out += _table("Duplicated landmarks (20 % of 512, RBF, n = 4,000; view X's maps of the float32 / float64 "
                      "solves)", "δ | eig_floor | cond K_LL | features | cond kept", by["duplicates"],
                      lambda r: f"{_g(r['config']['delta'], 'g')} | {r['config']['eig_floor']:g} | "
                                f"{_dup_spec(r, 'condition_number')} | {_dup_spec(r, 'effective_rank', 'd')} | "
                                f"{_dup_spec(r, 'condition_kept')}")
    if by["safeguards"]:
        out += safeguard_table(by["safeguards"], by["duplicates"])
    return "\n".join(out)


def _eff_rank(row: dict) -> str:
    ny = _diag(row).get("nystrom") or {}
    return " / ".join(f"{(ny.get(v) or {}).get('effective_rank', '—')}" for v in "xy")


def _lse(row: dict) -> str:
    lse = _diag(row).get("lse_range")
    return "—" if not lse else f"[{lse[0]:.3g}, {lse[1]:.3g}]"


def _outcome(row: dict) -> str:
    if row.get("broke"):
        return f"**broke: {row['broke']}**"
    e, ver = row["errors"], _verify(row)
    return (f"C err {_g(ver.get('c_rel_error'))}, emb err {_g(e.get('emb_rel_error'))}, "
            f"ΔR@1 {_g(e.get('R@1_delta'), '+.3f')}")


def safeguard_table(rows: list[dict], dups: list[dict]) -> list[str]:
    out = ["**What each safeguard buys**", "", "| safeguard | configuration | with it | without it |",
           "|---|---|---|---|"]
    for name in ("log-space statistics", "whitening"):
        pairs = [r for r in rows if r.get("safeguard") == name]
        on = [r for r in pairs if r["state"] == "on"]
        off = [r for r in pairs if r["state"] == "off"]
        for a, b in zip(on, off):
            out.append(f"| {name} | {a['label']} | {_outcome(a)} | {_outcome(b)} |")
    for d in sorted({r["config"]["delta"] for r in dups if r["config"]["delta"] is not None}):
        pair = {r["config"]["eig_floor"]: r for r in dups if r["config"]["delta"] == d}
        if DEFAULT_FLOOR in pair and 0.0 in pair:
            out.append(f"| eigenvalue floor 1e-10 (off: 0) | 20 % duplicated landmarks, δ {d:g} | "
                       f"{_outcome(pair[DEFAULT_FLOOR])} | {_outcome(pair[0.0])} |")
    for r in rows:
        if r.get("safeguard") == "float64 accumulation of C":
            acc = r["accumulation"]
            cells = {k: f"C err {_g(v['c_rel_error'])}, σ err {_g(v['sv_rel_error'])}" for k, v in acc.items()}
            out.append(f"| float64 accumulation of C | {r['label']} ({r['config']['tiles']} tiles) | library pass: "
                       f"{cells['library pass (float64 accumulation)']}; tile products summed in float64: "
                       f"{cells['tile products summed in float64']} | tile products summed in float32: "
                       f"{cells['tile products summed in float32']} |")
    return out + [""]


def safeguard_pairs(rows: list[dict], dups: list[dict]) -> list[tuple[str, float, float]]:
    """(label, error with the safeguard, error without it; None when the solve broke) per comparison."""
    out = []
    for name, short in (("log-space statistics", "log space"), ("whitening", "whitening")):
        on = [r for r in rows if r.get("safeguard") == name and r["state"] == "on"]
        off = [r for r in rows if r.get("safeguard") == name and r["state"] == "off"]
        for a, b in zip(on, off):
            emb = b["errors"].get("emb_rel_error") if not b["broke"] or "embedding" in b["broke"] else None
            out.append((f"{short}: {a['label']}", a["errors"].get("emb_rel_error"), emb))
    for d in sorted({r["config"]["delta"] for r in dups if r["config"]["delta"] is not None}):
        pair = {r["config"]["eig_floor"]: r for r in dups if r["config"]["delta"] == d}
        if DEFAULT_FLOOR in pair and 0.0 in pair:
            out.append((f"eig floor: duplicates δ {d:g}", pair[DEFAULT_FLOOR]["errors"].get("emb_rel_error"),
                        pair[0.0]["errors"].get("emb_rel_error")))
    for r in rows:
        if r.get("safeguard") == "float64 accumulation of C":
            acc = r["accumulation"]
            out.append((f"C accumulation: {r['label']}", acc["library pass (float64 accumulation)"]["c_rel_error"],
                        acc["tile products summed in float32"]["c_rel_error"]))
    return out


# ----------------------------------------------------------------------------- plots
def _errors_axes(ax, xs, rows, xlabel, label_prefix="", marker="o", w=True):
    """Errors against x; ``w=False`` leaves out W's (Nyström bases differ by eigenvector signs)."""
    keys = (("verifier C err", lambda r: _verify(r).get("c_rel_error"), "-"),
            ("W err", lambda r: r["errors"].get("w_rel_error"), "--"),
            ("emb err", lambda r: r["errors"].get("emb_rel_error"), ":"))
    for name, get, ls in keys if w else (keys[0], keys[2]):
        pts = [(x, get(r)) for x, r in zip(xs, rows) if get(r) is not None and get(r) > 0 and math.isfinite(get(r))]
        if pts:
            ax.plot(*zip(*pts), ls, marker=marker, label=f"{label_prefix}{name}")
    for x, r in zip(xs, rows):
        if r["broke"]:
            ax.axvline(x, color="red", alpha=0.3)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("relative error vs float64")
    ax.grid(True, which="both", alpha=0.3)


def plot_all(data: dict, quick: bool = False) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    by = _by_sweep(rows)
    suffix = "_quick" if quick else ""
    written = []

    def save_fig(fig, sweep):
        fig.tight_layout()
        out = HERE / "results" / f"stability_{sweep}{suffix}.png"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)

    if by["precision"]:
        fig, ax = plt.subplots(figsize=(7, 4))
        rs = [r for r in by["precision"] if not r["is_reference"]]
        xs = np.arange(len(rs))
        for k, (name, get) in enumerate((("verifier C err", lambda r: _verify(r).get("c_rel_error")),
                                         ("W err", lambda r: r["errors"].get("w_rel_error")),
                                         ("emb err", lambda r: r["errors"].get("emb_rel_error")))):
            ax.bar(xs + 0.27 * (k - 1), [get(r) or 0 for r in rs], 0.27, label=name)
        ax.set_xticks(xs, [f"{r['config']['storage']}\n{r['config']['tiles']} tiles".replace(", ", "\n")
                           for r in rs], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("relative error vs float64 solve")
        ax.set_title("storage precision × tile dtype (linear, n = 4,000)")
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", which="both", alpha=0.3)
        save_fig(fig, "precision")
    if by["tau"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for sim, marker in (("cosine", "o"), ("dot", "s")):
            rs = sorted((r for r in by["tau"] if r["config"]["similarity"] == sim),
                        key=lambda r: r["config"]["temperature"])
            _errors_axes(ax, [r["config"]["temperature"] for r in rs], rs, "temperature τ", f"{sim}: ", marker)
        ax.set_xscale("log")
        ax.set_title("float32 solve vs float64, by τ (linear, n = 4,000)")
        ax.legend(fontsize=7)
        save_fig(fig, "tau")
    if by["n"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        rs = sorted(by["n"], key=lambda r: r["config"]["n"])
        _errors_axes(ax, [r["config"]["n"] for r in rs], rs, "training pairs n")
        ax.set_xscale("log")
        ax.set_title("float32 solve vs float64, by n (full negatives)")
        ax.legend(fontsize=8)
        save_fig(fig, "n")
    if by["nystrom"]:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for m in sorted({r["config"]["n_landmarks"] for r in by["nystrom"]}):
            rs = sorted((r for r in by["nystrom"] if r["config"]["n_landmarks"] == m),
                        key=lambda r: r["config"]["eig_floor"])
            xs = [max(r["config"]["eig_floor"], 1e-14) for r in rs]
            axes[0].plot(xs, [r["errors"].get("emb_rel_error") for r in rs], "o-", label=f"m = {m}: emb err")
            axes[0].plot(xs, [_verify(r).get("c_rel_error") for r in rs], "s:", label=f"m = {m}: verifier C err")
            axes[1].plot(xs, [((_diag(r).get("nystrom") or {}).get("x") or {}).get("effective_rank") for r in rs], "o-",
                         label=f"m = {m}")
        for ax in axes:
            ax.set_xscale("log")
            ax.set_xlabel("eig_floor (0 drawn at 1e-14)")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].set_yscale("log")
        axes[0].set_ylabel("relative error vs float64")
        axes[1].set_ylabel("effective rank of the X map")
        axes[0].legend(fontsize=7)
        axes[1].legend(fontsize=7)
        fig.suptitle("RBF Nyström, median bandwidth, n = 4,000")
        save_fig(fig, "nystrom")
    if by["bandwidth"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        rs = sorted(by["bandwidth"], key=lambda r: r["config"]["factor"])
        conds = [(_diag(r).get("nystrom") or {}).get("x", {}).get("condition_number") for r in rs]
        _errors_axes(ax, conds, rs, "condition number of K_LL (view X)", w=False)
        for x, r in zip(conds, rs):
            ax.annotate(f"c={r['config']['factor']:g}", (x, r["errors"].get("emb_rel_error") or 1e-8), fontsize=7)
        ax.set_xscale("log")
        ax.set_title("RBF bandwidth c × median: errors vs cond(K_LL)")
        ax.legend(fontsize=8)
        save_fig(fig, "bandwidth")
    if by["duplicates"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for floor, marker in ((DEFAULT_FLOOR, "o"), (0.0, "s")):
            rs = sorted((r for r in by["duplicates"]
                         if r["config"]["eig_floor"] == floor and r["config"]["delta"] is not None),
                        key=lambda r: r["config"]["delta"])
            xs = [max(r["config"]["delta"], 1e-10) for r in rs]
            _errors_axes(ax, xs, rs, "perturbation δ of the duplicates (0 drawn at 1e-10)", f"floor {floor:g}: ",
                         marker, w=False)
        ax.set_xscale("log")
        ax.set_title("20 % duplicated landmarks (m = 512, n = 4,000)")
        ax.legend(fontsize=7)
        save_fig(fig, "duplicates")
    if by["safeguards"]:
        pairs = safeguard_pairs(by["safeguards"], by["duplicates"])
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(pairs) + 1.5))
        ys = np.arange(len(pairs))[::-1]
        finite = [v for _, a, b in pairs for v in (a, b) if v is not None and math.isfinite(v) and v > 0]
        top = max(finite) * 30 if finite else 1.0
        for y, (label, with_it, without) in zip(ys, pairs):
            ax.barh(y + 0.2, with_it or 0, 0.4, color="C0")
            broken = without is None or not math.isfinite(without)
            ax.barh(y - 0.2, top if broken else without, 0.4, color="C3" if broken else "C1")
            if broken:
                ax.text(top, y - 0.2, " no result (exception)", va="center", ha="right", fontsize=7, color="white")
        ax.set_yticks(ys, [p[0] for p in pairs], fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("relative error vs float64 (emb err of the solve; C err for the accumulation)")
        ax.set_title("what each safeguard buys")
        ax.grid(True, axis="x", which="both", alpha=0.3)
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color="C0", label="with the safeguard"), Patch(color="C1", label="without it"),
                           Patch(color="C3", label="without it: no result")], fontsize=7, loc="lower right")
        save_fig(fig, "safeguards")
    return written


def report(args) -> int:
    path = results_path(args.quick, args.out)
    data = json.loads(path.read_text())
    runs = data.get("runs", {})
    machines = sorted({v["machine"] for v in runs.values()})
    commits = sorted({v["commit"] for v in runs.values()})
    print(f"machine: {'; '.join(machines)}; commit(s) {', '.join(commits)}\n")
    print(report_tables(data))
    for p in ([] if args.out else plot_all(data, args.quick)):
        print(f"plot: {p.relative_to(H.REPO)}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="measure the sweeps (default: all)")
    p_run.add_argument("sweeps", nargs="*", metavar="sweep", help=f"any of {', '.join(SWEEPS)}")
    p_run.add_argument("--quick", action="store_true", help="smoke run at small sizes (stability_quick.json)")
    p_run.add_argument("--max-iter", type=int, help="iterations cap of every solve (default: Scale.max_iter)")
    p_run.add_argument("--ref-tol", type=float, help="tol of the float64 solves (default: the library's 1e-7)")
    p_rep = sub.add_parser("report", help="Markdown tables and plots from the JSON")
    p_rep.add_argument("--quick", action="store_true")
    for p in (p_run, p_rep):
        p.add_argument("--out", help="JSON file name under results/ instead of stability.json (no plots)")
    args = parser.parse_args(argv)
    unknown = [w for w in getattr(args, "sweeps", []) if w not in SWEEPS]
    if unknown:  # (argparse rejects an empty list when nargs="*" has choices)
        parser.error(f"unknown sweep(s) {', '.join(unknown)}; expected any of {', '.join(SWEEPS)}")
    return run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    sys.exit(main())
