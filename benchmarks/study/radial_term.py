"""Dense check of the cosine step with the radial term (SVD of D_x^{-1/2} C D_y^{-1/2}).

RESULTS.md §7c: the library's step against the corrected one from the same first step, on a
seeded Fashion-MNIST subset of n pairs.  With a batch size B, S(γ) is formed per contiguous
batch of B pairs (batched negatives; n up to the 60,000 training pairs), otherwise over all n
(n ≤ ~8,000).  Prints the training loss / test R@1 after each of 12 damped steps.  Usage:

    python benchmarks/study/radial_term.py 5000
    python benchmarks/study/radial_term.py 60000 4096 [library|corrected]
"""
import sys, numpy as np, torch
import unicon_dist as ud
from unicon_dist.data.datasets import load_fashion_mnist_halves
n = int(sys.argv[1]); B = int(sys.argv[2]) if len(sys.argv) > 2 else n; r = 64; tau = 0.1
xl, xr, _ = load_fashion_mnist_halves("train")[:3]
tl, tr, _ = load_fashion_mnist_halves("test")[:3]
idx = np.random.default_rng(0).choice(len(xl), n, replace=False)
m0 = ud.UniCon(rank=r, max_iter=1, negatives="full" if B >= n else B).fit(xl[idx], xr[idx])     # whitening + first (CCA) step
X = m0.map_x_.transform(torch.as_tensor(xl[idx])); Y = m0.map_y_.transform(torch.as_tensor(xr[idx]))
TX = m0.map_x_.transform(torch.as_tensor(tl[:5000])); TY = m0.map_y_.transform(torch.as_tensor(tr[:5000]))
F1, F2 = torch.as_tensor(m0.F1_), torch.as_tensor(m0.F2_)
def evaluate(F1, F2):
    zx, zy = TX @ F1.T, TY @ F2.T
    zx = zx / zx.norm(dim=1, keepdim=True); zy = zy / zy.norm(dim=1, keepdim=True)
    m = ud.retrieval_metrics(zx.numpy(), zy.numpy(), ks=(1,)); return (m["x2y_R@1"] + m["y2x_R@1"]) / 2
def state(F1, F2):
    parts = [block(X[a:a + B], Y[a:a + B], F1, F2) for a in range(0, n, B)]
    C, Dx, Dy = (sum(p[k] for p in parts) for k in range(3))
    return C, Dx, Dy, sum(p[3] * p[4] for p in parts) / n
def block(X, Y, F1, F2):
    fx, gy = X @ F1.T, Y @ F2.T
    nx, ny = fx.norm(dim=1, keepdim=True), gy.norm(dim=1, keepdim=True)
    s = (fx / nx) @ (gy / ny).T
    S = ud.similarity_weights(s.detach(), temperature=tau)
    S = torch.as_tensor(S, dtype=torch.float64)
    Xt, Yt = X / nx, Y / ny
    C = Xt.T @ S @ Yt
    d = (S * s.detach()).sum(1); dp = (S * s.detach()).sum(0)
    Dx = Xt.T @ (d[:, None] * Xt); Dy = Yt.T @ (dp[:, None] * Yt)
    loss = float(ud.contrastive_loss(s.detach(), temperature=tau))
    return C, Dx, Dy, loss, len(X)
def isqrt(D, eps):
    e, V = torch.linalg.eigh(0.5 * (D + D.T)); e = e.clamp_min(eps * e.max())
    return (V / e.sqrt()) @ V.T
for mode in (sys.argv[3:] or ("library", "corrected")):
    G1, G2 = F1.clone(), F2.clone()
    out = []
    for it in range(12):
        C, Dx, Dy, loss = state(G1, G2)
        if mode == "library":
            M = C; Ax = Ay = None
        else:
            Ax, Ay = isqrt(Dx, 1e-3), isqrt(Dy, 1e-3); M = Ax @ C @ Ay
        U, sv, Vh = torch.linalg.svd(M)
        H1, H2 = sv[:r, None].sqrt() * U[:, :r].T, sv[:r, None].sqrt() * Vh[:r]
        if Ax is not None:
            H1, H2 = H1 @ Ax, H2 @ Ay
        # damping 0.2 on W at matched scale (directions only)
        W_old, W_new = G1.T @ G2, H1.T @ H2
        W = 0.8 * W_old / torch.linalg.svdvals(W_old)[:r].mean() + 0.2 * W_new / torch.linalg.svdvals(W_new)[:r].mean()
        U, sv, Vh = torch.linalg.svd(W)
        if Ax is None:
            G1, G2 = sv[:r, None].sqrt() * U[:, :r].T, sv[:r, None].sqrt() * Vh[:r]
        else:
            # keep the D-metric split: factor in the D^{1/2} coordinates
            Bx, By = torch.linalg.inv(Ax), torch.linalg.inv(Ay)
            U2, sv2, Vh2 = torch.linalg.svd(Bx @ W @ By)
            G1 = (sv2[:r, None].sqrt() * U2[:, :r].T) @ Ax; G2 = (sv2[:r, None].sqrt() * Vh2[:r]) @ Ay
        out.append(f"{loss:.4f}/{evaluate(G1, G2):.3f}")
    print(mode, " ".join(out), flush=True)
