"""The CLIP loss (τ 0.1) that SGD-CLIP, UniCon and CCA reach on the same 4,096 training pairs.

RESULTS.md §7c, "why linear UniCon still trails SGD-CLIP".  Usage:

    python benchmarks/study/training_loss.py
"""
import numpy as np, torch
import unicon_dist as ud
from unicon_dist.baselines import SGDCLIP, RegularizedCCA
from unicon_dist.data.datasets import load_fashion_mnist_halves
torch.set_num_threads(2)
xl, xr, yl = load_fashion_mnist_halves("train")[:3]
tl, tr, tlab = load_fashion_mnist_halves("test")[:3]
sub = np.random.default_rng(1).choice(60000, 4096, replace=False)
def rep(name, m):
    zx, zy = m.encode_x(xl[sub]), m.encode_y(xr[sub])
    s = torch.as_tensor(zx @ zy.T, dtype=torch.float64)
    r = ud.retrieval_metrics(m.encode_x(tl[:5000]), m.encode_y(tr[:5000]), ks=(1,))
    print(name, "train loss@0.1 %.4f" % ud.contrastive_loss(s, temperature=0.1), "R@1 %.3f" % ((r["x2y_R@1"]+r["y2x_R@1"])/2))
sg = SGDCLIP(rank=64, lr=1e-3, temperature=0.1).fit(xl, xr); rep("sgd t0.1", sg)
u = ud.UniCon(rank=64, temperature=0.1, max_iter=30, damping=0.2, center=True, whiten=1e-3, negatives=2048, factorization="sqrt", loss_tol=1e-4).fit(xl, xr); rep("unicon", u)
c = RegularizedCCA(rank=64, ridge=1e-3).fit(xl, xr); rep("cca", c)
