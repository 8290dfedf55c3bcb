"""``tdist-agent``: the per-node daemon (``systemctl start tdist-agent`` runs it).

    tdist-agent [--config /etc/tdist/agent.toml]      # run
    tdist-agent check-config FILE                     # validate only: exit 0, or 1 naming file, key, reason

SIGHUP re-reads the file (an invalid one is logged and the running set stays);
SIGTERM or SIGINT drains the workers and exits 0. A start-up failure (a port in use,
another agent on the state dir, a bad file) is one line on stderr and exit 1, with
nothing started. SIGHUP is blocked from this module's first line until its handler is
installed (a pending one is then delivered as a reload), so an early reload cannot kill the
agent; under systemd (``Type=notify``) reloads wait for ``READY=1`` anyway.
"""

from __future__ import annotations

import signal

# First instruction: SIGHUP must not kill the agent before its handler is installed (``run``
# unblocks it then). Children are spawned only after that, so none inherits the mask.
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})

import argparse  # noqa: E402
import asyncio  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402

from tdist import logs  # noqa: E402
from tdist.agent.config import load_agent_config  # noqa: E402
from tdist.agent.daemon import Agent  # noqa: E402
from tdist.agent.notify import notify, reloading  # noqa: E402
from tdist.errors import ConfigError, TdistError  # noqa: E402

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

    def on_hup() -> None:
        reloading()  # at once, not at the main loop's next round: systemd ties it to its reload
        reload.set()

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    agent = Agent(config_path, nats_url=nats_url, http_port=http_port)
    try:
        await agent.prepare()
        # The first line on stdout (launchers and tests read it): HTTP answers from now on.
        print(f"tdist-agent: starting, http on port {agent.http_port}", flush=True)
        # READY=1 comes from agent.run once /ready would answer 200 (systemctl start returns then).
        notify(f"STATUS=starting: NATS, then {len(agent.programs)} workers")
        if await agent.start(stop):
            notify(f"STATUS=waiting for {len(agent.programs)} workers")
            await agent.run(stop, reload)
    finally:
        notify("STOPPING=1")
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
    parser.add_argument("--nats-url", help="replaces [nats] servers (the embedded server listens there; port 0: "
                                           "a free one)")
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
        log.error("agent_failed", error=exc.message, code=exc.code)
        print(f"tdist-agent: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
