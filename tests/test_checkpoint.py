"""Checkpoints: a fit killed after iteration k and resumed ends with the uninterrupted model, bit for bit."""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import unicon_dist as ud
import unicon_dist.solver.fit_paths as fit_paths
import unicon_dist.solver.fixed_point as fixed_point
from unicon_dist.io.checkpoints import FORMAT, array_digest, load_checkpoint, read_checkpoint_header
from unicon_dist.apps.cli import main
from unicon_dist.math.whitening import FeatureWhitening, Moments

from _budgets import panel_budget
from _options import PAPER

ROOT = Path(__file__).resolve().parents[1]

# Oscillates (tol 0 never stops it): the kept iterate is an early one, not the last, so
# the checkpoint's separate best iterate is exercised.
OSCILLATING = dict(PAPER, rank=3, temperature=0.1, max_iter=6, tol=0.0)
# Converges in a few steps: the best iterate is the last, and resuming ends converged.
CONVERGING = dict(PAPER, rank=3, temperature=2.0, max_iter=30, tol=1e-3)
# Nyström maps on both views (resolved RBF bandwidth, landmarks) and a randomized SVD.
NYSTROEM = dict(PAPER, rank=3, kernel="rbf", n_landmarks=30, svd="randomized", temperature=0.2, max_iter=5, tol=0.0)
# Centred, whitened features and damped (shifted) orthonormal steps.
# (the library's defaults otherwise)
WHITENED = dict(rank=3, whiten=1e-2, temperature=0.2, max_iter=5, tol=0.0, loss_tol=0.0)
# The library's solver: Anderson mixing, interrupted with a secant history to carry over.
ACCELERATED = dict(rank=3, temperature=0.5, max_iter=10, tol=0.0)


def make_data(n=150, seed=0):
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, 3))
    X = (Z @ rng.standard_normal((3, 8)) + 0.3 * rng.standard_normal((n, 8))).astype(np.float32)
    Y = (Z @ rng.standard_normal((3, 6)) + 0.3 * rng.standard_normal((n, 6))).astype(np.float32)
    return X, Y


def make_store(path, X, Y, groups=None):
    store = ud.PairStore.create(path, X.shape[1], Y.shape[1], groups=groups is not None, chunk_rows=32)
    store.append(X, Y, groups=groups)
    return store


