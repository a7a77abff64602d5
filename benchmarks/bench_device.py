"""Benchmark: the same passes and fits on the CPU and on a CUDA device, in one process.

Three workloads on seeded synthetic pairs (float32 tiles, library defaults otherwise), each run
on every device named (default: "cpu" and, if visible, "cuda"), timed as wall seconds with the
device synchronised, and checked against the first device's result:

``pass``
    One streamed C = Φ_xᵀ S Φ_y with full negatives (statistics + product passes over all
    n² pairs): n = 40,000, 512 + 512 features, r = 128 embeddings.
``linear``
    ``UniCon(rank=128, negatives=4096)`` on n = 200,000 pairs of 512 + 512 features, three
    iterations.
``rbf``
    ``UniCon(kernel="rbf", n_landmarks=2048, rank=128, negatives=4096)`` on n = 100,000 pairs
    of 392 + 392 features, three iterations: 2048 features per view, so the matrix-free
    randomized SVD.

Usage::

    python benchmarks/bench_device.py run [--devices cpu cuda] [--quick] [--out PATH] [--commit HASH]
    python benchmarks/bench_device.py report [PATH]     # the Markdown table of RESULTS §10
    python benchmarks/bench_device.py profile [--device cuda] [--out PATH]   # one iteration, torch.profiler

``--out`` defaults to ``benchmarks/results/device.json`` (``device_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import datetime
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

import torch  # noqa: E402

import unicon_dist as ud  # noqa: E402
from bench_iteration import pairs  # noqa: E402  (that script stays self-contained: see its docstring)

FULL = {"pass": dict(n=40_000, d=512, r=128), "linear": dict(n=200_000, d=512, r=128),
        "rbf": dict(n=100_000, d=392, r=128, m=2048), "linear-1m": dict(n=1_000_000, d=512, r=128)}
QUICK = {"pass": dict(n=2_000, d=32, r=16), "linear": dict(n=4_000, d=32, r=8),
         "rbf": dict(n=3_000, d=24, r=8, m=80), "linear-1m": dict(n=8_000, d=32, r=8)}
WORKLOADS = ("pass", "linear", "rbf", "linear-1m")
DEFAULT_WORKLOADS = ("pass", "linear", "rbf")


def parse(spec: str) -> tuple[str, int | None]:
    """"cuda@32": device "cuda" with ``memory_budget`` 32 MiB (the CPU's default tile plan)."""
    device, _, mib = spec.partition("@")
    return device, (int(mib) << 20) if mib else None


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def run_pass(size: dict, spec: str) -> tuple[dict, np.ndarray]:
    device, budget = parse(spec)
    X, Y = pairs(size["n"], size["d"])
    g = torch.Generator().manual_seed(1)
    F1, F2 = (torch.randn(size["r"], size["d"], generator=g, dtype=torch.float64) / size["d"] ** 0.5
              for _ in range(2))
    tensors = [torch.as_tensor(a, device=device) for a in (X, Y)]
    zx, zy = (torch.nn.functional.normalize(T @ F.to(device=device, dtype=torch.float32).T, dim=1)
              for T, F in zip(tensors, (F1, F2)))

    def go():
        op = ud.CrossProductOperator(*tensors, zx, zy, temperature=0.1, device=device, dtype=torch.float32,
                                     memory_budget=budget)
        return op.materialize()

    C, seconds = timed(device, go)
    return {"seconds": seconds, "pairs_per_s": size["n"] ** 2 / seconds}, C.cpu().numpy()


def run_fit(size: dict, spec: str, kernel: str) -> tuple[dict, np.ndarray]:
    device, budget = parse(spec)
    X, Y = pairs(size["n"], size["d"])
    opts = dict(rank=size["r"], negatives=4096, max_iter=3, tol=0.0, loss_tol=0.0, seed=0, device=device,
                memory_budget=budget)
    if kernel == "rbf":
        # above 1024 features ``svd="auto"`` picks the matrix-free randomized SVD; say so for small m
        opts.update(kernel="rbf", n_landmarks=size["m"], svd="auto" if size["m"] > 1024 else "randomized")
    model, seconds = timed(device, lambda: ud.UniCon(**opts).fit(X, Y))
    iters = [h["seconds"] for h in model.history_]
    return {"seconds": seconds, "iterations": len(iters), "seconds_per_iteration": float(np.mean(iters)),
            "loss": model.loss_, "svd_solver": model.svd_solver_}, model.W_


def warm_up(device: str) -> None:
    """CUDA context, cuBLAS/cuSOLVER handles: not part of any measurement."""
    X, Y = pairs(512, 16)
    ud.UniCon(rank=4, max_iter=1, device=device).fit(X, Y)
    ud.UniCon(rank=4, max_iter=1, kernel="rbf", n_landmarks=64, svd="randomized", device=device).fit(X, Y)
    sync(device)


def run(args) -> int:
    sizes = QUICK if args.quick else FULL
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    out = Path(args.out) if args.out else HERE / "results" / ("device_quick.json" if args.quick else "device.json")
    info = {"machine": H.machine_line(), "commit": args.commit or H.git_commit(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "sizes": sizes}
    print(json.dumps(info), flush=True)
    rows = []
    for device in dict.fromkeys(parse(spec)[0] for spec in devices):
        warm_up(device)
    for name in args.workloads or DEFAULT_WORKLOADS:
        first = None
        for device in devices:
            row, result = (run_pass(sizes[name], device) if name == "pass"
                           else run_fit(sizes[name], device, "rbf" if name == "rbf" else "linear"))
            row.update(workload=name, device=device, **sizes[name])
            if first is None:
                first = result
            else:
                row["rel_diff_to_" + devices[0]] = float(np.linalg.norm(result - first) / np.linalg.norm(first))
            rows.append(row)
            print(json.dumps(row), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


def profile(args) -> int:
    """Where one iteration of the linear fit spends its time: operators by self CPU and self
    device time (torch.profiler), after a warm-up fit."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    size = (QUICK if args.quick else FULL)["linear"]
    device = args.device
    warm_up(device)
    X, Y = pairs(size["n"], size["d"])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    opts = dict(rank=size["r"], negatives=4096, max_iter=1, seed=0, device=device)
    with torch_profile(activities=activities) as prof:
        _, seconds = timed(device, lambda: ud.UniCon(**opts).fit(X, Y))
    sort = ["self_cpu_time_total"] + (["self_cuda_time_total"] if device.startswith("cuda") else [])
    text = [f"{H.machine_line()}; device {device}; linear fit, n = {size['n']:,}, one iteration: {seconds:.2f} s"]
    for key in sort:
        text += [f"\n== by {key}", prof.key_averages().table(sort_by=key, row_limit=25)]
    out = "\n".join(text)
    if args.out:
        Path(args.out).write_text(out)
    print(out)
    return 0


def report(args) -> int:
    path = Path(args.path) if args.path else HERE / "results" / "device.json"
    data = json.loads(path.read_text())
    info, rows = data["info"], data["rows"]
    print(f"{info['machine']}; GPU {info['cuda']}; commit {info['commit']}, {info['date']}\n")
    print("| workload | n | device | seconds | s / iteration | speed-up | result vs first device |")
    print("|---|---|---|---|---|---|---|")
    base = {}
    for r in rows:
        base.setdefault(r["workload"], r["seconds"])
        diff = next((v for k, v in r.items() if k.startswith("rel_diff_to_")), None)
        per_it = r.get("seconds_per_iteration")
        print(f"| {r['workload']} | {r['n']:,} | {r['device']} | {r['seconds']:.2f} | "
              f"{'—' if per_it is None else f'{per_it:.2f}'} | {base[r['workload']] / r['seconds']:.1f}× | "
              f"{'—' if diff is None else f'{diff:.1e}'} |")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("--devices", nargs="*",
                   help='default: cpu and, if visible, cuda; "cuda@32" is cuda with memory_budget 32 MiB')
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out")
    p.add_argument("--commit", help="commit to record (where the checkout has no .git)")
    p.add_argument("--workloads", nargs="*", choices=WORKLOADS,
                   help=f"default: {' '.join(DEFAULT_WORKLOADS)}; linear-1m is the linear fit at n = 1,000,000")
    f = sub.add_parser("profile", help="torch.profiler tables of one linear-fit iteration on a device")
    f.add_argument("--device", default="cuda")
    f.add_argument("--quick", action="store_true")
    f.add_argument("--out", help="text file for the tables (default: print)")
    q = sub.add_parser("report")
    q.add_argument("path", nargs="?")
    args = parser.parse_args(argv)
    return {"run": run, "report": report, "profile": profile}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
