"""The scheduling pipeline: which replica serves a request, as a ranked list.

    candidates.gather   the health filter: routable candidates as columns, healthy first
    producers           per-request data once for all candidates (prefix match, rates, ...)
    order keys          the bounded-load guard, the weighted cost terms (terms/, seconds of
                        expected time to first token), tie-breaks
    -> Decision         every candidate ranked (the proxy fails over down it) + why

A `Profile` (profile.py) is one such pipeline; presets.py builds the profile that each
``routing.policy`` name of routes.yaml stands for, tuned by ``routing.params`` and, for the
cost presets, ``routing.terms``.
"""

from __future__ import annotations

from router.config.routing import DEFAULT_PRESET, PRESET_NAMES
from router.core.scheduling.decision import Decision
from router.core.scheduling.presets import build_profile, profile_of, validate_policy_params
from router.core.scheduling.profile import Profile
from router.core.scheduling.terms import TERM_NAMES

__all__ = ["DEFAULT_PRESET", "PRESET_NAMES", "TERM_NAMES", "Decision", "Profile", "build_profile",
           "profile_of", "validate_policy_params"]
