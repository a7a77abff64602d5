"""Damaged or foreign model and checkpoint files, file modes of atomic writes, and inputs that require grad."""

import os
import textwrap

import numpy as np
import pytest
import torch

import unicon_dist as ud
from unicon_dist.io.checkpoints import load_checkpoint, write_checkpoint
from unicon_dist.apps.cli import main
from unicon_dist.apps.jobs import atomic_write_text
from unicon_dist.io.artifacts import ArtifactError, atomic_save_npz, atomic_write, load_npz
from unicon_dist.data.store import PairStore

OPTIONS = dict(rank=2, temperature=0.5, max_iter=3)
START_OVER = "delete it to start the fit over without it"


def make_data(n=100, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 5))
    Y = X @ rng.normal(size=(5, 4)) + 0.3 * rng.normal(size=(n, 4))
    return X, Y


@pytest.fixture(scope="module")
def data():
    return make_data()


@pytest.fixture(scope="module")
def model(data):
    return ud.UniCon(**OPTIONS).fit(*data)


@pytest.fixture
def model_bytes(tmp_path, model):
    return model.save(tmp_path / "good.npz").read_bytes()


@pytest.fixture
def umask():
    """Set the process umask for one test; the previous one is restored."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def with_nan(path, loader, writer, name="F1"):
    """Rewrite ``path`` through the package's writer with one NaN in array ``name``."""
    header, arrays = loader(path)
    arrays[name] = arrays[name].copy()
    arrays[name].flat[0] = np.nan
    writer(path, header, arrays)


