"""What a fitted :class:`~unicon_dist.UniCon` hands to other stacks: its two heads.

A mixin of the estimator: the heads are built by :mod:`unicon_dist.math.heads` and written
by :mod:`unicon_dist.io.head_files`; here they are only taken from the fitted state.
"""

from __future__ import annotations

import torch

from ..io.head_files import export_onnx, save_heads
from ..math.heads import head_from_state, head_state

__all__ = ["HeadExports"]


class HeadExports:
    """``to_torch``, ``save_safetensors`` and ``export_onnx`` of a fitted model."""

    def head_states(self) -> dict:
        """{"x": (config, tensors), "y": ...}: each view's fitted stages folded into one head.

        See :func:`unicon_dist.math.heads.head_state`; what :meth:`to_torch` builds and
        :meth:`save_safetensors` writes.
        """
        self.check_fitted()
        return {"x": head_state(self.map_x_, self.F1_, str(self.similarity)),
                "y": head_state(self.map_y_, self.F2_, str(self.similarity))}

    def to_torch(self, *, dtype=torch.float32, device=None):
        """(head_x, head_y): ``torch.nn`` modules mapping raw inputs to the embeddings.

        Each head is ``nn.Sequential(features, nn.Linear, normalisation)`` with centring,
        whitening and the projection folded into the linear layer and, for a kernel, a
        :class:`~unicon_dist.math.heads.NystroemFeatures` stage; plain tensors and layers
        only, so it scripts (``torch.jit.script``), exports (``torch.export``) and moves
        to any device or dtype.  ``head_x(X)`` equals :meth:`encode_x` to the round-off of
        ``dtype`` (float64 heads reproduce float64 encoding; in float32 a Nyström stage
        loses up to 1/√λ_min of K_LL in relative accuracy, as the module docstring says).

        Parameters
        ----------
        dtype : torch.dtype
            Of the heads' tensors; inputs must be given in it.
        device : str or torch.device, optional

        Raises
        ------
        RuntimeError
            The model is not fitted.
        """
        states = self.head_states()
        return tuple(head_from_state(*states[v], dtype=dtype, device=device) for v in ("x", "y"))

    def save_safetensors(self, directory):
        """Write the two heads to ``directory``: ``heads.safetensors`` and ``config.json``.

        The format is :mod:`unicon_dist.io.head_files`'s; read it back with
        :func:`unicon_dist.load_heads`, or without this library (README, "Using the heads
        elsewhere").  Needs the ``export`` extra (safetensors).
        """
        return save_heads(directory, self.head_states(), str(self.similarity))

    def export_onnx(self, directory, *, dtype=torch.float32, opset: int | None = None):
        """Write ``x_head.onnx`` and ``y_head.onnx`` to ``directory`` (dynamic batch axis).

        Inputs ``features`` (batch × n_inputs, ``dtype``), outputs ``embeddings``.  Needs the
        ``export`` extra (onnx, onnxscript; onnxruntime to run them).  Returns the paths.
        """
        return export_onnx(directory, self.to_torch(dtype=dtype), opset=opset)
