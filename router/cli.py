"""The `router` command.

    router --config config/routes.yaml [--host H] [--port P] [--log-level L] [--no-launch]
           [--workers N]                N router processes on one port (router/workers.py)
    router check-config FILE          validate routes.yaml (and its launch: engines) and exit

Exit status: 0 on success (and after a SIGTERM drain), 2 for a configuration error (the
message names the file, the key path, what was found and what was expected), 1 when the
router cannot start (port in use, a launched engine that does not come up).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from router import __version__
from router.config import DEFAULT_CONFIG_PATH, Config, load_config
from router.core.scheduling import validate_policy_params
from router.observability.logs import announce
from yamlcheck import ConfigError, ConfigErrors

log = logging.getLogger("router.cli")
EXIT_CONFIG = 2
PARENT_POLL_S = 1.0  # how often a worker checks that its supervisor is alive


def _checked(config: Config) -> None:
    """What `check-config` checks beyond the file's own shape (ConfigError on a problem)."""
    validate_policy_params(config)
    if config.launch is not None:
        from router.app import launch_plan

        launch_plan(config.launch)


def _check(path: str) -> Config:
    return load_config(path, then=_checked)


def check_config(path: str) -> int:
    try:
        config = _check(path)
    except ConfigErrors as exc:  # every problem of the file, in file order
        for error in exc.errors:
            print(f"error: {error}", file=sys.stderr)
        print(f"{path}: {len(exc.errors)} problems", file=sys.stderr)
        return EXIT_CONFIG
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    backends = sum(len(m.backends) for m in config.models)
    launch = " + launched engines" if config.launch is not None else ""
    print(f"{path}: OK ({len(config.models)} model(s), {backends} backend(s){launch}, "
          f"policy {config.routing.policy})")
    return 0


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    """A worker whose supervisor died (it is re-parented) drains and exits."""
    while os.getppid() == parent:
        await asyncio.sleep(PARENT_POLL_S)
    log.warning("the supervisor (pid %d) is gone: draining", parent)
    stop.set()


