"""Background loading of real chunks, a bounded number ahead of the compute.

The distillation step consumes real images chunk by chunk, in an order known one iteration
ahead (the next iteration's indices are drawn before the current one computes). A single worker
thread reads and prepares the upcoming chunks while the main thread runs the network, so the
device never waits on the disk. At most ``lookahead`` chunks beyond the one being consumed exist
at any time: the memory planner counts them.

On CPU the worker also normalises (uint8 -> float), which overlaps that pass with compute too. On
a GPU it returns pinned uint8 rows; the main thread copies them without blocking and normalises on
the device (4x fewer bytes over PCIe than float).
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Deque, Hashable, Tuple

import torch


class ChunkPrefetcher:
    def __init__(self, load: Callable[[torch.Tensor], torch.Tensor], *, lookahead: int = 1,
                 enabled: bool = True):
        self._load = load
        self.lookahead = max(int(lookahead), 0)
        self.enabled = enabled and self.lookahead > 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="datadam_fast-prefetch") \
            if self.enabled else None
        self._queued: Deque[Tuple[Hashable, torch.Tensor]] = deque()
        self._inflight: Deque[Tuple[Hashable, Future]] = deque()

    def schedule(self, key: Hashable, indices: torch.Tensor) -> None:
        """Append a chunk to the consumption order."""
        self._queued.append((key, indices))
        self._top_up()

    def _top_up(self) -> None:
        if not self.enabled:
            return
        while self._queued and len(self._inflight) < self.lookahead:
            key, idx = self._queued.popleft()
            self._inflight.append((key, self._pool.submit(self._load, idx)))

    def get(self, key: Hashable) -> torch.Tensor:
        """The chunk ``key``, which must be the next one in consumption order."""
        if self._inflight:
            k, fut = self._inflight.popleft()
            if k != key:
                raise RuntimeError(f"prefetch order broken: expected chunk {k}, asked for {key}")
            self._top_up()
            return fut.result()
        k, idx = self._queued.popleft()
        if k != key:
            raise RuntimeError(f"prefetch order broken: expected chunk {k}, asked for {key}")
        self._top_up()
        return self._load(idx)

    def clear(self) -> None:
        """Forget scheduled chunks (e.g. after a checkpoint is loaded); waits for running loads."""
        for _, fut in self._inflight:
            fut.cancel()
        for _, fut in self._inflight:
            if not fut.cancelled():
                try:
                    fut.result()
                except Exception:  # noqa: BLE001 - the chunk is being dropped anyway
                    pass
        self._inflight.clear()
        self._queued.clear()

    def close(self) -> None:
        self.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
