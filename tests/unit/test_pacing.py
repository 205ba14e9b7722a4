"""Send pacing (``--max-send-rate``): the rate's units and the virtual link, on a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from gossip.config import ConfigError, GossipConfig, NodeConfig, SimulateConfig, chunk_bytes_for
from gossip.core.addresses import parse_rate
from gossip.transport.channels import DEADLINE_BYTES_PER_S, transfer_timeout
from gossip.transport.pacing import SendPacer


@pytest.mark.parametrize(
    ("spec", "bytes_per_s"),
    [
        ("50mbit", 6.25e6),
        ("1gbit", 125e6),
        ("800kbit", 1e5),
        ("8bit", 1.0),
        ("5mbps", 5e6),
        (" 2.5MBIT ", 312_500.0),
        ("1e3kbps", 1e6),
    ],
)
def test_rates_take_tc_units(spec: str, bytes_per_s: float) -> None:
    assert parse_rate(spec) == pytest.approx(bytes_per_s)


@pytest.mark.parametrize("spec", ["50", "mbit", "fast", "-5mbit", "0gbit", "nanmbit", "infkbit", "5 m bit"])
def test_anything_else_is_refused_with_the_units(spec: str) -> None:
    with pytest.raises(ConfigError, match="rate"):
        parse_rate(spec)


def test_configs_check_the_rate() -> None:
    assert NodeConfig().send_rate is None
    assert NodeConfig(max_send_rate="16mbit").send_rate == 2e6
    with pytest.raises(ConfigError, match="not a number with a unit"):
        NodeConfig(max_send_rate="16").validate()
    with pytest.raises(ConfigError):
        SimulateConfig(max_send_rate="quick").validate()


def test_without_a_send_limit_chunks_are_4_mib_and_a_set_size_is_kept() -> None:
    assert chunk_bytes_for(0, None) == 4 << 20
    assert chunk_bytes_for(0, parse_rate("50mbit")) == 1 << 20
    assert chunk_bytes_for(0, parse_rate("100mbit")) == 2 << 20
    assert chunk_bytes_for(0, parse_rate("1gbit")) == 4 << 20
    assert chunk_bytes_for(0, parse_rate("1mbit")) == 64 << 10
    assert chunk_bytes_for(8192, parse_rate("1gbit")) == 8192
    with pytest.raises(ConfigError, match="0 \\(auto\\) or between"):
        GossipConfig(chunk_bytes=100).validate()


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_frames_leave_at_the_rate_and_the_first_goes_at_once() -> None:
    clock = FakeClock()
    pacer = SendPacer(1000.0, clock=clock, sleep=clock.sleep)
    starts: list[float] = []

    async def send(sizes: list[int]) -> None:
        for n in sizes:
            await pacer.take(n)
            starts.append(clock.now)

    asyncio.run(send([500, 500, 1000, 250]))

    # Each frame starts when the ones before it would have crossed a 1000 B/s link.
    assert starts == [100.0, 100.5, 101.0, 102.0]
    assert pacer.sent == 2250 and pacer.waited == pytest.approx(2.0)


def test_an_idle_link_does_not_bank_a_burst() -> None:
    clock = FakeClock()
    pacer = SendPacer(1000.0, clock=clock, sleep=clock.sleep)

    async def main() -> None:
        await pacer.take(100)
        clock.now += 60.0  # a minute of silence
        await pacer.take(1000)
        await pacer.take(1000)

    asyncio.run(main())
    # After the silence one frame goes at once, the next waits its full second: no credit saved up.
    assert clock.sleeps == [pytest.approx(1.0)]


def test_concurrent_senders_share_one_link() -> None:
    clock = FakeClock()
    pacer = SendPacer(1000.0, clock=clock, sleep=clock.sleep)
    done: list[float] = []

    async def sender(n: int) -> None:
        for _ in range(n):
            await pacer.take(100)
        done.append(clock.now)

    async def main() -> None:
        await asyncio.gather(sender(10), sender(10))

    asyncio.run(main())
    # 20 frames of 100 B at 1000 B/s: the last one starts 1.9 s after the first, whoever sends it.
    assert max(done) == pytest.approx(101.9)


def test_a_paced_deadline_stretches_to_the_rate() -> None:
    assert transfer_timeout(5.0, 20_000_000) == 5.0 + 2.0  # the 20 MB/s floor
    assert transfer_timeout(5.0, 20_000_000, floor=2e6) == 5.0 + 20.0  # a 16 Mbit/s sender
    assert transfer_timeout(5.0, 20_000_000, floor=1e9) == 5.0 + 2 * 20_000_000 / DEADLINE_BYTES_PER_S
    with pytest.raises(ValueError):
        SendPacer(0.0)
