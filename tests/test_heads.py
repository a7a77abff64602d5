"""The fitted heads outside the library: torch modules, TorchScript, torch.export, safetensors, ONNX.

Reference: :meth:`UniCon.encode_x` / :meth:`UniCon.encode_y`.  Tolerances:

- float64 heads against float64 encoding: the two differ only in the order of exact
  operations (whitening and projection folded into one affine map, kernels written with
  the same formulas), so they agree to float64 round-off times the amplification of the
  stages -- ``_bound`` with u = 2⁻⁵³, far below anything a wrong fold or kernel produces;
- float32 heads (and the float32 ONNX graphs) against float32 encoding: each side rounds
  every stage in float32 (the library forms Nyström features in float64 and rounds them;
  a head computes them in float32), so the bound is u = 2⁻²⁴ times the same amplification
  (see ``_bound``);
- scripted heads and reloaded heads run the same operations on the same tensors as the
  eager head: equal bit for bit.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import unicon_dist as ud
from unicon_dist.io.artifacts import ArtifactError

CASES = {
    "linear": dict(),
    "linear-orthonormal": dict(factorization="orthonormal"),
    "linear-raw-dot": dict(whiten=None, center=False, similarity="dot"),
    "rbf": dict(kernel="rbf", n_landmarks=40),
    "laplacian-orthonormal": dict(kernel="laplacian", n_landmarks=40, factorization="orthonormal"),
    "angular-dot": dict(kernel="angular", n_landmarks=40, similarity="dot"),
    "polynomial": dict(kernel="polynomial", n_landmarks=30),
    "arccos-y-linear": dict(kernel_x="arccos", kernel_y="linear", n_landmarks=30),
}


def _data(n=300, seed=0):
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, 4))
    # an offset on X: centring then carries a bias into the folded layer
    X = (Z @ rng.standard_normal((4, 7)) + 0.3 * rng.standard_normal((n, 7)) + 1.5).astype(np.float32)
    Y = (Z @ rng.standard_normal((4, 5)) + 0.3 * rng.standard_normal((n, 5))).astype(np.float32)
    return X, Y


def _fit(**options):
    X, Y = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # max_iter=3 does not converge: the warning says so
        return ud.UniCon(rank=3, temperature=0.5, max_iter=3, **options).fit(X, Y), X, Y


@pytest.fixture(scope="module", params=list(CASES))
def fitted(request):
    return (request.param, *_fit(**CASES[request.param]))


def _bound(model, view: str, A: np.ndarray, u: float) -> np.ndarray:
    """Per-row bound on |head(a) − encode(a)|_∞ from rounding at unit roundoff u.

    First-order forward error of φ(a) -> (φ − μ)·A·Fᵀ -> z/‖z‖, with the √m growth of
    rounding errors in m-term inner products (the statistical model of Higham & Mary,
    SIAM J. Sci. Comput. 2019, rather than the worst case m): the features carry an
    absolute error of u·c_k·√m·‖k(a, L)‖·‖N‖₂ (c_k the kernel's own amplification: 1 plus
    the largest exponent |arg| of exp for rbf/laplacian, whose argument is formed with an
    absolute error u·|arg|; a few roundings per input dimension otherwise), the affine
    layer adds u·(√m·‖φ‖·‖W‖₂ + ‖b‖) (the folded weight W and bias b), and normalisation
    divides by ‖z‖ (a relative error at most 2× that of z).  The constant 4 covers both
    sides rounding.
    """
    config, t = model.head_states()[view]
    W, b = t["weight"].numpy(), t["bias"].numpy()
    A = A.astype(np.float64)
    W2 = np.linalg.norm(W, 2)
    if "nystrom" in config:
        fmap = model.map_x_ if view == "x" else model.map_y_
        base = getattr(fmap, "base", fmap)
        L = base.landmarks.numpy()
        K = base.kernel(torch.as_tensor(A), base.landmarks).numpy()
        phi = K @ base.normalization.numpy()
        N2 = np.linalg.norm(base.normalization.numpy(), 2)
        kind = config["nystrom"]["kernel"]
        if kind == "rbf":
            arg = ((A * A).sum(1)[:, None] + (L * L).sum(1)[None, :]) / (2 * config["nystrom"]["bandwidth"] ** 2)
            ck = 1 + arg.max(1)
        elif kind == "laplacian":
            arg = (np.abs(A).sum(1)[:, None] + np.abs(L).sum(1)[None, :]) / config["nystrom"]["bandwidth"]
            ck = 1 + arg.max(1)
        else:
            ck = np.full(A.shape[0], 4.0 * A.shape[1])
        m = L.shape[0]
        feature_err = ck * np.sqrt(m) * np.linalg.norm(K, axis=1) * N2
    else:
        phi, m, feature_err = A, A.shape[1], np.zeros(A.shape[0])
    z = phi @ W.T + b
    scale = np.linalg.norm(z, axis=1) if config["normalize"] else 1.0
    err_z = u * (feature_err * W2 + np.sqrt(m) * np.linalg.norm(phi, axis=1) * W2 + np.linalg.norm(b))
    return 4.0 * err_z / scale


def _encode(model, view, A):
    return model.encode_x(A) if view == "x" else model.encode_y(A)


# ------------------------------------------------------------------ torch modules
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_heads_equal_the_library_encoders(fitted, dtype):
    name, model, X, Y = fitted
    u = 2.0 ** -53 if dtype == torch.float64 else 2.0 ** -24
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    heads = model.to_torch(dtype=dtype)
    for view, head, A in (("x", heads[0], X), ("y", heads[1], Y)):
        A = A.astype(np_dtype)
        with torch.no_grad():
            out = head(torch.as_tensor(A)).numpy()
        assert out.dtype == np_dtype and out.shape == (A.shape[0], 3)
        err = np.abs(out.astype(np.float64) - _encode(model, view, A)).max(1)
        bound = _bound(model, view, A, u)
        # the bound says something: in float64 any wrong fold or kernel number is caught; in
        # float32 the first-order bound is loose (measured 100-1000x above the errors) but
        # still far below the O(1) differences of unit rows a wrong stage gives
        assert bound.max() < (1e-9 if dtype == torch.float64 else 0.5), (name, view)
        assert np.all(err <= bound), (name, view, float((err / bound).max()))


def test_scripted_and_exported_heads_equal_the_eager_ones(fitted):
    name, model, X, Y = fitted
    for head, A in zip(model.to_torch(), (X, Y)):
        x = torch.as_tensor(A)
        with torch.no_grad():
            eager = head(x)
            scripted = torch.jit.script(head)(x)
            exported = torch.export.export(head, (x[:5],), dynamic_shapes=({0: torch.export.Dim("batch")},))
            via_export = exported.module()(x)
        assert torch.equal(scripted, eager), name
        # torch.export may decompose ops into others (e.g. linear into addmm): float32 round-off
        torch.testing.assert_close(via_export, eager, rtol=1e-5, atol=1e-6)


def test_heads_move_to_another_dtype_and_device():
    model, X, _ = _fit(kernel="rbf", n_landmarks=40)
    head = model.to_torch()[0].to(torch.float64)  # a float32 head moved: its tensors stay float32-rounded
    assert all(t.dtype == torch.float64 for t in head.state_dict().values())
    X64 = X.astype(np.float64)
    with torch.no_grad():
        err = np.abs(head(torch.as_tensor(X64)).numpy() - model.encode_x(X64)).max(1)
    assert np.all(err <= _bound(model, "x", X64, 2.0 ** -24))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_model_fitted_on_cuda_exports_on_cpu(tmp_path):
    X, Y = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gpu = ud.UniCon(rank=3, temperature=0.5, max_iter=3, kernel="rbf", n_landmarks=40, device="cuda").fit(X, Y)
    head = gpu.to_torch(device="cpu")[0]
    assert all(t.device.type == "cpu" for t in head.state_dict().values())
    with torch.no_grad():
        out = head(torch.as_tensor(X)).numpy()
    np.testing.assert_allclose(out, gpu.encode_x(X), atol=float(_bound(gpu, "x", X, 2.0 ** -24).max()))
    gpu.save_safetensors(tmp_path)
    on_gpu = ud.load_heads(tmp_path, device="cuda")[0]
    with torch.no_grad():
        np.testing.assert_allclose(on_gpu(torch.as_tensor(X, device="cuda")).cpu().numpy(), out, atol=1e-5)


def test_an_unfitted_model_cannot_be_exported(tmp_path):
    model = ud.UniCon(rank=3)
    for call in (model.to_torch, lambda: model.save_safetensors(tmp_path), lambda: model.export_onnx(tmp_path)):
        with pytest.raises(RuntimeError, match="not fitted"):
            call()
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ safetensors
def test_the_safetensors_round_trip_gives_the_same_heads(fitted, tmp_path):
    pytest.importorskip("safetensors")
    name, model, X, Y = fitted
    model.save_safetensors(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "heads.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["format"] == "unicon_dist.heads/1" and config["similarity"] == model.similarity
    for dtype in (torch.float32, torch.float64):
        loaded = ud.load_heads(tmp_path, dtype=dtype)
        for a, b, A in zip(model.to_torch(dtype=dtype), loaded, (X, Y)):
            x = torch.as_tensor(A).to(dtype)
            with torch.no_grad():
                assert torch.equal(a(x), b(x)), name


def test_loading_damaged_heads_names_the_problem(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file, save_file

    model, _, _ = _fit()
    with pytest.raises(FileNotFoundError, match="no heads config"):
        ud.load_heads(tmp_path)
    model.save_safetensors(tmp_path)
    tensors = load_file(str(tmp_path / "heads.safetensors"))
    tensors["y.weight"] = tensors["y.weight"][:, :-1].contiguous()
    save_file(tensors, str(tmp_path / "heads.safetensors"))
    with pytest.raises(ArtifactError, match=r"y\.weight should have shape \(3, 5\), found \(3, 4\)"):
        ud.load_heads(tmp_path)
    (tmp_path / "config.json").write_text('{"format": "something else"}')
    with pytest.raises(ArtifactError, match="not a heads config"):
        ud.load_heads(tmp_path)


def _readme_loader() -> str:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index("<!-- heads-loader -->")
    block = text[start:].split("```python\n", 1)[1].split("```", 1)[0]
    return block


def test_the_readme_loader_needs_only_torch_and_safetensors(tmp_path):
    pytest.importorskip("safetensors")
    model, X, Y = _fit()
    model.save_safetensors(tmp_path / "heads")
    np.save(tmp_path / "x.npy", X)
    np.save(tmp_path / "y.npy", Y)
    code = _readme_loader()
    assert len(code.strip().splitlines()) <= 12
    script = (
        "import sys; sys.modules['unicon_dist'] = None  # importing the library would fail\n"
        "import numpy as np, torch\n"
        + code +
        f"\nx = torch.as_tensor(np.load({str(tmp_path / 'x.npy')!r}))"
        f"\ny = torch.as_tensor(np.load({str(tmp_path / 'y.npy')!r}))"
        f"\nnp.save({str(tmp_path / 'zx.npy')!r}, head_x(x).detach().numpy())"
        f"\nnp.save({str(tmp_path / 'zy.npy')!r}, head_y(y).detach().numpy())\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, check=True)
    for view, A in (("x", X), ("y", Y)):
        out = np.load(tmp_path / f"z{view}.npy")
        err = np.abs(out - _encode(model, view, A)).max(1)
        assert np.all(err <= _bound(model, view, A, 2.0 ** -24)), view


# ------------------------------------------------------------------ ONNX
def test_onnx_runtime_equals_the_library_encoders(fitted, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    name, model, X, Y = fitted
    paths = model.export_onnx(tmp_path)
    assert [p.name for p in paths] == ["x_head.onnx", "y_head.onnx"]
    for view, path, A in (("x", paths[0], X), ("y", paths[1], Y)):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["features"]
        for rows in (A, A[:1]):  # the batch axis is dynamic
            out = session.run(["embeddings"], {"features": rows})[0]
            err = np.abs(out - _encode(model, view, rows)).max(1)
            assert np.all(err <= _bound(model, view, rows, 2.0 ** -24)), (name, view)
