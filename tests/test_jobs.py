"""Job files: every key's type and range, unknown keys, paths, stores, outputs, ordering."""

import os
import textwrap

import numpy as np
import pytest

import unicon_dist as ud
from unicon_dist.apps import job_spec
from unicon_dist.apps.jobs import JobError, load_job, parse_bytes
from unicon_dist.data.store import PairStore


def make_store(path, n=40, dim_x=6, dim_y=5, groups=False, labels=False, seed=0):
    rng = np.random.default_rng(seed)
    store = PairStore.create(path, dim_x, dim_y, groups=groups, labels=labels, chunk_rows=16)
    if n:
        store.append(rng.normal(size=(n, dim_x)), rng.normal(size=(n, dim_y)),
                     groups=np.arange(n) // 2 if groups else None,
                     labels=np.arange(n) % 3 if labels else None)
    return store


@pytest.fixture
def workdir(tmp_path):
    make_store(tmp_path / "train.zarr")
    return tmp_path


def write_job(folder, text, name="job.toml"):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


BASE = {
    "data": 'store = "train.zarr"',
    "model": "rank = 4\ntemperature = 0.5",
    "output": 'model = "out/model.npz"',
}


def job_text(**tables):
    """A job file from BASE with tables replaced (None drops a table)."""
    merged = {**BASE, **tables}
    return "\n".join(f"[{name}]\n{body}\n" for name, body in merged.items() if body is not None)


def errors_of(folder, **tables):
    path = write_job(folder, job_text(**tables))
    with pytest.raises(JobError) as info:
        load_job(path)
    for line in str(info.value).splitlines():
        assert line.startswith(f"{path}: "), line  # every line names the file
    return info.value.errors


def test_valid_job_defaults(workdir):
    job = load_job(write_job(workdir, job_text()))
    assert job.data.store.path == workdir / "train.zarr"
    assert (job.data.store.n_rows, job.data.store.dim_x, job.data.store.dim_y) == (40, 6, 5)
    assert job.data.eval_store is None and job.data.groups is None and not job.data.use_groups
    assert job.executor.kind == "local"
    assert job.evaluate == job_spec.EvaluateSpec()
    assert job.output.model == workdir / "out" / "model.npz"
    assert job.output.metrics is None and job.output.overwrite is False
    model = job.make_model()
    assert isinstance(model, ud.UniCon) and model.rank == 4 and model.temperature == 0.5
    assert job.fit_kwargs() == {}
    plan = job.describe()
    assert "train.zarr (40 rows, x 6 + y 5 float32)" in plan and "new file" in plan
    assert job.to_dict()["model"] == {"rank": 4, "temperature": 0.5}
    assert not (workdir / "out").exists()  # validation creates nothing


def test_relative_paths_resolve_against_the_job_folder(tmp_path, monkeypatch):
    make_store(tmp_path / "data" / "s.zarr")
    path = write_job(tmp_path / "jobs", job_text(data='store = "../data/s.zarr"', output='model = "m/x.npz"'))
    monkeypatch.chdir(tmp_path / "data")  # the working directory does not matter
    job = load_job(path)
    assert job.data.store.path == tmp_path / "data" / "s.zarr"
    assert job.output.model == tmp_path / "jobs" / "m" / "x.npz"
    abs_path = write_job(tmp_path / "other", job_text(data=f'store = "{tmp_path / "data" / "s.zarr"}"'))
    assert load_job(abs_path).data.store.path == tmp_path / "data" / "s.zarr"


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such job file"):
        load_job(tmp_path / "nope.toml")
    with pytest.raises(JobError, match="invalid TOML"):
        load_job(write_job(tmp_path, "[data\nstore = 1"))


def test_unknown_tables_and_keys_list_the_valid_ones(workdir):
    errs = errors_of(workdir, extra="a = 1", model="rank = 4\ntemprature = 0.5")
    assert any("unknown table [extra]; valid tables: [data], [model], [executor], [evaluate], [output]" in e
               for e in errs)
    model_err = next(e for e in errs if "temprature" in e)
    assert model_err.startswith("[model] unknown key 'temprature' (did you mean 'temperature'?); valid keys: rank,")
    for table, valid in (("data", "store, eval_store, groups"), ("executor", "kind, address"),
                         ("evaluate", "ks, max_rows, seed, block_rows"), ("output", "model, metrics, checkpoint, overwrite")):
        extra = 'kind = "local"\n' if table == "executor" else ""
        body = {**BASE, "executor": None, "evaluate": None}.get(table) or ""
        errs = errors_of(workdir, **{table: f"{body}\n{extra}bogus = 1"})
        assert any(e.startswith(f"[{table}] unknown key 'bogus'") and valid in e for e in errs), errs


