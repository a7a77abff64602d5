"""Parameter studies: validation before any solve, resumable runs, the tidy table, plots, Ray tasks."""

import csv
import json
import textwrap

import numpy as np
import pytest
import torch

import unicon_dist as ud
import unicon_dist.solver.estimator
from unicon_dist.apps.cli import main
from unicon_dist.apps.study import StudyError, flatten_record, load_study, point_id, round_to_storage, run_study

MODEL = "[model]\nrank = 3\nmax_iter = 2\n"


def _store(path, n, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8)).astype(np.float32)
    y = (x[:, :6] + 0.5 * rng.standard_normal((n, 6))).astype(np.float32)
    store = ud.PairStore.create(path, 8, 6, chunk_rows=64)
    store.append(x, y)
    return store


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("study-data")
    _store(root / "train.zarr", 300, 0)
    _store(root / "test.zarr", 80, 1)
    return root


def write_grid(folder, grid, *, model=MODEL, study='output = "out"', data=None, name="grid.toml"):
    data = data if data is not None else (f'train = "{folder.parent / "train.zarr"}"\n'
                                          f'test = "{folder.parent / "test.zarr"}"')
    path = folder / name
    path.write_text(f"[data]\n{data}\n\n[study]\n{study}\n\n{model}\n[grid]\n{textwrap.dedent(grid)}",
                    encoding="utf-8")
    return path


@pytest.fixture
def work(data, tmp_path):
    """A folder next to the stores (the grid files name them by absolute path)."""
    folder = data / tmp_path.name
    folder.mkdir()
    return folder


@pytest.fixture
def fits(monkeypatch):
    """Counts UniCon.fit calls; ``fits.fail`` = a temperature whose fits raise."""
    original = unicon_dist.solver.estimator.UniCon.fit

    class Counter:
        calls = 0
        fail = None

    def fit(self, *args, **kwargs):
        Counter.calls += 1
        if self.temperature == Counter.fail:
            raise RuntimeError("injected failure")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(unicon_dist.solver.estimator.UniCon, "fit", fit)
    return Counter


def run(path):
    lines = []
    rows = run_study(load_study(path), echo=lines.append)
    return rows, "\n".join(lines)


# ------------------------------------------------------------------------------ resuming
def test_a_finished_study_reruns_nothing(work, fits):
    path = write_grid(work, "temperature = [0.2, 0.5]\nn = [120]\n")
    rows, log = run(path)
    assert fits.calls == 2 and [r["status"] for r in rows] == ["ok", "ok"]
    assert "[1/2] temperature=0.2 ... ok" in log and "skipped" not in log
    runs = sorted((work / "out" / "runs").glob("*.json"))
    mtimes = [p.stat().st_mtime_ns for p in runs]
    rows2, log2 = run(path)
    assert fits.calls == 2
    assert "skipped 2 finished points" in log2 and "[2/2] temperature=0.5 ... skipped" in log2
    assert [p.stat().st_mtime_ns for p in runs] == mtimes
    assert rows2 == rows
    # a grown grid solves only the new point
    write_grid(work, "temperature = [0.5, 0.2, 1.0]\nn = [120]\n")
    rows3, log3 = run(path)
    assert fits.calls == 3 and len(rows3) == 3 and "skipped 2 finished points" in log3


def test_an_errored_point_is_recorded_and_rerun(work, fits):
    path = write_grid(work, "temperature = [0.2, 0.5]\nn = [120]\n")
    fits.fail = 0.5
    rows, log = run(path)
    assert [r["status"] for r in rows] == ["ok", "error"]
    assert rows[1]["error"] == "RuntimeError: injected failure"
    record = json.loads((work / "out" / "runs" / f"{rows[1]['id']}.json").read_text())
    assert record["status"] == "error" and "injected failure" in record["traceback"]
    assert "temperature=0.5 ... error: RuntimeError: injected failure" in log and "1 failed" in log
    fits.fail = None
    rows, log = run(path)
    assert fits.calls == 3  # only the errored point again
    assert [r["status"] for r in rows] == ["ok", "ok"] and "error" not in rows[1]
    assert "skipped 1 finished points" in log


def test_a_changed_model_or_data_table_is_refused(work):
    path = write_grid(work, "temperature = [0.5]\nn = [100]\n")
    run(path)
    write_grid(work, "temperature = [0.5]\nn = [100]\n", model="[model]\nrank = 2\nmax_iter = 2\n")
    with pytest.raises(StudyError, match=r"\[model\] differs from the study already in .*rank: 3 -> 2"):
        load_study(path)
    write_grid(work, "temperature = [0.5]\nn = [100]\n", data=f'train = "{work.parent / "train.zarr"}"')
    with pytest.raises(StudyError, match=r"\[data\] differs .*test"):
        load_study(path)


