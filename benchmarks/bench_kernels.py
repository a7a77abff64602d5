"""Benchmark: Nyström maps and the randomized SVD against scikit-learn and dask.

Four parts, each printed as a Markdown table and written as JSON to
``benchmarks/results/kernels_<part>.json``:

``svd``
    The same explicit matrices given to ``unicon_dist.randomized_svd``,
    ``sklearn.utils.extmath.randomized_svd`` (QR normaliser) and
    ``dask.array.linalg.svd_compressed`` at equal rank r, oversampling p and power
    iterations q, each with its own random test matrix for seeds 0..9 (medians reported):
    relative error of the top-r singular values (max_k |σ_k − σ*_k| / σ*_k), the sine of the
    largest principal angle to the exact left singular subspace (LAPACK), the residual
    ‖A − UUᵀA‖₂ / σ_(r+1) (Halko et al.'s measure; 1 is optimal), and wall time.
    Matrices: 3000 × 1500 with slowly decaying spectra σ_k = k^(−1/2) and k^(−1)
    (random singular vectors), and the Nyström cross-covariance C of the pipeline below.

``pipeline``
    The first UniCon step with an RBF kernel, end to end, on clustered synthetic
    two-view data (d = 64 per view, n = 10k … 200k): Nyström features of both views
    (m = 1000 landmarks, the same bandwidth for both libraries), the centred
    cross-covariance C = Φ_Xᵀ(I − 11ᵀ/n)Φ_Y/n, and a rank-32 randomized SVD of C.
    ``unicon_dist``: NystroemMap + weighted_cross_product at s = 0 + randomized_svd;
    ``sklearn``: Nystroem.fit_transform + numpy + randomized_svd.  Each run is a fresh
    process: wall time per stage, peak RSS, the kernel approximation error
    ‖K − ΦΦᵀ‖_F/‖K‖_F on 2000 held rows, and the singular-value error of the randomized
    SVD against LAPACK on the same C.

``streamed``
    The matrix-free path: ``randomized_svd`` of C = Φ_Xᵀ S Φ_Y at non-zero similarities
    through the streamed C·Ω and Cᵀ·Ω (C never formed), n = 10k … 40k, m = 512:
    time, peak-RSS increment, error against LAPACK on the materialised C.

``retrieval``
    Which kernel wins retrieval on real data: UniCon with each kernel on scikit-learn
    digits (left/right halves, all pairs, 25% test) and Fashion-MNIST (left/right halves,
    20,000 training pairs, the 10,000 test pairs; Debian package dataset-fashion-mnist).

Usage::

    python benchmarks/bench_kernels.py all        # about 25 minutes on 2 cores
    python benchmarks/bench_kernels.py svd        # or one part: svd, pipeline, streamed, retrieval
    python benchmarks/bench_kernels.py pipeline --sizes 10000 30000
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _harness as H  # noqa: E402

H.use_checkout()

RANK, OVERSAMPLING, POWER_ITER = 32, 10, 2
SVD_SEEDS = 10
LANDMARKS = 1000
PIPELINE_SIZES = [10000, 30000, 100000, 200000]
STREAMED_SIZES = [10000, 20000, 40000]
KERNELS = ["linear", "rbf", "laplacian", "polynomial", "cosine", "angular", "arccos0", "arccos1"]


# ----------------------------------------------------------------- accuracy
def exact_svd(A):
    U, s, Vt = np.linalg.svd(np.asarray(A, dtype=np.float64), full_matrices=False)
    return U, s


def errors(U, s, U_ref, s_ref, r):
    """(max relative singular-value error, sin of the largest principal angle)."""
    s = np.asarray(s, dtype=np.float64)[:r]
    sv = float(np.max(np.abs(s - s_ref[:r]) / s_ref[:r]))
    cos = np.linalg.svd(U_ref[:, :r].T @ np.asarray(U, dtype=np.float64)[:, :r], compute_uv=False)
    return sv, float(np.sqrt(max(0.0, 1.0 - cos.min() ** 2)))


def residual_ratio(A, U, s_ref, r):
    """‖A − UUᵀA‖₂ / σ_{r+1}: 1 is the best any rank-r basis can do (Halko et al., §1.4)."""
    U = np.asarray(U, dtype=np.float64)[:, :r]
    return float(np.linalg.norm(A - U @ (U.T @ A), 2) / s_ref[r])


def slow_decay_matrix(rows, cols, power, seed=0):
    rng = np.random.default_rng(seed)
    k = min(rows, cols)
    U = np.linalg.qr(rng.standard_normal((rows, k)))[0]
    V = np.linalg.qr(rng.standard_normal((cols, k)))[0]
    return (U * (np.arange(1, k + 1) ** -power)) @ V.T


def svd_methods():
    import dask.array as da
    import torch
    from sklearn.utils.extmath import randomized_svd as sk_rsvd

    import unicon_dist as ud

    def ours(A, r, p, q, seed):
        U, s, _ = ud.randomized_svd(torch.as_tensor(A), r, oversampling=p, n_power_iter=q, seed=seed)
        return U.numpy(), s.numpy()

    def sklearn(A, r, p, q, seed):
        U, s, _ = sk_rsvd(A, r, n_oversamples=p, n_iter=q, power_iteration_normalizer="QR", random_state=seed)
        return U, s

    def dask(A, r, p, q, seed):
        chunks = (max(1, A.shape[0] // 4), A.shape[1])  # tall-skinny row blocks, as svd_compressed expects
        U, s, _ = da.linalg.svd_compressed(da.from_array(A, chunks=chunks), r, n_power_iter=q,
                                           n_oversamples=p, seed=seed, compute=True)
        return np.asarray(U), np.asarray(s)

    return {"unicon_dist": ours, "sklearn": sklearn, "dask": dask}


# --------------------------------------------------------------------- data
def two_views(n, d=64, seed=0, clusters=50, latent=16):
    """Clustered synthetic pairs: a shared latent point seen through two nonlinear maps."""
    rng = np.random.default_rng(seed)
    centres = 2.0 * rng.standard_normal((clusters, latent))
    z = centres[rng.integers(clusters, size=n)] + 0.5 * rng.standard_normal((n, latent))
    ax = rng.standard_normal((latent, d)) / np.sqrt(latent)
    ay = rng.standard_normal((latent, d)) / np.sqrt(latent)
    x = np.tanh(z @ ax) + 0.1 * rng.standard_normal((n, d))
    y = np.sin(z @ ay) + 0.1 * rng.standard_normal((n, d))
    return x.astype(np.float32), y.astype(np.float32)


def _bandwidths(x, y):
    import torch

    import unicon_dist as ud

    return [ud.get_kernel("rbf").resolve(torch.as_tensor(v[:20000]), seed=0).bandwidth for v in (x, y)]


# ------------------------------------------------------------------ workers
def worker_pipeline(p):
    import torch

    n, m, r = p["n"], p["m"], p["r"]
    x, y = two_views(n, seed=p["seed"])
    held_x, held_y = two_views(2000, seed=p["seed"] + 1)
    bw = p["bandwidths"]
    rss0 = H.rss_mib()
    H.reset_peak()
    stages = {}
    if p["method"] == "unicon_dist":
        import unicon_dist as ud

        with H.Timer() as t:
            maps = [ud.NystroemMap.fit(v, ud.kernels.RBF(bandwidth=b), m, seed=p["seed"]) for v, b in zip((x, y), bw)]
            phi = [mp.transform(v, dtype=torch.float32) for mp, v in zip(maps, (x, y))]
        stages["features"] = t
        zeros = torch.zeros((n, 1))
        with H.Timer() as t:
            C = ud.weighted_cross_product(phi[0], phi[1], zeros, zeros).numpy()
        stages["cross_covariance"] = t
        with H.Timer() as t:
            U, s, _ = ud.randomized_svd(torch.as_tensor(C), r, oversampling=p["p"], n_power_iter=p["q"], seed=0)
            U, s = U.numpy(), s.numpy()
        stages["svd"] = t
        held_phi = [mp.transform(v).numpy() for mp, v in zip(maps, (held_x, held_y))]
    else:
        from sklearn.kernel_approximation import Nystroem
        from sklearn.utils.extmath import randomized_svd

        with H.Timer() as t:
            maps = [Nystroem(kernel="rbf", gamma=0.5 / b**2, n_components=m, random_state=p["seed"]).fit(v)
                    for v, b in zip((x, y), bw)]
            phi = [mp.transform(v) for mp, v in zip(maps, (x, y))]
        stages["features"] = t
        with H.Timer() as t:
            px = phi[0] - phi[0].mean(0)
            py = phi[1] - phi[1].mean(0)
            C = (px.T @ py).astype(np.float64) / n
            del px, py
        stages["cross_covariance"] = t
        with H.Timer() as t:
            U, s, _ = randomized_svd(C, r, n_oversamples=p["p"], n_iter=p["q"], power_iteration_normalizer="QR",
                                     random_state=0)
        stages["svd"] = t
        held_phi = [mp.transform(v).astype(np.float64) for mp, v in zip(maps, (held_x, held_y))]
    peak = H.maxrss_mib()
    if p.get("save_c"):  # the part "svd" reuses this C as one of its matrices
        np.save(HERE / "results" / "_nystrom_C.npy", C)
    # accuracy, after the measurement: kernel approximation on held rows, SVD against LAPACK
    approx = []
    for v, f, b in zip((held_x, held_y), held_phi, bw):
        v = v.astype(np.float64)
        sq = (v * v).sum(1)
        K = np.exp(-np.maximum(sq[:, None] + sq[None, :] - 2 * v @ v.T, 0) / (2 * b * b))
        approx.append(float(np.linalg.norm(K - f @ f.T) / np.linalg.norm(K)))
    U_ref, s_ref = exact_svd(C)
    sv_err, sub_err = errors(U, s, U_ref, s_ref, r)
    return {
        **p,
        "residual_ratio": residual_ratio(C, U, s_ref, r),
        "seconds": {k: v.seconds for k, v in stages.items()},
        "total_s": sum(v.seconds for v in stages.values()),
        "cpu_utilisation": min(v.utilisation for v in stages.values()),
        "rss_before_mib": rss0,
        "peak_rss_mib": peak,
        "inputs_mib": (x.nbytes + y.nbytes) / 2**20,
        "kernel_approx_error": approx,
        "sv_error": sv_err,
        "subspace_error": sub_err,
        "features": int(phi[0].shape[1]),
    }


def worker_streamed(p):
    import torch

    import unicon_dist as ud

    n, m, r = p["n"], p["m"], p["r"]
    g = torch.Generator().manual_seed(p["seed"])
    # features with a slowly decaying spectrum (column k scaled by k^(-1/2)), so that the
    # top-r subspace of C is well defined but not trivially separated
    decay = torch.arange(1, m + 1, dtype=torch.float32) ** -0.5
    phi_x = torch.randn(n, m, generator=g) * decay
    phi_y = (phi_x @ torch.randn(m, m, generator=g) / m**0.5 + 0.5 * torch.randn(n, m, generator=g)) * decay
    zx = torch.nn.functional.normalize(phi_x[:, :64] + 0.3 * torch.randn(n, 64, generator=g), dim=1)
    zy = torch.nn.functional.normalize(phi_y[:, :64] + 0.3 * torch.randn(n, 64, generator=g), dim=1)
    rss0 = H.rss_mib()
    H.reset_peak()
    with H.Timer() as t:
        op = ud.CrossProductOperator(phi_x, phi_y, zx, zy, temperature=0.07)
        U, s, _ = ud.randomized_svd(op, r, oversampling=p["p"], n_power_iter=p["q"], seed=0)
    peak = H.maxrss_mib()
    with H.Timer() as t_full:
        C = op.materialize().numpy()
    U_ref, s_ref = exact_svd(C)
    sv_err, sub_err = errors(U.numpy(), s.numpy(), U_ref, s_ref, r)
    return {**p, "residual_ratio": residual_ratio(C, U.numpy(), s_ref, r), "seconds": t.seconds,
            "materialize_s": t_full.seconds, "cpu_utilisation": t.utilisation,
            "rss_before_mib": rss0, "peak_rss_mib": peak, "rss_increment_mib": peak - rss0,
            "inputs_mib": (phi_x.nbytes + phi_y.nbytes + zx.nbytes + zy.nbytes) / 2**20,
            "sv_error": sv_err, "subspace_error": sub_err}


WORKERS = {"pipeline": worker_pipeline, "streamed": worker_streamed}


# -------------------------------------------------------------------- parts
def part_svd(args):
    import time

    rows = []
    x, y = two_views(20000, seed=0)
    bw = _bandwidths(x, y)
    c_path = HERE / "results" / "_nystrom_C.npy"
    c_path.unlink(missing_ok=True)  # never reuse a C left by an earlier run
    pipe = H.spawn(Path(__file__), "pipeline", {"method": "unicon_dist", "n": 20000, "m": LANDMARKS, "r": RANK,
                                                  "p": OVERSAMPLING, "q": POWER_ITER, "seed": 0, "bandwidths": bw,
                                                  "save_c": True})
    matrices = {
        "3000×1500, σ_k = k^-1/2": slow_decay_matrix(3000, 1500, 0.5),
        "3000×1500, σ_k = k^-1": slow_decay_matrix(3000, 1500, 1.0),
    }
    if c_path.exists():
        matrices["Nyström cross-cov. C (n = 20k, m = 1000)"] = np.load(c_path)
    for name, A in matrices.items():
        U_ref, s_ref = exact_svd(A)
        for q in (0, POWER_ITER):
            for method, fn in svd_methods().items():
                times, sv, sub, res = [], [], [], []
                for seed in range(SVD_SEEDS):
                    t0 = time.perf_counter()
                    U, s = fn(A, RANK, OVERSAMPLING, q, seed)
                    times.append(time.perf_counter() - t0)
                    e = errors(U, s, U_ref, s_ref, RANK)
                    sv.append(e[0])
                    sub.append(e[1])
                    res.append(residual_ratio(A, U, s_ref, RANK))
                rows.append({"matrix": name, "q": q, "method": method, "seconds": float(np.median(times)),
                             "sv_error": float(np.median(sv)), "subspace_error": float(np.median(sub)),
                             "residual_ratio": float(np.median(res)), "residual_ratio_p90": float(np.percentile(res, 90)),
                             "sv_error_all": sv, "residual_ratio_all": res})
    lines = [f"r = {RANK}, p = {OVERSAMPLING}; medians over seeds 0..{SVD_SEEDS - 1} of each method's own random "
             "test matrix; errors against LAPACK (numpy.linalg.svd). residual = ‖A − UUᵀA‖₂/σ_(r+1) (1 is optimal).", "",
             "| matrix | q | method | sv error | subspace sin θ | residual (median / 90th pct) | seconds (median) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['matrix']} | {r['q']} | {r['method']} | {r['sv_error']:.2e} | "
                     f"{r['subspace_error']:.2e} | {r['residual_ratio']:.4f} / {r['residual_ratio_p90']:.4f} | "
                     f"{r['seconds']:.3f} |")
    return {"rows": rows, "pipeline_for_C": pipe}, lines


def part_pipeline(args):
    rows = []
    x, y = two_views(20000, seed=0)
    bw = _bandwidths(x, y)
    for n in args.sizes or PIPELINE_SIZES:
        for method in ("unicon_dist", "sklearn"):
            print(f"pipeline n={n} {method} ...", file=sys.stderr, flush=True)
            rows.append(H.spawn(Path(__file__), "pipeline", {"method": method, "n": n, "m": LANDMARKS, "r": RANK,
                                                             "p": OVERSAMPLING, "q": POWER_ITER, "seed": 0,
                                                             "bandwidths": bw}))
    lines = [f"RBF (median-heuristic bandwidth of each view, shared by both libraries), m = {LANDMARKS} landmarks, "
             f"r = {RANK}, p = {OVERSAMPLING}, q = {POWER_ITER}; one fresh process per row", "",
             "| n | method | features s | C s | SVD s | total s | peak RSS MiB | inputs MiB | kernel err x / y | "
             "SVD residual |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['n']} | {r['method']} | failed: {r['error']} {r.get('stderr_tail')} |")
            continue
        sec = r["seconds"]
        lines.append(f"| {r['n']} | {r['method']} | {sec['features']:.2f} | {sec['cross_covariance']:.2f} | "
                     f"{sec['svd']:.3f} | {r['total_s']:.2f} | {r['peak_rss_mib']:.0f} | {r['inputs_mib']:.0f} | "
                     f"{r['kernel_approx_error'][0]:.2e} / {r['kernel_approx_error'][1]:.2e} | {r['residual_ratio']:.4f} |")
    return {"rows": rows}, lines


def part_streamed(args):
    rows = []
    for n in args.sizes or STREAMED_SIZES:
        print(f"streamed n={n} ...", file=sys.stderr, flush=True)
        rows.append(H.spawn(Path(__file__), "streamed", {"n": n, "m": 512, "r": RANK, "p": OVERSAMPLING,
                                                         "q": POWER_ITER, "seed": 0}))
    lines = [f"randomized_svd through the streamed operator (C·Ω, Cᵀ·Ω; C never formed), CLIP τ = 0.07, "
             f"cosine embeddings of width 64, m_x = m_y = 512, r = {RANK}, p = {OVERSAMPLING}, q = {POWER_ITER}", "",
             "| n | seconds | materialise C once, s | peak RSS MiB | RSS increment MiB | inputs MiB | sv error | "
             "subspace sin θ | residual |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['n']} | failed: {r['error']} {r.get('stderr_tail')} |")
            continue
        lines.append(f"| {r['n']} | {r['seconds']:.1f} | {r['materialize_s']:.1f} | {r['peak_rss_mib']:.0f} | "
                     f"{r['rss_increment_mib']:.0f} | {r['inputs_mib']:.0f} | {r['sv_error']:.1e} | "
                     f"{r['subspace_error']:.1e} | {r['residual_ratio']:.4f} |")
    return {"rows": rows}, lines


def _retrieval_rows(name, train, test, kernels, rank, temperature, landmarks, max_iter):
    import time

    import unicon_dist as ud

    (xl, xr), (tl, tr, labels) = train, test
    mean_l, mean_r = xl.mean(0), xr.mean(0)
    rows = []
    for kernel in kernels:
        print(f"retrieval {name} {kernel} ...", file=sys.stderr, flush=True)
        model = ud.UniCon(rank=rank, kernel=kernel, temperature=temperature, max_iter=max_iter,
                          n_landmarks=None if kernel == "linear" else min(landmarks, len(xl)))
        t0 = time.perf_counter()
        model.fit(xl - mean_l, xr - mean_r)
        fit_s = time.perf_counter() - t0
        zx, zy = model.encode_x(tl - mean_l), model.encode_y(tr - mean_r)
        inst = ud.retrieval_metrics(zx, zy)
        cls = ud.retrieval_metrics(zx, zy, groups=labels)
        rows.append({"dataset": name, "kernel": kernel, "fit_s": fit_s, "iterations": model.n_iter_,
                     "instance": inst, "class": cls})
    return rows


def part_retrieval(args):
    from unicon_dist.data.datasets import load_digits_halves, load_fashion_mnist_halves

    left, right, labels = load_digits_halves()
    perm = np.random.default_rng(0).permutation(len(left))
    test, train = perm[: len(left) // 4], perm[len(left) // 4 :]
    rows = _retrieval_rows("digits", (left[train], right[train]), (left[test], right[test], labels[test]),
                           KERNELS, rank=16, temperature=0.5, landmarks=LANDMARKS, max_iter=10)
    try:
        fl, fr, _ = load_fashion_mnist_halves("train")
        tl, tr, tlab = load_fashion_mnist_halves("test")
        sub = np.random.default_rng(0).permutation(len(fl))[: args.fashion_train]
        rows += _retrieval_rows("fashion-mnist", (fl[sub], fr[sub]), (tl, tr, tlab), KERNELS, rank=64,
                                temperature=0.1, landmarks=LANDMARKS, max_iter=args.fashion_iter)
    except FileNotFoundError as exc:
        print(f"skipping Fashion-MNIST: {exc}", file=sys.stderr)
    lines = ["UniCon (CLIP loss, cosine similarity) per kernel; inputs centred with the training means; "
             f"Nyström with {LANDMARKS} uniform landmarks (all training pairs for digits) for every kernel but linear. "
             "digits: r = 16, τ = 0.5, 1348 train / 449 test pairs. Fashion-MNIST: r = 64, τ = 0.1, "
             f"{args.fashion_train} train pairs, 10,000 test pairs. Instance R@1: a half retrieves its own other half "
             "among all test pairs; class R@1: any other half of the same class counts.", "",
             "| dataset | kernel | x→y R@1 | y→x R@1 | x→y R@10 | class x→y R@1 | class y→x R@1 | iterations | fit s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        i, c = r["instance"], r["class"]
        lines.append(f"| {r['dataset']} | {r['kernel']} | {i['x2y_R@1']:.3f} | {i['y2x_R@1']:.3f} | "
                     f"{i['x2y_R@10']:.3f} | {c['x2y_R@1']:.3f} | {c['y2x_R@1']:.3f} | {r['iterations']} | "
                     f"{r['fit_s']:.1f} |")
    return {"rows": rows}, lines


PARTS = {"svd": part_svd, "pipeline": part_pipeline, "streamed": part_streamed, "retrieval": part_retrieval}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", nargs="?", choices=[*PARTS, "all"], default="all")
    ap.add_argument("--sizes", type=int, nargs="+", help="values of n for the pipeline or streamed part")
    ap.add_argument("--fashion-train", type=int, default=20000, help="Fashion-MNIST training pairs")
    ap.add_argument("--fashion-iter", type=int, default=10, help="max_iter on Fashion-MNIST")
    ap.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        params = json.loads(args.params)
        out = WORKERS[args.worker](params)
        print(json.dumps(out))
        return
    (HERE / "results").mkdir(exist_ok=True)
    print(f"Machine: {H.machine_line()}\n")
    for name in (PARTS if args.part == "all" else [args.part]):
        result, lines = PARTS[name](args)
        result["machine"] = H.machine_line()
        (HERE / "results" / f"kernels_{name}.json").write_text(json.dumps(result, indent=2, default=str))
        print(f"## {name}\n")
        print("\n".join(lines) + "\n", flush=True)
        busy = [r for r in result["rows"] if isinstance(r, dict) and r.get("cpu_utilisation", 1.0) < 0.8]
        if busy:
            print(f"WARNING: {len(busy)} rows ran below 0.8 CPU utilisation (another process took the cores)\n")


if __name__ == "__main__":
    main()
