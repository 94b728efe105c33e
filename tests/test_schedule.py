import math

import pytest

from alr_fast.schedule import learning_rate


def test_default_schedule_values_of_spec_b92():
    lr = [learning_rate(e) for e in range(200)]
    assert lr[0] == pytest.approx(2e-6)
    assert lr[1] == pytest.approx(2e-6 + (2e-4 - 2e-6) / 9)
    assert lr[9] == pytest.approx(2e-4)
    assert all(v == pytest.approx(2e-4) for v in lr[10:40])
    assert all(v == pytest.approx(2e-5) for v in lr[40:70])
    assert all(v == pytest.approx(2e-6) for v in lr[70:])


def test_other_modes_and_floor():
    assert learning_rate(5, mode="constant", start=1e-3, end=1e-3) == 1e-3
    assert learning_rate(0, mode="linear", start=1e-3, end=1e-5, epoch_num=11) == pytest.approx(1e-3)
    assert learning_rate(10, mode="linear", start=1e-3, end=1e-5, epoch_num=11) == pytest.approx(1e-5)
    c = learning_rate(5, mode="cosine", start=1e-3, end=1e-5, epoch_num=11)
    assert c == pytest.approx((1e-3 - 1e-5) / 2 * math.cos(math.pi * 0.5) + (1e-3 + 1e-5) / 2)
    assert learning_rate(20, mode="warmup", start=1e-5, end=1e-3, warmup_epochs=10) == 1e-3
    assert learning_rate(50, mode="linear", start=1e-3, end=0.0, epoch_num=11) == 2e-6  # floored
    with pytest.raises(ValueError, match="lr_start == lr_end"):
        learning_rate(0, mode="constant", start=1e-3, end=1e-4)
    with pytest.raises(ValueError, match="unknown lr_mode"):
        learning_rate(0, mode="step")


def test_drop_factor_zero_is_derived():
    # exp(steady/(epoch_num - 2 warmup) * ln(base/lower)) = exp(30/180 * ln 100)
    factor = math.exp(30 / 180 * math.log(100))
    assert learning_rate(45, drop_factor=0) == pytest.approx(2e-4 / factor)


def test_warmup_takes_the_minimum_with_end_as_the_seed():
    """The seed's warmup mode is min(linear ramp, end) at every epoch (not 'ramp, then end'): with
    start > end it is end while the ramp lies above it, then follows the ramp below it to the floor."""
    kw = dict(mode="warmup", start=1e-3, end=1e-4, warmup_epochs=10, lower_bound=2e-6)
    assert learning_rate(0, **kw) == 1e-4
    assert learning_rate(9, **kw) == pytest.approx(1e-4)
    assert learning_rate(10, **kw) == 2e-6  # ramp at 0, floored; the ramp does not stop at warmup_epochs
    ramp = [1e-3 + (1e-4 - 1e-3) * e / 9 for e in range(12)]
    assert [learning_rate(e, **kw) for e in range(12)] == [max(min(r, 1e-4), 2e-6) for r in ramp]
    # start < end: the usual warm-up, held at end afterwards
    up = dict(mode="warmup", start=1e-5, end=1e-3, warmup_epochs=5)
    assert [learning_rate(e, **up) for e in (0, 2, 4, 7)] == pytest.approx([1e-5, 1e-5 + 2 * (1e-3 - 1e-5) / 4, 1e-3, 1e-3])
