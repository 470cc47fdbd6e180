"""Testing a frozen network without training it (the official ``distill_test_model.py``): which
network a state dict is, and its test accuracy."""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..errors import UserError


def frozen_model_network(state_dict, *, model: Optional[str] = None, norm: Optional[str] = None,
                         width: Optional[int] = None, depth: Optional[int] = None) -> Dict:
    """Which network a frozen state dict is: read from the dict (ConvNet family) unless named.

    Returns ``{"model", "norm", "width", "depth", "reason"}``. BatchNorm buffers in the dict mean a
    BatchNorm ConvNet; the choice is never silent (``reason`` says what decided it).
    """
    from ..models.networks import infer_network_from_state_dict
    if model is not None:
        rec = {"model": model, "norm": norm, "width": width, "depth": depth, "reason": "--model"}
        return rec
    try:
        rec = infer_network_from_state_dict(state_dict)
    except ValueError as e:
        raise UserError(f"frozen model: {e} (--model)") from None
    for k, v in (("norm", norm), ("width", width), ("depth", depth)):
        if v is not None:
            rec[k] = v
            rec["reason"] += f"; --{k} {v}"
    return rec


def frozen_model_accuracy(state_dict, test_set, *, model: str = "ConvNetBN", device="cpu", batch: int = 1000,
                          norm: Optional[str] = None, width: Optional[int] = None,
                          depth: Optional[int] = None) -> float:
    """Like the official ``distill_test_model.py``: load the frozen net and test it (no training)."""
    from .evaluate import EvalConfig, accuracy, build_eval_network, network_label
    from ..models.networks import describe_network, load_official_state_dict
    H, W = test_set.image_size
    cfg = EvalConfig(model=model, norm=norm, width=width, depth=depth)
    net = build_eval_network(cfg, test_set.channels, test_set.num_classes, (H, W))
    try:
        load_official_state_dict(net, state_dict)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])[:300]
        raise UserError(f"frozen model does not fit {network_label(describe_network(net, model))} for "
                        f"{test_set.name}: {detail}") from None
    return accuracy(net.to(device), test_set, torch.device(device), batch)
