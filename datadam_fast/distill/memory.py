"""Memory measurement and the per-iteration memory planner.

The distillation step holds three kinds of memory:

* **fixed**: everything that exists whatever the chunking: the process itself (interpreter,
  libraries, the dataset's in-memory part), the synthetic images of this rank, their gradient
  and SGD momentum, the class-mean targets;
* **real phase**: a chunk of real images going through the network under ``no_grad`` (the
  input, DSA output, the live activations and the tapped maps of that chunk);
* **synthetic phase**: a chunk of synthetic images with its whole autograd graph (forward
  activations saved for backward, then the backward's temporaries).

The two phases run one after the other, so the peak is ``fixed + max(real, synthetic)``. The
per-image cost of each phase is *measured* by a probe (the same code path as the step, on random
data, at two batch sizes, so that per-call constants cancel out) rather than derived from layer
shapes: it then includes the norm layers' temporaries, DSA, the fused loss and whatever the
convolution library allocates.

Peak memory is process-wide: on CPU it is the resident set (``VmHWM``, which Linux lets a
process reset through ``/proc/self/clear_refs``), on a GPU the CUDA allocator's peak.
"""
from __future__ import annotations

import gc
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import UserError

MB = 2 ** 20
GB = 2 ** 30

# What the default budget may use of what is free: the rest is left to the OS page cache, other
# processes and the allocator's fragmentation.
DEFAULT_CPU_SHARE = 0.8
DEFAULT_GPU_SHARE = 0.9
# Headroom kept below the budget for what the probe cannot see (allocator rounding, a checkpoint
# being serialised, the progress bar, ...): a share of the budget plus a constant.
HEADROOM_SHARE = 0.08
HEADROOM_BYTES = 128 * MB


# ----------------------------------------------------------------------------- measurement
def _proc_status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Current resident set size of this process (bytes)."""
    kb = _proc_status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    import resource  # pragma: no cover - non-Linux fallback: the peak is the best we have
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Process peak memory on ``device``, with a resettable window.

    CPU: ``VmHWM``. Resetting it (``clear_refs``) also resets what ``getrusage`` reports, so the
    peak seen before every reset is remembered and :meth:`process_peak` reports the true maximum
    over the process's life.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._peak_before_resets = 0
        self.can_reset = self._probe_reset()

    def _probe_reset(self) -> bool:
        if self.device.type == "cuda":
            return True
        return os.path.exists("/proc/self/clear_refs") and _proc_status_kb("VmHWM") is not None

    def current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return rss_bytes()

    def window_peak(self) -> int:
        """Peak since the last :meth:`reset` (since the start without one)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        kb = _proc_status_kb("VmHWM")
        return kb * 1024 if kb is not None else rss_bytes()

    def process_peak(self) -> int:
        return max(self._peak_before_resets, self.window_peak())

    def reset(self) -> None:
        self._peak_before_resets = self.process_peak()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # 5 = reset the peak RSS (Linux >= 4.0)
        except OSError:
            self.can_reset = False

    def measure(self, fn: Callable[[], None]) -> Tuple[int, int]:
        """Peak bytes above the current level while ``fn`` runs, seen two ways: the growth of
        the process peak, and the peak of the tensor storages ``fn`` creates."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        base = self.current()
        self.reset()
        with TensorBytesTracker(self.device) as tracked:
            fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return max(self.window_peak() - base, 0), tracked.peak


class TensorBytesTracker:
    """Peak bytes of live tensor storages created while active (a ``TorchDispatchMode``).

    Unlike the resident set, this does not depend on what the allocator kept from earlier work
    (glibc reuses freed heap memory without a new page fault, so a probe can see no RSS growth
    at all). Storages are tracked by weak reference and swept before each op; memory private to
    a kernel (convolution workspaces) is not seen, which is what the RSS probe and the headroom
    cover.
    """

    def __init__(self, device: torch.device):
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves
        dev_type = torch.device(device).type
        tracker = self
        self.current = 0
        self.peak = 0
        self._live: Dict[int, tuple] = {}

        def sweep():
            dead = [k for k, (ref, _) in tracker._live.items() if ref.expired()]
            for k in dead:
                tracker.current -= tracker._live.pop(k)[1]

        def track(t):
            if not isinstance(t, torch.Tensor) or t.device.type != dev_type:
                return
            st = t.untyped_storage()
            key = st.data_ptr()
            if not key or key in tracker._live:
                return
            n = st.nbytes()
            tracker._live[key] = (StorageWeakRef(st), n)
            tracker.current += n
            tracker.peak = max(tracker.peak, tracker.current)

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                sweep()
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    track(t)
                return out

        self._mode = _Mode()

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def linear_fit(sizes: Sequence[int], peaks: Sequence[Tuple[int, int]], floor: float) -> Tuple[float, float]:
    """Per-image slope and per-call intercept of measured peaks at two batch sizes.

    Each way of measuring (process peak, tensor bytes) is fitted on its own and the larger
    slope and intercept are kept: the resident set can miss memory the heap had kept from earlier
    work, tensor tracking misses kernel workspaces, and a plan must cover both. ``floor``: the
    least a per-image cost can be (the image itself)."""
    (n1, n2) = sizes
    slope, base = float(floor), 0.0
    for way in range(2):
        p1, p2 = peaks[0][way], peaks[1][way]
        s = max((p2 - p1) / (n2 - n1), 0.0)
        slope = max(slope, s)
        base = max(base, p1 - s * n1)
    return slope, base


def available_bytes(device: torch.device) -> int:
    """Memory this process could still take: free device memory on a GPU; on CPU the kernel's
    ``MemAvailable``, capped by a cgroup limit when one is set."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:  # pragma: no cover - non-Linux
        avail = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                raw = f.read().strip()
            if raw.isdigit() and int(raw) < 2 ** 60:
                avail = min(avail, int(raw) - rss_bytes())
        except OSError:
            continue
    return max(int(avail), 0)