@pytest.fixture(scope="module")
def data():
    return make_data()


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, data):
    X, Y = data
    path = tmp_path_factory.mktemp("ckpt") / "pairs.zarr"
    make_store(path, X, Y, groups=np.arange(len(X)) // 2)
    return path


class Interrupt(Exception):
    """Stands in for the driver dying."""


def interrupt_after(mp, k):
    """closed_form_step raises on its (k+2)-th call (the s = 0 step, then one per iteration):
    the driver dies after checkpoint k is written."""
    step = fixed_point.closed_form_step
    calls = []

    def dying_step(*args, **kwargs):
        calls.append(1)
        if len(calls) > k + 1:
            raise Interrupt(f"killed during iteration {k + 1}")
        return step(*args, **kwargs)

    mp.setattr(fixed_point, "closed_form_step", dying_step)


def count_steps(mp):
    step = fixed_point.closed_form_step
    calls = []

    def counting_step(*args, **kwargs):
        calls.append(1)
        return step(*args, **kwargs)

    mp.setattr(fixed_point, "closed_form_step", counting_step)
    return calls


def fail(*args, **kwargs):
    pytest.fail("a resumed fit recomputed what the checkpoint holds")


def assert_same_model(resumed, reference):
    for attr in ("F1_", "F2_", "W_"):
        assert np.array_equal(getattr(resumed, attr), getattr(reference, attr)), attr
    for key in ("iteration", "loss", "objective", "delta_w"):
        assert [h[key] for h in resumed.history_] == [h[key] for h in reference.history_], key
    for attr in ("n_iter_", "converged_", "best_iteration_", "loss_", "initial_loss_", "svd_solver_",
                 "n_features_x_", "n_features_y_", "n_inputs_x_", "n_inputs_y_"):
        assert getattr(resumed, attr) == getattr(reference, attr), attr
    for side in ("map_x_", "map_y_"):
        a, b = getattr(resumed, side), getattr(reference, side)
        assert type(a) is type(b)
        if isinstance(a, FeatureWhitening):
            assert torch.equal(a.mean, b.mean) and torch.equal(a.matrix, b.matrix)
            a, b = a.base, b.base
        assert (a is None) == (b is None)
        if a is not None:
            assert a.kernel == b.kernel
            assert torch.equal(a.landmarks.cpu(), b.landmarks.cpu())
            assert torch.equal(a.normalization.cpu(), b.normalization.cpu())


# --------------------------------------------------------------------------- in memory
@pytest.mark.parametrize("options, k", [(OSCILLATING, 2), (CONVERGING, 2), (NYSTROEM, 3), (WHITENED, 2),
                                        (ACCELERATED, 5)],
                         ids=["oscillating", "converging", "nystroem", "whitened", "accelerated"])
def test_resume_arrays_equals_uninterrupted(tmp_path, monkeypatch, data, options, k):
    X, Y = data
    groups = np.arange(len(X)) // 3
    reference = ud.UniCon(**options).fit(X, Y, groups)
    ckpt = tmp_path / "fit.ckpt.npz"
    with monkeypatch.context() as mp:
        interrupt_after(mp, k)
        with pytest.raises(Interrupt):
            ud.UniCon(**options).fit(X, Y, groups, checkpoint=ckpt)
    header, arrays = load_checkpoint(ckpt)
    assert header["format"] == FORMAT and header["iteration"] == k and not header["finished"]
    assert [h["loss"] for h in header["history"]] == [h["loss"] for h in reference.history_[:k]]
    assert header["fingerprint"]["temperature"] == options["temperature"]
    assert header["fingerprint"]["X"] == array_digest(torch.as_tensor(X))
    assert "best_F1" in arrays and "solver" in header  # the kept iterate, and the policy's state
    if options.get("solver", "anderson") == "anderson":
        assert header["solver"]["policy"]["n_points"] > 1 and any(k.startswith("solver_") for k in arrays)
        assert any(h["step"].startswith("anderson(") for h in reference.history_[k:])

    with monkeypatch.context() as mp:
        steps = count_steps(mp)
        mp.setattr(ud.NystroemMap, "fit", fail)  # the maps come from the checkpoint
        mp.setattr(Moments, "add", fail)  # and so does the whitening
        resumed = ud.UniCon(**options).fit(X, Y, groups, checkpoint=ckpt, resume=True)
    assert len(steps) == reference.n_iter_ - k
    assert_same_model(resumed, reference)
    assert "_checkpoint_run" not in vars(resumed)
    final = read_checkpoint_header(ckpt)
    assert final["finished"] and final["iteration"] == reference.n_iter_
    assert final["converged"] == reference.converged_


def test_checkpoint_history_has_every_iteration(tmp_path, data):
    X, Y = data
    ckpt = tmp_path / "c.npz"
    model = ud.UniCon(**OSCILLATING).fit(X, Y, checkpoint=ckpt)  # resume=False: a plain fit that also writes
    header, arrays = load_checkpoint(ckpt)
    assert header["history"] == json.loads(json.dumps(model.history_))
    # without a loss-plateau stop the iterate kept is the one of lowest residual
    residuals = [h["residual"] for h in model.history_]
    assert model.best_iteration_ == int(np.argmin(residuals)) + 1
    assert header["best"] == {"value": residuals[model.best_iteration_ - 1], "iteration": model.best_iteration_}
    assert header["stop_reason"] == model.stop_reason_ == "max_iter"
    assert np.array_equal(arrays["best_F1"], model.F1_) and np.array_equal(arrays["best_W"], model.W_)
    assert header["n_features"] == [8, 6] and header["n_inputs"] == [8, 6] and header["svd_solver"] == "exact"
    assert "verbose" not in header["fingerprint"]  # logging changes no number
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "c.npz"]
    assert leftovers == []  # no temporary files


