"""The core decides: which models exist and who may use them, admission and rate limits, the
scheduling pipeline and the flows' decisions.  It imports no aiohttp and does no I/O of its
own; the front door and the transport carry bytes around it (ARCHITECTURE.md)."""
