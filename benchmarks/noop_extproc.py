"""A no-op Envoy ext_proc server on the picker's gRPC stack: the transport's CPU floor.

    python -m benchmarks.noop_extproc --port 9002 --destination 127.0.0.1:8101

It answers every message of a lean bootstrap's stream (`router envoy-bootstrap --lean`) as
the picker does, with one fixed destination, and decides nothing: no body parsing, no
intake, no ranking, no hooks.  `benchmarks.picker_overhead` runs it behind the same Envoy
as `router pick`, so the CPU per request it spends is what grpc.aio on uvloop costs for one
ext_proc stream of three messages each way, a floor no change to the picker's own code can
go under.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from typing import Any

import grpc
import uvloop
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as epg

from router.picker import messages


class NoopPicker(epg.ExternalProcessorServicer):  # type: ignore[misc]
    """Every request goes to `destination`; each message gets the picker's lean answer."""

    def __init__(self, destination: str) -> None:
        self.destination = destination

    async def Process(self, request_iterator: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async for request in request_iterator:
            kind = request.WhichOneof("request")
            if kind == "request_headers":
                yield messages.empty_headers(request=True)
            elif kind == "request_body":
                yield messages.route_body(self.destination, None)
            elif kind == "response_headers":
                yield messages.empty_headers(request=False)
            elif kind == "response_body":
                yield ep.ProcessingResponse(response_body=ep.BodyResponse())
            else:
                yield messages.empty_trailers(request=kind == "request_trailers")


async def serve(port: int, destination: str) -> None:
    server = grpc.aio.server()
    epg.add_ExternalProcessorServicer_to_server(NoopPicker(destination), server)
    if not server.add_insecure_port(f"127.0.0.1:{port}"):
        raise OSError(f"cannot listen on 127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.noop_extproc", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--destination", required=True, help="ip:port of the one replica")
    args = parser.parse_args(argv)
    uvloop.run(serve(args.port, args.destination))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