# --------------------------------------------------------------------------- pair store
def test_resume_store_equals_uninterrupted(tmp_path, monkeypatch, store_path):
    options = dict(NYSTROEM, memory_budget=panel_budget(store_path, rows=100, **NYSTROEM))
    reference = ud.UniCon(**options).fit(store_path)
    ckpt = tmp_path / "store.ckpt.npz"
    with monkeypatch.context() as mp:
        interrupt_after(mp, 2)
        with pytest.raises(Interrupt):
            ud.UniCon(**options).fit(str(store_path), checkpoint=ckpt)
    header = read_checkpoint_header(ckpt)
    assert header["iteration"] == 2
    assert header["fingerprint"]["store"] == str(store_path.resolve())
    assert header["fingerprint"]["n_pairs"] == 150 and header["fingerprint"]["groups"] == "store"
    with monkeypatch.context() as mp:
        steps = count_steps(mp)
        mp.setattr(ud.NystroemMap, "from_landmarks", fail)  # no landmark rows are read again
        resumed = ud.UniCon(**options).fit(store_path, checkpoint=ckpt, resume=True)
    assert len(steps) == reference.n_iter_ - 2
    assert_same_model(resumed, reference)


_CHILD = textwrap.dedent("""\
    import json, sys, time
    import torch
    torch.set_num_threads(int(sys.argv[3]))  # the parent's: same BLAS blocking, same bits
    import unicon_dist as ud
    import unicon_dist.solver.fixed_point as fixed_point

    step = fixed_point.closed_form_step

    def slow_step(*args, **kwargs):
        time.sleep(0.3)  # room for the parent to kill between two checkpoints
        return step(*args, **kwargs)

    fixed_point.closed_form_step = slow_step
    ud.UniCon(**json.loads(sys.argv[4])).fit(sys.argv[1], checkpoint=sys.argv[2])
    """)


def test_sigkill_driver_after_iteration_k_then_resume(tmp_path, store_path):
    """A real driver process is killed with SIGKILL once its checkpoint reports iteration k."""
    options = dict(OSCILLATING, max_iter=8)
    options, k = dict(options, memory_budget=panel_budget(store_path, rows=100, **options)), 2
    ckpt = tmp_path / "killed.ckpt.npz"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    log = tmp_path / "driver.log"  # a file, not a pipe: a full pipe would block the driver
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(store_path), str(ckpt), str(torch.get_num_threads()),
             json.dumps(options)],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the driver exited ({proc.returncode}) before it was killed: "
                            f"{log.read_text()[-2000:]}")
            try:
                if read_checkpoint_header(ckpt)["iteration"] >= k:
                    break
            except FileNotFoundError:  # before the first checkpoint; a torn file would raise ValueError
                pass
            assert time.monotonic() < deadline, "no checkpoint of iteration k within 60 s"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    header = read_checkpoint_header(ckpt)
    assert k <= header["iteration"] < options["max_iter"] and not header["finished"]

    resumed = ud.UniCon(**options).fit(store_path, checkpoint=ckpt, resume=True)
    reference = ud.UniCon(**options).fit(store_path)
    assert_same_model(resumed, reference)


