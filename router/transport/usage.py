"""What an answer says about the replica's prefix cache: ``usage.prompt_tokens_details.cached_tokens``.

vLLM (with ``--enable-prompt-tokens-details``) reports the prompt tokens it found in its
prefix cache in a non-streamed answer's usage and in a stream's usage chunk (the last data
event; present only when the client asked ``stream_options.include_usage``: the router never
adds options the client did not ask for).  The router relays answers verbatim and does not
parse them; this reads the one number from the answer's tail bytes, so the prediction
accuracy (hooks.PredictionAccuracy) costs a reverse byte search per answer.
"""

from __future__ import annotations

import re

_KEYS = (b'"cached_tokens"',  # chat, completions; Responses' usage.input_tokens_details
         b'"cache_read_input_tokens"')  # Anthropic Messages' usage (vLLM's name for the same)
_VALUE = re.compile(rb"\s*:\s*(\d{1,12})")


def cached_tokens_of(tail: bytes) -> int | None:
    """The last ``"cached_tokens": N`` (or Anthropic's ``"cache_read_input_tokens": N``)
    in `tail` (None if absent or null)."""
    at, key = max((tail.rfind(k), k) for k in _KEYS)
    if at < 0:
        return None
    m = _VALUE.match(tail, at + len(key))
    return int(m.group(1)) if m else None
