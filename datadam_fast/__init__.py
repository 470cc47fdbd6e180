"""datadam-fast: fused attention-matching loss and dataset distillation (DataDAM, ICCV 2023)."""
from .backends import BackendUnavailable, available_backends
from .extractor import FeatureExtractor
from .loss import AttentionMatchingLoss, attention_matching_loss
from .ops import spatial_attention
from .targets import (ClassMeanAccumulator, ClassTargets, class_attention_means,
                      class_embedding_means)
from . import profiling

__version__ = "0.1.0"

__all__ = [
    "attention_matching_loss", "AttentionMatchingLoss", "class_attention_means",
    "class_embedding_means", "ClassMeanAccumulator", "ClassTargets", "spatial_attention",
    "FeatureExtractor", "available_backends", "BackendUnavailable", "profiling", "__version__",
]