def test_missing_required_tables_and_keys(workdir):
    errs = errors_of(workdir, data=None, output=None)
    assert "missing table [data]" in errs and "missing table [output]" in errs
    errs = errors_of(workdir, data="groups = false", output="overwrite = true")
    assert any(e.startswith("[data] store is required") for e in errs)
    assert any(e.startswith("[output] model is required") for e in errs)
    errs = errors_of(workdir, data="store = 3")
    assert errs == ["[data] store must be a path string, got 3 (integer)"]
    path = write_job(workdir, 'data = "train.zarr"\n[output]\nmodel = "m.npz"\n')
    with pytest.raises(JobError, match=r"data must be a table \[data\], got string"):
        load_job(path)


@pytest.mark.parametrize("line, message", [
    ('rank = "4"', "[model] rank must be an integer, got '4' (string)"),
    ("rank = 0", "[model] rank must be a positive integer, got 0"),
    ("rank = 1.5", "[model] rank must be an integer, got 1.5 (float)"),
    ("temperature = -1", "[model] temperature must be a finite number > 0, got -1"),
    ("temperature = true", "[model] temperature must be a number, got True (boolean)"),
    ("rho = 0", "[model] rho must be a finite number > 0, got 0"),
    ("nu = nan", "[model] nu must be finite"),
    ('kernel = "nope"', "[model] kernel: unknown kernel 'nope'"),
    ('kernel_x = {bandwidth = 2.0}', '[model] kernel_x: needs a string key "name"'),
    ('kernel = {name = "rbf", width = 2.0}', "[model] kernel: bad parameters for kernel 'rbf'"),
    ("n_landmarks = 0", "[model] n_landmarks must be a positive integer or None, got 0"),
    ('landmarks = "random"', "[model] landmarks must be one of"),
    ("eig_floor = 1.0", "[model] eig_floor must be in [0, 1), got 1.0"),
    ('loss = "hinge"', "[model] unknown loss 'hinge'"),
    ("loss = {margin = 1.0}", '[model] loss: needs a string key "name"'),
    ("negatives = 0", "[model] negatives batch size must be positive, got 0"),
    ('negatives = "half"', "[model] negatives must be 'full', 'auto' or a positive batch size, got 'half'"),
    ("negatives = 1", "[model] negatives batch size must be at least 2, got 1"),
    ('kernel = {name = "laplacian", bandwidth = -1}', "[model] kernel: laplacian kernel bandwidth must be a finite"),
    ("negatives = 2.5", "[model] negatives must be a string or an integer, got 2.5 (float)"),
    ('similarity = "l2"', "[model] similarity must be one of"),
    ('factorization = "qr"', "[model] factorization must be one of"),
    ("ridge = -1.0", "[model] ridge must be a finite number >= 0, got -1.0"),
    ("max_iter = 0", "[model] max_iter must be a positive integer, got 0"),
    ("tol = -1e-3", "[model] tol must be None or a number >= 0, got -0.001"),
    ('svd = "lapack"', "[model] svd must be one of"),
    ("svd_oversampling = -1", "[model] svd_oversampling must be an integer >= 0, got -1"),
    ("svd_power_iter = 1.0", "[model] svd_power_iter must be an integer, got 1.0 (float)"),
    ('seed = "0"', "[model] seed must be an integer, got '0' (string)"),
    ("device = 0", "[model] device must be a string, got 0 (integer)"),
    ('device = "gpu:x"', "[model] invalid device 'gpu:x'"),
    ('dtype = "int8"', "[model] unsupported dtype 'int8'"),
    ('dtype = "float16"', "[model] dtype of the tile arithmetic must be float32 or float64"),
    ('memory_budget = "lots"', "[model] memory_budget: must be a byte count or a size string"),
    ("memory_budget = 0", "[model] memory_budget: must be a positive number of bytes, got 0"),
    ("memory_budget = 1.5", "[model] memory_budget must be an integer or a string, got 1.5 (float)"),
    ('verbose = "yes"', "[model] verbose must be a boolean, got 'yes' (string)"),
    ("whiten = true", "[model] whiten: is a ridge > 0 (e.g. 1e-3), or false for no whitening"),
    ("whiten = -1e-3", "[model] whiten must be None or a ridge > 0"),
    ('center = "yes"', "[model] center must be a boolean, got 'yes' (string)"),
    ("damping = 0", "[model] damping must be a number in (0, 1]"),
    ("loss_tol = -1", "[model] loss_tol must be a number >= 0"),
])
def test_model_option_types_and_ranges(workdir, line, message):
    body = {"rank": "rank = 4", "temperature": "temperature = 0.5"}
    body[line.split("=")[0].strip()] = line
    errs = errors_of(workdir, model="\n".join(body.values()))
    assert len(errs) == 1 and errs[0].startswith(message), errs