async def _serve(config: Config, host: str | None, port: int | None, launch: bool,
                 worker_fd: int | None = None, worker_index: int | None = None,
                 picker: tuple[str, int] | None = None) -> int:
    from router.app import Router, serve
    from router.workers import LAUNCHED_ENV, decode_launched

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sock = None
    watcher = None
    if worker_fd is not None:
        sock = socket.socket(fileno=worker_fd)
        watcher = loop.create_task(_watch_parent(os.getppid(), stop))
    router = await Router.create(config, launch=launch, worker_index=worker_index,
                                 launched=decode_launched(os.environ.get(LAUNCHED_ENV)) if sock is not None else None)
    try:
        server = await serve(router, host, port, sock=sock)
    except BaseException:
        await router.close()
        raise
    picker_server = None
    if picker is not None:
        try:
            picker_server = await _start_picker(router, *picker)
        except BaseException:
            await server.drain_and_close()
            raise
    reloads: set[asyncio.Task[object]] = set()

    async def reload() -> None:
        try:
            await router.reloader.reload()
        except ConfigError:
            pass  # logged by the reloader: the running config stays

    def on_sighup() -> None:
        task = loop.create_task(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    # What start-up built lives as long as the router: out of the cyclic collector's sight
    # (gc.freeze), the collections that requests' garbage sets off no longer walk it
    # every time (2% of a request's instructions, benchmarks/profile_router.py --callgrind).
    # Reference counting still frees all of it; only a cycle among start-up objects that
    # a reload drops would stay (one configuration's worth, once).
    gc.freeze()
    policy = router.policy.name
    who = f"worker {worker_index} (pid {os.getpid()}) " if worker_index is not None else ""
    log.info("router %s %sserving on %s (policy %s, %d replica(s) of %s)", __version__, who, server.url,
             policy, len(router.fleet), ", ".join(router.fleet.models()) or "no model")
    if worker_index is None:
        announce(f"router listening on {server.url} (policy {policy})")
    await stop.wait()
    if watcher is not None:
        watcher.cancel()
    log.info("signal received: draining")
    if picker_server is not None:
        await picker_server.stop(config.server.drain_timeout)
    drained = await server.drain_and_close()
    log.info("router stopped (%s)", "drained" if drained else "drain timeout")
    return 0


def build_picker(router: Any) -> Any:
    """The Envoy endpoint picker over the router's own parts (router/picker/)."""
    from router.picker.extproc import EndpointPicker

    api = router.api
    return EndpointPicker(intake=api.intake, keyring=lambda: api.keyring, flow=router.flow,
                          proxy=router.proxy, bodies=api.bodies, pd_flow=api.pd_flow)


async def _start_picker(router: Any, host: str, port: int) -> Any:
    """`build_picker`, served over gRPC."""
    from router.picker.server import start_picker

    server = await start_picker(build_picker(router), host, port, ready=lambda: any(
        router.proxy.admissible(r) for r in router.fleet),
        max_message_bytes=router.config.server.max_body_bytes + (1 << 20))
    announce(f"endpoint picker (Envoy ext_proc) listening on {host}:{server.port}")
    return server


def _run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a core dependency off Windows
        return asyncio.run(coro)
    result: int = uvloop.run(coro)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="router", description="A prefix-cache-aware, load-aware router for vLLM replicas.",
        epilog="Also: `router check-config FILE` validates a routes.yaml and exits; `router pick "
               "[options]` runs as the endpoint picker of an Envoy gateway (ext_proc over gRPC, "
               "--picker-port) beside the usual HTTP server.")
    parser.add_argument("--config", "-c", default=None,
                        help=f"routes.yaml (default: {DEFAULT_CONFIG_PATH})")
    parser.add_argument("--host", default=None, help="override server.host")
    parser.add_argument("--port", type=int, default=None, help="override server.port")
    parser.add_argument("--log-level", default=None,
                        choices=["debug", "info", "warning", "error", "critical"])
    parser.add_argument("--no-launch", action="store_true",
                        help="ignore the config's launch: block (engines already running)")
    parser.add_argument("--workers", type=int, default=1,
                        help="router processes sharing the port, each a full router, under one "
                             "supervisor that restarts them (default 1: no supervisor)")
    parser.add_argument("--worker-fd", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--picker-host", default="127.0.0.1",
                        help="`router pick`: the address of the ext_proc gRPC server (default 127.0.0.1)")
    parser.add_argument("--picker-port", type=int, default=9002,
                        help="`router pick`: its port (default 9002, the GIE's)")
    parser.add_argument("--version", action="version", version=f"router {__version__}")
    return parser


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def envoy_bootstrap(argv: Sequence[str]) -> int:
    """`router envoy-bootstrap`: print an Envoy bootstrap whose endpoint picker is `router pick`."""
    sub = argparse.ArgumentParser(
        prog="router envoy-bootstrap",
        description="Print an Envoy bootstrap (YAML) that asks `router pick` where each request "
                    "goes: an ext_proc filter, and the replicas of routes.yaml as one cluster.")
    sub.add_argument("--config", "-c", default=str(DEFAULT_CONFIG_PATH))
    sub.add_argument("--listen", default="127.0.0.1:10000", help="Envoy's listener (host:port)")
    sub.add_argument("--picker", default="127.0.0.1:9002", help="the picker's gRPC address (host:port)")
    sub.add_argument("--admin-port", type=int, default=None, help="Envoy's admin port (none by default)")
    sub.add_argument("--fail-open", action="store_true",
                     help="let requests through (round robin) when the picker is down; the body is "
                          "then buffered by Envoy instead of streamed through the picker")
    sub.add_argument("--lean", action="store_true",
                     help="the least CPU per request: Envoy buffers the body and sends the picker no "
                          "answer bodies (the picker then learns no first-token times or cached "
                          "tokens, and cannot tell a client that left from an answered one)")
    args = sub.parse_args(list(argv))
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    from router.app import launch_plan
    from router.picker.bootstrap import render

    launched = [plan.url for plan in launch_plan(config.launch)[1]] if config.launch is not None else []
    sys.stdout.write(render(config, listen=_host_port(args.listen), picker=_host_port(args.picker),
                            admin_port=args.admin_port, fail_open=args.fail_open, lean=args.lean,
                            launched=launched))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "check-config":
        sub = argparse.ArgumentParser(prog="router check-config",
                                      description="Validate a routes.yaml and exit.")
        sub.add_argument("file")
        return check_config(sub.parse_args(argv[1:]).file)
    if argv and argv[0] == "envoy-bootstrap":
        return envoy_bootstrap(argv[1:])
    pick = bool(argv) and argv[0] == "pick"
    args = build_parser().parse_args(argv[1:] if pick else argv)
    path = args.config or str(DEFAULT_CONFIG_PATH)
    try:
        config = _check(path) if not args.no_launch else load_config(path)
        if args.no_launch:
            validate_policy_params(config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    from router.observability.logs import setup_logging

    server = config.server
    setup_logging(args.log_level or server.log_level, server.log_format, server.access_log)
    from router.workers import MAX_WORKERS, Supervisor

    if not 1 <= args.workers <= MAX_WORKERS:
        announce(f"error: --workers: expected 1 to {MAX_WORKERS}, got {args.workers}", logging.ERROR)
        return EXIT_CONFIG
    try:
        if pick and args.workers > 1:
            announce("error: router pick runs one process (--workers 1)", logging.ERROR)
            return EXIT_CONFIG
        if args.workers > 1 and args.worker_fd is None:
            return _run(Supervisor(config, argv, args.workers, host=args.host, port=args.port).run())
        return _run(_serve(config, args.host, args.port, launch=not args.no_launch,
                           worker_fd=args.worker_fd, worker_index=args.worker_index,
                           picker=(args.picker_host, args.picker_port) if pick else None))
    except ConfigError as exc:
        announce(f"error: {exc}", logging.ERROR)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        announce(f"error: cannot start the router: {exc}", logging.ERROR)
        return 1
    except Exception as exc:  # noqa: BLE001 - e.g. engines.launcher.LaunchError
        announce(f"error: {type(exc).__name__}: {exc}", logging.ERROR)
        return 1


if __name__ == "__main__":
    sys.exit(main())
