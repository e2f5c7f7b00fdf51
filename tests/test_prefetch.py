import threading
import time

import pytest

from protorefine_jax.app.prefetch import prefetch


def test_yields_every_item_in_order():
    assert list(prefetch(iter(range(50)), depth=3)) == list(range(50))


def test_producer_runs_ahead_of_the_consumer():
    produced = []

    def items():
        for i in range(4):
            produced.append(i)
            yield i

    gen = prefetch(items(), depth=2)
    assert next(gen) == 0
    deadline = time.time() + 5
    while len(produced) < 3 and time.time() < deadline:
        time.sleep(0.01)
    assert len(produced) >= 3  # items 1 and 2 decoded while 0 is in use
    assert list(gen) == [1, 2, 3]


def test_producer_error_reaches_the_consumer_at_its_item():
    def items():
        yield 1
        raise OSError("broken file x.png")

    gen = prefetch(items())
    assert next(gen) == 1
    with pytest.raises(OSError, match="broken file x.png"):
        next(gen)


def test_closing_early_stops_the_thread():
    gen = prefetch(iter(range(1000)), depth=1)
    assert next(gen) == 0
    gen.close()
    assert not any(t.name == "prefetch" for t in threading.enumerate())


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="prefetch depth must be >= 1"):
        next(prefetch([1], depth=0))