def test_model_table_reports_every_bad_value_at_once(workdir):
    # each is well typed, so only UniCon's own validation sees them; it stops at its first
    errs = errors_of(workdir, model="rank = 0\ntemperature = -1\ndamping = 2.0")
    assert errs == [
        "[model] rank must be a positive integer, got 0",
        "[model] temperature must be a finite number > 0, got -1.0",
        "[model] damping must be a number in (0, 1], got 2.0",
    ]


def test_model_table_reports_every_kind_of_problem_at_once(workdir):
    body = textwrap.dedent("""\
        rank = 4
        bogus = 1
        max_iter = "3"
        kernel = {name = "rbf", bandwidth = 0}
        negatives = 1
        loss = {name = "sigmoid"}
        temperature = -1
        """)
    errs = errors_of(workdir, model=body)
    expected = ["[model] unknown key 'bogus'", "[model] max_iter must be an integer, got '3' (string)",
                "[model] kernel: rbf kernel bandwidth must be a finite number > 0",
                "[model] negatives batch size must be at least 2, got 1",
                "[model] temperature must be a finite number > 0, got -1"]
    assert len(errs) == len(expected), errs
    for fragment in expected:
        assert sum(e.startswith(fragment) for e in errs) == 1, (fragment, errs)
    # the loss table carries τ, but a bad τ is reported once, under its own key
    assert not any(e.startswith("[model] loss") for e in errs), errs


def test_model_options_that_are_accepted(workdir):
    body = textwrap.dedent("""\
        rank = 3
        kernel = {name = "rbf", bandwidth = 2.0}
        kernel_y = "laplacian"
        n_landmarks = 20
        loss = {name = "sigmoid", bias = -1.0}
        temperature = 0.2
        negatives = 16
        memory_budget = "1.5MiB"
        verbose = false
        """)
    job = load_job(write_job(workdir, job_text(model=body)))
    model = job.make_model()
    assert model.kernel == ud.kernels.RBF(bandwidth=2.0) and model.kernel_y == "laplacian"
    assert model.loss.name == "sigmoid" and model.loss.temperature == 0.2
    assert model.memory_budget == int(1.5 * 2**20) and model.negatives == 16
    assert "memory budget 1.5 MiB" in job.describe()
    raw = load_job(write_job(workdir, job_text(model="rank = 3\ncenter = false\nwhiten = false\nloss_tol = 0.0"),
                             name="raw.toml")).make_model()
    assert (raw.center, raw.whiten, raw.loss_tol) == (False, None, 0.0)


