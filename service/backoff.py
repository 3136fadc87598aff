"""How a background loop waits out an outage (Redis down, a store that does not answer): exponential waits that a
stop event cuts short, back to the first after a success."""

from __future__ import annotations

import threading

__all__ = ["Backoff"]


class Backoff:
    """Waits of `first` seconds, doubled after each failure up to `most`; `reset` after a success."""

    def __init__(self, first: float = 0.5, most: float = 10.0) -> None:
        self.first = first
        self.most = most
        self.delay = first

    def reset(self) -> None:
        self.delay = self.first

    def wait(self, stop: threading.Event) -> None:
        """Sleep the current delay (or until `stop` is set), then double it."""
        stop.wait(self.delay)
        self.delay = min(self.delay * 2, self.most)
