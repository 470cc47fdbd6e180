"""The attention-matching loss as a drop-in operator.

* :mod:`.matching`: :func:`attention_matching_loss` and :class:`AttentionMatchingLoss` (the public
  function and module);
* :mod:`.ops`, :mod:`._oplib`: the registered ``spatial_attention`` op and its autograd/fake
  registration;
* :mod:`.reference`: the pure-PyTorch reference every backend is tested against;
* :mod:`.targets`: real-side class targets, streamed (:class:`ClassMeanAccumulator`);
* :mod:`.characteristic`: the characteristic-function statistic (NCFM) as a registered op, and
  :func:`cf_matching_loss`;
* :mod:`.channels`: channel attention and channel moments as registered ops;
* :mod:`.extractor`: :class:`FeatureExtractor` (features of any network by forward hooks);
* :mod:`.backends`: CPU (C++), CUDA and Triton implementations and their selection.
"""
from .backends import available_backends, resolved_backend
from .channels import channel_attention, channel_moments, class_channel_moments
from .characteristic import CFMatchingLoss, cf_class_sums, cf_matching_loss, characteristic_function
from .extractor import FeatureExtractor
from .matching import AttentionMatchingLoss, attention_matching_loss
from .ops import spatial_attention
from .targets import (ClassMeanAccumulator, ClassTargets, check_streaming_safe, class_attention_means,
                      class_embedding_means)

__all__ = ["attention_matching_loss", "AttentionMatchingLoss", "class_attention_means", "class_embedding_means",
           "ClassMeanAccumulator", "ClassTargets", "check_streaming_safe", "spatial_attention", "FeatureExtractor",
           "available_backends", "resolved_backend", "cf_matching_loss", "CFMatchingLoss", "cf_class_sums",
           "characteristic_function", "channel_attention", "channel_moments", "class_channel_moments"]
