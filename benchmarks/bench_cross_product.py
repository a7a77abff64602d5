"""Benchmark: streamed C = Φ_Xᵀ S Φ_Y against the dense reference, on CPU.

For each size n the script runs, each in a fresh Python subprocess (so that the
peak RSS belongs to one configuration only):

* ``streamed``: ``unicon_dist.weighted_cross_product`` (CLIP, τ = 0.07) on the tiled
  passes (``fused="off"``), which stream the similarity tiles twice and never form the
  n × n matrix S;
* ``fused``: the same call through the fused attention kernels (``fused="attention"``,
  :mod:`unicon_dist.solver.fused`): two kernel calls, queries z_x/τ and z_y, values Φ_Y
  and Φ_X, each returning its log-sum-exp;
* ``dense`` (n ≤ --dense-max): s = z_x z_yᵀ (float32), S = similarity_weights(s),
  C = Φ_Xᵀ (S Φ_Y) — all of it in memory.

One more subprocess measures the machine: the torch float32 GEMM rate (best of 3,
4096 × 4096 @ 4096 × 4096) and the rate of torch's scaled_dot_product_attention at
n = 20000, r = m = 128, so that the streamed rate can be read against both.

Data: seeded ``torch.randn``; z rows L2-normalised (cosine similarities, so
|s/τ| ≤ 1/0.07 ≈ 14.3); float32; rank r of z and width m of Φ both 128 by default.
Only the product is timed (data generation is not), after a small untimed warm-up
call of the same method at n = 256.  Torch threading is left at its defaults.

Nominal flop counts used for the GFLOP/s columns:

* streamed (two passes): F = 2n²(2r + m) + 2n·m_x·m_y — pass 1 forms the n² scores
  once (2n²r), pass 2 forms them again (2n²r) and multiplies the tile by Φ_Y (2n²m),
  plus the final Φ_Xᵀ R products (2n·m_x·m_y);
* dense: F = 2n²(r + m) + 2n·m_x·m_y — s once, S Φ_Y, Φ_Xᵀ (S Φ_Y);
* fused: the same nominal F as streamed (so the two rates compare times), and its own
  work, 2·2n²(max(r,m) + max(r,m)) + 2·2n·m_x·m_y (two kernels, each forming the scores
  once at the padded width and multiplying by its values), in the JSON as ``own_gflops``;
* attention: 2n²(r + m) (QKᵀ and PV).

Elementwise work (exp, reductions) is not counted in any of them.

Usage::

    python benchmarks/bench_cross_product.py            # full sweep (quiet machine!)
    python benchmarks/bench_cross_product.py --quick    # n = 2000, 5000 smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import _harness as H  # noqa: E402

DEFAULT_SIZES = [2000, 5000, 10000, 20000, 50000, 100000, 200000]
QUICK_SIZES = [2000, 5000]
TEMPERATURE = 0.07
SDPA_N = 20000
GEMM_N = 4096
WARMUP_N = 256
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TORCH_NUM_THREADS")


# ---------------------------------------------------------------- flop counts
def flops_streamed(n: int, r: int, m: int) -> float:
    return 2.0 * n * n * (2 * r + m) + 2.0 * n * m * m


def flops_dense(n: int, r: int, m: int) -> float:
    return 2.0 * n * n * (r + m) + 2.0 * n * m * m


def flops_fused_own(n: int, r: int, m: int) -> float:
    w = max(r, m)
    return 2.0 * 2 * n * n * (w + w) + 2.0 * 2 * n * m * m


def flops_attention(n: int, r: int, m: int) -> float:
    return 2.0 * n * n * (r + m)


# --------------------------------------------------------------------- worker
def _make_data(n: int, r: int, m: int, seed: int = 0):
    """z_x, z_y (n × r, unit rows) and Φ_X, Φ_Y (n × m), float32, seeded.

    Everything is generated and normalised in place, so no large temporaries
    inflate the peak RSS before the timed call.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    z_x = torch.randn(n, r, generator=g, dtype=torch.float32)
    z_y = torch.randn(n, r, generator=g, dtype=torch.float32)
    phi_x = torch.randn(n, m, generator=g, dtype=torch.float32)
    phi_y = torch.randn(n, m, generator=g, dtype=torch.float32)
    z_x.div_(z_x.norm(dim=1, keepdim=True))
    z_y.div_(z_y.norm(dim=1, keepdim=True))
    return phi_x, phi_y, z_x, z_y


