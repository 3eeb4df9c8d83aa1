import itertools

import numpy as np
import pytest

from fpsa_jax.demo.task import DemoSource
from train.prefetch import Prefetch


def test_prefetched_batches_and_states_match_drawing_in_order():
    direct = DemoSource(3, seed=5)
    expected = [(next(direct), direct.state()) for _ in range(6)]
    with Prefetch(DemoSource(3, seed=5), depth=2) as batches:
        got = list(itertools.islice(batches, 6))
    for (b, s), (eb, es) in zip(got, expected, strict=True):
        np.testing.assert_array_equal(b.latents, eb.latents)
        assert b.captions == eb.captions
        assert s == es


def test_state_of_a_consumed_batch_resumes_at_the_next_batch():
    with Prefetch(DemoSource(2, seed=1), depth=3) as batches:
        _, state = next(batches)
        third_consumed = next(batches)[0]
    resumed = DemoSource(2, seed=1, state=state)
    np.testing.assert_array_equal(next(resumed).latents, third_consumed.latents)


class _Failing:
    def __init__(self):
        self.n = 0

    def __iter__(self):
        return self

    def __next__(self):
        self.n += 1
        if self.n == 3:
            raise RuntimeError("clip 3 is broken")
        return self.n

    def state(self):
        return {"n": self.n}


def test_an_error_in_the_source_is_raised_by_the_consumer_after_the_good_batches():
    with Prefetch(_Failing()) as batches:
        assert [next(batches)[0] for _ in range(2)] == [1, 2]
        with pytest.raises(RuntimeError, match="clip 3 is broken"):
            next(batches)
        with pytest.raises(RuntimeError, match="clip 3 is broken"):
            next(batches)


def test_a_finite_source_stops_and_close_ends_the_thread():
    class Finite(_Failing):
        def __next__(self):
            self.n += 1
            if self.n > 2:
                raise StopIteration
            return self.n

    batches = Prefetch(Finite())
    assert [b for b, _ in batches] == [1, 2]
    batches.close()
    assert not batches._thread.is_alive()


def test_close_stops_a_thread_blocked_on_a_full_queue():
    batches = Prefetch(_Endless(), depth=1)
    next(batches)
    batches.close()
    assert not batches._thread.is_alive()


class _Endless:
    def __iter__(self):
        return itertools.count()

    def state(self):
        return {}


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth"):
        Prefetch(_Endless(), depth=0)
