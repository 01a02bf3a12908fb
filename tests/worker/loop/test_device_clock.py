"""The device clock: when the batches in flight will have left the device, from the per-step times of the batches
that ran to their end; pure logic, time passed in."""

import pytest

from worker.loop.device_clock import LEAD_FRACTION, LEAD_MIN_S, DeviceClock


def test_with_nothing_in_flight_or_no_estimate_a_batch_may_form_now():
    clock = DeviceClock()
    assert clock.formable_in_s(10.0) == 0.0
    clock.dispatched("a", "shape", steps=4, now_s=10.0)
    assert clock.formable_in_s(10.0) == 0.0  # no batch of its kind has ended yet


def test_the_next_batch_forms_a_lead_before_those_in_flight_leave():
    clock = DeviceClock()
    clock.dispatched("a", "shape", steps=4, now_s=0.0)
    clock.left("a", done_s=2.0, device_s=2.0)  # 0.5 s a step
    clock.dispatched("b", "shape", steps=4, now_s=2.0)
    clock.dispatched("c", "shape", steps=2, now_s=2.1)  # queued behind b: starts when b leaves, at 4.0
    lead_s = max(LEAD_MIN_S, LEAD_FRACTION * 1.0)
    assert clock.formable_in_s(2.1) == pytest.approx(5.0 - lead_s - 2.1)
    clock.left("b", done_s=4.2, device_s=2.2)  # a little late: 0.55 s a step
    step_s = 0.5 + 0.3 * (0.55 - 0.5)  # the average moves 30% of the way
    c_s = 2 * step_s  # c starts as b leaves, at 4.2
    assert clock.formable_in_s(4.2) == pytest.approx(4.2 + c_s - max(LEAD_MIN_S, LEAD_FRACTION * c_s) - 4.2)
    clock.left("c", done_s=5.3, device_s=1.1)
    assert clock.formable_in_s(5.3) == 0.0


def test_an_estimate_that_proved_short_lets_the_batch_form_at_once():
    clock = DeviceClock()
    clock.dispatched("a", "shape", steps=1, now_s=0.0)
    clock.left("a", done_s=1.0, device_s=1.0)
    clock.dispatched("b", "shape", steps=1, now_s=1.0)
    assert clock.formable_in_s(1.5) > 0 and clock.formable_in_s(3.0) == 0.0  # b overran its second: no waiting


def test_a_batch_cut_short_or_one_that_raised_teaches_nothing_and_is_forgotten():
    clock = DeviceClock()
    clock.dispatched("canceled", "shape", steps=10, now_s=0.0)
    clock.left("canceled", done_s=0.1, device_s=None)
    clock.dispatched("raised", "shape", steps=10, now_s=0.1)
    assert clock.formable_in_s(0.1) == 0.0  # still no estimate
    clock.forget("raised")
    clock.forget("raised")  # twice: harmless
    clock.dispatched("other kind", "other", steps=2, now_s=1.0)
    clock.left("other kind", done_s=2.0, device_s=1.0)
    assert clock.formable_in_s(2.0) == 0.0  # nothing in flight