# --------------------------------------------------------------------------- mismatches
def test_fingerprint_mismatch_names_the_field(tmp_path, data):
    X, Y = data
    ckpt = tmp_path / "c.npz"
    ud.UniCon(**OSCILLATING).fit(X, Y, checkpoint=ckpt)
    with pytest.raises(ValueError, match=r"temperature is 0\.1 in the checkpoint but 0\.3 now"):
        ud.UniCon(**dict(OSCILLATING, temperature=0.3)).fit(X, Y, checkpoint=ckpt, resume=True)
    X2 = X.copy()
    X2[7, 0] += 1.0
    with pytest.raises(ValueError, match=r"different fit: X is 'sha256:"):
        ud.UniCon(**OSCILLATING).fit(X2, Y, checkpoint=ckpt, resume=True)
    with pytest.raises(ValueError, match=r"different fit: groups is None in the checkpoint but 'sha256:"):
        ud.UniCon(**OSCILLATING).fit(X, Y, np.arange(len(X)) // 2, checkpoint=ckpt, resume=True)
    with pytest.raises(ValueError, match=r"different fit: n_pairs is 150 in the checkpoint but 149 now"):
        ud.UniCon(**OSCILLATING).fit(X[:-1], Y[:-1], checkpoint=ckpt, resume=True)
    # verbose changes no number, so it is not part of the fingerprint
    ud.UniCon(**OSCILLATING, verbose=True).fit(X, Y, checkpoint=ckpt, resume=True)


def test_fingerprint_mismatch_after_appending_rows(tmp_path, data):
    X, Y = data
    path = tmp_path / "growing.zarr"
    make_store(path, X[:100], Y[:100])
    ckpt = tmp_path / "c.npz"
    ud.UniCon(**OSCILLATING).fit(path, checkpoint=ckpt)
    with pytest.raises(ValueError, match=r"data is 'store' in the checkpoint but 'arrays' now"):
        ud.UniCon(**OSCILLATING).fit(X[:100], Y[:100], checkpoint=ckpt, resume=True)
    ud.PairStore.open(path, mode="r+").append(X[100:110], Y[100:110])
    before = ckpt.read_bytes()
    with pytest.raises(ValueError, match=r"n_pairs is 100 in the checkpoint but 110 now.*delete the checkpoint"):
        ud.UniCon(**OSCILLATING).fit(path, checkpoint=ckpt, resume=True)
    assert ckpt.read_bytes() == before  # a refused resume writes nothing


def test_resume_errors(tmp_path, data):
    X, Y = data
    with pytest.raises(ValueError, match="resume=True needs checkpoint="):
        ud.UniCon(**OSCILLATING).fit(X, Y, resume=True)
    model_file = ud.UniCon(**OSCILLATING).fit(X, Y).save(tmp_path / "model.npz")
    with pytest.raises(ValueError, match="is not a unicon_dist checkpoint"):
        ud.UniCon(**OSCILLATING).fit(X, Y, checkpoint=model_file, resume=True)
    (tmp_path / "junk.npz").write_bytes(b"not an npz file")
    with pytest.raises(ValueError, match="cannot read"):
        ud.UniCon(**OSCILLATING).fit(X, Y, checkpoint=tmp_path / "junk.npz", resume=True)


# --------------------------------------------------------------------------- atomic writes
def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch, data):
    X, Y = data
    reference = ud.UniCon(**OSCILLATING).fit(X, Y)
    ckpt = tmp_path / "c.npz"
    savez = np.savez
    writes = []

    def failing_savez(fh, **arrays):
        writes.append(1)
        if len(writes) == 2:  # the second checkpoint: half a file, then the disk fills up
            fh.write(b"PK\x03\x04 torn")
            raise OSError(28, "No space left on device")
        return savez(fh, **arrays)

    with monkeypatch.context() as mp:
        mp.setattr(np, "savez", failing_savez)
        with pytest.raises(OSError, match="No space left"):
            ud.UniCon(**OSCILLATING).fit(X, Y, checkpoint=ckpt)
    assert read_checkpoint_header(ckpt)["iteration"] == 1  # the previous checkpoint, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz"]  # the torn temporary file is gone
    resumed = ud.UniCon(**OSCILLATING).fit(X, Y, checkpoint=ckpt, resume=True)
    assert_same_model(resumed, reference)


# --------------------------------------------------------------------------- finished / missing
@pytest.mark.parametrize("options", [OSCILLATING, CONVERGING], ids=["max_iter", "converged"])
def test_resume_a_finished_fit_only_restores(tmp_path, monkeypatch, data, options):
    X, Y = data
    ckpt = tmp_path / "c.npz"
    reference = ud.UniCon(**options).fit(X, Y, checkpoint=ckpt)
    header = read_checkpoint_header(ckpt)
    assert header["finished"] and header["converged"] == reference.converged_
    before = ckpt.read_bytes()
    with monkeypatch.context() as mp:
        mp.setattr(fixed_point, "closed_form_step", fail)
        mp.setattr(fit_paths, "CrossProductOperator", fail)  # no pass over the data at all
        resumed = ud.UniCon(**options).fit(X, Y, checkpoint=ckpt, resume=True)
    assert_same_model(resumed, reference)
    assert ckpt.read_bytes() == before


def test_resume_without_a_checkpoint_starts_from_scratch(tmp_path, caplog, data):
    X, Y = data
    ckpt = tmp_path / "new" / "c.npz"
    with caplog.at_level(logging.INFO, logger="unicon_dist.io.checkpoints"):
        model = ud.UniCon(**CONVERGING).fit(X, Y, checkpoint=ckpt, resume=True)
    assert f"no checkpoint at {ckpt}; fitting from scratch" in caplog.text
    assert_same_model(model, ud.UniCon(**CONVERGING).fit(X, Y))
    assert read_checkpoint_header(ckpt)["finished"]


