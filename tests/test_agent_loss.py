"""The agent's loss warnings: what was lost since the last one, at most every 10 s."""

from __future__ import annotations

from hopscope.agent.run import LossWatch


def test_losses_are_warned_about_once_per_period_with_what_is_new() -> None:
    w = LossWatch(every=10.0)
    assert w.update({"tc_lost": 0, "kernel_lost": 0, "decode_errors": 0}, 0.5) is None
    msg = w.update({"tc_lost": 6, "kernel_lost": 0, "decode_errors": 0}, 1.0)
    assert msg is not None and "event=lost tc 6 (total 6)" in msg
    w.late(0.3)
    w.late(0.05)
    assert w.update({"tc_lost": 7, "kernel_lost": 2, "decode_errors": 0}, 2.0) is None  # held
    msg = w.update({"tc_lost": 7, "kernel_lost": 2, "decode_errors": 0}, 11.5)
    assert msg is not None
    assert "kernel 2, tc 1 (total 9)" in msg and "up to 300 ms late" in msg
    assert w.update({"tc_lost": 7, "kernel_lost": 2, "decode_errors": 0}, 30.0) is None


def test_the_loop_drains_sooner_after_a_burst() -> None:
    """After a drain that took more than a quarter of the ring, the next comes after
    LOOP_BUSY_S, not LOOP_S (a burst gets a 10 ms loop's drain rate)."""
    from hopscope.agent.run import LOOP_BUSY_S, LOOP_S, next_tick_s

    ring = 4 << 20
    assert LOOP_BUSY_S < LOOP_S
    assert next_tick_s(0, ring) == LOOP_S
    assert next_tick_s(ring // 4, ring) == LOOP_S
    assert next_tick_s(ring // 4 + 8, ring) == LOOP_BUSY_S
    assert next_tick_s(ring, ring) == LOOP_BUSY_S