# ------------------------------------------------------------------------------ validation
BAD = [
    ("temprature = [0.1]", "[grid] unknown key 'temprature' (did you mean 'temperature'?)", None),
    ("temperature = [0.1]\n[extra]\na = 1", "unknown table [extra]", None),
    ("seed = ['four']", "[grid] seed must be an integer, got 'four' (string)", None),
    ("temperature = 0.1", "[grid] temperature must be a non-empty array", None),
    ("temperature = []", "[grid] temperature must be a non-empty array", None),
    ("temperature = [0.1, 0.1]", "[grid] temperature lists 0.1 more than once", None),
    ("temperature = [-1.0, 0.5]", "[grid] temperature must be a finite number > 0, got -1.0 (at 1 of 2 points, "
                                  "e.g. temperature=-1.0)", None),
    ("n = [1, 100]", "[grid] n must be integers >= 2", None),
    ("n = [301]", "[grid] n = 301 exceeds the 300 rows of the train store", None),
    ("storage_dtype = ['int8']\nn = [100]", "[grid] storage_dtype must be one of", None),
    ("storage_dtype = ['float16']", "[grid] storage_dtype rounds rows read into memory and needs n", None),
    ("rank = [3]", "[grid] rank is also in [model]", None),
    ("rank = [9]\nn = [100]", "[grid] rank = 9 exceeds the 6 features of view y", "[model]\nmax_iter = 2\n"),
    ("temperature = [0.5]", "[study] executor must be one of 'local', 'ray', got 'dask'",
     'output = "out"\nexecutor = "dask"'),
    ("temperature = [0.5]", '[study] cpus_per_task applies to executor = "ray" only',
     'output = "out"\ncpus_per_task = 2'),
]


@pytest.mark.parametrize("grid, message, other", BAD)
def test_bad_grid_files_are_refused_before_any_solve(work, fits, grid, message, other):
    kwargs = {}
    if other is not None:
        kwargs["model" if other.startswith("[model]") else "study"] = other
    path = write_grid(work, grid, **kwargs)
    with pytest.raises(StudyError) as info:
        load_study(path)
    assert any(message in e for e in info.value.errors), info.value.errors
    assert str(info.value).startswith(f"{path}: ")
    assert fits.calls == 0 and not (work / "out").exists()


def test_every_problem_is_reported_at_once(work):
    path = write_grid(work, "temperature = [0.5]\nbogus = [1]\nn = [100000]\n",
                      model="[model]\nrank = 3\nn = 10\nmax_iterr = 2\n",
                      data=f'train = "{work / "missing.zarr"}"\neval_rows = 1')
    with pytest.raises(StudyError) as info:
        load_study(path)
    text = str(info.value)
    for message in ("[data] train: no pair store at", "[data] eval_rows must be an integer >= 2",
                    "[data] eval_rows applies only with a test store", "[model] unknown key 'max_iterr'",
                    "[model] n is a study key", "[grid] unknown key 'bogus'"):
        assert message in text, text
    assert not (work / "out").exists()


def test_an_output_folder_that_is_not_a_study_is_refused(work):
    (work / "out").mkdir()
    (work / "out" / "notes.txt").write_text("mine")
    with pytest.raises(StudyError, match="holds no study.json"):
        load_study(write_grid(work, "temperature = [0.5]\n"))


def test_point_ids_do_not_depend_on_the_order_of_the_grid(work):
    a = load_study(write_grid(work, "temperature = [0.2, 0.5]\nn = [100, 200]\n", name="a.toml"))
    b = load_study(write_grid(work, "n = [200, 100]\ntemperature = [0.5, 0.2]\n",
                              model="[model]\nmax_iter = 2\nrank = 3\n", name="b.toml"))
    assert {p.id for p in a.points} == {p.id for p in b.points} and len(a.points) == 4
    assert [p.id for p in a.points] != [p.id for p in b.points]  # other order, same ids
    assert point_id({"rank": 3, "n": 100}) == point_id({"n": 100, "rank": 3}) != point_id({"rank": 3, "n": 200})