def default_budget(device: torch.device, in_use: int) -> int:
    """A safe share of what is free, plus what this process already holds (the budget covers
    the whole process's peak)."""
    share = DEFAULT_GPU_SHARE if torch.device(device).type == "cuda" else DEFAULT_CPU_SHARE
    return int(in_use + share * available_bytes(device))


# ----------------------------------------------------------------------------- the plan
@dataclass
class MemoryPlan:
    """How one iteration is cut, and what it is predicted to cost (bytes)."""
    budget: int
    fixed: int
    real_per_image: int
    syn_per_image: int
    prefetch_per_image: int
    num_classes: int              # classes this process owns
    batch_real: int
    ipc: int
    real_chunk: int               # classes per real chunk
    syn_chunk: int                # classes per synthetic chunk
    lookahead: int                # real chunks loaded ahead by the prefetcher
    predicted_peak: int
    headroom: int
    notes: List[str] = field(default_factory=list)

    @property
    def real_chunks(self) -> int:
        return math.ceil(self.num_classes / self.real_chunk)

    @property
    def syn_chunks(self) -> int:
        return math.ceil(self.num_classes / self.syn_chunk)

    def as_dict(self) -> Dict:
        d = asdict(self)
        d.update(real_chunks=self.real_chunks, syn_chunks=self.syn_chunks)
        return d

    def summary(self) -> str:
        gb = lambda b: f"{b / GB:.2f} GB"  # noqa: E731
        return (f"memory plan: {self.num_classes} classes, {self.num_classes * self.batch_real} real + "
                f"{self.num_classes * self.ipc} synthetic images per iteration; real side in {self.real_chunks} "
                f"chunk(s) of {self.real_chunk} classes, synthetic side in {self.syn_chunks} chunk(s) of "
                f"{self.syn_chunk} classes; predicted peak {gb(self.predicted_peak)} of a {gb(self.budget)} budget "
                f"(fixed {gb(self.fixed)}, {self.real_per_image / MB:.2f} MB per real image, "
                f"{self.syn_per_image / MB:.2f} MB per synthetic image)")


