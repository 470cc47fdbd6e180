"""datadam-fast: fused attention-matching loss and dataset distillation (DataDAM, ICCV 2023)."""
from .errors import BackendUnavailable, DatadamError, UserError
from .loss import (AttentionMatchingLoss, CFMatchingLoss, ClassMeanAccumulator, ClassTargets, FeatureExtractor,
                   attention_matching_loss, cf_class_sums, cf_matching_loss, channel_attention, channel_moments,
                   characteristic_function, class_channel_moments, available_backends, check_streaming_safe, class_attention_means,
                   class_embedding_means, resolved_backend, spatial_attention)
from . import profiling

__version__ = "0.1.0"


def __getattr__(name):
    # ``datadam_fast.distill`` (the engine, callable as ``datadam_fast.distill(cfg, out_dir)``) is
    # imported on first use: the loss alone does not need it
    if name == "distill":
        import importlib
        return importlib.import_module(".distill", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "attention_matching_loss", "AttentionMatchingLoss", "class_attention_means",
    "class_embedding_means", "ClassMeanAccumulator", "ClassTargets", "check_streaming_safe",
    "spatial_attention", "FeatureExtractor", "cf_matching_loss", "CFMatchingLoss", "cf_class_sums",
    "characteristic_function", "channel_attention", "channel_moments", "class_channel_moments", "available_backends", "resolved_backend",
    "BackendUnavailable", "DatadamError", "UserError", "profiling", "distill", "__version__",
]
