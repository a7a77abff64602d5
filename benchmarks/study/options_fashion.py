"""One UniCon fit on a seeded Fashion-MNIST training subset, scored on 5,000 test pairs.

The measurements behind RESULTS.md §7c items 1-5 (what moved R@1 while the defaults were
chosen).  Usage: ``python benchmarks/study/options_fashion.py N 'JSON options'``, e.g.

    python benchmarks/study/options_fashion.py 10000 '{"rank":64,"max_iter":1,"whiten":null,"factorization":"orthonormal"}'
    python benchmarks/study/options_fashion.py 10000 '{"rank":64,"max_iter":1,"whiten":null}'
    python benchmarks/study/options_fashion.py 10000 '{"rank":64,"max_iter":1,"whiten":1e-3}'
    python benchmarks/study/options_fashion.py 10000 '{"rank":64,"max_iter":25,"factorization":"orthonormal"}'
    python benchmarks/study/options_fashion.py 10000 '{"rank":64,"max_iter":25}'
    python benchmarks/study/options_fashion.py 60000 '{"rank":64,"negatives":2048}'
    python benchmarks/study/options_fashion.py 60000 '{"rank":64,"negatives":2048,"temperature":0.2}'
    python benchmarks/study/options_fashion.py 60000 '{"rank":64,"negatives":8192}'

(The figures in §7c were taken with these options spelled out before they became the
defaults.)  Prints the fit time, iterations, how it stopped, mean R@1 / R@10 and the
per-iteration ΔW and loss.
"""
import sys, time, json, numpy as np, torch
import unicon_dist as ud
from unicon_dist.data.datasets import load_fashion_mnist_halves
torch.set_num_threads(2)
n = int(sys.argv[1]); opts = json.loads(sys.argv[2])
xl, xr, yl = load_fashion_mnist_halves("train")[:3]
tl, tr, tlab = load_fashion_mnist_halves("test")[:3]
rng = np.random.default_rng(0); idx = rng.choice(len(xl), n, replace=False)
xl, xr = xl[idx], xr[idx]
t = time.perf_counter()
m = ud.UniCon(**opts).fit(xl, xr)
el = time.perf_counter() - t
def ev(F1, F2):
    m.F1_, m.F2_ = F1, F2
    r = ud.retrieval_metrics(m.encode_x(tl[:5000]), m.encode_y(tr[:5000]), ks=(1, 10))
    return (r["x2y_R@1"] + r["y2x_R@1"]) / 2, (r["x2y_R@10"] + r["y2x_R@10"]) / 2
r1, r10 = ev(m.F1_, m.F2_)
print(opts, f"fit {el:.1f}s iters {m.n_iter_} conv {m.converged_} kept {m.best_iteration_} R@1 {r1:.3f} R@10 {r10:.3f}")
print("  dW", " ".join(f"{h['delta_w']:.2g}" for h in m.history_))
print("  loss", " ".join(f"{h['loss']:.4f}" for h in m.history_))
