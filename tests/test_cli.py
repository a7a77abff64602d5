"""evaluate_store / evaluate_arrays against retrieval_metrics, and the solve / evaluate / demo commands."""

import json
import textwrap

import numpy as np
import pytest

import unicon_dist as ud
from unicon_dist.apps.cli import main
from unicon_dist.apps.evaluation import LABEL_EMBEDDINGS, evaluate_arrays, evaluate_store, format_evaluation
from unicon_dist.data.store import PairStore

UNICON = "UniCon r=3"
BASE = "unaligned (identity)"


def unit(a):
    a = np.asarray(a, dtype=np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def make_data(n=120, d=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x @ rng.normal(size=(d, d)) * 0.5 + rng.normal(size=(n, d))).astype(np.float32)
    labels = rng.integers(0, 4, size=n)
    groups = np.arange(n) // 3
    return x, y, labels, groups


def write_store(path, x, y, labels=None, groups=None, chunk_rows=16):
    store = PairStore.create(path, x.shape[1], y.shape[1], labels=labels is not None, groups=groups is not None,
                             chunk_rows=chunk_rows)
    store.append(x, y, groups=groups, labels=labels)
    return store


@pytest.fixture(scope="module")
def data():
    return make_data()


@pytest.fixture(scope="module")
def model(data):
    x, y, _, _ = data
    return ud.UniCon(rank=3, temperature=0.5, max_iter=3).fit(x, y)


# ------------------------------------------------------------------------------ evaluate_store
def test_evaluate_store_equals_retrieval_metrics(tmp_path, data, model):
    x, y, labels, groups = data
    store = write_store(tmp_path / "s.zarr", x, y, labels=labels, groups=groups)
    res = evaluate_store(model, store, block_rows=7)  # blocks that do not align with the chunks
    zx, zy = model.encode_x(x), model.encode_y(y)
    assert res["n_rows"] == res["evaluated_rows"] == 120 and res["subset"] is None
    assert res["methods"] == [BASE, UNICON]
    r = res["retrieval"]
    assert r["instance"][UNICON] == ud.retrieval_metrics(zx, zy)
    assert r["group"][UNICON] == ud.retrieval_metrics(zx, zy, groups=groups)
    assert r["class"][UNICON] == ud.retrieval_metrics(zx, zy, groups=labels)
    assert r["instance"][BASE] == ud.retrieval_metrics(unit(x), unit(y))
    assert r["class"][BASE] == ud.retrieval_metrics(unit(x), unit(y), groups=labels)
    # the same from a path, with the default blocks, and from arrays
    assert evaluate_store(model, str(store.path))["retrieval"] == r
    assert evaluate_arrays(model, x, y, labels=labels, groups=groups)["retrieval"] == r
    text = format_evaluation(res)
    assert "instance retrieval" in text and "class retrieval" in text and "prototype accuracy" in text


def test_evaluate_store_subset(tmp_path, data, model):
    x, y, labels, _ = data
    store = write_store(tmp_path / "s.zarr", x, y, labels=labels)
    res = evaluate_store(model, store, max_rows=50, seed=3, ks=(1, 2))
    rows = np.sort(np.random.default_rng(3).choice(120, size=50, replace=False))
    assert res["evaluated_rows"] == 50 and res["subset"]["rows"] == 50 and res["subset"]["of"] == 120
    assert "seeded random subset of 50 of the 120 rows" in res["subset"]["note"]
    assert "seeded random subset" in format_evaluation(res)
    zx, zy = model.encode_x(x[rows]), model.encode_y(y[rows])
    assert res["retrieval"]["instance"][UNICON] == ud.retrieval_metrics(zx, zy, ks=(1, 2))
    assert res["retrieval"]["class"][UNICON] == ud.retrieval_metrics(zx, zy, ks=(1, 2), groups=labels[rows])
    assert evaluate_arrays(model, x, y, labels=labels, max_rows=50, seed=3, ks=(2, 1))["retrieval"] == res["retrieval"]


def identity_model(d):
    """A fitted UniCon whose encoders are the identity: f(x) = x/‖x‖, g(y) = y/‖y‖."""
    rng = np.random.default_rng(1)
    m = ud.UniCon(rank=d, max_iter=1).fit(rng.normal(size=(20, d)), rng.normal(size=(20, d)))
    m.F1_ = m.F2_ = np.eye(d)
    return m


def zero_shot_case():
    d = 6
    E = np.eye(d, dtype=np.float32) * 2.0
    labels = np.arange(12) % d
    x = E[labels] + 0.05
    x[9] = E[(labels[9] + 1) % d]                           # wrong at top 1; the true class ties the rest
    for i in (10, 11):
        x[i] = E[(labels[i] + 1) % d] - 0.5 * E[labels[i]]  # wrong at top 1 and at top 5
    y = np.random.default_rng(2).normal(size=(12, d)).astype(np.float32)
    return x, y, labels, E


def test_zero_shot_accuracy_known_answer(tmp_path):
    x, y, labels, E = zero_shot_case()
    model = identity_model(6)
    store = write_store(tmp_path / "z.zarr", x, y, labels=labels)
    store.put_array(LABEL_EMBEDDINGS, E)
    res = evaluate_store(model, PairStore.open(tmp_path / "z.zarr"))
    cls = res["classification"]
    assert cls["kind"] == "zero-shot" and cls["n_classes"] == 6
    expected = {"top1": 9 / 12, "top5": 10 / 12}
    assert cls["accuracy"] == {BASE: expected, "UniCon r=6": expected}
    from_arrays = evaluate_arrays(model, x, y, labels=labels, label_embeddings=E)
    assert from_arrays["classification"]["accuracy"] == cls["accuracy"]
    assert "zero-shot classification" in format_evaluation(res)


def test_prototype_accuracy_is_named_as_such(tmp_path, data, model):
    x, y, labels, _ = data
    res = evaluate_store(model, write_store(tmp_path / "p.zarr", x, y, labels=labels))
    cls = res["classification"]
    assert cls["kind"] == "prototype" and cls["description"].startswith("not zero-shot")
    zx, zy = model.encode_x(x), model.encode_y(y)
    protos = unit(np.stack([zy[labels == c].mean(0) for c in range(4)]))
    assert cls["accuracy"][UNICON]["top1"] == pytest.approx(np.mean((zx @ protos.T).argmax(1) == labels))
    assert list(cls["accuracy"][UNICON]) == ["top1"]  # top-5 of 4 classes is not reported
    assert "prototype accuracy (not zero-shot" in format_evaluation(res)


def test_evaluation_without_labels_and_without_baseline(tmp_path, model):
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(30, 6)), rng.normal(size=(30, 6))
    res = evaluate_store(model, write_store(tmp_path / "n.zarr", x, y), baseline=False)
    assert res["methods"] == [UNICON] and list(res["retrieval"]) == ["instance"]
    assert "classification" not in res
    m = ud.UniCon(rank=2, max_iter=1).fit(rng.normal(size=(30, 5)), rng.normal(size=(30, 3)))
    res = evaluate_arrays(m, rng.normal(size=(30, 5)), rng.normal(size=(30, 3)))
    assert res["methods"] == ["UniCon r=2"]  # dims differ: no identity baseline


