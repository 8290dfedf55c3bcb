"""``tdist-agent``: the per-node daemon (``systemctl start tdist-agent`` runs it).

    tdist-agent [--config /etc/tdist/agent.toml]      # run
    tdist-agent check-config FILE                     # validate only: exit 0, or 1 naming file, key, reason

SIGHUP re-reads the file (an invalid one is logged and the running set stays);
SIGTERM or SIGINT drains the workers and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

from tdist import logs
from tdist.agent.config import load_agent_config
from tdist.agent.daemon import Agent
from tdist.errors import ConfigError, TdistError

log = logs.get_logger("tdist.agent.main")
DEFAULT_CONFIG = "/etc/tdist/agent.toml"


def check_config(path: str) -> int:
    try:
        cfg = load_agent_config(path)
    except ConfigError as exc:
        print(f"tdist-agent: {exc.message}", file=sys.stderr)
        return 1
    instances = sum(w.count for w in cfg.workers)
    print(f"{path}: valid: node {cfg.node.name}, {len(cfg.workers)} worker kinds, {instances} instances")
    return 0


async def run(config_path: str, nats_url: str | None = None, http_port: int | None = None) -> int:
    stop, reload = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload.set)
    agent = Agent(config_path, nats_url=nats_url, http_port=http_port)
    try:
        await agent.start()
        print(f"tdist-agent: serving, http on port {agent.http_port}", flush=True)
        await agent.run(stop, reload)
    finally:
        await agent.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["check-config"]:
        if len(args) != 2:
            print("usage: tdist-agent check-config FILE", file=sys.stderr)
            return 2
        return check_config(args[1])
    parser = argparse.ArgumentParser(prog="tdist-agent", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--nats-url", help="replaces [nats] servers (the embedded server listens there)")
    parser.add_argument("--http-port", type=int, help="replaces [http] port (0: a free one)")
    opts = parser.parse_args(args)
    try:
        cfg = load_agent_config(opts.config)
    except ConfigError as exc:
        print(f"tdist-agent: {exc.message}", file=sys.stderr)
        return 1
    logs.configure(cfg.logging.level, file=cfg.logging.file, component="agent", node=cfg.node.name)
    try:
        return asyncio.run(run(opts.config, opts.nats_url, opts.http_port))
    except TdistError as exc:
        log.error("agent_failed", error=str(exc), code=exc.code)
        print(f"tdist-agent: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
