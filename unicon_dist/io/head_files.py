"""The fitted heads as files other stacks read: safetensors + JSON, and ONNX.

A heads folder (format ``"unicon_dist.heads/1"``) holds

- ``heads.safetensors``: float64 tensors ``x.weight``, ``x.bias`` (and, for a kernel,
  ``x.landmarks``, ``x.normalization``), the same under ``y.``;
- ``config.json``: ``format``, ``version``, ``similarity``, and per view (``x``, ``y``) the
  config of :func:`unicon_dist.math.heads.head_state` (``n_inputs``, ``rank``,
  ``normalize``, ``nystrom``).

Both files are written atomically, the config last, so a folder whose config is readable
is complete.  :func:`load_heads` rebuilds the two ``torch.nn`` modules; the README shows
the lines that rebuild linear-kernel heads with torch and safetensors alone.

:func:`export_onnx` writes ``x_head.onnx`` and ``y_head.onnx`` (input ``features``, output
``embeddings``, batch axis dynamic) with torch's ONNX exporter.  ONNX has no pairwise
distance operator, so heads whose kernel needs one (laplacian, angular, arc-cosine) compute
it by broadcasting: memory batch × landmarks × input dimension per call.

safetensors, onnx and onnxruntime are the ``export`` extra; they are imported here only
when used.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch

from ..math.heads import HEAD_FORMAT, head_from_state
from ..version import __version__
from .artifacts import ArtifactError, atomic_write

__all__ = ["HEADS_FILE", "CONFIG_FILE", "ONNX_FILES", "save_heads", "load_heads", "read_heads_config",
           "export_onnx"]

HEADS_FILE = "heads.safetensors"
CONFIG_FILE = "config.json"
ONNX_FILES = ("x_head.onnx", "y_head.onnx")


def _need(module: str, extra: str = "export"):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ImportError(f"{module} is needed for this; install unicon_dist[{extra}]") from None


def save_heads(directory, states: dict, similarity: str) -> Path:
    """Write ``states`` ({"x": (config, tensors), "y": ...}) to ``directory``.

    Returns the folder.  Existing heads files there are replaced; nothing else in the
    folder is touched.
    """
    st = _need("safetensors.torch")
    directory = Path(directory)
    tensors = {f"{view}.{name}": t.detach().to("cpu", torch.float64).contiguous()
               for view, (_, arrays) in states.items() for name, t in arrays.items()}
    with atomic_write(directory / HEADS_FILE, "wb") as fh:
        fh.write(st.save(tensors, metadata={"format": HEAD_FORMAT}))
    config = {"format": HEAD_FORMAT, "version": __version__, "similarity": similarity,
              **{view: cfg for view, (cfg, _) in states.items()}}
    with atomic_write(directory / CONFIG_FILE, "w") as fh:
        json.dump(config, fh, indent=1, sort_keys=True)
    return directory


def read_heads_config(directory) -> dict:
    """The config of a heads folder, checked to be one."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no heads config here (written by UniCon.save_safetensors)")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(path, f"not a heads config ({exc})", kind="heads config") from None
    if not isinstance(config, dict) or config.get("format") != HEAD_FORMAT:
        raise ArtifactError(path, f"not a heads config of format {HEAD_FORMAT!r}", kind="heads config",
                            damaged=False)
    return config


def load_heads(directory, *, dtype=torch.float32, device=None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(head_x, head_y) rebuilt from a heads folder, in ``dtype`` on ``device``.

    Raises
    ------
    FileNotFoundError
        No config or no tensors file in ``directory``.
    ArtifactError
        The config is not a heads config, or a tensor it needs is missing or misshapen.
    """
    st = _need("safetensors.torch")
    directory = Path(directory)
    config = read_heads_config(directory)
    path = directory / HEADS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the heads' tensors are missing")
    try:
        tensors = st.load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ArtifactError(path, f"cannot read the tensors ({exc})", kind="heads") from None
    heads = []
    for view in ("x", "y"):
        cfg = config[view]
        arrays = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(view + ".")}
        expected = {"weight": (cfg["rank"], cfg["nystrom"]["n_features"] if "nystrom" in cfg else cfg["n_inputs"]),
                    "bias": (cfg["rank"],)}
        if "nystrom" in cfg:
            expected["landmarks"] = (cfg["nystrom"]["n_landmarks"], cfg["n_inputs"])
            expected["normalization"] = (cfg["nystrom"]["n_landmarks"], cfg["nystrom"]["n_features"])
        for name, shape in expected.items():
            if name not in arrays or tuple(arrays[name].shape) != shape:
                found = tuple(arrays[name].shape) if name in arrays else "missing"
                raise ArtifactError(path, f"tensor {view}.{name} should have shape {shape}, found {found}", kind="heads")
        heads.append(head_from_state(cfg, arrays, dtype=dtype, device=device))
    return heads[0], heads[1]


def _onnx_ready(head: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``head`` whose Nyström stage computes distances by broadcasting."""
    head = copy.deepcopy(head)
    for module in head.modules():
        if hasattr(module, "broadcast_distances"):
            module.broadcast_distances = True
    return head


def export_onnx(directory, heads, *, opset: int | None = None) -> list[Path]:
    """Write ``x_head.onnx`` and ``y_head.onnx`` for ``heads`` = (head_x, head_y).

    Each graph takes ``features`` (batch × n_inputs, the heads' dtype) and returns
    ``embeddings`` (batch × rank); the batch axis is dynamic.  Each file is written to a
    temporary name and renamed into place.
    """
    _need("onnx")
    _need("onnxscript")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, head in zip(ONNX_FILES, heads):
        head = _onnx_ready(head).eval()
        param = next(iter(head.parameters()))
        n_inputs = _n_inputs(head)
        example = torch.zeros((2, n_inputs), dtype=param.dtype, device=param.device)
        batch = torch.export.Dim("batch")
        program = torch.onnx.export(head, (example,), dynamo=True, input_names=["features"],
                                    output_names=["embeddings"], dynamic_shapes=({0: batch},),
                                    external_data=False, opset_version=opset, verbose=False)
        target = directory / name
        tmp = directory / f".{name}.{os.getpid()}.tmp"
        try:
            program.save(str(tmp))
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        written.append(target)
    return written


def _n_inputs(head: torch.nn.Module) -> int:
    first = head[0]
    if hasattr(first, "landmarks"):
        return int(first.landmarks.shape[1])
    return int(head[1].weight.shape[1])
