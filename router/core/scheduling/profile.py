"""`Profile`: producers, then one sort by (health group, order keys...), into a ranked list.

    candidates (health filter) -> producers -> order keys -> ranked list + why

The ranked list keeps every routable candidate (the proxy fails over down it, without
asking again).  A profile is what the proxy calls a policy: ``rank`` (pure, no I/O, no
awaits), ``observe`` (feedback after each answer's first byte, for what producers learn),
and ``adopt`` (a reload keeps what was learned).  What the producers learn is per capacity
class or decays (producers.py), so a replica that leaves needs no forgetting here.

`Cost` is the order key that sums the weighted cost terms (terms/): each term returns one
cost in seconds per candidate, in one call, the profile multiplies by the term's weight
from routes.yaml and adds.  Its ``why``: the total of the winner and of the runner-up
(``cost_s``, ``runner_up_cost_s``) and, under ``terms``, what each term gave both
(``{"prefill": [winner_s, runner_up_s], ...}``), so an access-log line says why a replica
won.

``ties``: order keys after ``keys`` that only break ties, computed only when the last of
``keys`` has equal values (cache_aware's costs are almost always all distinct; an idle
fleet's are not).

``fallback``: a profile that ranks the requests this one cannot (session without a key).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat
from operator import add, mul
from typing import TYPE_CHECKING, Any

from router.core.scheduling.candidates import gather
from router.core.scheduling.decision import Decision

if TYPE_CHECKING:
    from router.core.requests import RouteRequest
    from router.core.scheduling.candidates import Candidates
    from router.core.scheduling.order import OrderKey
    from router.core.scheduling.producers import Producer
    from router.core.scheduling.terms import Term
    from router.fleet.replicas import Replica
    from router.prefix.exact import ExactIndex
    from router.prefix.index import PrefixIndex


def _exact_ids(ids: list[str], rows: list[bool] | None) -> frozenset[str]:
    return frozenset(rid for rid, e in zip(ids, rows) if e) if rows else frozenset()


class Cost:
    """Order key: the weighted sum of the cost terms, seconds of expected time to first token."""

    name = "cost"

    def __init__(self, terms: Sequence[tuple[Term, float]]) -> None:
        self.terms = [(term, weight) for term, weight in terms if weight > 0]
        if not self.terms:
            raise ValueError("a cost needs at least one term with a weight > 0")
        self._explain_terms = [term.explain for term, _ in self.terms if hasattr(term, "explain")]

    @property
    def weights(self) -> dict[str, float]:
        return {term.name: weight for term, weight in self.terms}

    def values(self, request: RouteRequest, cands: Candidates) -> list[float] | None:
        """The total per row; None when every term said 0 for every row."""
        each: dict[str, list[float] | None] = {}
        total: list[float] | None = None
        for term, weight in self.terms:
            costs = term.costs(request, cands)
            each[term.name] = costs
            if costs is None:  # 0 for every row
                continue
            if weight != 1.0:
                costs = each[term.name] = list(map(mul, repeat(weight), costs))
            total = costs if total is None else list(map(add, total, costs))
        cands.data["costs"] = each
        return total

    def explain(self, cands: Candidates, column: list[float] | None, winner: int, runner_up: int | None,
                why: dict[str, object]) -> None:
        other = winner if runner_up is None else runner_up
        if column is None:
            why["cost_s"] = why["runner_up_cost_s"] = 0.0
        else:
            why["cost_s"] = round(column[winner], 6)
            why["runner_up_cost_s"] = round(column[other], 6)
        terms: dict[str, list[float]] = {}
        for name, c in cands.data["costs"].items():
            terms[name] = [0.0, 0.0] if c is None else [round(c[winner], 6), round(c[other], 6)]
        why["terms"] = terms  # [winner, runner-up] (the winner twice when it is alone)
        for explain in self._explain_terms:
            explain(cands, winner, why)


class Profile:
    """A named scheduling profile; see the module docstring."""

    def __init__(self, name: str, *, producers: Sequence[Producer] = (), keys: Sequence[OrderKey] = (),
                 ties: Sequence[OrderKey] = (), fallback: Profile | None = None) -> None:
        self.name = name
        self.producers = tuple(producers)
        self.keys = tuple(keys)  # sorted on after the health group
        self.ties = tuple(ties)  # then these, computed only when the keys leave a tie
        self.fallback = fallback  # ranks requests without a session key (session only)
        self._chosen = tuple(p.chosen for p in self.producers if hasattr(p, "chosen"))
        self._ticks = tuple(k.tick for k in self.keys + self.ties if hasattr(k, "tick"))
        self._explainers = tuple((i, k.explain) for i, k in enumerate(self.keys) if hasattr(k, "explain"))

    @property
    def cost(self) -> Cost | None:
        """The profile's cost key, if it sums cost terms."""
        for key in self.keys:
            if isinstance(key, Cost):
                return key
        return self.fallback.cost if self.fallback is not None else None

    def rank(self, request: RouteRequest, replicas: Sequence[Replica], index: PrefixIndex,
             exact: ExactIndex | None = None, *, explain: bool = True) -> Decision:
        """The ranking; ``explain=False`` leaves the order keys' part of the why out (what
        each term gave the winner and the runner-up: about 2% of a request's instructions,
        read only by the access log)."""
        if self.fallback is not None and not request.session_key:
            decision = self.fallback.rank(request, replicas, index, exact, explain=explain)
            decision.why = {**decision.why, "policy": self.name, "fallback": self.fallback.name}
            return decision
        cands = gather(replicas, index, exact)
        n = cands.n
        if not n:
            return Decision(ranked=[], why={"policy": self.name})
        for producer in self.producers:
            producer.produce(request, cands)
        for tick in self._ticks:  # a rotation turns on every decision, used or not
            tick()
        # Sort on (group, keys..., ties..., row), leaving out what cannot change the order:
        # a column equal for every row (a key returns None then; the group when every
        # candidate is healthy), and the tie-breaks when the last column is all distinct.
        # The common case then sorts row numbers by one float column.
        by = [cands.group] if 0 < cands.n_healthy < n else []
        columns = []
        for key in self.keys:
            column = key.values(request, cands)
            columns.append(column)
            if column is not None:
                by.append(column)
        if self.ties and (not by or len(set(by[-1])) < n):
            for key in self.ties:
                column = key.values(request, cands)
                if column is not None:
                    by.append(column)
        # The order of sorted(zip(*by, range(n))) without building a tuple per row: stable
        # sorts, the least significant column first (each keeps the order of the rows it finds
        # equal, so equal rows end in row order).
        order = list(range(n))
        for column in reversed(by):
            order.sort(key=column.__getitem__)
        winner = order[0]
        runner_up = order[1] if n > 1 else None
        ids = cands.ids
        for chosen in self._chosen:
            chosen(ids[winner])
        why: dict[str, Any] = {"policy": self.name, "load": cands.replicas[winner].queued}
        prefix = cands.data.get("prefix")
        if prefix is not None:
            why["matched_blocks"] = prefix.matched[winner]
            why["matched_tokens"] = prefix.matched_tokens[winner]
            if prefix.exact is not None:
                why["prefix_index"] = "exact" if prefix.exact[winner] else "approximate"
        if runner_up is not None:
            why["runner_up"] = ids[runner_up]
            if prefix is not None:
                why["runner_up_matched_blocks"] = prefix.matched[runner_up]
        if explain:
            for i, explainer in self._explainers:
                explainer(cands, columns[i], winner, runner_up, why)
        return Decision(ranked=list(map(cands.replicas.__getitem__, order)), why=why,
                        matched_blocks=prefix.by_id if prefix is not None else {},
                        matched_tokens=prefix.tokens_by_id if prefix is not None else {},
                        exact_replicas=_exact_ids(ids, prefix.exact) if prefix is not None else frozenset())

    def observe(self, replica: Replica, request: RouteRequest, *, time_to_first_byte_s: float,
                matched_blocks: int, matched_tokens: int | None = None, tokens_ahead: int = 0) -> None:
        """Feedback after the first response byte from `replica` (``tokens_ahead``: the
        router's prompt tokens pending there when the request was sent)."""
        for producer in self._all_producers():
            observe = getattr(producer, "observe", None)
            if observe is not None:
                observe(replica, request, time_to_first_byte_s=time_to_first_byte_s, matched_blocks=matched_blocks,
                        matched_tokens=matched_tokens, tokens_ahead=tokens_ahead)

    def adopt(self, old: Profile) -> None:
        """After a reload: keep what `old`'s producers learned (by producer name)."""
        learned = {p.name: p for p in old._all_producers()}
        for producer in self._all_producers():
            previous = learned.get(producer.name)
            adopt = getattr(producer, "adopt", None)
            if adopt is not None and type(previous) is type(producer):
                adopt(previous)

    def describe(self) -> dict[str, Any]:
        """What /admin/replicas and a reload's answer say of the running profile."""
        cost = self.cost
        return {"policy": self.name, "cost_terms": cost.weights if cost is not None else None}

    def prefill_rate(self, replica: Replica) -> float | None:
        """The prefill tokens/s this profile expects of `replica` (learned or prior), if it
        models prefill rates at all."""
        for producer in self._all_producers():
            rate = getattr(producer, "prefill_rate", None)
            if rate is not None:
                value: float = rate(replica)
                return value
        return None

    def producer(self, name: str) -> Any:  # Any: the caller knows which producer it asks for
        """The producer `name` of this profile (or its fallback); KeyError if none."""
        for producer in self._all_producers():
            if producer.name == name:
                return producer
        raise KeyError(name)

    def _all_producers(self) -> tuple[Producer, ...]:
        return self.producers + (self.fallback._all_producers() if self.fallback is not None else ())
