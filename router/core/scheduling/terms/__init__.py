"""Cost terms: one file each, every cost in seconds of expected time to first token.

A term module exposes:
* ``NAME`` (its key under ``routing.terms`` in routes.yaml; the file name),
* ``NEEDS``: the producers it reads (router/core/scheduling/producers.py), by name,
* ``PARAMS``: the ``routing.params`` keys it reads,
* ``build(params: Node) -> Term``: ``params`` is the validated ``routing.params`` node,
and the Term's ``costs(request, candidates) -> list[float] | None`` returns, in one call,
one cost per candidate row, or None when it is 0 for every row (the profile then skips
the addition).  A profile multiplies each term's costs by its weight from the
config and sums them; lower is better.  Terms do no I/O and never await.

Adding a term is adding one file here: the registry below lists this package's modules,
so the file's name becomes a valid key of ``routing.terms`` (and appears in the "did you
mean" hints) without editing anything else.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from router.core.requests import RouteRequest
    from router.core.scheduling.candidates import Candidates
    from yamlcheck import Node


class Term(Protocol):
    name: str

    def costs(self, request: RouteRequest, cands: Candidates) -> list[float] | None:
        """Seconds of expected time to first token, one per candidate row (None: 0 for all)."""
        ...


TERM_NAMES: tuple[str, ...] = tuple(sorted(
    module.name for module in pkgutil.iter_modules(__path__) if not module.name.startswith("_")))


def term_module(name: str) -> ModuleType:
    if name not in TERM_NAMES:
        raise ValueError(f"unknown cost term {name!r}; expected one of {', '.join(TERM_NAMES)}")
    return importlib.import_module(f"{__name__}.{name}")


def build_term(name: str, params: Node) -> Term:
    term: Term = term_module(name).build(params)
    return term
