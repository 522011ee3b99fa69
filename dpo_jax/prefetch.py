"""Host-to-device prefetch: the next batches are built and copied while the device computes.

A background thread takes batches from the training iterator, prepares them (host work
such as counting real tokens, then the asynchronous device placement) and queues up to
`depth` of them. Each item carries the iterator position *after* its own batch, which is
what a checkpoint taken after that step must save: the thread is always ahead of the loop.
With depth 0 everything happens in the caller's thread, in the same order.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

_DONE = object()


class Prefetcher:
    """Iterates (prepared batch, iterator position after it), `depth` batches ahead."""

    def __init__(self, iterator: Iterator, prepare: Callable[[dict], Any], depth: int = 2):
        self.iterator, self.prepare, self.depth = iterator, prepare, depth
        self._stop = threading.Event()
        self._thread = None
        if depth > 0:
            self._queue: queue.Queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._fill, name="prefetch", daemon=True)
            self._thread.start()

    def _produce(self):
        batch = next(self.iterator)
        return self.prepare(batch), self.iterator.state()

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                self._put(self._produce())
        except BaseException as error:  # re-raised in the consumer's thread
            self._put(error)
        else:
            self._put(_DONE)

    def _put(self, item) -> None:
        """Waits for room in the queue, giving up once close() was called."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self):
        return self

    def __next__(self):
        if self._thread is None:
            return self._produce()
        item = self._queue.get()
        if item is _DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stops the thread (batches it prepared beyond the last one taken are dropped)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