def _product(method: str):
    """The function z, Φ → C (float64 tensor) for ``method``."""
    import torch

    import unicon_dist

    if method in ("streamed", "fused"):
        fused = "off" if method == "streamed" else "attention"

        def run(phi_x, phi_y, z_x, z_y):
            return unicon_dist.weighted_cross_product(phi_x, phi_y, z_x, z_y, loss="clip", temperature=TEMPERATURE,
                                                      fused=fused)

    elif method == "dense":

        def run(phi_x, phi_y, z_x, z_y):
            s = z_x @ z_y.T
            S = unicon_dist.similarity_weights(s, loss="clip", temperature=TEMPERATURE)
            return (phi_x.T @ (S @ phi_y)).to(torch.float64)

    else:
        raise ValueError(method)
    return run


def worker_product(args) -> dict:
    import torch

    run = _product(args.worker)
    # untimed warm-up on a tiny problem: thread pool start-up, lazy init of kernels
    run(*_make_data(WARMUP_N, args.rank, args.dim, seed=1))
    data = _make_data(args.n, args.rank, args.dim, seed=args.seed)
    rss_before = H.rss_mib()
    maxrss_before = H.maxrss_mib()
    times, cpu = [], []
    C = None
    for _ in range(args.repeats):
        C = None  # release the previous result before the next call
        c0 = H.cpu_s()
        t0 = time.perf_counter()
        C = run(*data)
        times.append(time.perf_counter() - t0)
        cpu.append(H.cpu_s() - c0)
    maxrss_after = H.maxrss_mib()
    if args.save_c:
        import numpy as np

        np.save(args.save_c, C.detach().cpu().numpy().astype(np.float64))
    out = {
        "method": args.worker,
        "n": args.n,
        "rank": args.rank,
        "dim": args.dim,
        "times_s": times,
        "seconds": min(times),
        "cpu_s": cpu,
        # CPU seconds / (wall seconds × threads) of the best call: about 1 on an idle
        # machine; clearly lower when other processes took the cores away
        "cpu_utilisation": cpu[times.index(min(times))] / (min(times) * torch.get_num_threads()),
        "rss_before_mib": rss_before,
        "maxrss_before_mib": maxrss_before,
        "peak_rss_mib": maxrss_after,
        "rss_increment_mib": maxrss_after - rss_before,
        "torch_threads": torch.get_num_threads(),
        "finite": bool(torch.isfinite(C).all()),
    }
    if args.worker in ("streamed", "fused"):
        try:
            from unicon_dist.solver.planning import plan_tiles

            p = plan_tiles(args.n, args.rank + args.dim, itemsize=4)
            out["tile"] = [p.block_rows, p.block_cols]
        except Exception as exc:  # informational only
            out["tile"] = f"unavailable: {exc!r}"
    return out


def worker_machine(args) -> dict:
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    a = torch.randn(GEMM_N, GEMM_N, generator=g)
    b = torch.randn(GEMM_N, GEMM_N, generator=g)
    gemm_times = []
    for _ in range(3):
        t0 = time.perf_counter()
        torch.mm(a, b)
        gemm_times.append(time.perf_counter() - t0)
    gemm_gflops = 2.0 * GEMM_N**3 / min(gemm_times) / 1e9
    del a, b

    n, r, m = args.sdpa_n, args.rank, args.dim
    q = torch.randn(1, 1, n, r, generator=g)
    k = torch.randn(1, 1, n, r, generator=g)
    v = torch.randn(1, 1, n, m, generator=g)
    with torch.no_grad():
        F.scaled_dot_product_attention(q[:, :, :256], k[:, :, :256], v[:, :, :256])  # warm-up
        sdpa_times = []
        for _ in range(3):
            t0 = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v)
            sdpa_times.append(time.perf_counter() - t0)
    sdpa_gflops = flops_attention(n, r, m) / min(sdpa_times) / 1e9
    return {
        "gemm_n": GEMM_N,
        "gemm_times_s": gemm_times,
        "gemm_gflops": gemm_gflops,
        "sdpa_n": n,
        "sdpa_rank": r,
        "sdpa_dim": m,
        "sdpa_times_s": sdpa_times,
        "sdpa_gflops": sdpa_gflops,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch_parallel_info": torch.__config__.parallel_info(),
    }