# ------------------------------------------------------------------------------ model files
DAMAGE = {
    "truncated": (lambda b: b[: len(b) // 2], "it is damaged: a truncated or corrupted .npz archive (BadZipFile"),
    "zero-filled": (lambda b: bytes(len(b)), "it is damaged: the file is zero-filled"),
    "empty": (lambda b: b"", "it is damaged: the file is empty (0 bytes)"),
    "text": (lambda b: b"rank = 3\n", "it is not a unicon_dist model: not an .npz archive (it starts with b'rank = 3"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_or_foreign_model_file(tmp_path, model_bytes, damage):
    make, problem = DAMAGE[damage]
    path = tmp_path / "m.npz"
    path.write_bytes(make(model_bytes))
    with pytest.raises(ArtifactError) as info:
        ud.UniCon.load(path)
    assert str(info.value).startswith(f"cannot read model {path}: {problem}")
    assert info.value.path == str(path) and info.value.kind == "model"
    assert isinstance(info.value, ValueError)


def test_folder_is_not_a_model(tmp_path):
    with pytest.raises(ArtifactError, match=r"cannot read model .*: it is a directory, not a file$"):
        ud.UniCon.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such model file: .*none.npz"):
        ud.UniCon.load(tmp_path / "none.npz")


def test_npz_without_header_is_not_a_model(tmp_path):
    path = tmp_path / "plain.npz"
    np.savez(path, F1=np.ones((2, 5)), F2=np.ones((2, 4)))
    with pytest.raises(ArtifactError, match=r"cannot read model .*plain\.npz: it is not a unicon_dist model: an "
                                            r"\.npz archive without the unicon_dist header \(it holds 'F1', 'F2'\)"):
        ud.UniCon.load(path)


def test_checkpoint_is_not_a_model(tmp_path, data):
    path = tmp_path / "fit.ckpt.npz"
    ud.UniCon(**OPTIONS).fit(*data, checkpoint=path)
    with pytest.raises(ArtifactError) as info:
        ud.UniCon.load(path)
    assert str(info.value) == (f"cannot read model {path}: it is not a unicon_dist model: its header names the format "
                               "'unicon_dist.checkpoint/1' (it is a unicon_dist checkpoint), expected "
                               "'unicon_dist.model/1'")
    assert not info.value.damaged


@pytest.mark.parametrize("name", ["F1", "landmarks_x"])
def test_model_holding_nan_is_refused(tmp_path, data, name):
    path = ud.UniCon(**OPTIONS, kernel="rbf", n_landmarks=20).fit(*data).save(tmp_path / "m.npz")
    with_nan(path, load_npz, atomic_save_npz, name)
    with pytest.raises(ArtifactError, match=rf"cannot read model .*m\.npz: it is damaged: array '{name}' of shape "
                                            r"\(\d+, \d+\) holds NaN or Inf in 1 of its \d+ entries"):
        ud.UniCon.load(path)


def test_malformed_model_header(tmp_path, model):
    path = model.save(tmp_path / "m.npz")
    header, arrays = load_npz(path)
    atomic_save_npz(path, {k: v for k, v in header.items() if k != "n_iter"}, arrays)
    with pytest.raises(ArtifactError, match=r"cannot read model .*m\.npz: it is damaged: its header has no 'n_iter'"):
        ud.UniCon.load(path)
    atomic_save_npz(path, {**header, "n_iter": None}, arrays)
    with pytest.raises(ArtifactError, match=r"m\.npz: it is damaged: its header and arrays do not describe a model "
                                            r"\(TypeError: int\(\) argument"):
        ud.UniCon.load(path)
    atomic_save_npz(path, header, {k: v for k, v in arrays.items() if k != "F2"})
    with pytest.raises(ArtifactError, match=r"m\.npz: it is damaged: it has no array 'F2'"):
        ud.UniCon.load(path)


# ------------------------------------------------------------------------------ checkpoints
def damage_checkpoint(path, damage):
    if damage == "nan":
        with_nan(path, load_checkpoint, write_checkpoint)
        return "it is damaged: array 'F1' of shape (2, 5) holds NaN or Inf in 1 of its 10 entries"
    make, problem = DAMAGE[damage]
    path.write_bytes(make(path.read_bytes()))
    return problem


@pytest.mark.parametrize("damage", ["truncated", "zero-filled", "empty", "nan"])
def test_damaged_checkpoint_on_resume_says_how_to_start_over(tmp_path, data, damage):
    path = tmp_path / "fit.ckpt.npz"
    ud.UniCon(**OPTIONS).fit(*data, checkpoint=path)
    problem = damage_checkpoint(path, damage)
    before = path.read_bytes()
    with pytest.raises(ArtifactError) as info:
        ud.UniCon(**OPTIONS).fit(*data, checkpoint=path, resume=True)
    message = str(info.value)
    assert message.startswith(f"cannot read checkpoint {path}: {problem}") and message.endswith(f"; {START_OVER}")
    assert info.value.kind == "checkpoint" and path.read_bytes() == before
    # the hint holds: a fit without resume will not replace the file, a fit after deleting it starts over
    if damage != "nan":
        with pytest.raises(ValueError, match="refusing to replace it with a checkpoint"):
            ud.UniCon(**OPTIONS).fit(*data, checkpoint=path)
    path.unlink()
    resumed = ud.UniCon(**OPTIONS).fit(*data, checkpoint=path, resume=True)
    np.testing.assert_array_equal(resumed.F1_, ud.UniCon(**OPTIONS).fit(*data).F1_)


def test_foreign_checkpoint_file_gets_no_delete_hint(tmp_path, data, model):
    for path in (model.save(tmp_path / "m.npz"), tmp_path / "notes.txt"):
        if path.suffix == ".txt":
            path.write_text("my notes\n")
        with pytest.raises(ArtifactError, match="is not a unicon_dist checkpoint") as info:
            ud.UniCon(**OPTIONS).fit(*data, checkpoint=path, resume=True)
        assert "delete" not in str(info.value)


# ------------------------------------------------------------------------------ CLI
def solve_job(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(60, 5)).astype(np.float32)
    y = (x @ rng.normal(size=(5, 4)) + rng.normal(size=(60, 4))).astype(np.float32)
    PairStore.create(tmp_path / "train.zarr", 5, 4).append(x, y)
    job = tmp_path / "job.toml"
    job.write_text(textwrap.dedent("""\
        [data]
        store = "train.zarr"

        [model]
        rank = 2
        temperature = 0.5
        max_iter = 2

        [output]
        model = "runs/model.npz"
        checkpoint = "runs/model.ckpt.npz"
        overwrite = true
        """))
    return job, tmp_path / "runs" / "model.ckpt.npz"


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("unicon-dist: error: ")
    return err.removeprefix("unicon-dist: error: ").rstrip("\n")


def test_cli_damaged_model_is_a_one_line_error(tmp_path, capsys, model_bytes):
    PairStore.create(tmp_path / "s.zarr", 5, 4).append(*make_data(20))
    path = tmp_path / "m.npz"
    path.write_bytes(model_bytes[: len(model_bytes) // 2])
    assert main(["evaluate", str(path), str(tmp_path / "s.zarr")]) == 2
    assert one_line_error(capsys).startswith(f"cannot read model {path}: it is damaged: a truncated")


@pytest.mark.parametrize("damage", ["truncated", "nan"])
def test_cli_resume_from_damaged_checkpoint_is_a_one_line_error(tmp_path, capsys, damage):
    job, ckpt = solve_job(tmp_path)
    assert main(["solve", str(job), "--quiet"]) == 0
    capsys.readouterr()
    problem = damage_checkpoint(ckpt, damage)
    assert main(["solve", str(job), "--resume", "--quiet"]) == 2
    err = one_line_error(capsys)
    # a truncated file is caught when the job is checked, a NaN only when the fit reads the arrays
    prefix = f"{job}: [output] checkpoint: " if damage == "truncated" else ""
    assert err.startswith(f"{prefix}cannot read checkpoint {ckpt}: {problem}") and START_OVER in err


# ------------------------------------------------------------------------------ atomic writes
WRITERS = {
    "model": lambda path, model, data: model.save(path),
    "checkpoint": lambda path, model, data: ud.UniCon(**OPTIONS).fit(*data, checkpoint=path),
    "text": lambda path, model, data: atomic_write_text(path, "{}\n"),
}


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_umask_mode(tmp_path, umask, model, data, writer, mask, mode):
    umask(mask)
    path = tmp_path / "out" / "file"
    WRITERS[writer](path, model, data)
    assert oct(path.stat().st_mode & 0o777) == oct(mode)
    assert [p.name for p in path.parent.iterdir()] == ["file"]


def test_study_table_gets_the_umask_mode(tmp_path, umask):
    from unicon_dist.apps.study import write_table

    umask(0o022)
    write_table([{"id": "a", "status": "ok", "error": None, "loss": 1.5}], tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.parquet"]
    assert {oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == {oct(0o644)}


@pytest.mark.parametrize("mode", ["wb", "w"])
def test_failed_atomic_write_keeps_the_previous_file(tmp_path, mode):
    path = tmp_path / "f"
    path.write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(path, mode) as fh:
            fh.write(b"half" if mode == "wb" else "half")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]
    with pytest.raises(RuntimeError):
        with atomic_write(tmp_path / "new", mode):
            raise RuntimeError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_atomic_write_replaces_on_success(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    with atomic_write(path, "w") as fh:
        fh.write("één\n")
    assert path.read_text(encoding="utf-8") == "één\n"
    with pytest.raises(ValueError, match="mode must be 'wb' or 'w'"):
        with atomic_write(path, "a"):
            pass


# ------------------------------------------------------------------------------ requires_grad inputs
def test_inputs_that_require_grad_fit_and_encode_as_detached(data, model):
    X, Y = (torch.tensor(a, requires_grad=True) for a in data)
    fitted = ud.UniCon(**OPTIONS).fit(X, Y)
    np.testing.assert_array_equal(fitted.F1_, model.F1_)
    np.testing.assert_array_equal(fitted.F2_, model.F2_)
    for encode, A in ((model.encode_x, X), (model.encode_y, Y)):
        z = encode(A)
        assert not z.requires_grad
        torch.testing.assert_close(z, encode(A.detach()), rtol=0, atol=0)
    assert X.requires_grad and Y.requires_grad  # the caller's tensors are untouched


def test_contrastive_loss_stays_differentiable():
    s = torch.randn(6, 6, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(ud.contrastive_loss(s, temperature=0.5), s)
    assert grad.shape == (6, 6) and bool(grad.abs().sum() > 0)