def _phase_peak(classes: int, per_class_images: int, per_image: int, lookahead_imgs: int,
                prefetch_per_image: int) -> int:
    return classes * per_class_images * per_image + lookahead_imgs * prefetch_per_image


def plan_chunks(*, budget: int, fixed: int, real_per_image: int, syn_per_image: int, prefetch_per_image: int,
                num_classes: int, batch_real: int, ipc: int, lookahead: int = 1,
                real_chunk: Optional[int] = None, syn_chunk: Optional[int] = None,
                single_pass: Optional[str] = None) -> MemoryPlan:
    """Largest chunks (in classes) whose predicted peak fits ``budget``.

    ``real_chunk`` / ``syn_chunk`` fix a side's chunk instead of choosing it. ``single_pass``: a
    reason why the iteration may not be chunked (BatchNorm); the plan then is one chunk per side
    or an error. A budget that cannot hold one class is an error before any work starts.
    """
    K = int(num_classes)
    headroom = int(HEADROOM_SHARE * budget + HEADROOM_BYTES)
    room = budget - headroom - fixed

    def need(rc: int, sc: int) -> int:
        ahead = lookahead * rc * batch_real  # the next real chunk(s) being loaded meanwhile
        real = _phase_peak(rc, batch_real, real_per_image, ahead + rc * batch_real, prefetch_per_image)
        syn = _phase_peak(sc, ipc, syn_per_image, ahead, prefetch_per_image)
        return max(real, syn)

    def largest(fits: Callable[[int], bool]) -> int:
        lo, hi = 0, K  # largest c in [1, K] with fits(c); fits is monotone
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid - 1
        return lo

    gb = lambda b: f"{b / GB:.2f} GB"  # noqa: E731
    if single_pass:
        rc, sc = K, K
        if need(rc, sc) > room:
            raise UserError(
                f"memory budget {gb(budget)} is too small for this run, and it cannot be split into chunks: "
                f"{single_pass}. One pass needs about {gb(fixed + need(rc, sc) + headroom)} "
                f"(fixed {gb(fixed)}); raise the memory budget, lower the batch of real images or IPC, or use "
                f"instancenorm (the paper preset), which allows chunking")
    else:
        one = need(1, 1)
        if one > room:
            raise UserError(
                f"memory budget {gb(budget)} is too small for even one class per chunk: that needs about "
                f"{gb(fixed + one + headroom)} (fixed {gb(fixed)} for the process, the synthetic images, their "
                f"gradient and momentum; {gb(one)} for one class's {batch_real} real / {ipc} synthetic images; "
                f"{gb(headroom)} headroom); raise the memory budget or lower the real batch")
        rc = real_chunk or largest(lambda c: need(c, 1) <= room)
        sc = syn_chunk or largest(lambda c: need(rc, c) <= room)
        rc, sc = max(1, min(rc, K)), max(1, min(sc, K))
    peak = fixed + need(rc, sc)
    plan = MemoryPlan(budget=int(budget), fixed=int(fixed), real_per_image=int(real_per_image),
                      syn_per_image=int(syn_per_image), prefetch_per_image=int(prefetch_per_image),
                      num_classes=K, batch_real=int(batch_real), ipc=int(ipc), real_chunk=rc, syn_chunk=sc,
                      lookahead=int(lookahead), predicted_peak=int(peak), headroom=headroom)
    if peak + headroom > budget:
        plan.notes.append("fixed chunk sizes exceed the budget's prediction")
    return plan


def parse_budget(value: Optional[float], device: torch.device, in_use: int) -> int:
    if value is None:
        return default_budget(device, in_use)
    if not (value > 0):
        raise UserError(f"memory budget must be a positive number of GB, got {value}")
    return int(value * GB)
