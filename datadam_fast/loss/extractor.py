"""Take layer outputs and the final embedding from any ``nn.Module`` without cloning them."""
from __future__ import annotations

import difflib
import warnings
from typing import Callable, Dict, List, Sequence, Tuple, Union

import torch
from torch import nn

from ..errors import UserError, UserTypeError

Embedding = Union[None, str, Callable[[object], torch.Tensor]]


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class FeatureExtractor(nn.Module):
    """Wrap ``model`` so that a call returns ``(features, embedding)``.

    ``layers``: names (as in ``model.named_modules()``) whose outputs are the attention-matched
    features. ``embedding``: a module name whose output, flattened to ``[N, D]``, is the
    embedding; a callable applied to the model's output (e.g. ``lambda out: out[1]``); or
    ``None`` for the model's own output (the first element if it returns a tuple, flattened).
    Hooks keep a *reference* to each output, never a copy, so nothing is cloned; if a later
    in-place op (e.g. ``ReLU(inplace=True)`` applied to a hooked tensor) modifies a captured
    output, hook the in-place module itself instead (its output is the final value).

    A wrong name raises with close matches and the full list of names; a hooked module that did
    not run in a forward raises; one that ran more than once (a module reused in ``forward``)
    warns, and its last output is used.

    >>> fx = FeatureExtractor(resnet, ["layer1", "layer2", "layer3"], embedding="avgpool")
    >>> feats, emb = fx(images)
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], embedding: Embedding = None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise UserTypeError(f"FeatureExtractor: model must be an nn.Module, got {type(model).__name__}")
        if isinstance(layers, str):
            raise UserTypeError(f"FeatureExtractor: layers must be a list of module names, got the string "
                                f"{layers!r} (did you mean [{layers!r}]?)")
        if embedding is not None and not isinstance(embedding, str) and not callable(embedding):
            raise UserTypeError("FeatureExtractor: embedding must be None, a module name or a callable, "
                                f"got {type(embedding).__name__}")
        self.model = model
        self.layers = list(layers)
        self.embedding = embedding
        modules: Dict[str, nn.Module] = dict(model.named_modules())
        self._emb_name = embedding if isinstance(embedding, str) else None
        hooked = self.layers + ([self._emb_name] if self._emb_name else [])
        missing = [n for n in hooked if n not in modules]
        if missing:
            names = [n for n in modules if n]
            hints = []
            for n in missing:
                close = difflib.get_close_matches(n, names, n=3, cutoff=0.5)
                hints.append(f"{n!r}" + (f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""))
            raise UserError(f"FeatureExtractor: no module named {', '.join(hints)} in {type(model).__name__}; "
                            f"its modules are: {', '.join(names)}")
        self._store: Dict[str, torch.Tensor] = {}
        self._calls: Dict[str, int] = {}
        self._handles = []
        for n in dict.fromkeys(hooked):
            self._handles.append(modules[n].register_forward_hook(self._hook(n)))

    def _hook(self, name):
        def hook(_module, _inp, out):
            self._store[name] = _first(out)
            self._calls[name] = self._calls.get(name, 0) + 1
        return hook

    def forward(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        self._store, self._calls = {}, {}
        try:
            out = self.model(x)
            never = [n for n in self._calls_expected() if n not in self._store]
            if never:
                raise UserError(f"FeatureExtractor: hooked module(s) {never} did not run in "
                                f"{type(self.model).__name__}.forward; hook modules that the forward calls")
            twice = {n: c for n, c in self._calls.items() if c > 1}
            if twice:
                warnings.warn(f"FeatureExtractor: hooked module(s) ran more than once in one forward {twice}; "
                              "using the last output of each (hook a module that runs once to be sure "
                              "which output is matched)", RuntimeWarning, stacklevel=2)
            feats = [self._store[n] for n in self.layers]
            if self._emb_name is not None:
                emb = self._store[self._emb_name]
            elif callable(self.embedding):
                emb = self.embedding(out)
                if not isinstance(emb, torch.Tensor):
                    raise UserTypeError(f"FeatureExtractor: the embedding callable returned "
                                        f"{type(emb).__name__}, expected a tensor")
            else:
                emb = _first(out)
        finally:
            self._store, self._calls = {}, {}
        return feats, emb.flatten(1)

    def _calls_expected(self) -> List[str]:
        return self.layers + ([self._emb_name] if self._emb_name else [])

    def check_streaming_safe(self, *, error: bool = True) -> List[str]:
        """See :func:`datadam_fast.check_streaming_safe` (train-mode BatchNorm makes streaming inexact)."""
        from .targets import check_streaming_safe
        return check_streaming_safe(self.model, error=error)

    def remove(self) -> None:
        """Detach the hooks from the wrapped model."""
        for h in self._handles:
            h.remove()
        self._handles = []
