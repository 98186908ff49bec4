"""Peak memory of a calibration run on its device, and of the host process.

`DevicePeak` measures what a block of code holds on the device beyond what was there when it started:
- on CUDA: `torch.cuda.max_memory_allocated` minus the allocation at entry (the caching allocator's own
  count of live tensor bytes; with the model on the host this is one block plus its activations,
  statistics and solver temporaries);
- on the CPU, where the device *is* the host and the model's own weights are already resident: the peak
  total size of the tensor storages allocated inside the block and alive at the same time, followed
  through a TorchDispatchMode (every op's outputs whose storage is not one of its inputs' is a new
  allocation; a storage counts until it is freed, through a weak reference to it). Blocks "moved" to
  the CPU are not copied and so not counted; everything the pipeline itself allocates is.
The CPU tracker slows every op down: use it for tests and counted runs, not for timed ones.
"""

from __future__ import annotations

import resource
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def host_peak_mb() -> float:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def host_current_mb() -> float:
    """Resident set size of this process now."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


class _LiveStorages(TorchDispatchMode):
    """Follows the storages allocated by ops under this mode on one device type; tracks their peak total."""

    def __init__(self, device_type: str) -> None:
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self._weak = StorageWeakRef
        self.device_type = device_type
        self.live: dict[int, tuple[object, int]] = {}  # data_ptr -> (weak ref, nbytes)
        self.current = 0
        self.peak = 0

    def _prune(self) -> None:
        for key, (ref, nbytes) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != self.device_type:
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in inputs or storage.nbytes() == 0:
                continue
            self._prune()  # the total only grows at an allocation: pruning here keeps the peak exact
            if key in self.live:  # an address reused after a free the pruning has now seen
                continue
            self.live[key] = (self._weak(storage), storage.nbytes())
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        return out


class DevicePeak:
    """Context manager: `peak_bytes` held on `device` above the level at entry (see the module doc)."""

    def __init__(self, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.peak_bytes: int = 0
        self.method = ("torch.cuda.max_memory_allocated" if self.device.type == "cuda"
                       else "peak of tensor storages allocated and alive at once (dispatch-mode tracker)")
        self._mode: Optional[_LiveStorages] = None
        self._base = 0

    def __enter__(self) -> "DevicePeak":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._mode = _LiveStorages(self.device.type)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._mode.__exit__(*exc)
            self.peak_bytes = self._mode.peak
