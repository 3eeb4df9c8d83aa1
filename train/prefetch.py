"""Draw training batches in a background thread while the device runs the previous step.

The generated sources (the demo's clips, the synthetic stand-in) are drawn on the host in NumPy,
one clip at a time; drawn in the loop's thread they serialise with the device step (on an H100
the demo model's step waited ~60 ms per batch of 48 for its clips). A thread suffices: the
loop's thread spends the step blocked on the device, with the GIL released.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

_DONE = object()


class Prefetch:
    """Iterates `(batch, state)` pairs of `source`, drawn up to `depth` batches ahead.

    `state` is `source.state()` right after its batch was drawn, so a checkpoint that stores the
    state of the last batch the loop consumed resumes at the next one, however far ahead the
    thread is. An exception in the thread is raised by the `next()` that would have returned
    its batch. `close()` (or leaving a `with` block) stops the thread.
    """

    def __init__(self, source: Any, depth: int = 2):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._fill, args=(iter(source), source), name="prefetch", daemon=True
        )
        self._thread.start()

    def _put(self, item) -> bool:
        """Puts `item`, giving up when closed; True when it was put."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, batches: Iterator, source: Any) -> None:
        try:
            for batch in batches:
                if not self._put((batch, source.state())):
                    return
        except BaseException as error:  # handed to the consumer, raised there
            self._put(error)
            return
        self._put(_DONE)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[Any, dict]:
        item = self._queue.get()
        if item is _DONE:
            self._queue.put(_DONE)  # every later next() stops too
            raise StopIteration
        if isinstance(item, BaseException):
            self._queue.put(item)
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
