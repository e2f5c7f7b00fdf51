"""Overlap the eval's data path (file decoding, resizing) with the compiled detector.

`experiments.eval` decodes and resizes each test batch on the host, then runs
the jitted feature extractor on it. Done in turn, the device waits for the
decoder and the decoder for the device; `prefetch` runs the producer in a
background thread (PIL and numpy release the GIL while decoding), so the next
batch is decoded while the current one is on the device. BENCHMARKS.md
("The eval's own throughput") gives the measured gain.

`ordered_map` spreads per-image work (decoding, encoding overlays) over a
few threads and hands the results back in input order, a bounded number
ahead; `Stages` records where a loop's time goes (`predict`'s profile,
`experiments.bench_predict`).
"""

from __future__ import annotations

import collections
import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

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


def ordered_map(
    fn: Callable[[T], R], items: Iterable[T], workers: int = 2, depth: int | None = None
) -> Iterator[R]:
    """`fn(item)` for each item, computed by `workers` threads, yielded in input order.

    At most `depth` (default `2 * workers`) calls are in flight or waiting;
    so memory holds a bounded number of results whatever the number of items.
    An exception raised by `fn` is re-raised here, at its item (later items
    are not yielded). `workers=0` runs `fn` in the caller's thread.

    Raises:
      ValueError: `workers < 0` or `depth < 1`.
    """
    if workers < 0:
        raise ValueError(f"ordered_map workers must be >= 0, got {workers}.")
    if workers == 0:
        yield from map(fn, items)
        return
    depth = 2 * workers if depth is None else depth
    if depth < 1:
        raise ValueError(f"ordered_map depth must be >= 1, got {depth}.")
    pool = ThreadPoolExecutor(workers, thread_name_prefix="ordered_map")
    pending: collections.deque = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)


class Stages:
    """Seconds spent per named stage (thread-safe): `with stages("decode"): ...`.

    `add(name, seconds, count)` records a measured span; `report()` gives
    `{name: {"seconds", "calls", "items"}}`. Stages measured in worker
    threads overlap with the main thread's, so their sum can exceed the wall
    time; the main thread's waits (e.g. `wait for images`) say what the
    workers cost the loop.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds: dict[str, float] = {}
        self._calls: dict[str, int] = {}
        self._items: dict[str, int] = {}

    def add(self, name: str, seconds: float, items: int = 1) -> None:
        """Adds a measured span of `seconds` that handled `items` items to stage `name`."""
        with self._lock:
            self._seconds[name] = self._seconds.get(name, 0.0) + seconds
            self._calls[name] = self._calls.get(name, 0) + 1
            self._items[name] = self._items.get(name, 0) + items

    @contextlib.contextmanager
    def __call__(self, name: str, items: int = 1) -> Iterator[None]:
        """Times the `with` block as a span of stage `name`."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0, items)

    def report(self) -> dict[str, dict[str, float]]:
        """`{stage: {"seconds", "calls", "items"}}` so far."""
        with self._lock:
            return {
                k: {"seconds": self._seconds[k], "calls": self._calls[k], "items": self._items[k]}
                for k in self._seconds
            }


class _NoStages(Stages):
    """A `Stages` that records nothing (the default: no profiling cost)."""

    def add(self, name: str, seconds: float, items: int = 1) -> None:
        pass

    @contextlib.contextmanager
    def __call__(self, name: str, items: int = 1) -> Iterator[None]:
        yield


NO_STAGES = _NoStages()