def test_evaluation_errors(tmp_path, model):
    rng = np.random.default_rng(5)
    store = write_store(tmp_path / "w.zarr", rng.normal(size=(10, 7)), rng.normal(size=(10, 6)))
    with pytest.raises(ValueError, match=r"has dims \(x 7, y 6\); the model was fitted on \(x 6, y 6\)"):
        evaluate_store(model, store)
    x, y, labels, E = zero_shot_case()
    with pytest.raises(ValueError, match="label 5 is out of range"):
        evaluate_arrays(identity_model(6), x, y, labels=labels, label_embeddings=E[:5])
    for kwargs, match in (({"ks": (0,)}, "ks must be"), ({"max_rows": 1}, "max_rows must be"),
                          ({"block_rows": 0}, "block_rows must be"), ({"seed": -1}, "seed must be")):
        with pytest.raises(ValueError, match=match):
            evaluate_arrays(model, x, y, **kwargs)
    with pytest.raises(RuntimeError, match="not fitted"):
        evaluate_arrays(ud.UniCon(rank=2), x, y)


# ------------------------------------------------------------------------------ CLI
def test_cli_evaluate(tmp_path, capsys, data, model):
    x, y, labels, _ = data
    write_store(tmp_path / "s.zarr", x, y, labels=labels)
    model.save(tmp_path / "m.npz")
    rc = main(["evaluate", str(tmp_path / "m.npz"), str(tmp_path / "s.zarr"), "--json", str(tmp_path / "r.json"),
               "--ks", "1", "3", "--max-rows", "100"])
    out = capsys.readouterr().out
    assert rc == 0 and "instance retrieval" in out and "seeded random subset of 100 of the 120 rows" in out
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["ks"] == [1, 3] and res["evaluated_rows"] == 100 and res["model_file"] == str(tmp_path / "m.npz")
    assert res["retrieval"] == evaluate_store(tmp_path / "m.npz", tmp_path / "s.zarr", ks=(1, 3),
                                              max_rows=100)["retrieval"]

    assert main(["evaluate", str(tmp_path / "none.npz"), str(tmp_path / "s.zarr")]) == 2
    assert "unicon-dist: error: no such model file" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "m.npz"), str(tmp_path / "none.zarr")]) == 2
    assert "unicon-dist: error: no pair store at" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "m.npz"), str(tmp_path / "s.zarr"), "--max-rows", "1"]) == 2
    assert "max_rows must be an integer >= 2" in capsys.readouterr().err


