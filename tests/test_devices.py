"""The same computations on every torch device this process sees (DESIGN §3: device-agnostic).

Each test runs on "cpu" and, where one is visible, on "cuda"; the CUDA variants are skipped on
machines without a GPU (CI) and were run on a GPU node as recorded in RESULTS §10.  Every device
is compared with a float64 CPU reference: the dense S of ``similarity_weights`` for the
streamed operator, numpy's SVD for the randomized one, and a CPU fit for the estimator.
"""

import numpy as np
import pytest
import torch

import unicon_dist as ud
from _budgets import panel_budget
from _refs import rel_err

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a CUDA device"))]
# float32 on a GPU: full float32 GEMMs (torch leaves TF32 off for matmul by default), so the
# float32 bounds are those of the CPU tests
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def _problem(n=400, mx=9, my=7, r=5, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    phi_x, phi_y = rng.standard_normal((n, mx)), rng.standard_normal((n, my))
    zx = rng.standard_normal((n, r))
    zy = zx + 0.8 * rng.standard_normal((n, r))
    zx = scale * zx / np.linalg.norm(zx, axis=1, keepdims=True)
    zy = scale * zy / np.linalg.norm(zy, axis=1, keepdims=True)
    return phi_x, phi_y, zx, zy


def _paired(n=600, dx=14, dy=11, seed=1):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, dx))
    Y = X[:, :dy] @ rng.standard_normal((dy, dy)) / np.sqrt(dy) + 0.5 * rng.standard_normal((n, dy))
    return X.astype(np.float32), Y.astype(np.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tau, scale, negatives", [(0.1, 1.0, "full"), (0.1, 9.0, "full"), (0.1, 1.0, 128)])
def test_operator_equals_dense(device, dtype, tau, scale, negatives):
    """C, its products and the loss; scale 9 puts the float32 statistics in log space."""
    phi_x, phi_y, zx, zy = _problem(scale=scale)
    groups = np.random.default_rng(3).integers(0, 300, len(zx))
    op = ud.CrossProductOperator(*(torch.as_tensor(a, dtype=dtype, device=device) for a in (phi_x, phi_y, zx, zy)),
                                 loss="clip", temperature=tau, groups=groups, negatives=negatives, seed=4,
                                 block_rows=53, block_cols=71, device=device, dtype=dtype)
    C = op.materialize()
    assert C.device.type == device and C.dtype == torch.float64
    if negatives == "full":
        S = ud.similarity_weights(zx @ zy.T, loss="clip", temperature=tau, groups=groups)
        C_ref = phi_x.T @ S @ phi_y
        loss_ref = ud.contrastive_loss(zx @ zy.T, loss="clip", temperature=tau, groups=groups)
    else:  # the same batches on the CPU in float64
        cpu = ud.CrossProductOperator(phi_x, phi_y, zx, zy, loss="clip", temperature=tau, groups=groups,
                                      negatives=negatives, seed=4, dtype=torch.float64)
        C_ref, loss_ref = cpu.materialize().numpy(), cpu.loss
    assert rel_err(C.cpu().numpy(), C_ref) < TOL[dtype]
    assert op.loss == pytest.approx(loss_ref, rel=TOL[dtype])
    omega = np.random.default_rng(5).standard_normal((phi_y.shape[1], 3))
    got = op.matmul(torch.as_tensor(omega, device=device))
    assert got.device.type == device
    assert rel_err(got.cpu().numpy(), C_ref @ omega) < TOL[dtype]
    omega = np.random.default_rng(6).standard_normal((phi_x.shape[1], 2))
    assert rel_err(op.rmatmul(torch.as_tensor(omega, device=device)).cpu().numpy(), C_ref.T @ omega) < TOL[dtype]
    if scale > 1 and dtype == torch.float32:
        assert op.statistics["log_space_batches"] == op.statistics["batches"]


@pytest.mark.parametrize("device", DEVICES)
def test_randomized_svd_equals_numpy(device):
    rng = np.random.default_rng(7)
    # a decaying spectrum, so the top 6 triplets are well determined
    A = (rng.standard_normal((120, 40)) * 0.7 ** np.arange(40)) @ np.linalg.qr(rng.standard_normal((40, 40)))[0]
    U, s, Vh = ud.randomized_svd(torch.as_tensor(A, device=device), 6, n_power_iter=4)
    assert s.device.type == "cpu" and s.dtype == torch.float64  # the k-column algebra runs on the CPU
    s_ref = np.linalg.svd(A, compute_uv=False)[:6]
    np.testing.assert_allclose(s.cpu().numpy(), s_ref, rtol=1e-8)
    approx = (U * s) @ Vh
    U_ref, s_full, Vh_ref = np.linalg.svd(A, full_matrices=False)
    assert rel_err(approx.cpu().numpy(), (U_ref[:, :6] * s_full[:6]) @ Vh_ref[:6]) < 1e-8


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel, dtype, svd", [("linear", "float64", "auto"), ("rbf", "float64", "auto"),
                                                ("rbf", "float32", "auto"), ("rbf", "float64", "randomized")])
