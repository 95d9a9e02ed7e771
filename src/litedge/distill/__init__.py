"""litedge.distill: turn a softmax DiT teacher into a linear-attention student.

    from litedge.distill import DistillConfig, distill
    result = distill(DistillConfig(teacher="pixart-sigma/", family="lit", data="images/", out="runs/lit"))

See :mod:`litedge.distill.trainer` (the run), :mod:`~litedge.distill.data` (data layouts and
the feature cache), :mod:`~litedge.distill.losses`, :mod:`~litedge.distill.checkpoint`.
"""

from litedge.distill.data import CacheInfo, FeatureCache, Sample, cache_features, discover
from litedge.distill.trainer import DistillConfig, RunResult, distill, load_teacher

__all__ = ["CacheInfo", "DistillConfig", "FeatureCache", "RunResult", "Sample", "cache_features", "discover",
           "distill", "load_teacher"]
