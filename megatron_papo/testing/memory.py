"""Live-memory measurement for tests and benchmarks (Linux, glibc)."""

from __future__ import annotations

import ctypes
import gc
import threading

from megatron_papo.train.metrics import mallinfo2


class PeakLive:
    """Peak of the bytes malloc has handed out and not taken back (glibc ``mallinfo2``: arena
    bytes in use + mmapped bytes), above the level at entry. Unlike the resident set it does not
    count freed memory the allocator keeps. Sampled whenever :meth:`sample` is called (the test
    calls it at every tensor the push yields) and by a background thread every 0.2 ms (tensor
    copies and collectives release the GIL, so transient peaks inside a step are seen too)."""

    def __init__(self):
        self._libc = ctypes.CDLL("libc.so.6")

    def live(self) -> int:
        info = mallinfo2(self._libc)
        return info.uordblks + info.hblkhd

    def sample(self) -> None:
        self.top = max(self.top, self.live())

    def __enter__(self):
        gc.collect()
        self.base = self.top = self.live()
        self._stop = threading.Event()

        def run():
            while not self._stop.wait(0.0002):
                self.sample()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()
        self.peak = self.top - self.base
