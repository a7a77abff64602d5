"""Linear projection heads trained by minibatch SGD on the symmetric InfoNCE (CLIP) loss.

The iterative baseline UniCon replaces: two bias-free linear heads f(x) = A x, g(y) = B y
(on frozen input features) trained with AdamW on ½[CE(s/τ, diag) + CE(sᵀ/τ, diag)] over
minibatches, s the cosine similarities of the batch, with early stopping on validation
retrieval.  :func:`sgd_clip_sweep` tunes the learning rate and temperature on one split.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F

from ..math.validation import resolve_device, resolve_dtype
from ._common import (
    BaselineEstimator,
    cap_validation,
    check_bool,
    check_int,
    check_nonnegative,
    check_positive,
    check_rank,
    check_views,
    normalize_rows,
    retrieval_score,
    split_validation,
)

__all__ = ["SGDCLIP", "sgd_clip_sweep", "clip_loss"]

logger = logging.getLogger(__name__)

# CLIP clips its learnt logit scale 1/τ at 100 (Radford et al., 2021)
_MAX_LOGIT_SCALE = 100.0


def clip_loss(z_x, z_y, temperature):
    """Symmetric InfoNCE (CLIP) loss of one batch of paired embeddings.

    ½ [CE(S/τ, diag) + CE(Sᵀ/τ, diag)], S = z_x z_yᵀ, each cross-entropy averaged
    over the rows of the batch, the partner of row i being column i.

    Parameters
    ----------
    z_x, z_y : torch.Tensor, shape (b, r)
        Embeddings of the paired rows (unit-norm rows for the cosine CLIP loss; they
        are not normalised here).
    temperature : float or 0-d torch.Tensor
        τ > 0.

    Returns
    -------
    torch.Tensor
        0-d, differentiable.

    Notes
    -----
    For one-to-one pairs this equals ``unicon_dist.contrastive_loss(S, loss="clip",
    temperature=τ, nu=1) / τ``: the family of DESIGN §2 uses the outer function
    φ(a) = τ log a, which multiplies the usual cross-entropy by τ.  Gradients (and so
    the SGD path at a given learning rate) follow this unscaled form, the one CLIP is
    trained with.
    """
    logits = (z_x @ z_y.T) / temperature
    return _symmetric_cross_entropy(logits)


def _symmetric_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


class SGDCLIP(BaselineEstimator):
    """Linear CLIP heads trained with AdamW and early stopping on validation R@1.

    Parameters
    ----------
    rank : int
        Output dimension r of both heads (≤ min(d_x, d_y)).
    temperature : float
        τ > 0 of the loss (the initial τ when ``learn_temperature``).
    learn_temperature : bool
        Learn log(1/τ) jointly with the heads, as CLIP does, with 1/τ capped at
        max(100, 1/τ_init); no weight decay on it.
    lr : float
        AdamW learning rate.
    weight_decay : float
        AdamW (decoupled) weight decay of the head weights.
    batch_size : int
        Pairs per minibatch (the negatives of each pair are the rest of its batch).
        Rows are reshuffled every epoch; a final batch of a single row is skipped.
    max_epochs : int
        Upper bound on the number of passes over the training rows.
    patience : int or None
        Stop after this many epochs without a higher validation mean R@1; None trains
        all ``max_epochs``.  Either way the weights of the best epoch are kept.
    validation : float, (X_val, Y_val) or None
        A fraction of the training rows held out (drawn with ``seed``), separate
        validation pairs, or None (no validation: the last epoch is kept).  Retrieval and
        the validation loss use at most 5,000 validation pairs (a seeded subset).
    center : bool
        Subtract the training means (of the rows trained on) before the heads.
    seed : int
        Seeds the validation split, the head initialisation and the shuffling.
    device : str
        Torch device of the training ("cpu", "cuda", ...).  The training rows are moved
        there once.
    dtype : {"float32", "float64"}
        Precision of the heads and of the arithmetic.
    verbose : bool
        Log one line per epoch at INFO level (logger ``unicon_dist.baselines.sgd_clip``).

    Attributes
    ----------
    Wx_ : ndarray of shape (d_x, rank)
        Transposed weight of the x head at the best epoch (f(x) = (x − mean_x_) Wx_).
    Wy_ : ndarray of shape (d_y, rank)
    mean_x_ : ndarray of shape (d_x,)
    mean_y_ : ndarray of shape (d_y,)
        Training means (zeros when ``center=False``).
    temperature_ : float
        τ at the best epoch (``temperature`` unless learnt).
    history_ : list of dict
        Per epoch: "epoch", "train_loss" (mean over the epoch's minibatches, weighted by
        their sizes, each evaluated before its update), "val_loss" (the same loss over
        consecutive validation batches of ``batch_size``), "val_R@1" (mean of x→y and y→x
        R@1 on the validation pairs), "seconds".  The validation entries are None
        without validation.
    best_epoch_ : int
        The epoch whose weights were kept (1-based).
    best_score_ : float or None
        Its validation mean R@1.
    n_epochs_ : int
        Epochs run.
    stopped_early_ : bool
    n_train_, n_val_ : int
        Pairs trained on and validation pairs scored.
    train_rows_, validation_rows_ : ndarray or None
        Rows of X trained on and held out (sorted), when ``validation`` is a fraction.
    n_inputs_x_, n_inputs_y_ : int
    fit_seconds_ : float

    Notes
    -----
    The minibatch loss is :func:`clip_loss`, i.e. ``unicon_dist.contrastive_loss(s,
    "clip", τ) / τ`` on each batch's cosine similarities.

    References
    ----------
    A. Radford et al., "Learning transferable visual models from natural language
    supervision" (CLIP), ICML 2021.
    A. van den Oord, Y. Li & O. Vinyals, "Representation learning with contrastive
    predictive coding" (InfoNCE), arXiv:1807.03748, 2018.
    I. Loshchilov & F. Hutter, "Decoupled weight decay regularization" (AdamW), ICLR 2019.
    """

    _fitted_attr = "Wx_"

    def __init__(
        self,
        rank: int = 128,
        *,
        temperature: float = 0.07,
        learn_temperature: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        batch_size: int = 1024,
        max_epochs: int = 50,
        patience: int | None = 5,
        validation=0.1,
        center: bool = True,
        seed: int = 0,
        device: str = "cpu",
        dtype: str = "float32",
        verbose: bool = False,
    ):
        self.rank = rank
        self.temperature = temperature
        self.learn_temperature = learn_temperature
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.validation = validation
        self.center = center
        self.seed = seed
        self.device = device
        self.dtype = dtype
        self.verbose = verbose

    def _validate_params(self) -> dict:
        p = {
            "temperature": check_positive("temperature", self.temperature),
            "learn_temperature": check_bool("learn_temperature", self.learn_temperature),
            "lr": check_positive("lr", self.lr),
            "weight_decay": check_nonnegative("weight_decay", self.weight_decay),
            "batch_size": check_int("batch_size", self.batch_size, 2),
            "max_epochs": check_int("max_epochs", self.max_epochs, 1),
            "patience": None if self.patience is None else check_int("patience", self.patience, 1),
            "center": check_bool("center", self.center),
            "seed": check_int("seed", self.seed, 0),
            "device": resolve_device(self.device),
            "dtype": resolve_dtype(self.dtype),
            "verbose": check_bool("verbose", self.verbose),
        }
        if p["dtype"] not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        return p

    def fit(self, X, Y):
        """Train the heads on paired views.

        Parameters
        ----------
        X : array_like or torch.Tensor, shape (n, d_x)
        Y : array_like or torch.Tensor, shape (n, d_y)
            Row i of X and row i of Y are a pair.

        Returns
        -------
        self
        """
        t_start = time.perf_counter()
        p = self._validate_params()
        device, dtype, seed = p["device"], p["dtype"], p["seed"]
        X, Y = check_views(X, Y)
        dx, dy = X.shape[1], Y.shape[1]
        rank = check_rank(self.rank, dx, dy)
        Xtr, Ytr, Xv, Yv, self.train_rows_, self.validation_rows_ = split_validation(self.validation, X, Y, seed)
        Xv, Yv = cap_validation(Xv, Yv, seed)
        Xtr, Ytr = Xtr.to(device=device, dtype=dtype), Ytr.to(device=device, dtype=dtype)
        if p["center"]:
            mx, my = Xtr.mean(0), Ytr.mean(0)
        else:
            mx = torch.zeros(dx, dtype=dtype, device=device)
            my = torch.zeros(dy, dtype=dtype, device=device)
        Xtr, Ytr = Xtr - mx, Ytr - my
        if Xv is not None:
            Xv = Xv.to(device=device, dtype=dtype) - mx
            Yv = Yv.to(device=device, dtype=dtype) - my
        n_train = Xtr.shape[0]

        # seeded initialisation on the CPU (the same weights on every device), then the
        # usual nn.Linear bound U(−1/√fan_in, 1/√fan_in)
        gen = torch.Generator().manual_seed(seed)
        head_x = torch.nn.Linear(dx, rank, bias=False, device=device, dtype=dtype)
        head_y = torch.nn.Linear(dy, rank, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            for head, d in ((head_x, dx), (head_y, dy)):
                bound = 1.0 / math.sqrt(d)
                w = torch.empty((rank, d), dtype=torch.float64).uniform_(-bound, bound, generator=gen)
                head.weight.copy_(w.to(dtype))
        log_scale = torch.nn.Parameter(
            torch.tensor(math.log(1.0 / p["temperature"]), dtype=dtype, device=device),
            requires_grad=p["learn_temperature"],
        )
        max_log_scale = math.log(max(_MAX_LOGIT_SCALE, 1.0 / p["temperature"]))
        groups = [{"params": [head_x.weight, head_y.weight], "weight_decay": p["weight_decay"]}]
        if p["learn_temperature"]:
            groups.append({"params": [log_scale], "weight_decay": 0.0})
        opt = torch.optim.AdamW(groups, lr=p["lr"])

        def scale():
            return log_scale.clamp(max=max_log_scale).exp()

        def embed(A, head):
            return normalize_rows(head(A))

        batch = p["batch_size"]
        self.history_ = []
        best = None  # (score, epoch, state)
        wait = 0
        self.stopped_early_ = False
        for epoch in range(1, p["max_epochs"] + 1):
            t0 = time.perf_counter()
            order = torch.randperm(n_train, generator=gen).to(device)
            total = torch.zeros((), dtype=torch.float64, device=device)
            count = 0
            for start in range(0, n_train, batch):
                idx = order[start:start + batch]
                if idx.numel() < 2:
                    continue
                logits = (embed(Xtr[idx], head_x) @ embed(Ytr[idx], head_y).T) * scale()
                loss = _symmetric_cross_entropy(logits)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach().to(torch.float64) * idx.numel()
                count += idx.numel()
            with torch.no_grad():
                train_loss = float(total) / count
                val_loss = score = None
                if Xv is not None:
                    zx, zy = embed(Xv, head_x), embed(Yv, head_y)
                    val_loss = _batched_loss(zx, zy, scale(), batch)
                    score = retrieval_score(zx, zy)
            self.history_.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_R@1": score,
                                  "seconds": time.perf_counter() - t0})
            if p["verbose"]:
                logger.info("epoch %d: train loss %.5g, val loss %s, val R@1 %s, %.2fs", epoch, train_loss,
                            "-" if val_loss is None else f"{val_loss:.5g}", "-" if score is None else f"{score:.4f}",
                            self.history_[-1]["seconds"])
            # without validation every epoch counts as the best so far: the last is kept
            if best is None or score is None or score > best[0]:
                state = [t.detach().clone() for t in (head_x.weight, head_y.weight, log_scale)]
                best = (score, epoch, state)
                wait = 0
            else:
                wait += 1
                if p["patience"] is not None and wait >= p["patience"]:
                    self.stopped_early_ = epoch < p["max_epochs"]
                    break
        score, self.best_epoch_, (wx, wy, ls) = best
        self.best_score_ = score
        self.n_epochs_ = len(self.history_)
        self.Wx_ = wx.T.contiguous().cpu().numpy()
        self.Wy_ = wy.T.contiguous().cpu().numpy()
        self.temperature_ = float(1.0 / ls.clamp(max=max_log_scale).exp())
        self.mean_x_ = mx.cpu().numpy()
        self.mean_y_ = my.cpu().numpy()
        self.n_train_ = int(n_train)
        self.n_val_ = 0 if Xv is None else int(Xv.shape[0])
        self.n_inputs_x_, self.n_inputs_y_ = int(dx), int(dy)
        self.fit_seconds_ = time.perf_counter() - t_start
        return self

    def _projection(self, which: str):
        return (self.Wx_, self.mean_x_) if which == "x" else (self.Wy_, self.mean_y_)


def _batched_loss(zx: torch.Tensor, zy: torch.Tensor, scale, batch: int) -> float:
    """Mean CLIP loss over consecutive batches of ``batch`` pairs (size-weighted; 1-row batches skipped)."""
    total, count = 0.0, 0
    for start in range(0, zx.shape[0], batch):
        a, b = zx[start:start + batch], zy[start:start + batch]
        if a.shape[0] < 2:
            continue
        total += float(_symmetric_cross_entropy((a @ b.T) * scale)) * a.shape[0]
        count += a.shape[0]
    return total / count


def sgd_clip_sweep(X, Y, *, lrs=(3e-4, 1e-3, 3e-3), temperatures=(0.03, 0.07, 0.2), validation=0.1, **kwargs):
    """Fit :class:`SGDCLIP` for every (learning rate, temperature) and keep the best.

    Every combination trains on the same rows and is scored on the same validation
    pairs (a fraction is drawn once, with ``seed``), so the table compares like with like.

    Parameters
    ----------
    X : array_like or torch.Tensor, shape (n, d_x)
    Y : array_like or torch.Tensor, shape (n, d_y)
    lrs : sequence of float
        Learning rates tried.
    temperatures : sequence of float
        Temperatures tried.
    validation : float or (X_val, Y_val)
        As in :class:`SGDCLIP` (None is not allowed: the sweep selects on it).
    **kwargs
        Any other :class:`SGDCLIP` argument (``rank``, ``batch_size``, ``seed``, ...).

    Returns
    -------
    best_model : SGDCLIP
        The fitted model with the highest validation mean R@1 (the first in grid order
        on a tie, lrs outer, temperatures inner).  Its ``validation`` is the pair of
        validation arrays the sweep used.
    table : list of dict
        One row per combination, in grid order: "lr", "temperature", "val_R@1" (at the
        kept epoch), "epochs" (run), "best_epoch", "seconds" (fit time).
    """
    for name in ("lr", "temperature"):
        if name in kwargs:
            raise ValueError(f"{name}= is swept; pass {name}s= instead")
    if validation is None:
        raise ValueError("sgd_clip_sweep needs validation (a fraction or (X_val, Y_val)) to select on")
    lrs, temperatures = tuple(lrs), tuple(temperatures)
    if not lrs or not temperatures:
        raise ValueError("lrs and temperatures must each hold at least one value")
    for lr in lrs:
        check_positive("lrs entry", lr)
    for t in temperatures:
        check_positive("temperatures entry", t)
    seed = check_int("seed", kwargs.get("seed", 0), 0)
    X, Y = check_views(X, Y)
    Xtr, Ytr, Xv, Yv, _, _ = split_validation(validation, X, Y, seed)
    best, table = None, []
    for lr in lrs:
        for t in temperatures:
            model = SGDCLIP(lr=lr, temperature=t, validation=(Xv, Yv), **kwargs).fit(Xtr, Ytr)
            table.append({"lr": lr, "temperature": t, "val_R@1": model.best_score_, "epochs": model.n_epochs_,
                          "best_epoch": model.best_epoch_, "seconds": model.fit_seconds_})
            if best is None or model.best_score_ > best.best_score_:
                best = model
    return best, table

