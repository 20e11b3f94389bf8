"""Sentry, when a DSN is configured: errors reported with no PII, no request bodies, no
frame locals, and the header spellings of API keys scrubbed.
"""

from __future__ import annotations

import logging
import os

from router import __version__

log = logging.getLogger("router")


def init_sentry(dsn: str | None, *, environment: str | None = None) -> bool:
    """Initialise Sentry when a DSN is configured (config or SENTRY_DSN); never fatal."""
    dsn = dsn or os.environ.get("SENTRY_DSN")
    if not dsn:
        return False
    try:
        import sentry_sdk
        from sentry_sdk.scrubber import DEFAULT_DENYLIST, EventScrubber

        # No PII, no request bodies and no frame locals: prompts are the users' data and
        # keys pass through locals (tests/reliability/test_sentry.py caught one).  The
        # scrubber also removes the header spellings of API keys that clients send.
        scrubber = EventScrubber(denylist=[*DEFAULT_DENYLIST, "x-api-key", "api-key",
                                           "x-admin-key", "proxy-authorization"], recursive=True)
        sentry_sdk.init(dsn=dsn, environment=environment, release=f"vllm-smart-router@{__version__}",
                        traces_sample_rate=float(os.environ.get("SENTRY_TRACES_SAMPLE_RATE", "0")),
                        send_default_pii=False, max_request_body_size="never",
                        include_local_variables=False, event_scrubber=scrubber)
        return True
    except Exception as exc:  # noqa: BLE001 - telemetry must never stop the router
        log.warning("Sentry init failed: %s", exc)
        return False
