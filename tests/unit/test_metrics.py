import numpy as np
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from pipeline.metrics import observe_many

BUCKETS = (0.001, 0.01, 0.1, 1.0)


def _pair():
    one, many = CollectorRegistry(), CollectorRegistry()
    return (Histogram("t_seconds", "t", buckets=BUCKETS, registry=one), one,
            Histogram("t_seconds", "t", buckets=BUCKETS, registry=many), many)


def _series(registry):
    lines = generate_latest(registry).decode().splitlines()
    return [line for line in lines if line.startswith("t_seconds") and "_created" not in line]


def test_observe_many_exports_what_observe_would_bucket_by_bucket():
    rng = np.random.default_rng(0)
    # values on the bounds (an amount equal to a bound counts in that bucket), around them, past the last
    values = np.concatenate([np.array(BUCKETS), np.array(BUCKETS) * 1.0001, [0.0, 5.0, 30.0], rng.exponential(0.05, 500)])
    a, ra, b, rb = _pair()
    for v in values:
        a.observe(float(v))
    observe_many(b, values)
    sa, sb = _series(ra), _series(rb)
    buckets_a = [line for line in sa if "_bucket" in line or "_count" in line]
    assert buckets_a == [line for line in sb if "_bucket" in line or "_count" in line]
    for bound in BUCKETS:  # cumulative: every value at or below the bound (0.001 itself in le="0.001")
        assert f't_seconds_bucket{{le="{bound}"}} {float((values <= bound).sum())}' in sb
    assert 't_seconds_count 511.0' in sb
    sum_a = float(next(line for line in sa if line.startswith("t_seconds_sum")).split()[-1])
    sum_b = float(next(line for line in sb if line.startswith("t_seconds_sum")).split()[-1])
    assert abs(sum_a - sum_b) < 1e-9 * max(1.0, sum_a)


def test_observe_many_of_nothing_leaves_the_histogram_empty():
    _, _, b, rb = _pair()
    observe_many(b, np.array([]))
    assert 't_seconds_count 0.0' in _series(rb)


def test_observe_many_falls_back_to_observe_on_a_histogram_without_the_fields_it_reads():
    class Plain:  # what a prometheus-client without `_upper_bounds` / `_buckets` / `_sum` would offer
        def __init__(self):
            self.seen = []

        def observe(self, amount):
            self.seen.append(amount)

    plain = Plain()
    observe_many(plain, np.array([0.5, 0.002]))
    assert plain.seen == [0.5, 0.002]
