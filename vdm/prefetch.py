"""Inputs of the next host calls, prepared while the device runs the current one.

``Prefetcher(produce, keys, depth)`` iterates ``(key, produce(key))`` over ``keys`` in
order. With ``depth > 0`` a background thread computes the items ahead into a queue of
at most ``depth`` of them (the ``flax.jax_utils.prefetch_to_device`` pattern with a
thread); with ``depth = 0`` each item is computed in the caller's thread when asked. The
training loop passes ``produce(first_step) = place(stack(get_batch(first_step + j) for j <
k))``: the k batches of one host call, stacked and put on the devices of the step
(``place``, e.g. ``jax.device_put`` onto the step's sharding), so the host-to-device copy
is made ahead too. The item of a key is ``produce(key)`` whatever the depth: the queue
changes when a batch is made, never which batch a step sees.

The thread is a daemon (it dies with its process, SIGKILL included) and ``close()`` stops
it and waits for it; an exception raised by ``produce`` is raised again by ``next`` in
the caller's thread.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterable

_END = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """Iterator of ``(key, produce(key))`` for ``keys`` in order, computed up to ``depth`` ahead."""

    def __init__(self, produce: Callable[[Any], Any], keys: Iterable, depth: int):
        if not isinstance(depth, int) or depth < 0:
            raise ValueError(f"prefetch depth must be an integer >= 0, got {depth!r}")
        self._produce, self._keys, self.depth = produce, iter(keys), depth
        self._stop, self._finished, self._thread = threading.Event(), False, None
        if depth:
            self._queue: queue.Queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._fill, name="vdm-prefetch", daemon=True)
            self._thread.start()

    def _fill(self) -> None:
        try:
            for key in self._keys:
                if not self._put((key, self._produce(key))):
                    return
            self._put(_END)
        except BaseException as e:  # handed to the consumer, raised there
            self._put(_Failure(e))

    def _put(self, item) -> bool:
        """Blocks until the queue has room or ``close`` is called (then returns False)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def __iter__(self):
        return self

    def __next__(self):
        if self._finished:
            raise StopIteration
        if self._thread is None:
            try:
                key = next(self._keys)
            except StopIteration:
                self._finished = True
                raise
            return key, self._produce(key)
        item = self._queue.get()
        if item is _END or isinstance(item, _Failure):
            self._finished = True
            if item is _END:
                raise StopIteration
            raise item.error
        return item

    def close(self) -> None:
        """Stops the thread (after the item it is making) and waits for it; idempotent."""
        self._finished = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
