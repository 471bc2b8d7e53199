"""raterseg: fuse several raters' segmentations into a truth estimate, rater models and
uncertainty — classical (majority vote, STAPLE, spatial STAPLE) and learned (CM, TGCE,
MrPrism, AVAP) methods, 2D and 3D, any number of raters, missing raters allowed.

Examples:
    >>> import raterseg as rs
    >>> res = rs.fuse(raters, method="staple")          # raters: int (R, *S), -1 = missing
    >>> res.truth, res.probabilities, res.rater_confusion
"""

from .api import create, fuse, load
from .chunked import fuse_chunked, load_chunked
from .methods._base import FusionMethod, ParamInfo, param
from .methods._registry import available_methods, get_method, register_method
from .types import FusionResult, RaterSegError, RaterStack, TrainingEvent, as_rater_stack

__version__ = "0.1.0"

__all__ = [
    "FusionMethod",
    "FusionResult",
    "ParamInfo",
    "RaterSegError",
    "RaterStack",
    "TrainingEvent",
    "as_rater_stack",
    "available_methods",
    "create",
    "fuse",
    "fuse_chunked",
    "get_method",
    "load",
    "load_chunked",
    "param",
    "register_method",
]
