"""Take layer outputs and the final embedding from any ``nn.Module`` without cloning them."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn


class FeatureExtractor(nn.Module):
    """Wrap ``model`` so that a call returns ``(features, embedding)``.

    ``layers``: names (as in ``model.named_modules()``) whose outputs are the attention-matched
    features. ``embedding``: a module name whose output, flattened to ``[N, D]``, is the
    embedding; ``None`` uses the model's own output (the first element if it returns a tuple,
    flattened). Hooks keep a *reference* to each output, never a copy, so nothing is cloned; if a
    later in-place op (e.g. ``ReLU(inplace=True)`` applied to a hooked tensor) modifies a captured
    output, hook the in-place module itself instead (its output is the final value).

    >>> fx = FeatureExtractor(resnet, ["layer1", "layer2", "layer3"], embedding="avgpool")
    >>> feats, emb = fx(images)
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], embedding: Optional[str] = None):
        super().__init__()
        self.model = model
        self.layers = list(layers)
        self.embedding = embedding
        modules: Dict[str, nn.Module] = dict(model.named_modules())
        missing = [n for n in self.layers + ([embedding] if embedding else []) if n not in modules]
        if missing:
            known = [n for n in modules if n][:40]
            raise ValueError(f"FeatureExtractor: no module named {missing} in {type(model).__name__}; "
                             f"known names include {known}")
        self._store: Dict[str, torch.Tensor] = {}
        self._handles = []
        for n in set(self.layers + ([embedding] if embedding else [])):
            self._handles.append(modules[n].register_forward_hook(self._hook(n)))

    def _hook(self, name):
        def hook(_module, _inp, out):
            self._store[name] = out[0] if isinstance(out, (tuple, list)) else out
        return hook

    def forward(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        self._store = {}
        try:
            out = self.model(x)
            feats = [self._store[n] for n in self.layers]
            if self.embedding is not None:
                emb = self._store[self.embedding]
            else:
                emb = out[0] if isinstance(out, (tuple, list)) else out
        finally:
            store, self._store = self._store, {}
            del store
        return feats, emb.flatten(1)

    def remove(self) -> None:
        """Detach the hooks from the wrapped model."""
        for h in self._handles:
            h.remove()
        self._handles = []
