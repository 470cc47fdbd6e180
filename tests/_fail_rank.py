"""A 2-rank torchrun job in which rank 1 raises at iteration 3 (tests/distill/test_scale.py)."""
import sys

from datadam_fast.cli import entry
from datadam_fast import distill


class _FailingDistiller(distill.Distiller):
    def step(self, timings=None):
        if self.world.rank == 1 and self.iteration == 3:
            raise RuntimeError(f"injected failure on rank {self.world.rank} at iteration {self.iteration}")
        return super().step(timings)


distill.Distiller = _FailingDistiller  # the CLI builds whatever distill.Distiller is
entry(sys.argv[1:])