def test_parse_bytes():
    assert parse_bytes(512) == 512 and parse_bytes("512") == 512
    assert parse_bytes("2GiB") == 2 * 1024**3 and parse_bytes("2 gib") == 2 * 1024**3
    assert parse_bytes("2GB") == 2 * 10**9 and parse_bytes("500MB") == 500 * 10**6
    assert parse_bytes("1.5KiB") == 1536 and parse_bytes("3k") == 3000
    for bad in ("", "2 GiBs", "-1", "1e9", "GiB", True, 0, 2.5, "0.1B", "2iB"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_stores_are_checked(workdir):
    errs = errors_of(workdir, data='store = "missing.zarr"\neval_store = "also-missing.zarr"')
    assert errs == [f"[data] store: no pair store at {workdir / 'missing.zarr'}",
                    f"[data] eval_store: no pair store at {workdir / 'also-missing.zarr'}"]
    (workdir / "plain").mkdir()
    errs = errors_of(workdir, data='store = "plain"')
    assert len(errs) == 1 and errs[0].startswith("[data] store: ") and "is not a pair store" in errs[0]
    make_store(workdir / "empty.zarr", n=0)
    errs = errors_of(workdir, data='store = "empty.zarr"')
    assert errs == [f"[data] store: pair store {workdir / 'empty.zarr'} has 0 rows; at least 2 pairs are needed"]
    make_store(workdir / "wide.zarr", dim_x=7)
    errs = errors_of(workdir, data='store = "train.zarr"\neval_store = "wide.zarr"')
    assert errs == ["[data] eval_store has dims (x 7, y 5) but store has (x 6, y 5); the model cannot encode it"]


def test_groups_option(workdir):
    make_store(workdir / "grouped.zarr", groups=True)
    job = load_job(write_job(workdir, job_text(data='store = "grouped.zarr"')))
    assert job.data.use_groups and job.fit_kwargs() == {} and "many-to-many" in job.describe()
    job = load_job(write_job(workdir, job_text(data='store = "grouped.zarr"\ngroups = false')))
    assert not job.data.use_groups and job.fit_kwargs() == {"groups": False}
    errs = errors_of(workdir, data='store = "train.zarr"\ngroups = true')
    assert errs == [f"[data] groups = true but the store {workdir / 'train.zarr'} has no groups"]
    errs = errors_of(workdir, data='store = "train.zarr"\ngroups = "yes"')
    assert errs == ["[data] groups must be true or false, got 'yes' (string)"]


def test_rank_against_the_store(workdir):
    errs = errors_of(workdir, model="rank = 6")  # dim_y = 5
    assert errs == ["[model] rank = 6 exceeds the 5 features of view y: the store's dimension 5 (linear kernel)"]
    errs = errors_of(workdir, model='rank = 5\nkernel = "rbf"\nn_landmarks = 4')
    assert errs == ["[model] rank = 5 exceeds the 4 features of view x: n_landmarks 4"]
    errs = errors_of(workdir, model='rank = 4\nkernel = "rbf"\nn_landmarks = 41')
    assert errs == [f"[model] n_landmarks = 41 exceeds the 40 rows of the store {workdir / 'train.zarr'}"]
    errs = errors_of(workdir, model='rank = 4\nkernel_x = "rbf"\nlandmarks = "kmeans++"')
    assert len(errs) == 1 and errs[0].startswith("[model] landmarks = 'kmeans++' needs every row in memory")
    # Nyström on both views: up to the 40 rows (default landmarks min(n, 1000)), more than the dims
    load_job(write_job(workdir, job_text(model='rank = 30\nkernel = "laplacian"')))


def test_executor_table(workdir, monkeypatch):
    # the executor classes are looked up in job_spec when a job is checked or made
    monkeypatch.setattr(job_spec, "RayExecutor", None)
    errs = errors_of(workdir, executor='kind = "ray"')
    assert errs == ['[executor] kind = "ray" is not available yet in this unicon_dist (no ud.RayExecutor); '
                    'use kind = "local"']
    errs = errors_of(workdir, executor='kind = "slurm"')
    assert errs == ["[executor] kind must be one of 'local', 'ray', got 'slurm'"]
    errs = errors_of(workdir, executor='kind = "local"\nnum_workers = 2')
    assert errs == ['[executor] num_workers applies to kind = "ray" only']

    made = {}

    class FakeRay:
        def __init__(self, **kwargs):
            made.update(kwargs)

    monkeypatch.setattr(job_spec, "RayExecutor", FakeRay)
    job = load_job(write_job(workdir, job_text(
        executor='kind = "ray"\naddress = "ray://head:10001"\nnum_workers = 4\nnum_gpus_per_worker = 0.5')))
    assert isinstance(job.executor.make(), FakeRay)
    assert made == {"address": "ray://head:10001", "num_workers": 4, "num_gpus_per_worker": 0.5}
    errs = errors_of(workdir, executor='kind = "ray"\naddress = 1\nnum_workers = 0\nnum_gpus_per_worker = -1')
    assert [e.split(" must")[0] for e in errs] == [
        "[executor] address", "[executor] num_workers", "[executor] num_gpus_per_worker"]


def test_cuda_device_needs_a_gpu_for_the_local_executor(workdir, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    errs = errors_of(workdir, model='rank = 4\ndevice = "cuda:0"')
    assert errs == ["[model] device = 'cuda:0' but no CUDA device is visible to this process (the local "
                    'executor runs here); use device = "cpu"']
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert load_job(write_job(workdir, job_text(model='rank = 4\ndevice = "cuda:0"'))).make_model().device == "cuda:0"


def test_evaluate_table(workdir):
    job = load_job(write_job(workdir, job_text(evaluate="ks = [10, 1, 1]\nmax_rows = 500\nseed = 3\nblock_rows = 8")))
    assert job.evaluate == job_spec.EvaluateSpec(ks=(1, 10), max_rows=500, seed=3, block_rows=8)
    errs = errors_of(workdir, evaluate='ks = [0]\nmax_rows = 1\nseed = -1\nblock_rows = "8"')
    assert [e.split(" must")[0] for e in errs] == [
        "[evaluate] ks", "[evaluate] max_rows", "[evaluate] seed", "[evaluate] block_rows"]
    assert errors_of(workdir, evaluate="ks = []")[0].startswith("[evaluate] ks must be a non-empty array")


def test_outputs(workdir):
    out = workdir / "out"
    out.mkdir()
    (out / "model.npz").write_bytes(b"old")
    errs = errors_of(workdir)
    assert errs == [f"[output] model: {out / 'model.npz'} already exists; set overwrite = true to replace it"]
    job = load_job(write_job(workdir, job_text(output='model = "out/model.npz"\noverwrite = true')))
    assert job.output.overwrite and "replaces the existing file" in job.describe()
    errs = errors_of(workdir, output='model = "out/model.pkl"\nmetrics = "out/m.txt"\noverwrite = 1')
    assert errs == ["[output] overwrite must be true or false, got 1 (integer)",
                    f"[output] model must be a .npz file, got {out / 'model.pkl'}",
                    f"[output] metrics must be a .json file, got {out / 'm.txt'}"]
    errs = errors_of(workdir, output='model = "same.npz"\nmetrics = "same.npz"')
    assert "[output] model and metrics must be different files" in errs
    (workdir / "file").write_text("x")
    errs = errors_of(workdir, output='model = "file/sub/model.npz"')
    assert errs == [f"[output] model: cannot create folder {workdir / 'file' / 'sub'}: {workdir / 'file'} "
                    "is not a directory"]
    (out / "dir.npz").mkdir()
    assert errors_of(workdir, output='model = "out/dir.npz"') == [f"[output] model: {out / 'dir.npz'} is a directory"]
    errs = errors_of(workdir, output='model = "train.zarr/model.npz"')
    assert errs == [f"[output] model: {workdir / 'train.zarr' / 'model.npz'} lies inside the pair store "
                    f"{workdir / 'train.zarr'}"]


def test_output_folder_not_writable(workdir, monkeypatch):
    ro = workdir / "ro"
    ro.mkdir()
    # the check asks os.access (root passes a chmod 500 folder, so simulate the answer)
    monkeypatch.setattr(os, "access", lambda p, mode: os.path.abspath(p) != str(ro))
    errs = errors_of(workdir, output='model = "ro/sub/model.npz"')
    assert errs == [f"[output] model: cannot create {ro / 'sub' / 'model.npz'}: folder {ro} is not writable"]


def test_all_problems_reported_at_once(workdir):
    errs = errors_of(workdir, data='store = "missing.zarr"', model="rank = 4\ntemperature = -1",
                     output='model = "m.txt"')
    assert errs == ["[model] temperature must be a finite number > 0, got -1.0",
                    f"[output] model must be a .npz file, got {workdir / 'm.txt'}",
                    f"[data] store: no pair store at {workdir / 'missing.zarr'}"]


def test_no_rows_read_and_model_validated_before_the_store(workdir, monkeypatch):
    make_store(workdir / "labelled.zarr", labels=True, groups=True)
    calls = []

    def forbidden(*args, **kwargs):
        raise AssertionError("load_job read rows")

    for name in ("read", "_read", "iter_blocks", "read_labels", "get_array"):
        monkeypatch.setattr(PairStore, name, forbidden)
    real_open, real_validate = PairStore.open.__func__, ud.UniCon.validate_params

    def spy_open(cls, path, mode="r"):
        calls.append(("open", mode))
        return real_open(cls, path, mode)

    def spy_validate(self):
        calls.append(("validate",))
        return real_validate(self)

    monkeypatch.setattr(PairStore, "open", classmethod(spy_open))
    monkeypatch.setattr(ud.UniCon, "validate_params", spy_validate)
    job = load_job(write_job(workdir, job_text(data='store = "labelled.zarr"\neval_store = "train.zarr"')))
    assert job.data.store.has_labels and job.data.store.has_groups
    assert calls == [("validate",), ("open", "r"), ("open", "r")]


def test_checkpoint_output(workdir):
    job = load_job(write_job(workdir, job_text()))
    assert job.output.checkpoint is None and not job.resume and job.fit_kwargs() == {}
    # --resume defaults the checkpoint to <model stem>.ckpt.npz next to the model
    job = load_job(write_job(workdir, job_text()), resume=True)
    default = workdir / "out" / "model.ckpt.npz"
    assert job.output.checkpoint == default and job.resume
    assert job.fit_kwargs() == {"checkpoint": str(default), "resume": True}
    assert f"checkpoint    {default} (new file, written after every iteration; no checkpoint to resume from)" \
        in job.describe()
    assert job.to_dict()["output"]["checkpoint"] == str(default) and job.to_dict()["resume"] is True
    job = load_job(write_job(workdir, job_text(output='model = "out/model.npz"\ncheckpoint = "ck/fit.npz"')))
    assert job.output.checkpoint == workdir / "ck" / "fit.npz"
    assert job.fit_kwargs() == {"checkpoint": str(workdir / "ck" / "fit.npz"), "resume": False}
    assert not (workdir / "ck").exists()  # validation creates nothing

    errs = errors_of(workdir, output='model = "m.npz"\ncheckpoint = "c.txt"')
    assert errs == [f"[output] checkpoint must be a .npz file, got {workdir / 'c.txt'}"]
    errs = errors_of(workdir, output='model = "m.npz"\ncheckpoint = 3')
    assert errs == ["[output] checkpoint must be a path string, got 3 (integer)"]
    errs = errors_of(workdir, output='model = "m.npz"\ncheckpoint = "m.npz"')
    assert "[output] checkpoint must be a different file from model and metrics" in errs
    errs = errors_of(workdir, output='model = "m.npz"\ncheckpoint = "train.zarr/c.npz"')
    assert errs == [f"[output] checkpoint: {workdir / 'train.zarr' / 'c.npz'} lies inside the pair store "
                    f"{workdir / 'train.zarr'}"]


def test_existing_checkpoint(workdir):
    ckpt = workdir / "out" / "model.ckpt.npz"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"someone's data")
    for resume in (False, True):  # a file that is not a checkpoint is never replaced
        with pytest.raises(JobError) as info:
            load_job(write_job(workdir, job_text(output='model = "out/model.npz"\ncheckpoint = "out/model.ckpt.npz"')),
                     resume=resume)
        assert info.value.errors[0].startswith(f"[output] checkpoint: cannot read checkpoint {ckpt}")
        assert info.value.errors[0].endswith("refusing to replace or resume it")

    ckpt.unlink()
    ud.UniCon(rank=4, temperature=0.5, max_iter=2).fit(workdir / "train.zarr", checkpoint=ckpt)
    text = job_text(model="rank = 4\ntemperature = 0.5\nmax_iter = 2")
    # no overwrite needed for the checkpoint, resumed or replaced
    job = load_job(write_job(workdir, text), resume=True)
    assert "resumes a finished fit (2 iterations): restored, nothing refitted" in job.describe()
    job = load_job(write_job(workdir, text.replace('"out/model.npz"', '"out/model.npz"\ncheckpoint = '
                                                   '"out/model.ckpt.npz"')))
    assert "exists and will be replaced after the first iteration; pass --resume" in job.describe()
    # resuming a checkpoint of another fit is refused during validation, naming the field
    other = job_text(model="rank = 4\ntemperature = 0.5\nmax_iter = 3")
    with pytest.raises(JobError) as info:
        load_job(write_job(workdir, other), resume=True)
    assert info.value.errors == [f"[output] checkpoint: checkpoint {ckpt} was written by a different fit: max_iter "
                                 "is 2 in the checkpoint but 3 now; resume with the same data and settings, or "
                                 "delete the checkpoint to start over"]
    load_job(write_job(workdir, other))  # without --resume no checkpoint is used
