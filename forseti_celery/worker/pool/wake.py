"""The watcher's wake-up: a pipe any thread writes to, to have the watcher thread run a round now."""

from __future__ import annotations

import os

__all__ = ["Waker"]

_PIPE = 65536  # what a pipe holds by default (Linux); more left would be read with the next round


class Waker:
    """A pipe any thread writes to, to have the watcher run a round now."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)

    def __call__(self) -> None:
        try:
            os.write(self.w, b"x")
        except BlockingIOError:
            pass

    def drain(self) -> None:
        """Empty the pipe: one read takes all a pipe holds (64 KiB), no second read to find it empty."""
        try:
            os.read(self.r, _PIPE)
        except BlockingIOError:
            pass