def test_fit_equals_cpu_fit(device, kernel, dtype, svd):
    X, Y = _paired()
    opts = dict(rank=4, kernel=kernel, dtype=dtype, svd=svd, max_iter=4, seed=0)
    if kernel == "rbf":
        opts["n_landmarks"] = 64
    ref = ud.UniCon(device="cpu", **{**opts, "dtype": "float64"}).fit(X, Y)
    model = ud.UniCon(device=device, **opts).fit(X, Y)
    tol = 1e-8 if dtype == "float64" else 1e-4
    assert model.n_iter_ == ref.n_iter_
    assert rel_err(model.W_, ref.W_) < tol
    assert model.loss_ == pytest.approx(ref.loss_, rel=tol)
    zx = model.encode_x(torch.as_tensor(X[:50], device=device))
    assert zx.device.type == device
    # embeddings come out in the inputs' precision (float32 here), whatever the solve's
    assert rel_err(zx.cpu().numpy().astype(np.float64), ref.encode_x(X[:50]).astype(np.float64)) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_store_fit_verify_and_reload(device, tmp_path):
    """Out of core from a pair store on the device, the verifier there, and the saved model
    loaded back on the CPU."""
    X, Y = _paired(n=700)
    store = ud.PairStore.create(tmp_path / "pairs.zarr", X.shape[1], Y.shape[1], chunk_rows=128)
    store.append(X[:400], Y[:400])
    store.append(X[400:], Y[400:])
    opts = dict(rank=4, kernel="rbf", n_landmarks=48, max_iter=3, seed=0, negatives=256)
    ref = ud.UniCon(device="cpu", dtype="float64", **opts).fit(X, Y)
    model = ud.UniCon(device=device, dtype="float64", verify="full",
                      memory_budget=panel_budget(store, dtype="float64", verify="full", **opts), **opts).fit(store)
    assert rel_err(model.W_, ref.W_) < 1e-8
    assert model.diagnostics_["verify"]["c_rel_error"] == 0.0  # float64 tiles: nothing to find
    model.save(tmp_path / "model.npz")
    back = ud.UniCon.load(tmp_path / "model.npz")
    np.testing.assert_allclose(back.encode_x(X[:20]), ref.encode_x(X[:20]), rtol=1e-6, atol=1e-9)


def test_tile_plan_by_device():
    """Without a budget, CUDA tiles hold a whole batch (the launch-bound profile of RESULTS
    §10); the CPU keeps its cache-sized tiles; an explicit budget decides on either."""
    cpu = ud.plan_tiles(4096, 640)
    gpu = ud.plan_tiles(4096, 640, device_type="cuda")
    assert (cpu.block_rows, cpu.block_cols) == (512, 4096)  # 2^21 elements: 512 rows of 4,096
    assert (gpu.block_rows, gpu.block_cols) == (4096, 4096) and gpu.tile_bytes <= (1 << 30) + 4096 * 640 * 4
    big = ud.plan_tiles(1_000_000, 640, device_type="cuda")
    assert big.block_rows * big.block_cols * 16 <= 1 << 30 and big.block_cols > cpu.block_cols
    assert ud.plan_tiles(4096, 640, memory_budget=32 << 20, device_type="cuda") == ud.plan_tiles(
        4096, 640, memory_budget=32 << 20)


@pytest.mark.parametrize("device", DEVICES)
def test_operator_uses_the_device_plan(device):
    phi_x, phi_y, zx, zy = _problem(n=300)
    op = ud.CrossProductOperator(phi_x, phi_y, zx, zy, temperature=0.1, device=device, dtype=torch.float32)
    plan = op.tile_plan(0, op.rank + max(op.shape))
    assert plan == ud.plan_tiles(300, op.rank + max(op.shape), device_type=device)
