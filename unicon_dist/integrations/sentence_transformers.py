"""A fitted UniCon view as the last module of a sentence-transformers model.

:func:`append_head` puts one view's head (:mod:`unicon_dist.math.heads`) after the modules
of a :class:`sentence_transformers.SentenceTransformer`, so that ``st.encode(texts)``
returns the aligned UniCon embeddings of the texts -- the same numbers as
``model.encode_y(st_base.encode(texts))`` up to the head's float32 arithmetic -- and
``st.similarity`` scores them as the UniCon model does.

The head is a :class:`UniConHead`, a ``sentence_transformers`` module: it reads
``features["sentence_embedding"]`` and writes the aligned embedding back under the same
key.  ``st.save(path)`` stores it in its own subfolder (``<idx>_UniConHead/``) as

- ``head.safetensors``: the fitted float64 tensors of
  :func:`~unicon_dist.math.heads.head_state` (``weight``, ``bias`` and, for a kernel,
  ``landmarks``, ``normalization``), whatever dtype the head computes in;
- ``config.json``: format ``"unicon_dist.st_head/1"``, the view, the similarity, the
  compute dtype and the head's config (``n_inputs``, ``rank``, ``normalize``, ``nystrom``).

modules.json records the class path
``unicon_dist.integrations.sentence_transformers.UniConHead``.  sentence-transformers 6
imports a module class from outside its own namespace only with
``trust_remote_code=True``, so the saved model is reloaded with::

    SentenceTransformer(path, trust_remote_code=True)   # needs unicon_dist importable

(the flag lets the folder name Python classes to import; here the only non-library class is
this one, but it is read from the folder, so pass it only for folders you trust).

This module imports ``sentence_transformers`` (and safetensors) at import time; the
package itself never imports it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

try:  # sentence-transformers >= 6
    from sentence_transformers.base.modules import Module as _STModule
except ImportError:  # pragma: no cover - sentence-transformers 5.x
    from sentence_transformers.models import Module as _STModule

from ..math.heads import head_from_state
from ..version import __version__

__all__ = ["ST_HEAD_FORMAT", "UniConHead", "append_head"]

#: ``format`` of a saved :class:`UniConHead`'s config.json
ST_HEAD_FORMAT = "unicon_dist.st_head/1"
_TENSORS_FILE = "head.safetensors"
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16}


def _dtype_name(dtype) -> str:
    for name, value in _DTYPES.items():
        if dtype == value or dtype == name:
            return name
    raise ValueError(f"dtype must be one of {sorted(_DTYPES)} (or the torch dtype), got {dtype!r}")


def _expected_shapes(config: dict) -> dict:
    nys = config.get("nystrom")
    shapes = {"weight": (config["rank"], nys["n_features"] if nys else config["n_inputs"]),
              "bias": (config["rank"],)}
    if nys:
        shapes["landmarks"] = (nys["n_landmarks"], config["n_inputs"])
        shapes["normalization"] = (nys["n_landmarks"], nys["n_features"])
    return shapes


class UniConHead(_STModule):
    """One fitted UniCon view's head as a sentence-transformers module.

    Replaces ``features["sentence_embedding"]`` (batch × ``n_inputs``) by the view's
    aligned embedding (batch × ``rank``; unit rows when the model's similarity is
    "cosine").  Usually made by :func:`append_head`; rebuilt by sentence-transformers from
    a saved model through :meth:`load`.

    Parameters
    ----------
    config : dict
        The head's config from :func:`~unicon_dist.math.heads.head_state` (``n_inputs``,
        ``rank``, ``normalize``, and ``nystrom`` for a kernel).
    tensors : dict of str to torch.Tensor
        The head's tensors from the same call (kept in float64 for :meth:`save`).
    view : {"x", "y"}
        Which view of the UniCon model the head encodes (recorded only).
    similarity : {"cosine", "dot"}
        The UniCon model's similarity (recorded only; the head's normalisation is in
        ``config``).
    dtype : torch.dtype or str
        What the head computes in (attribute ``compute_dtype``, its name).  Inputs are cast to it, and the embedding comes out in
        it: a float32 head on a float16 transformer returns float32 embeddings.

    Notes
    -----
    The head is frozen (``requires_grad=False``) and :meth:`save` writes the fitted
    float64 tensors it was built from, not its current weights: training it through
    sentence-transformers would change nothing that is saved.
    """

    config_file_name = "config.json"
    config_keys = ["view", "similarity", "compute_dtype"]

    def __init__(self, config: dict, tensors: dict, *, view: str = "y", similarity: str = "cosine",
                 dtype=torch.float32):
        super().__init__()
        if view not in ("x", "y"):
            raise ValueError(f'view must be "x" or "y", got {view!r}')
        self.view, self.similarity, self.compute_dtype = view, str(similarity), _dtype_name(dtype)
        self.head_config = json.loads(json.dumps(config))  # a plain JSON copy
        self.n_inputs, self.rank = int(config["n_inputs"]), int(config["rank"])
        for name, shape in _expected_shapes(config).items():
            if name not in tensors or tuple(tensors[name].shape) != shape:
                found = tuple(tensors[name].shape) if name in tensors else "missing"
                raise ValueError(f"head tensor {name!r} should have shape {shape}, found {found}")
        # the fitted tensors, float64 on the CPU: what save() writes (not buffers, so that
        # moving or casting the model leaves them exact)
        self.head_tensors = {k: torch.as_tensor(v).detach().to("cpu", torch.float64).contiguous()
                             for k, v in tensors.items()}
        self.head = head_from_state(self.head_config, self.head_tensors, dtype=_DTYPES[self.compute_dtype])

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        """Replace ``features["sentence_embedding"]`` by its aligned embedding."""
        x = features["sentence_embedding"]
        if x.shape[-1] != self.n_inputs:
            raise ValueError(f"the UniCon {self.view} head takes {self.n_inputs}-dimensional sentence embeddings, "
                             f"got {x.shape[-1]}")
        weight = self.head[1].weight
        features["sentence_embedding"] = self.head(x.to(device=weight.device, dtype=weight.dtype))
        return features

    def get_embedding_dimension(self) -> int:
        """The rank of the UniCon model: the width of the aligned embeddings."""
        return self.rank

    def get_config_dict(self) -> dict[str, Any]:
        return {"format": ST_HEAD_FORMAT, "version": __version__, "view": self.view,
                "similarity": self.similarity, "dtype": self.compute_dtype, "head": self.head_config}

    def __repr__(self) -> str:
        kernel = self.head_config.get("nystrom", {}).get("kernel", "linear")
        return (f"UniConHead(view={self.view!r}, n_inputs={self.n_inputs}, rank={self.rank}, kernel={kernel!r}, "
                f"similarity={self.similarity!r}, dtype={self.compute_dtype!r})")

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        """Write ``config.json`` and ``head.safetensors`` to ``output_path``.

        The tensors are always written as safetensors (float64), whatever
        ``safe_serialization`` says.
        """
        from safetensors.torch import save_file

        os.makedirs(output_path, exist_ok=True)
        save_file(self.head_tensors, os.path.join(output_path, _TENSORS_FILE),
                  metadata={"format": ST_HEAD_FORMAT})
        self.save_config(output_path)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token: bool | str | None = None,
             cache_folder: str | None = None, revision: str | None = None, local_files_only: bool = False,
             **kwargs) -> "UniConHead":
        """Rebuild a saved head (sentence-transformers calls this while loading a model).

        Raises
        ------
        FileNotFoundError
            The subfolder has no config or no tensors.
        ValueError
            The config is not a UniCon head's, or a tensor is missing or misshapen.
        """
        from safetensors.torch import load_file

        hub = {"subfolder": subfolder, "token": token, "cache_folder": cache_folder, "revision": revision,
               "local_files_only": local_files_only}
        where = os.path.join(str(model_name_or_path), subfolder)
        config = cls.load_config(model_name_or_path, **hub)
        if not config:
            raise FileNotFoundError(f"{where}: no {cls.config_file_name} for a UniCon head")
        if config.get("format") != ST_HEAD_FORMAT:
            raise ValueError(f"{where}: {cls.config_file_name} is not a UniCon head config "
                             f"(format {config.get('format')!r}, expected {ST_HEAD_FORMAT!r})")
        path = cls.load_file_path(model_name_or_path, filename=_TENSORS_FILE, **hub)
        if path is None:
            raise FileNotFoundError(f"{where}: the UniCon head's {_TENSORS_FILE} is missing")
        return cls(config["head"], load_file(path), view=config["view"], similarity=config["similarity"],
                   dtype=config["dtype"])


def append_head(st_model, model, view: str = "y", *, dtype=torch.float32):
    """Append one view's UniCon head to a SentenceTransformer, in place.

    Parameters
    ----------
    st_model : sentence_transformers.SentenceTransformer
        The text encoder of that view.  It is modified **in place** (the head becomes its
        last module and its ``similarity_fn_name`` becomes the UniCon model's similarity)
        and returned; ``copy.deepcopy`` it first to keep the original.
    model : UniCon
        A fitted model whose ``view`` was fitted on exactly ``st_model.encode(...)``
        outputs: the same model, prompts and settings.  Those outputs are usually
        L2-normalised (the model ends in a ``Normalize`` module) and the head expects them
        that way; it sees what the last module before it returns.
    view : {"x", "y"}
        Which of the model's views the texts are.
    dtype : torch.dtype
        What the head computes in (see :class:`UniConHead`).  A float32 head matches
        ``model.encode_x``/``encode_y`` to float32 round-off for the linear kernel; with a
        Nyström kernel float32 loses up to 1/√λ_min(K_LL) more, ``torch.float64`` does not.

    Returns
    -------
    sentence_transformers.SentenceTransformer
        ``st_model`` itself.  ``encode`` now returns the aligned embeddings (``rank``
        columns); save it with ``st_model.save(path)`` and reload it with
        ``SentenceTransformer(path, trust_remote_code=True)``.

    Raises
    ------
    RuntimeError
        ``model`` is not fitted (:meth:`UniCon.check_fitted`).
    ValueError
        ``view`` is not "x" or "y"; ``st_model`` has a ``truncate_dim`` (truncation is
        applied after the last module, so the head would see untruncated embeddings);
        or its embedding dimension differs from the number of inputs the view was fitted on.
    TypeError
        ``model`` is not a UniCon model (has no ``head_states``).
    """
    if view not in ("x", "y"):
        raise ValueError(f'view must be "x" or "y", got {view!r}')
    if not hasattr(model, "head_states") or not hasattr(model, "check_fitted"):
        raise TypeError(f"model must be a unicon_dist.UniCon, got {type(model).__name__}")
    model.check_fitted()
    config, tensors = model.head_states()[view]
    if getattr(st_model, "truncate_dim", None) is not None:
        raise ValueError(f"the SentenceTransformer truncates its embeddings to {st_model.truncate_dim} dimensions "
                         "after its last module, so a head appended to it would see the untruncated ones; "
                         "set st_model.truncate_dim = None (and fit on untruncated embeddings)")
    dim = st_model.get_embedding_dimension()
    if dim is not None and int(dim) != int(config["n_inputs"]):
        raise ValueError(f"the SentenceTransformer gives {dim}-dimensional embeddings, but the UniCon model's "
                         f"{view} view was fitted on {config['n_inputs']} inputs")
    similarity = str(model.similarity)
    head = UniConHead(config, tensors, view=view, similarity=similarity, dtype=dtype)
    st_model.append(head.to(st_model.device))
    st_model.similarity_fn_name = "cosine" if similarity == "cosine" else "dot"
    return st_model
