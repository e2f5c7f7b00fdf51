"""Overlap the eval's data path (file decoding, resizing) with the compiled detector.

`experiments.eval` decodes and resizes each test batch on the host, then runs
the jitted feature extractor on it. Done in turn, the device waits for the
decoder and the decoder for the device; `prefetch` runs the producer in a
background thread (PIL and numpy release the GIL while decoding), so the next
batch is decoded while the current one is on the device. BENCHMARKS.md
("The eval's own throughput") gives the measured gain.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_DONE = object()


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yields `items` in order, producing up to `depth` of them ahead in a thread.

    An exception raised by the producer is re-raised here, at the item where
    it happened. Stopping early (closing the generator) lets the thread
    finish its current item and exit.

    Args:
      items: any iterable (e.g. `data.test_batches(n)`).
      depth: how many items may wait, decoded, at once (>= 1).

    Raises:
      ValueError: `depth < 1`.
    """
    if depth < 1:
        raise ValueError(f"prefetch depth must be >= 1, got {depth}.")
    slots: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            put((None, err))
            return
        put((_DONE, None))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, err = slots.get()
            if err is not None:
                raise err
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        thread.join()
