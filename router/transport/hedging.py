"""Hedging: a second attempt raced against a slow first one.

With ``proxy.hedge`` on (off by default).  A replica that is alive but slow fails nothing,
so failover never leaves it; the latency outlier detection (router/transport/outliers.py) ejects it
only after some requests suffered.  With hedging on, a request whose first attempt has no
first byte (a stream's first chunk, a whole answer otherwise) after a delay derived from
that replica's expected time to first byte (``multiplier`` x the lesser of its own typical
time and its peers' for the request's shape, within [``min_delay``, ``max_delay``]; before
those are known, a stream's prefill time at the profile's learned rate, else ``max_delay``)
gets a second attempt on the best admissible replica not tried yet.  Whichever answers
first is relayed; the other is cancelled: its connection closed (vLLM aborts it), its hooks
see ABANDONED with ``attempt.superseded`` (its prefix record is forgotten; a first attempt's
elapsed time feeds the latency detector).  At most one hedge per
request, only for its first attempt, never once it has its first byte, never without another
admissible replica, each one a retry token of the budget and one of ``max_attempts``; and
only for ``hedge.paths`` (requests without side effects) and never for a hop of a
disaggregated request (a KV transfer has one reader).  Without hedging the request path runs
no task or timer of its own for it.

"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from aiohttp import web

from router.config import ProxyConfig
from router.core.scheduling import Decision, Profile
from router.fleet.replicas import Replica
from router.observability.access_log import RequestRecord
from router.transport.attempts import Attempts, PoolSlot
from router.transport.failures import UpstreamFailure
from router.transport.hooks import (
    ABANDONED,
    FAILURE,
    SUCCESS,
    Attempt,
    uncached_tokens,
)
from router.transport.outliers import LatencyOutliers
from router.transport.retry_budget import RetryBudget
from router.transport.upstream_connection import UpstreamResponse
from router.transport.waits import Wait

if TYPE_CHECKING:
    from router.core.requests import RouteRequest

log = logging.getLogger("router.proxy")  # one logger for the whole forwarding path


class _Leg:
    """One attempt of a hedged request: its wait for the answer runs as a task, so that two
    can race (`Hedging.race`)."""

    __slots__ = ("attempt", "wait", "slot", "task", "outcome", "answer", "finished", "ended")

    def __init__(self, attempt: Attempt, wait: Wait, slot: PoolSlot) -> None:
        self.attempt = attempt
        self.wait = wait
        self.slot = slot
        self.task: asyncio.Task[tuple[UpstreamResponse, bytes, bool, bool]]
        self.outcome = ABANDONED
        self.answer: tuple[UpstreamResponse, bytes, bool, bool] | None = None  # the winner's
        self.finished = False  # its answer was relayed to the end
        self.ended = False  # its hooks heard on_complete: nothing more is said of it


def _retrieved(task: asyncio.Task[tuple[UpstreamResponse, bytes, bool, bool]]) -> None:
    """A leg's failure is read by the race, or was superseded: never "never retrieved"."""
    if not task.cancelled():
        task.exception()


