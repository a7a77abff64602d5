"""Bad inputs raise ValueError / TypeError with a message naming the problem."""

import numpy as np
import pytest
import torch

import unicon_dist as ud

N = 12


def _data(n=N, m_x=5, m_y=4, r=3, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, m_x)), rng.standard_normal((n, m_y)),
            rng.standard_normal((n, r)), rng.standard_normal((n, r)))


def _s(n=N):
    return 0.1 * np.random.default_rng(1).standard_normal((n, n))


def _wcp(**kw):
    phi_x, phi_y, z_x, z_y = _data()
    args = dict(phi_x=phi_x, phi_y=phi_y, z_x=z_x, z_y=z_y)
    args.update({k: v for k, v in kw.items() if k in args})
    opts = {k: v for k, v in kw.items() if k not in args}
    return ud.weighted_cross_product(args["phi_x"], args["phi_y"], args["z_x"], args["z_y"], **opts)


def _op(**kw):
    phi_x, phi_y, z_x, z_y = _data()
    return ud.CrossProductOperator(phi_x, phi_y, z_x, z_y, **kw)


def _fit(X=None, Y=None, groups=None, **params):
    X0, Y0, _, _ = _data(n=30, m_x=6, m_y=5)
    X = X0 if X is None else X
    Y = Y0 if Y is None else Y
    return ud.UniCon(**{"rank": 2, "max_iter": 1, **params}).fit(X, Y, groups=groups)


def _with_bad(a, row, value):
    a = np.array(a, dtype=np.float64, copy=True)
    a[row, 1] = value
    return a


# --------------------------------------------------------------------------------------
# NaN / Inf: the message says NaN/Inf and names the row
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("which", ["phi_x", "phi_y", "z_x", "z_y"])
def test_nonfinite_cross_product_inputs(which, value):
    arrays = dict(zip(["phi_x", "phi_y", "z_x", "z_y"], _data()))
    bad = {which: _with_bad(arrays[which], 7, value)}
    with pytest.raises(ValueError, match=r"(?i)nan|inf") as info:
        _wcp(**bad)
    msg = str(info.value)
    assert "row" in msg.lower() and "7" in msg and which in msg


@pytest.mark.parametrize("which", ["X", "Y"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nonfinite_fit_inputs(which, value):
    X, Y, _, _ = _data(n=30, m_x=6, m_y=5)
    if which == "X":
        X = _with_bad(X, 23, value)
    else:
        Y = _with_bad(Y, 23, value)
    with pytest.raises(ValueError, match=r"(?i)nan|inf") as info:
        _fit(X, Y)
    msg = str(info.value)
    assert "row" in msg.lower() and "23" in msg


def test_nonfinite_torch_input():
    phi_x, phi_y, z_x, z_y = (torch.from_numpy(a) for a in _data())
    z_x = z_x.clone()
    z_x[4, 0] = float("nan")
    with pytest.raises(ValueError, match=r"(?i)(nan|inf).*row|row.*(nan|inf)"):
        ud.weighted_cross_product(phi_x, phi_y, z_x, z_y)


@pytest.mark.parametrize("fn", [ud.contrastive_loss, ud.similarity_weights])
def test_nonfinite_similarities(fn):
    s = _s()
    s[3, 5] = np.nan
    with pytest.raises(ValueError, match=r"(?i)nan|inf"):
        fn(s)


def test_nonfinite_metrics_inputs():
    _, _, z_x, z_y = _data()
    with pytest.raises(ValueError, match=r"(?i)nan|inf"):
        ud.retrieval_metrics(_with_bad(z_x, 2, np.nan), z_y)


# --------------------------------------------------------------------------------------
# shapes
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["phi_x", "phi_y", "z_x", "z_y"])
def test_mismatched_rows_cross_product(which):
    arrays = dict(zip(["phi_x", "phi_y", "z_x", "z_y"], _data()))
    with pytest.raises(ValueError, match=r"(?i)row|length|mismatch"):
        _wcp(**{which: arrays[which][:-1]})


def test_mismatched_rows_fit():
    X, Y, _, _ = _data(n=30, m_x=6, m_y=5)
    with pytest.raises(ValueError, match=r"(?i)row|length|mismatch"):
        _fit(X, Y[:-3])


def test_mismatched_rows_metrics():
    _, _, z_x, z_y = _data()
    with pytest.raises(ValueError, match=r"(?i)row|length|mismatch"):
        ud.retrieval_metrics(z_x, z_y[:-1])


def test_mismatched_embedding_width():
    phi_x, phi_y, z_x, z_y = _data()
    with pytest.raises(ValueError, match=r"(?i)width|dim|column|shape"):
        ud.weighted_cross_product(phi_x, phi_y, z_x, z_y[:, :2])


def test_non_square_similarity():
    with pytest.raises(ValueError, match=r"(?i)square|shape"):
        ud.contrastive_loss(np.zeros((4, 5)))


@pytest.mark.parametrize("rank", [6, 50])
def test_rank_too_large_in_fit(rank):
    with pytest.raises(ValueError, match=r"(?i)rank"):
        _fit(rank=rank)  # m_x = 6, m_y = 5


@pytest.mark.parametrize("rank", [0, -1])
def test_rank_not_positive(rank):
    with pytest.raises(ValueError, match=r"(?i)rank"):
        _fit(rank=rank)


def test_fit_with_wrong_feature_count_at_encode():
    model = _fit()
    X, Y, _, _ = _data(n=5, m_x=7, m_y=5)
    with pytest.raises(ValueError, match=r"(?i)feature|column|dim|shape"):
        model.encode_x(X)


# --------------------------------------------------------------------------------------
# temperature, loss, kernel, negatives, groups
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [0.0, -0.5, float("nan")])
@pytest.mark.parametrize("loss", ["clip", "sigmoid"])
def test_bad_temperature(loss, tau):
    for call in (
        lambda: ud.contrastive_loss(_s(), loss=loss, temperature=tau),
        lambda: ud.similarity_weights(_s(), loss=loss, temperature=tau),
        lambda: _wcp(loss=loss, temperature=tau),
        lambda: _op(loss=loss, temperature=tau),
        lambda: _fit(loss=loss, temperature=tau),
    ):
        with pytest.raises(ValueError, match=r"(?i)temperature"):
            call()