# ------------------------------------------------------------------------------ the table
def test_the_table_has_one_row_per_point_and_round_trips(work):
    pq = pytest.importorskip("pyarrow.parquet")
    path = write_grid(work, "temperature = [0.2, 0.5]\nn = [100, 300]\ndtype = ['float64']\n")
    rows, _ = run(path)
    with open(work / "out" / "results.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(rows) == 4
    columns = list(table[0])
    assert columns[:5] == ["id", "status", "options.temperature", "n", "options.dtype"]
    for c in ("options.rank", "seconds", "n_iter", "stop_reason", "loss", "converged", "peak_rss_mib",
              "retrieval.R@1", "retrieval.instance.x2y_R@1", "retrieval.evaluated_rows"):
        assert c in columns, c
    assert not any(c.startswith("history") for c in columns)
    assert [r["id"] for r in table] == [r["id"] for r in rows]
    assert [float(r["loss"]) for r in table] == [r["loss"] for r in rows]
    parquet = pq.read_table(work / "out" / "results.parquet").to_pylist()
    assert parquet == [{c: r.get(c) for c in columns} for r in rows]
    assert all(r["retrieval.evaluated_rows"] == 80 for r in rows)


def test_flatten_record_keeps_histories_out():
    record = {"id": "a", "loss": 1.5, "history": [{"loss": 2.0}],
              "diagnostics": {"svd": {"spectral_gap": 0.5, "values": [3.0, 2.0]}, "per_iter": [{"r": 1}], "ok": True}}
    assert flatten_record(record) == {"id": "a", "loss": 1.5, "diagnostics.svd.spectral_gap": 0.5,
                                      "diagnostics.svd.values": "[3.0, 2.0]", "diagnostics.ok": True}


def test_diagnostics_are_recorded_and_plotted(work, monkeypatch):
    pytest.importorskip("matplotlib")
    original = unicon_dist.solver.estimator.UniCon.fit

    def fit(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        self.diagnostics_ = {"verify": {"rel_error": 1e-7 * self.temperature, "checks": [1, 2]},
                             "iterations": [{"residual": 0.1}]}
        return out

    monkeypatch.setattr(unicon_dist.solver.estimator.UniCon, "fit", fit)
    rows, log = run(write_grid(work, "temperature = [0.2, 0.5]\nn = [60, 120]\n"))
    assert rows[0]["diagnostics.verify.rel_error"] == pytest.approx(2e-8)
    assert rows[0]["diagnostics.verify.checks"] == "[1, 2]" and "diagnostics.iterations" not in rows[0]
    record = json.loads((work / "out" / "runs" / f"{rows[0]['id']}.json").read_text())
    assert record["diagnostics"]["iterations"] == [{"residual": 0.1}] and len(record["history"]) == 2
    plots = {p.name for p in (work / "out" / "plots").glob("*.png")}
    assert plots == {"time_vs_n.png", "loss_vs_temperature.png", "retrieval.R1_vs_temperature.png",
                     "diagnostics.verify.rel_error_vs_temperature.png"}
    assert "plots: plots/time_vs_n.png" in log


def test_without_matplotlib_the_study_completes(work, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    rows, log = run(write_grid(work, "temperature = [0.2, 0.5]\nn = [100]\n"))
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert "pip install unicon_dist[study]" in log and not (work / "out" / "plots").exists()


# ------------------------------------------------------------------------------ storage precision
def test_round_to_storage_is_torchs_cast():
    x = np.random.default_rng(0).standard_normal((50, 7)).astype(np.float32) * 100
    for name in ("bfloat16", "float16"):
        expected = torch.from_numpy(x).to(getattr(torch, name)).float().numpy()
        got = round_to_storage(x, name)
        assert got.dtype == np.float32 and np.array_equal(got, expected) and not np.array_equal(got, x)
    assert round_to_storage(x, "float64").dtype == np.float64 and round_to_storage(x, None) is x


def test_storage_dtype_changes_the_fit(work):
    rows, _ = run(write_grid(work, "n = [200]\nstorage_dtype = ['float32', 'bfloat16']\n"))
    f32, bf16 = rows
    assert (f32["storage_dtype"], bf16["storage_dtype"]) == ("float32", "bfloat16")
    assert f32["loss"] != bf16["loss"] and abs(f32["loss"] - bf16["loss"]) < 1e-2 * abs(f32["loss"])
    x, y, _ = ud.PairStore.open(work.parent / "train.zarr").read(slice(0, 200))
    direct = ud.UniCon(rank=3, max_iter=2).fit(round_to_storage(x, "bfloat16"), round_to_storage(y, "bfloat16"))
    assert bf16["loss"] == pytest.approx(direct.loss_, rel=1e-12)


# ------------------------------------------------------------------------------ the command
def test_cli_refuses_a_bad_grid_with_status_2(work, capsys):
    path = write_grid(work, "temperature = [-1.0]\n")
    assert main(["study", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: [grid] temperature must be a finite number > 0" in err
    assert not (work / "out").exists()


def test_cli_dry_run_lists_the_points_and_writes_nothing(work, capsys):
    path = write_grid(work, "temperature = [0.2, 0.5]\n")
    assert main(["study", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    ids = [p.id for p in load_study(path).points]
    assert all(i in out for i in ids) and "temperature=0.5" in out and "2 points" in out
    assert not (work / "out").exists()


# ------------------------------------------------------------------------------ Ray
def test_ray_tasks_give_the_local_rows(work):
    ray = pytest.importorskip("ray")
    was_running = ray.is_initialized()
    grid = "temperature = [0.2, 0.5]\n"  # no n: the whole store, fitted out of core in each task
    local, _ = run(write_grid(work, grid, name="local.toml"))
    remote, log = run(write_grid(work, grid, study='output = "out-ray"\nexecutor = "ray"\ncpus_per_task = 1',
                                 name="ray.toml"))
    assert ray.is_initialized() == was_running  # the study stopped the Ray it started
    assert "ok" in log
    by_id = {r["id"]: r for r in remote}
    assert sorted(by_id) == sorted(r["id"] for r in local)
    for r in local:
        other = by_id[r["id"]]
        assert other["status"] == "ok" and other["n"] is None
        assert other["loss"] == pytest.approx(r["loss"], rel=1e-6)
        assert other["n_iter"] == r["n_iter"]
        # round-off (other thread counts in the task) may flip at most one of the 80 queries
        assert other["retrieval.R@1"] == pytest.approx(r["retrieval.R@1"], abs=1 / 80 + 1e-9)
