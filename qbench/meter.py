"""Wall time and matmul FLOPs per phase of a calibration run (forward passes, statistics, solves).

The pipelines wrap their phases in `meter.phase(name)`; the default `NULL_METER` does nothing, so a
normal run pays one no-op context per batch. The benchmark passes a `Meter`: with `count_flops`, each
phase runs under its own torch FlopCounterMode (which slows it down: time and FLOPs come from separate
runs), and on CUDA every phase boundary synchronizes so that its time is the device's.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Iterator, Optional

import torch


class Meter:
    """Accumulates seconds (and FLOPs when counting) by phase name."""

    def __init__(self, count_flops: bool = False, device: Optional[torch.device] = None) -> None:
        self.count_flops = count_flops
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.flops: dict[str, int] = defaultdict(int)

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        if self.count_flops:
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
            try:
                with counter:
                    yield
            finally:
                self.flops[name] += counter.get_total_flops()
        else:
            yield
        self._sync()
        self.seconds[name] += time.perf_counter() - start


class _NullMeter:
    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        yield


NULL_METER = _NullMeter()