# --------------------------------------------------------------------------- unicon-dist solve --resume
def test_solve_resume_end_to_end(tmp_path, monkeypatch, capsys, data):
    X, Y = data
    make_store(tmp_path / "train.zarr", X[:80], Y[:80])
    job = tmp_path / "job.toml"
    job.write_text(textwrap.dedent("""\
        [data]
        store = "train.zarr"

        [model]
        rank = 3
        temperature = 0.1
        max_iter = 5
        tol = 0.0
        memory_budget = "4MiB"

        [output]
        model = "runs/model.npz"
        metrics = "runs/metrics.json"
        """))
    ckpt = tmp_path / "runs" / "model.ckpt.npz"
    with monkeypatch.context() as mp:
        interrupt_after(mp, 2)
        with pytest.raises(Interrupt):
            main(["solve", str(job), "--resume", "--quiet"])
    assert "no checkpoint at" in capsys.readouterr().out
    assert read_checkpoint_header(ckpt)["iteration"] == 2
    assert not (tmp_path / "runs" / "model.npz").exists()

    assert main(["solve", str(job), "--resume", "--dry-run"]) == 0
    assert f"checkpoint    {ckpt} (resumes after iteration 2)" in capsys.readouterr().out
    with monkeypatch.context() as mp:
        steps = count_steps(mp)
        assert main(["solve", str(job), "--resume", "--quiet"]) == 0
    assert len(steps) == 3
    assert f"resuming from checkpoint {ckpt} (after iteration 2)" in capsys.readouterr().out
    model = ud.UniCon.load(tmp_path / "runs" / "model.npz")
    # bitwise against the same job run uninterrupted (the same operations repeat) ...
    ref_job = tmp_path / "ref.toml"
    ref_job.write_text(job.read_text().replace('"runs/', '"ref/'))
    assert main(["solve", str(ref_job), "--quiet"]) == 0
    capsys.readouterr()
    reference = ud.UniCon.load(tmp_path / "ref" / "model.npz")
    assert np.array_equal(model.F1_, reference.F1_) and np.array_equal(model.W_, reference.W_)
    assert [h["loss"] for h in model.history_] == [h["loss"] for h in reference.history_]
    # ... and close to the same options fitted through the API: a different code path (the
    # job reads the store through its own handle and plans), so float32 tiles may round
    # differently; C is accumulated in float64 from float32 tiles of ~80 rows, so the
    # iterates agree to a few float32 ulps amplified by the 5 steps
    direct = ud.UniCon(rank=3, temperature=0.1, max_iter=5, tol=0.0, memory_budget=4 << 20).fit(
        tmp_path / "train.zarr")
    np.testing.assert_allclose(model.W_, direct.W_, rtol=1e-4, atol=1e-5 * np.abs(direct.W_).max())
    metrics = json.loads((tmp_path / "runs" / "metrics.json").read_text())
    assert metrics["checkpoint"] == {"path": str(ckpt), "resumed_after_iteration": 2}

    # a job whose options changed is refused before any work, naming the field
    job.write_text(job.read_text().replace("temperature = 0.1", "temperature = 0.2")
                   .replace("[output]", "[output]\noverwrite = true"))
    with monkeypatch.context() as mp:
        mp.setattr(ud.UniCon, "fit", fail)
        assert main(["solve", str(job), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "[output] checkpoint: checkpoint" in err and "temperature is 0.1 in the checkpoint but 0.2 now" in err


def test_a_file_that_is_not_a_checkpoint_is_never_replaced(tmp_path, data):
    X, Y = data
    model_file = ud.UniCon(**OSCILLATING).fit(X, Y).save(tmp_path / "model.npz")
    before = model_file.read_bytes()
    with pytest.raises(ValueError, match="is not a unicon_dist checkpoint.*refusing to replace it"):
        ud.UniCon(**OSCILLATING).fit(X, Y, checkpoint=model_file)
    assert model_file.read_bytes() == before
    with pytest.raises(ValueError, match="is a directory"):
        ud.UniCon(**OSCILLATING).fit(X, Y, checkpoint=tmp_path)
