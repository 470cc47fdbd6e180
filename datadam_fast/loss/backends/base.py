"""The backend interface (:class:`Backend`), the plain-PyTorch :class:`ReferenceBackend` and the
base of the compiled-extension backends (:class:`NativeOpBackend`); the registry in
:mod:`datadam_fast.loss.backends` loads the implementations. The contract is in that package's
docstring."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from ...errors import UserError

BACKEND_NAMES = ("reference", "triton", "cuda", "cpu")
#: device types each fused backend's kernels can run on, known without loading it (so that a tool
#: never builds one device's extension only to skip it); Triton takes CPU tensors only under its
#: interpreter, which its ``supports`` answers once loaded
DEVICE_TYPES = {"triton": ("cuda", "cpu"), "cuda": ("cuda",), "cpu": ("cpu",)}


class Backend:
    name = "abstract"

    def supports(self, device: torch.device) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def forward(self, feats: Sequence[torch.Tensor], power: float
                ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:  # pragma: no cover
        raise NotImplementedError

    def backward(self, feats: Sequence[torch.Tensor], maps: Sequence[torch.Tensor],
                 norms: Sequence[torch.Tensor], grad_maps: Sequence[torch.Tensor],
                 power: float) -> List[torch.Tensor]:  # pragma: no cover
        raise NotImplementedError


class ReferenceBackend(Backend):
    """Plain PyTorch; the oracle, and the fallback on any device."""
    name = "reference"

    def supports(self, device):
        return True

    def forward(self, feats, power):
        from ..reference import attention_maps_and_norms
        maps, norms = [], []
        for f in feats:
            m, n = attention_maps_and_norms(f, power)
            maps.append(m.contiguous())
            norms.append(n)
        return maps, norms

    def backward(self, feats, maps, norms, grad_maps, power):
        from ..reference import spatial_attention_backward
        from .._oplib import grad_memory_format
        out = []
        for f, m, n, g in zip(feats, maps, norms, grad_maps):
            grad = spatial_attention_backward(f, m, n, g, power)
            out.append(grad.contiguous(memory_format=grad_memory_format(f)))
        return out


class NativeOpBackend(Backend):
    """A backend whose kernels are dispatcher ops ``torch.ops.datadam_fast.<name>_fwd`` / ``_bwd``
    registered by a compiled extension (``TORCH_LIBRARY_IMPL``), over lists of layers."""

    #: the device type its kernels are registered for ("cpu" / "cuda"; set by each backend)
    device_type = ""
    _DEVICE_WORDS = {"cpu": "CPU", "cuda": "CUDA"}

    def supports(self, device) -> bool:
        return torch.device(device).type == self.device_type

    def _bwd_extra_args(self) -> tuple:
        return ()

    def _check_devices(self, groups) -> None:
        """Every tensor on this backend's device type, checked here: the dispatcher would
        otherwise answer first with "Could not run ... with arguments from the 'CPU' backend"."""
        want = self.device_type
        for what, tensors in groups:
            for i, t in enumerate(tensors):
                if isinstance(t, torch.Tensor) and t.device.type != want:
                    word = self._DEVICE_WORDS.get(want, want)
                    raise UserError(f"backend {self.name!r} takes {word} tensors, but {what}[{i}] is on "
                                    f"{t.device} (move it with .to({want!r}), or pass backend='auto' to pick the "
                                    f"backend from the tensors' device)")

    def forward(self, feats, power):
        self._check_devices((("feats", feats),))
        op = getattr(torch.ops.datadam_fast, f"{self.name}_fwd")
        maps, norms = op([f.detach() for f in feats], float(power))
        return list(maps), list(norms)

    def backward(self, feats, maps, norms, grad_maps, power):
        self._check_devices((("feats", feats), ("maps", maps), ("norms", norms), ("grad_maps", grad_maps)))
        op = getattr(torch.ops.datadam_fast, f"{self.name}_bwd")
        return list(op([f.detach() for f in feats], [m.detach() for m in maps],
                       [n.detach() for n in norms], [g.detach() for g in grad_maps],
                       float(power), *self._bwd_extra_args()))


__all__ = ["BACKEND_NAMES", "DEVICE_TYPES", "Backend", "ReferenceBackend", "NativeOpBackend"]
