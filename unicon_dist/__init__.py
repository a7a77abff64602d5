"""unicon_dist: closed-form contrastive alignment (UniCon) at scale.

The public interface is listed in DESIGN §5; everything here is importable as
``import unicon_dist as ud``.
"""

__version__ = "0.1.0"

from . import kernels, losses, nystrom
from .closed_form import closed_form_step, fixed_point_residual, spectral_gap, tangent_projection, truncated_svd
from .dense import contrastive_loss, similarity_weights
from .executors import LocalExecutor
from .ray_executor import RayExecutor
from .losses import get_loss
from .metrics import retrieval_metrics
from .kernels import get_kernel
from .model import UniCon
from .nystrom import NystroemMap
from .planning import PanelPlan, TilePlan, plan_panels, plan_tiles
from .randomized import randomized_svd
from .store import PairStore
from .streamed import CrossProductOperator, weighted_cross_product

__all__ = [
    "__version__",
    "losses",
    "kernels",
    "nystrom",
    "get_kernel",
    "NystroemMap",
    "randomized_svd",
    "get_loss",
    "contrastive_loss",
    "similarity_weights",
    "weighted_cross_product",
    "CrossProductOperator",
    "closed_form_step",
    "truncated_svd",
    "tangent_projection",
    "fixed_point_residual",
    "spectral_gap",
    "UniCon",
    "retrieval_metrics",
    "plan_tiles",
    "TilePlan",
    "PairStore",
    "LocalExecutor",
    "RayExecutor",
    "plan_panels",
    "PanelPlan",
]
