"""datadam-fast: fused attention-matching loss and dataset distillation (DataDAM, ICCV 2023)."""
from .errors import BackendUnavailable, DatadamError, UserError
from .backends import available_backends, resolved_backend
from .extractor import FeatureExtractor
from .loss import AttentionMatchingLoss, attention_matching_loss
from .ops import spatial_attention
from .targets import (ClassMeanAccumulator, ClassTargets, check_streaming_safe, class_attention_means,
                      class_embedding_means)
from . import profiling

__version__ = "0.1.0"

__all__ = [
    "attention_matching_loss", "AttentionMatchingLoss", "class_attention_means",
    "class_embedding_means", "ClassMeanAccumulator", "ClassTargets", "check_streaming_safe",
    "spatial_attention", "FeatureExtractor", "available_backends", "resolved_backend",
    "BackendUnavailable", "DatadamError", "UserError", "profiling", "__version__",
]
