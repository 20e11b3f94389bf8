"""`RequestIds`: a fresh id for each request that brought none of its own.

An id is 128 random bits in hex, as ``uuid4().hex``, from the operating system's CSPRNG
(``os.urandom``): the ids are echoed to clients and passed to vLLM, so one client must not
be able to predict another's.  Reading 16 bytes per request cost a ``getrandom`` system
call per request; the bytes are read 4 KiB at a time instead (one call per 256 ids).

The pool belongs to one process: ``router --workers N`` starts its workers as new
processes (router/workers.py), never by forking one that holds a filled pool.
"""

from __future__ import annotations

import os
import re

ID_BYTES = 16
POOL_IDS = 256


class RequestIds:
    """Random request ids, drawn from a pool of CSPRNG bytes refilled as it empties."""

    __slots__ = ("_pool", "_at")

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0

    def new(self) -> str:
        at = self._at
        if at >= len(self._pool):
            self._pool = os.urandom(ID_BYTES * POOL_IDS)
            at = 0
        self._at = at + ID_BYTES
        return self._pool[at:at + ID_BYTES].hex()

    def accept(self, given: str | None) -> str:
        """The client's own id when it is plain (visible ASCII, at most 200 characters: it goes
        into logs and to the replica), else a fresh one."""
        return given if given and CLIENT_ID.match(given) else self.new()


CLIENT_ID = re.compile(r"^[\x21-\x7e]{1,200}$")  # a client-chosen request id, bounded
