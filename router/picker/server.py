"""The picker's gRPC server: ``ExternalProcessor`` for Envoy and the standard health service
(``grpc.health.v1``) with the names the GIE protocol lists: ``liveness``, ``readiness``
(SERVING while some replica may take a request) and the ext_proc service's own name.

It runs on the router's event loop beside the HTTP server, which keeps /metrics, /health,
/ready and the admin API; ``router pick`` starts both (router/cli.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as epg
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from router.picker.extproc import EndpointPicker

log = logging.getLogger("router.picker")

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
READINESS_POLL_S = 1.0


class PickerServer:
    """A started gRPC server; `stop` ends it (in-flight streams get `grace` seconds)."""

    def __init__(self, server: grpc.aio.Server, health_servicer: health.aio.HealthServicer,
                 port: int, ready: Callable[[], bool]) -> None:
        self.server = server
        self.health = health_servicer
        self.port = port
        self._ready = ready
        self._watch = asyncio.get_running_loop().create_task(self._watch_readiness())

    async def _watch_readiness(self) -> None:
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        last: bool | None = None
        while True:
            try:
                ready = self._ready()
            except Exception:  # noqa: BLE001 - the watch must outlive a broken check
                log.exception("the readiness check failed")
                ready = False
            if ready != last:
                await self.health.set("readiness", serving if ready else not_serving)
                last = ready
            await asyncio.sleep(READINESS_POLL_S)

    async def stop(self, grace: float = 5.0) -> None:
        self._watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._watch
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_picker(picker: EndpointPicker, host: str, port: int, *,
                       ready: Callable[[], bool], max_message_bytes: int) -> PickerServer:
    """Listen on host:port (0: a free port) for Envoy's ext_proc streams (plaintext HTTP/2).
    `max_message_bytes`: a buffered body comes in one message (gRPC's default cap is 4 MiB)."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_message_bytes)])
    epg.add_ExternalProcessorServicer_to_server(picker, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", "liveness", EXT_PROC_SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise OSError(f"cannot listen on {host}:{port} for the endpoint picker")
    await server.start()
    log.info("endpoint picker (Envoy ext_proc) listening on %s:%d", host, bound)
    return PickerServer(server, health_servicer, bound, ready)