@pytest.mark.parametrize("tau", [0.0, -1.0])
def test_bad_triplet_smoothing(tau):
    # for "triplet" the temperature argument is the hinge smoothing width
    with pytest.raises(ValueError, match=r"(?i)temperature|smoothing"):
        ud.contrastive_loss(_s(), loss="triplet", temperature=tau)
    with pytest.raises(ValueError, match=r"(?i)temperature|smoothing"):
        _fit(loss="triplet", temperature=tau)


def test_bad_loss_object_parameters():
    with pytest.raises(ValueError, match=r"(?i)temperature"):
        ud.losses.InfoNCE(temperature=-0.1)
    with pytest.raises(ValueError, match=r"(?i)temperature"):
        ud.losses.PairwiseSigmoid(temperature=0.0)


@pytest.mark.parametrize("name", ["bogus", "CLIPPY", ""])
def test_unknown_loss(name):
    for call in (
        lambda: ud.contrastive_loss(_s(), loss=name),
        lambda: ud.similarity_weights(_s(), loss=name),
        lambda: _wcp(loss=name),
        lambda: _op(loss=name),
        lambda: _fit(loss=name),
    ):
        with pytest.raises(ValueError, match=r"(?i)unknown loss"):
            call()


@pytest.mark.parametrize("kernel", ["bogus", "rbff", ""])
def test_unknown_kernel(kernel):
    with pytest.raises(ValueError, match=r"(?i)kernel"):
        _fit(kernel=kernel)


@pytest.mark.parametrize("negatives", [0, -4, "half", "", 2.5])
def test_bad_negatives(negatives):
    with pytest.raises(ValueError, match=r"(?i)negatives"):
        _wcp(negatives=negatives)
    with pytest.raises(ValueError, match=r"(?i)negatives"):
        _op(negatives=negatives)
    with pytest.raises(ValueError, match=r"(?i)negatives"):
        _fit(negatives=negatives)


@pytest.mark.parametrize("length", [N - 1, N + 2, 0])
def test_groups_wrong_length(length):
    groups = np.arange(length) % 3
    with pytest.raises(ValueError, match=r"(?i)groups"):
        ud.contrastive_loss(_s(), groups=groups)
    with pytest.raises(ValueError, match=r"(?i)groups"):
        ud.similarity_weights(_s(), groups=groups)
    with pytest.raises(ValueError, match=r"(?i)groups"):
        _wcp(groups=groups)
    _, _, z_x, z_y = _data()
    with pytest.raises(ValueError, match=r"(?i)groups"):
        ud.retrieval_metrics(z_x, z_y, groups=groups)
    with pytest.raises(ValueError, match=r"(?i)groups"):
        _fit(groups=np.arange(length + 18) % 3)  # fit uses n = 30


def test_groups_two_dimensional():
    with pytest.raises(ValueError, match=r"(?i)groups"):
        ud.contrastive_loss(_s(), groups=np.zeros((N, 2), dtype=int))


# --------------------------------------------------------------------------------------
# non-numeric input: TypeError (or a ValueError that says so)
# --------------------------------------------------------------------------------------
def test_non_numeric_inputs():
    phi_x, phi_y, z_x, z_y = _data()
    words = np.array([["a"] * phi_x.shape[1]] * phi_x.shape[0])
    with pytest.raises((TypeError, ValueError), match=r"(?i)numeric|dtype|type|float"):
        ud.weighted_cross_product(words, phi_y, z_x, z_y)
    with pytest.raises((TypeError, ValueError), match=r"(?i)numeric|dtype|type|float"):
        ud.contrastive_loss(np.array([["x", "y"], ["z", "w"]]))
    X, Y, _, _ = _data(n=30, m_x=6, m_y=5)
    with pytest.raises((TypeError, ValueError), match=r"(?i)numeric|dtype|type|float"):
        ud.UniCon(rank=2, max_iter=1).fit(X.astype(object).astype(str), Y)
    with pytest.raises(TypeError):
        ud.weighted_cross_product(phi_x.astype(object), phi_y, z_x, z_y)


def test_model_not_fitted():
    X, _, _, _ = _data()
    with pytest.raises((RuntimeError, ValueError), match=r"(?i)fit"):
        ud.UniCon(rank=2).encode_x(X)
