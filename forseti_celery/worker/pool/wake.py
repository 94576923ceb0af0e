"""The watcher's wake-up: a pipe any thread writes to, to have the watcher thread run a round now."""

from __future__ import annotations

import os

__all__ = ["Waker"]


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
        try:
            while os.read(self.r, 4096):
                pass
        except BlockingIOError:
            pass
