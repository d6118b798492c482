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


class _Cap:
    """A capture source that only counts: what ``Agent`` asks of one at its loss checks
    and its close."""

    def __init__(self) -> None:
        self.counts = {"capture_sent": 10, "capture_lost": 0}

    def stats(self) -> dict[str, int]:
        return dict(self.counts)

    def flush(self, _pending: list[object]) -> None:
        pass

    def close(self) -> None:
        pass


class _Ship:
    def __init__(self) -> None:
        self.put_lost: list[dict[str, int]] = []
        self.obs: list[int] = []

    def put(self, obs: list[object], _clock: object, lost: dict[str, int], _raw: object = None,
            _n: int = 0) -> None:
        self.obs.append(len(obs))
        self.put_lost.append(dict(lost))

    def close(self) -> None:
        pass


def test_losses_reach_the_collector_without_observations_to_carry_them() -> None:
    """A loss counted after the last batch of observations is shipped on its own, at the
    loss check and at the stop: the collector's figure is the agent's."""
    from hopscope.agent.run import Agent, AgentConfig

    agent = Agent(AgentConfig(node="node1"))
    cap, ship = _Cap(), _Ship()
    agent.cap, agent.ship = cap, ship  # type: ignore[assignment]
    agent._ship_losses(agent._lost_recent(fresh=True))
    assert ship.put_lost == [{"capture_lost": 0, "decode_errors": 0}] and ship.obs == [0]
    agent._ship_losses(agent._lost_recent(fresh=True))  # nothing new: nothing sent
    assert len(ship.put_lost) == 1
    cap.counts["capture_lost"] = 5  # a burst the ring had no room for, then silence
    agent._ship_losses(agent._lost_recent(fresh=True))
    assert ship.put_lost[-1]["capture_lost"] == 5
    cap.counts["capture_lost"] = 7  # lost after the last check: the stop ships it
    agent.close()
    assert ship.put_lost[-1]["capture_lost"] == 7 and ship.obs[-1] == 0
    assert agent.final_stats["capture_lost"] == 7