def worker_main(args) -> None:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # benchmark the checkout this script lives in
    out = worker_machine(args) if args.worker == "machine" else worker_product(args)
    print(json.dumps(out))


# --------------------------------------------------------------------- driver
def spawn(worker: str, extra: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, *extra]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-5:]
        return {"error": f"worker exited with {proc.returncode}", "stderr_tail": tail, "process_wall_s": wall}
    try:
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": "no JSON from worker", "stdout": proc.stdout[-2000:], "process_wall_s": wall}
    out["process_wall_s"] = wall
    out["loadavg_1min_before"] = load
    return out


def _fmt(x, spec):
    return "—" if x is None else format(x, spec)


def markdown_table(rows: list[dict], gemm: float | None) -> str:
    head = ("| n | method | seconds | GFLOP/s | % of GEMM | own GFLOP/s (% of GEMM) | peak RSS (MiB) | "
            "RSS increment (MiB) | rel. diff |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['n']} | {r['method']} | failed: {r['error']} | | | | | | |")
            continue
        pct = None if gemm is None else 100.0 * r["gflops"] / gemm
        rel = r.get("rel_diff")
        own = r.get("own_gflops")
        own_s = "—" if own is None else f"{own:.1f} ({_fmt(None if gemm is None else 100.0 * own / gemm, '.1f')})"
        rel_s = _fmt(rel, ".2e") + ("" if rel is None else f" vs {r.get('rel_diff_to')}")
        lines.append(
            f"| {r['n']} | {r['method']} | {r['seconds']:.3f} | {r['gflops']:.1f} | {_fmt(pct, '.1f')} | {own_s} | "
            f"{r['peak_rss_mib']:.0f} | {r['rss_increment_mib']:.0f} | {rel_s} |"
        )
    return "\n".join(lines)


