"""LoopLag and ConnectWatch: the router's own stalls are not blamed on a replica.

These tests stall the event loop on purpose (a blocking sleep), which is the thing
being measured.
"""

from __future__ import annotations

import asyncio
import time

from router.observability.loop_lag import LoopLag
from router.transport.attempts import ConnectWatch


async def test_loop_lag_sees_a_stall_and_forgets_it() -> None:
    lag = LoopLag(interval=0.01)
    lag.start()
    try:
        await asyncio.sleep(0.05)
        started = time.monotonic()
        assert not lag.stalled_since(started, 0.1)
        time.sleep(0.3)  # the stall
        assert lag.current() >= 0.25  # seen while it is still going on
        await asyncio.sleep(0.05)
        assert lag.stalled_since(started, 0.2) and lag.recent_max() >= 0.25
        assert not lag.stalled_since(time.monotonic(), 0.2)  # nothing since
        assert len(lag._samples) <= lag._samples.maxlen
    finally:
        await lag.stop()
    assert lag.current() == 0.0


async def test_connect_watch_waits_out_a_stall_then_fires() -> None:
    lag = LoopLag(interval=0.01)
    lag.start()
    try:
        await asyncio.sleep(0.03)
        async with asyncio.timeout(None) as timeout:
            watch = ConnectWatch(0.2, lag)
            watch.timeout = timeout
            started = time.monotonic()
            watch.connecting()
            time.sleep(0.4)  # the loop stalls past the limit: no verdict on the replica
            await asyncio.sleep(0.05)
            assert not watch.expired
            await asyncio.sleep(2)
        raise AssertionError("the watch never fired")
    except TimeoutError:
        elapsed = time.monotonic() - started
        assert watch.expired
        assert 0.55 <= elapsed < 1.5  # the stall, then one more quiet limit
    finally:
        await lag.stop()


async def test_connect_watch_without_stall_fires_at_the_limit_and_cancel_stops_it() -> None:
    lag = LoopLag(interval=0.01)
    lag.start()
    try:
        watch = ConnectWatch(0.1, lag)
        watch.connecting()
        watch.cancel()
        await asyncio.sleep(0.2)
        assert not watch.expired
        started = time.monotonic()
        with_timeout = ConnectWatch(0.1, lag)
        try:
            async with asyncio.timeout(None) as timeout:
                with_timeout.timeout = timeout
                with_timeout.connecting()
                await asyncio.sleep(2)
        except TimeoutError:
            pass
        assert with_timeout.expired and time.monotonic() - started < 0.5
    finally:
        await lag.stop()
