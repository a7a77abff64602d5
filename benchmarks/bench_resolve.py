"""Benchmark: re-solving after an append, on the clustered synthetic set of tests/test_resolve.py.

1,000 pairs are fitted, 200 appended; then the parent (no update), ``refit(mode="fast")``,
``refit()`` (warm exact) and a cold fit on all 1,200 pairs are compared: iterations,
seconds, and the distance of each W from the cold solution, ‖W − W_cold‖/‖W_cold‖.

Usage::

    python benchmarks/bench_resolve.py      # a few seconds
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import _harness as H  # noqa: E402

H.use_checkout()

import unicon_dist as ud  # noqa: E402
from test_model import _two_cycle_data  # noqa: E402
from test_resolve import PARAMS  # noqa: E402


def main() -> int:
    logging.disable(logging.WARNING)
    X, Y = _two_cycle_data(n=1200)
    with tempfile.TemporaryDirectory() as d:
        store = ud.PairStore.create(Path(d) / "s.zarr", 16, 16)
        store.append(X[:1000], Y[:1000])
        parent = ud.UniCon(**PARAMS).fit(store)
        store.append(X[1000:], Y[1000:])
        rows = {}
        for name, run in (("fast", lambda: parent.refit(mode="fast")), ("warm", lambda: parent.refit()),
                          ("cold", lambda: ud.UniCon(**PARAMS).fit(store))):
            t0 = time.perf_counter()
            model = run()
            rows[name] = (model, time.perf_counter() - t0)
    cold = rows["cold"][0].W_
    out = [{"model": "parent (no update)", "iterations": 0, "seconds": 0.0,
            "W_rel_diff_to_cold": float(np.linalg.norm(parent.W_ - cold) / np.linalg.norm(cold))}]
    for name, (model, seconds) in rows.items():
        out.append({"model": name, "iterations": model.n_iter_, "converged": model.converged_, "seconds": seconds,
                    "W_rel_diff_to_cold": float(np.linalg.norm(model.W_ - cold) / np.linalg.norm(cold))})
    (HERE / "results" / "resolve.json").write_text(json.dumps({"machine": H.machine_line(), "rows": out}, indent=1))
    print("| model | iterations | seconds | ‖W − W_cold‖/‖W_cold‖ |\n|---|---|---|---|")
    for r in out:
        print(f"| {r['model']} | {r['iterations']} | {r['seconds']:.2f} | {r['W_rel_diff_to_cold']:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