def test_cli_usage_errors_exit_2(capsys):
    for argv in ([], ["frobnicate"], ["solve"], ["evaluate", "m.npz"], ["demo", "--dataset", "cifar"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    capsys.readouterr()


def test_demo_digits(tmp_path, capsys):
    out = tmp_path / "demo" / "digits.npz"
    assert main(["demo", "--dataset", "digits", "--max-iter", "3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "1,348 training pairs, 449 test pairs" in text
    for part in ("instance retrieval", "class retrieval", "prototype accuracy", BASE, "UniCon r=16", "model written"):
        assert part in text
    assert ud.UniCon.load(out).rank == 16


def test_demo_fashion_mnist_missing_files_say_how_to_install(tmp_path, capsys):
    assert main(["demo", "--data-dir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unicon-dist: error: Fashion-MNIST not found")
    assert "sudo apt-get install -y dataset-fashion-mnist" in err and "--dataset digits" in err


def test_demo_bad_options_fail_before_loading(tmp_path, capsys, monkeypatch):
    import unicon_dist.data.datasets

    monkeypatch.setattr(unicon_dist.data.datasets, "load_digits_halves", lambda: pytest.fail("data was read"))
    assert main(["demo", "--dataset", "digits", "--temperature", "-1", "--out", str(tmp_path / "m.npz")]) == 2
    assert "temperature must be a finite number > 0" in capsys.readouterr().err


# ------------------------------------------------------------------------------ solve
def solve_setup(tmp_path, extra_model="", output_extra=""):
    x, y, labels, _ = make_data(n=60, seed=7)
    write_store(tmp_path / "train.zarr", x, y, labels=labels)
    xt, yt, lt, _ = make_data(n=40, seed=8)
    write_store(tmp_path / "test.zarr", xt, yt, labels=lt)
    job = tmp_path / "job.toml"
    job.write_text(textwrap.dedent(f"""\
        [data]
        store = "train.zarr"
        eval_store = "test.zarr"

        [model]
        rank = 3
        temperature = 0.5
        max_iter = 3
        memory_budget = "64MiB"
        {extra_model}

        [evaluate]
        ks = [1, 5]

        [output]
        model = "runs/model.npz"
        metrics = "runs/metrics.json"
        {output_extra}
        """))
    return job, (x, y)


def test_solve_dry_run_writes_nothing(tmp_path, capsys, monkeypatch):
    job, _ = solve_setup(tmp_path)
    monkeypatch.setattr(ud.UniCon, "fit", lambda *a, **k: pytest.fail("dry run fitted"))
    assert main(["solve", str(job), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"job {job}") and "train.zarr (60 rows, x 6 + y 6 float32, with labels)" in out
    assert "memory budget 64 MiB" in out and "dry run: the job is valid" in out
    assert not (tmp_path / "runs").exists()


def test_solve_rejects_a_bad_job_before_any_work(tmp_path, capsys, monkeypatch):
    job, _ = solve_setup(tmp_path, extra_model="rho = -2\nshards = 4")
    monkeypatch.setattr(ud.UniCon, "fit", lambda *a, **k: pytest.fail("fitted a bad job"))
    assert main(["solve", str(job)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"unicon-dist: error: {job}: [model] unknown key 'shards'")
    assert f"\n{job}: [model] rho must be a finite number > 0, got -2" in err  # both problems at once
    assert main(["solve", str(tmp_path / "none.toml")]) == 2
    assert "no such job file" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(not hasattr(ud, "LocalExecutor"), reason="waiting on out-of-core fit(store, executor=...)")
def test_solve_end_to_end(tmp_path, capsys):
    job, (x, y) = solve_setup(tmp_path)
    assert main(["solve", str(job), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "model written to" in out and "instance retrieval" in out and "time: validate" in out
    model = ud.UniCon.load(tmp_path / "runs" / "model.npz")
    reference = ud.UniCon(rank=3, temperature=0.5, max_iter=3).fit(x, y)
    np.testing.assert_allclose(model.W_, reference.W_, atol=1e-5)
    metrics = json.loads((tmp_path / "runs" / "metrics.json").read_text())
    assert metrics["format"] == "unicon_dist.metrics/1"
    assert metrics["model_file"] == str(tmp_path / "runs" / "model.npz")
    assert metrics["checkpoint"] is None and not (tmp_path / "runs" / "model.ckpt.npz").exists()
    assert len(metrics["history"]) == model.n_iter_ == metrics["fit"]["n_iter"]
    assert {"validate", "fit", "save", "evaluate", "total"} <= set(metrics["timings"])
    assert metrics["job"]["model"]["memory_budget"] == "64MiB"
    assert metrics["evaluation"]["retrieval"] == evaluate_store(model, tmp_path / "test.zarr", ks=(1, 5))["retrieval"]

    # a second run refuses to clobber the outputs ...
    before = (tmp_path / "runs" / "model.npz").read_bytes()
    assert main(["solve", str(job)]) == 2
    assert "already exists; set overwrite = true to replace it" in capsys.readouterr().err
    assert (tmp_path / "runs" / "model.npz").read_bytes() == before
    # ... unless told to
    job.write_text(job.read_text().replace("[output]", "[output]\noverwrite = true"))
    assert main(["solve", str(job), "--quiet"]) == 0
