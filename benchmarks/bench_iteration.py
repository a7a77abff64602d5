"""Benchmark: seconds per iteration of a batched linear fit, for before/after comparisons.

Self-contained (public API only, synthetic pairs generated here), so that the same file can be
run against two commits on one machine, back to back::

    python benchmarks/bench_iteration.py                       # this checkout
    git worktree add /tmp/before <commit>
    cp benchmarks/bench_iteration.py /tmp/before/benchmarks/
    python /tmp/before/benchmarks/bench_iteration.py           # the other commit

Each run warms up once, then fits ``--repeats`` times (3 iterations each, no early stop) and
prints one JSON line: the commit, the mean seconds per iteration of each fit, and the loss.

``--fused {auto,off,attention}`` sets how one-to-one CLIP batches are computed
(:mod:`unicon_dist.solver.fused`; a commit without that module ignores it): ``off`` is the
tiled two-pass path, ``attention`` the fused kernels, so both run from one checkout::

    python benchmarks/bench_iteration.py --n 200000 --d 128 --rank 128 --fused off
    python benchmarks/bench_iteration.py --n 200000 --d 128 --rank 128 --fused attention
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _harness as H  # noqa: E402

H.use_checkout()

import torch  # noqa: E402

import unicon_dist as ud  # noqa: E402


def pairs(n: int, d: int, seed: int = 0):
    """Two views sharing a 64-dimensional latent signal plus independent noise."""
    g = torch.Generator().manual_seed(seed)
    k = min(64, d)
    latent = torch.randn(n, k, generator=g)
    mix = [torch.randn(k, d, generator=g) / k**0.5 for _ in range(2)]
    X, Y = (latent @ M + 0.5 * torch.randn(n, d, generator=g) for M in mix)
    return X.numpy(), Y.numpy()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=60_000)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--negatives", type=int, default=4096)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--fused", choices=["auto", "off", "attention", "one-pass"], default="auto")
    args = p.parse_args(argv)
    try:
        from unicon_dist.solver import fused

        fused.FORCE = args.fused
    except ImportError:  # a commit before the fused path: the tiled passes only
        pass
    X, Y = pairs(args.n, args.d)
    opts = dict(rank=args.rank, negatives=args.negatives, device=args.device, seed=0)
    ud.UniCon(max_iter=1, **opts).fit(X[:5000], Y[:5000])
    per_iter, loss = [], None
    for _ in range(args.repeats):
        model = ud.UniCon(max_iter=3, tol=0.0, loss_tol=0.0, **opts).fit(X, Y)
        per_iter.append(sum(h["seconds"] for h in model.history_) / len(model.history_))
        loss = model.loss_
    print(json.dumps({"commit": H.git_commit(), "machine": H.machine_line(), **vars(args),
                      "seconds_per_iteration": per_iter, "loss": loss}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