class Hedging:
    """Races a hedge against a slow first attempt; one per proxy."""

    def __init__(self, *, attempts: Attempts, outliers: LatencyOutliers, profile: Callable[[], Profile],
                 retry_budget: RetryBudget,
                 target: Callable[[Sequence[Replica], Sequence[Replica]], Replica | None]) -> None:
        self.attempts = attempts
        self.outliers = outliers
        self.profile = profile  # the routing profile's getter (a reload may swap it)
        self.retry_budget = retry_budget  # the proxy's (replaced on a reload that changes it)
        self.target = target  # the best admissible replica not tried yet
        self.telemetry = attempts.telemetry
        self.upstream = attempts.upstream

    @property
    def config(self) -> ProxyConfig:
        return self.attempts.config  # (one holder: a reload sets it there)

    # -- hedging ------------------------------------------------------------------------
    def delay(self, attempt: Attempt) -> float:
        """How long the first attempt on `replica` waits for its first byte before a hedge:
        ``multiplier`` x the time to first byte expected of it, within [``min_delay``,
        ``max_delay``].  Expected: what the latency detector learned of this request shape
        on it and its peers (router/transport/outliers.py); before that, for a stream, its prefill
        time, the prompts pending ahead of it included, at the profile's learned prefill
        rate (router/core/scheduling/producers.py); otherwise ``max_delay``.  The prompt tokens
        ahead are what the attempt's dispatch recorded (hooks.InFlight: none for an answer whose
        first byte comes after its generation), as the latency detector records them."""
        hedge = self.config.hedge
        replica, route, decision = attempt.replica, attempt.route, attempt.decision
        own = attempt.state.get("prefill_tokens")
        if own is None:
            own = uncached_tokens(replica, route, decision)
        ahead = attempt.state.get("prefill_ahead", 0)
        expected = self.outliers.expected(replica, route, decision, tokens_ahead=ahead)
        if expected is None and route.stream:
            rate = self.profile().prefill_rate(replica)
            if rate:
                expected = max(1, own + ahead) / rate
        if expected is None:
            return hedge.max_delay
        return min(hedge.max_delay, max(hedge.min_delay, hedge.multiplier * expected))

    async def race(self, request: web.Request, route: RouteRequest, decision: Decision,
                    record: RequestRecord, tried: list[Replica]) -> web.StreamResponse:
        """The first attempt (on ``tried[0]``), hedged: after `delay` without its first
        byte, a second attempt on the best admissible replica not tried yet; the first to
        answer is relayed, the other cancelled.  Raises the last UpstreamFailure when neither
        answered (the caller fails over as after any first attempt)."""
        model = route.model
        if not self.upstream.take_slot_now():  # (every connection in use: wait, bounded)
            await self.attempts.wait_for_slot(route, record)
        legs = [self._launch(route, tried[0], 1, decision, record)]
        winner: _Leg | None = None
        try:
            delay = self.delay(legs[0].attempt)
            done, _ = await asyncio.wait((legs[0].task,), timeout=delay)
            if not done:
                target = self.target(decision.ranked, tried)
                if target is None:
                    self.telemetry.hedges.labels(model, "skipped_no_replica").inc()
                elif not self.upstream.take_slot_now():  # a hedge never waits for a connection
                    self.telemetry.hedges.labels(model, "skipped_pool").inc()
                elif not self.retry_budget.try_spend():
                    self.upstream.release_slot()
                    self.telemetry.hedges.labels(model, "skipped_budget").inc()
                else:
                    log.info("request %s: no first byte from replica %s after %.3fs: hedged on %s",
                             route.request_id, tried[0].id, delay, target.id)
                    tried.append(target)
                    record.attempts = 2
                    legs.append(self._launch(route, target, 2, decision, record))
            try:
                winner = await self._first_answer(legs)
            except UpstreamFailure:
                if len(legs) > 1:
                    self.telemetry.hedges.labels(model, "failed").inc()
                raise
            if len(legs) > 1:
                self.telemetry.hedges.labels(model, "won" if winner is legs[1] else "lost").inc()
            record.replica = winner.attempt.replica.id
            assert winner.answer is not None
            resp, first, complete, streaming = winner.answer
            winner.outcome = SUCCESS
            out = await self.attempts.deliver(request, winner.attempt, resp, first, complete, streaming,
                                      winner.wait)
            winner.finished = True
            return out
        finally:
            for leg in legs:
                self._end_leg(leg, winner)

    def _launch(self, route: RouteRequest, replica: Replica, number: int, decision: Decision,
                record: RequestRecord) -> _Leg:
        """Dispatch one attempt of a hedged request (its pool slot taken), its wait for the
        answer a task."""
        attempt = Attempt(route, replica, decision, record, number)
        slot = PoolSlot()
        try:
            self.attempts.hooks.dispatch(attempt)
        except BaseException:
            slot.release(self.upstream)
            raise
        leg = _Leg(attempt, self.attempts.waits.open(replica), slot)
        leg.task = asyncio.get_running_loop().create_task(self._leg_head(leg))
        leg.task.add_done_callback(_retrieved)
        return leg

    async def _leg_head(self, leg: _Leg) -> tuple[UpstreamResponse, bytes, bool, bool]:
        attempt = leg.attempt
        try:
            return await self.attempts.head(attempt.route, attempt.replica, attempt.number, leg.wait, True,
                                    leg.slot)
        except UpstreamFailure as failure:
            if not leg.ended:
                leg.outcome = FAILURE
                self.attempts.hooks.failure(attempt, failure)
            raise

    @staticmethod
    async def _first_answer(legs: list[_Leg]) -> _Leg:
        """The first leg to have its answer; the last failure if none does."""
        pending = {leg.task for leg in legs}
        failure: BaseException | None = None
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for leg in legs:
                if leg.task not in done:
                    continue
                error = leg.task.exception()
                if error is None:
                    leg.answer = leg.task.result()
                    return leg
                if not isinstance(error, UpstreamFailure):
                    raise error  # the drain's 503, or a bug
                failure = error
        assert failure is not None
        raise failure

    def _end_leg(self, leg: _Leg, winner: _Leg | None) -> None:
        """A leg's end: the winner's like any attempt's; a loser's task cancelled (its
        connection dropped: vLLM aborts it) and its hooks told it was superseded."""
        task = leg.task
        if leg is not winner:
            if task.done():
                if not task.cancelled() and task.exception() is None:
                    task.result()[0].close()  # it answered too, but second
            else:
                task.cancel()
            leg.attempt.superseded = winner is not None
        leg.ended = True
        leg.slot.release(self.upstream)  # (a leg cancelled before it sent anything)
        self.attempts.finish(leg.attempt, leg.wait, leg.outcome,
                     leg.answer[0] if leg.answer is not None else None, leg.finished)