def driver(args) -> None:
    import tempfile

    import numpy as np

    sizes = QUICK_SIZES if args.quick else args.sizes
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    r, m = args.rank, args.dim
    common = ["--rank", str(r), "--dim", str(m), "--repeats", str(args.repeats), "--seed", str(args.seed)]

    machine_info = {
        "cpu_model": H.cpu_model(),
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "thread_env": {k: os.environ.get(k) for k in THREAD_ENV},
    }
    try:
        import psutil

        machine_info["physical_cores"] = psutil.cpu_count(logical=False)
        machine_info["total_memory_gib"] = psutil.virtual_memory().total / 2**30
    except ImportError:
        pass
    print("measuring GEMM and attention rates ...", file=sys.stderr, flush=True)
    machine = spawn("machine", [*common, "--sdpa-n", str(args.sdpa_n)])
    machine_info.update(machine)
    gemm = machine.get("gemm_gflops")

    result = {
        "description": "C = phi_x^T S phi_y, S = CLIP similarity weights of z_x z_y^T (tau=0.07); "
        "streamed = unicon_dist.weighted_cross_product, dense = similarity_weights + two matmuls",
        "flops": {
            "streamed": "2 n^2 (2 r + m) + 2 n m_x m_y  (two passes: scores twice, tile @ phi_y once)",
            "dense": "2 n^2 (r + m) + 2 n m_x m_y",
            "attention": "2 n^2 (r + m)",
        },
        "config": {"sizes": sizes, "dense_max": args.dense_max, "rank": r, "dim": m,
                   "repeats": args.repeats, "seed": args.seed, "temperature": TEMPERATURE,
                   "dtype": "float32", "warmup_n": WARMUP_N},
        "machine": machine_info,
        "results": [],
    }

    def save():
        out_path.write_text(json.dumps(result, indent=2))

    rows = result["results"]
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            paths = {}
            for method in ("dense", "streamed", "fused"):
                if method == "dense" and n > args.dense_max:
                    continue
                paths[method] = os.path.join(tmp, f"C_{method}_{n}.npy")
                print(f"n={n} {method} ...", file=sys.stderr, flush=True)
                res = spawn(method, [*common, "--n", str(n), "--save-c", paths[method]])
                res.setdefault("method", method)
                res.setdefault("n", n)
                if "error" not in res:
                    f = (flops_dense if method == "dense" else flops_streamed)(n, r, m)
                    res["flops"] = f
                    res["gflops"] = f / res["seconds"] / 1e9
                    if method == "fused":
                        res["own_gflops"] = flops_fused_own(n, r, m) / res["seconds"] / 1e9
                    if gemm:
                        res["pct_of_gemm"] = 100.0 * res["gflops"] / gemm
                rows.append(res)
                save()
            ok = {mth: p for mth, p in paths.items()
                  if os.path.exists(p) and not any("error" in x for x in rows if x["n"] == n and x["method"] == mth)}
            # against dense where it ran, else the fused C against the streamed one
            ref = "dense" if "dense" in ok else "streamed"
            for mth in ok:
                if mth != ref and ref in ok:
                    Cr, Cm = np.load(ok[ref]), np.load(ok[mth])
                    rel = float(np.abs(Cm - Cr).max() / np.abs(Cr).max())
                    for x in rows:
                        if x["n"] == n and x["method"] == mth and "error" not in x:
                            x["rel_diff"] = rel
                            x["rel_diff_to"] = ref
                save()

    lines = [
        "",
        f"Machine: {machine_info['cpu_model']}, {machine_info['logical_cpus']} logical CPUs "
        f"({machine_info.get('physical_cores', '?')} physical), "
        f"{machine_info.get('total_memory_gib', float('nan')):.0f} GiB RAM; "
        f"torch {machine.get('torch_version', '?')}, torch.get_num_threads() = {machine.get('torch_threads', '?')}",
    ]
    if "error" in machine:
        lines.append(f"machine worker failed: {machine['error']} {machine.get('stderr_tail')}")
    else:
        lines.append(
            f"float32 GEMM ({GEMM_N}³, best of 3): {machine['gemm_gflops']:.1f} GFLOP/s; "
            f"scaled_dot_product_attention (n={machine['sdpa_n']}, r=m={r}, best of 3): "
            f"{machine['sdpa_gflops']:.1f} GFLOP/s = {100 * machine['sdpa_gflops'] / machine['gemm_gflops']:.1f}% of GEMM"
        )
    lines += [
        f"r = {r}, m_x = m_y = {m}, float32, CLIP τ = {TEMPERATURE}; seconds = best of {args.repeats} "
        "(data generation excluded, after a warm-up call at n = 256), one fresh process per row.",
        "GFLOP/s: streamed F = 2n²(2r+m) + 2n·m_x·m_y (two passes), dense F = 2n²(r+m) + 2n·m_x·m_y; "
        "elementwise work not counted.",
        "Peak RSS = VmHWM of the worker process (includes the inputs); increment = peak − RSS just before the timed call.",
        "rel. diff = max|C − C_ref| / max|C_ref|, C_ref the dense C (float32) where it ran, else the streamed one.",
        "",
        markdown_table(rows, gemm),
    ]
    busy = [f"n={x['n']} {x['method']} ({x['cpu_utilisation']:.2f})" for x in rows
            if "error" not in x and x.get("cpu_utilisation", 1.0) < 0.8]
    if busy:
        lines += ["", "WARNING: CPU utilisation (CPU s / (wall s × threads)) below 0.8 for " + ", ".join(busy)
                  + ": other processes competed for the cores; these timings are not trustworthy."]
    lines += ["", f"JSON: {out_path}"]
    print("\n".join(lines))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=DEFAULT_SIZES, help="values of n")
    p.add_argument("--dense-max", type=int, default=20000, help="run the dense reference only for n <= this")
    p.add_argument("--rank", type=int, default=128, help="embedding dimension r of z_x, z_y")
    p.add_argument("--dim", type=int, default=128, help="feature dimension m = m_x = m_y of phi_x, phi_y")
    p.add_argument("--repeats", type=int, default=1, help="timed calls per configuration (best is reported)")
    p.add_argument("--out", default=str(HERE / "results" / "cross_product.json"), help="JSON output path")
    p.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES} only (smoke test)")
    p.add_argument("--seed", type=int, default=0, help="data seed")
    p.add_argument("--sdpa-n", type=int, default=SDPA_N, help="n of the attention reference")
    # internal: one measurement in this (fresh) process
    p.add_argument("--worker", choices=["streamed", "fused", "dense", "machine"], help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--save-c", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.worker:
        worker_main(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
