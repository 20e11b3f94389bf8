"""The ext_proc messages the picker reads and writes (Envoy's ``envoy.service.ext_proc.v3``),
in the shapes of the Gateway API Inference Extension's endpoint picker protocol
(kubernetes-sigs/gateway-api-inference-extension, docs/proposals/004-endpoint-picker-protocol).

Destination: the ranked ``ip:port`` list in the request header
``x-gateway-destination-endpoint`` and, the same value, in dynamic metadata
``envoy.lb/x-gateway-destination-endpoint`` (Envoy's override_host load-balancing policy reads
it and walks it on retries); the endpoint that really served comes back in the response
phase's metadata ``envoy.lb/x-gateway-destination-endpoint-served``; a data plane's subset hint
in ``envoy.lb.subset_hint/x-gateway-destination-endpoint-subset``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2
from multidict import CIMultiDict

DESTINATION = "x-gateway-destination-endpoint"
SERVED = "x-gateway-destination-endpoint-served"
SUBSET = "x-gateway-destination-endpoint-subset"
LB_NAMESPACE = "envoy.lb"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
BODY_CHUNK = 62_000  # bytes per streamed body message (GIE's size; under Envoy's 64 KiB advice)


def headers_of(message: Any) -> CIMultiDict[str]:
    """An ext_proc HttpHeaders' map, case-insensitive as HTTP names are (``raw_value`` first)."""
    out: CIMultiDict[str] = CIMultiDict()
    for header in message.headers.headers:
        value = header.raw_value.decode("utf-8", "surrogateescape") if header.raw_value else header.value
        out.add(header.key, value)
    return out


def metadata_value(request: Any, namespace: str, key: str) -> Any:
    """A value of the metadata Envoy forwarded with this message (None: absent)."""
    filters = request.metadata_context.filter_metadata
    if namespace not in filters:
        return None
    fields = filters[namespace].fields
    if key not in fields:
        return None
    value = fields[key]
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "list_value":
        return [v.string_value for v in value.list_value.values]
    return None


@functools.lru_cache(maxsize=4096)  # the fleet's URLs, parsed once each (bounded)
def address_of(url: str) -> str:
    """A replica's ``ip:port`` as Envoy names an upstream host (IPv6 in brackets)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# The client's credentials never reach a replica (as in proxy mode).
CLIENT_CREDENTIALS = ("authorization", "x-api-key", "api-key")


def _set_headers(pairs: Iterable[tuple[str, str]], remove: Iterable[str] = ()) -> ep.HeaderMutation:
    return ep.HeaderMutation(set_headers=[
        base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, raw_value=v.encode()))
        for k, v in pairs], remove_headers=list(remove))


def _destination_metadata(endpoints: str) -> struct_pb2.Struct:
    metadata = struct_pb2.Struct()
    metadata.update({LB_NAMESPACE: {DESTINATION: endpoints}})
    return metadata


def route_headers(endpoints: str, extra: Iterable[tuple[str, str]] = ()) -> ep.ProcessingResponse:
    """The answer to the request's headers (full-duplex mode, sent once the body decided):
    the destination header and metadata, and a cleared route cache; the client's
    credentials removed, `extra` headers set (the replica's API key)."""
    return ep.ProcessingResponse(
        request_headers=ep.HeadersResponse(response=ep.CommonResponse(
            header_mutation=_set_headers([(DESTINATION, endpoints), *extra], CLIENT_CREDENTIALS),
            clear_route_cache=True)),
        dynamic_metadata=_destination_metadata(endpoints))


def route_body(endpoints: str, body: bytes | None,
               extra: Iterable[tuple[str, str]] = ()) -> ep.ProcessingResponse:
    """The answer to a buffered body: the destination set from the body response (allowed in
    BUFFERED mode), and the body replaced only when the router rewrote it (an alias, a decode
    hop's transfer params), its Content-Length with it (Envoy refuses a mismatch with a 500)."""
    length = [] if body is None else [("content-length", str(len(body)))]
    common = ep.CommonResponse(
        header_mutation=_set_headers([(DESTINATION, endpoints), *extra, *length], CLIENT_CREDENTIALS),
        clear_route_cache=True)
    if body is not None:
        common.body_mutation.body = body
    return ep.ProcessingResponse(request_body=ep.BodyResponse(response=common),
                                 dynamic_metadata=_destination_metadata(endpoints))


def streamed_body(body: bytes, *, request: bool, end: bool = True) -> list[ep.ProcessingResponse]:
    """A body handed back in full-duplex mode (Envoy forwards only what the picker sends),
    in chunks of at most BODY_CHUNK bytes, the last one ending the stream when `end`."""
    chunks = [body[i:i + BODY_CHUNK] for i in range(0, len(body), BODY_CHUNK)] or [b""]
    out = []
    for i, chunk in enumerate(chunks):
        streamed = ep.StreamedBodyResponse(body=chunk, end_of_stream=end and i == len(chunks) - 1)
        common = ep.CommonResponse(body_mutation=ep.BodyMutation(streamed_response=streamed))
        body_response = ep.BodyResponse(response=common)
        out.append(ep.ProcessingResponse(request_body=body_response) if request
                   else ep.ProcessingResponse(response_body=body_response))
    return out


def empty_headers(request: bool) -> ep.ProcessingResponse:
    response = ep.HeadersResponse()
    return ep.ProcessingResponse(request_headers=response) if request \
        else ep.ProcessingResponse(response_headers=response)


def empty_trailers(request: bool) -> ep.ProcessingResponse:
    return ep.ProcessingResponse(request_trailers=ep.TrailersResponse()) if request \
        else ep.ProcessingResponse(response_trailers=ep.TrailersResponse())


def immediate(status: int, body: bytes, headers: Mapping[str, str]) -> ep.ProcessingResponse:
    """Envoy answers the client at once (the router's OpenAI-shaped errors)."""
    return ep.ProcessingResponse(immediate_response=ep.ImmediateResponse(
        status={"code": status}, body=body,
        headers=_set_headers([("content-type", "application/json"), *headers.items()])))
