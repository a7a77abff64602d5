"""unicon_dist: closed-form contrastive alignment (UniCon) at scale.

The public interface is listed in DESIGN §5; everything here is importable as
``import unicon_dist as ud``.
"""

from .version import __version__

from . import compat as _compat

_compat.install()

from .math import kernels
from .math import losses
from .math import nystrom
from .math.closed_form import closed_form_step, fixed_point_residual, spectral_gap, tangent_projection
from .math.linalg import truncated_svd
from .math.dense import contrastive_loss, similarity_weights
from .solver.executor import LocalExecutor
from .execution.ray import RayExecutor
from .math.losses import get_loss
from .math.metrics import retrieval_metrics
from .math.kernels import get_kernel
from .solver.estimator import UniCon
from .math.nystrom import NystroemMap
from .solver.planning import PanelPlan, TilePlan, plan_panels, plan_tiles
from .math.linalg import randomized_svd
from .data.store import PairStore
from .solver.operator import CrossProductOperator, weighted_cross_product
from .io.head_files import load_heads
from .math.heads import NystroemFeatures

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
    "load_heads",
    "NystroemFeatures",
]
