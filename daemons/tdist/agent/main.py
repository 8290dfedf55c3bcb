"""``tdist-agent``: the per-node daemon (``systemctl start tdist-agent`` runs it).

    tdist-agent [run] [--config /etc/tdist/agent.toml] [--nats-url URL] [--http-port N]
    tdist-agent check-config [FILE] [--no-host-checks]   # validate: exit 0, or 2 listing each problem
    tdist-agent --version

``run`` is the default command: ``tdist-agent --config FILE`` runs the agent.
SIGHUP re-reads the file (an invalid one is logged and the running set stays);
SIGTERM or SIGINT drains the workers and exits 0. A start-up failure (a port in use,
another agent on the state dir) is one line on stderr and exit 1, a bad file or flag exit 2,
with nothing started. SIGHUP is blocked from this module's first line until its handler is
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
import dataclasses  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402

from tdist import logs  # noqa: E402
from tdist.agent.config import AgentConfig, load_agent_config  # noqa: E402
from tdist.agent.daemon import Agent  # noqa: E402
from tdist.agent.host_checks import IMPORT_TIMEOUT, check_host  # noqa: E402
from tdist.agent.notify import notify, reloading  # noqa: E402
from tdist.cli_common import (  # noqa: E402
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    NATS_ENV,
    NATS_EPILOG,
    NatsOverrides,
    add_nats_arguments,
    add_version,
    epilog,
    nats_overrides,
    quiet_pipe,
    subcommand_default,
)
from tdist.errors import ConfigError, TdistError  # noqa: E402

PROG = "tdist-agent"
log = logs.get_logger("tdist.agent.main")
DEFAULT_CONFIG = "/etc/tdist/agent.toml"

RUN_HELP = "run the agent (the default command: `tdist-agent --config FILE` is `tdist-agent run --config FILE`)"
CHECK_HELP = "validate a file, and check what a start would hit on this host"
CHECK_DESCRIPTION = """\
Validate FILE (default /etc/tdist/agent.toml), then check what a start would hit on this host:
Triton model repositories and models exist, implementations import (each in a child process,
with a timeout) and are tdist Operator classes, GPU indices exist (or enough GPUs for
gpus = "auto"), and the HTTP and embedded NATS ports are free (not checked while an agent runs
on the file's state dir: they are its own). Workers with count = 0 are not checked. Relative
paths resolve against the current directory, as for the agent's workers.
Every problem is one line on stderr, FILE:KEY: REASON; exit 0 when there is none."""


def _add_run_arguments(p: argparse.ArgumentParser, *, suppress: bool) -> None:
    """``run``'s flags; on the main parser too (``tdist-agent --config FILE``). The subcommand's copy
    has SUPPRESS defaults so that it keeps what the main parser read."""
    p.add_argument("--config", metavar="FILE", **subcommand_default(suppress, DEFAULT_CONFIG),
                   help=f"the agent's TOML file (default {DEFAULT_CONFIG})")
    p.add_argument("--http-port", type=int, metavar="PORT", **subcommand_default(suppress),
                   help="replaces [http] port (0: a free one)")
    add_nats_arguments(p.add_argument_group(
        "NATS (replace the file's [nats] servers and credentials; the embedded server listens on the "
        "first URL, port 0: a free one)"), suppress=suppress)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage=f"{PROG} [run] [--config FILE] [--http-port PORT] [NATS flags]\n"
              f"       {PROG} check-config [FILE] [--no-host-checks] [--import-timeout SECONDS]\n"
              f"       {PROG} --version",
        epilog=epilog("the agent could not start or had to stop (a port in use, another agent on the state "
                      "dir, supervisord dying)", NATS_EPILOG))
    add_version(p)
    _add_run_arguments(p, suppress=False)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    run_p = sub.add_parser("run", prog=f"{PROG} run", help=RUN_HELP, description=RUN_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog=epilog("the agent could not start or had to stop", NATS_EPILOG))
    _add_run_arguments(run_p, suppress=True)
    check = sub.add_parser("check-config", prog=f"{PROG} check-config", help=CHECK_HELP,
                           description=CHECK_DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog=epilog("", "exit 2 also for each host check that fails"))
    check.add_argument("file", nargs="?", default=DEFAULT_CONFIG, metavar="FILE",
                       help=f"the agent's TOML file (default {DEFAULT_CONFIG})")
    check.add_argument("--no-host-checks", action="store_true",
                       help="validate the file only (a file meant for another host)")
    check.add_argument("--import-timeout", type=float, default=IMPORT_TIMEOUT, metavar="SECONDS",
                       help=f"seconds each implementation's import may take (default {IMPORT_TIMEOUT:g})")
    return p


def check_config(path: str, *, host_checks: bool = True, import_timeout: float = IMPORT_TIMEOUT) -> int:
    try:
        cfg = load_agent_config(path)
    except ConfigError as exc:
        print(f"{PROG}: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    instances = sum(w.count for w in cfg.workers)
    valid = f"{path}: valid: node {cfg.node.name}, {len(cfg.workers)} worker kinds, {instances} instances"
    if not host_checks:
        print(f"{valid}; host checks off")
        return EXIT_OK
    logs.configure("warning", component="agent")  # GPU detection may warn: JSON on stderr
    report = check_host(cfg, import_timeout=import_timeout)
    if report.problems:
        for problem in report.problems:
            print(f"{PROG}: {problem.message}", file=sys.stderr)
        print(f"{PROG}: {path}: {len(report.problems)} problem(s) on this host "
              f"(--no-host-checks checks the file alone)", file=sys.stderr)
        return EXIT_USAGE
    print(f"{valid}; on this host: {report.summary()}")
    return EXIT_OK


def apply_overrides(cfg: AgentConfig, nats: NatsOverrides, http_port: int | None) -> AgentConfig:
    """The file's settings with the flags' and the environment's; a ConfigError names the flag."""
    cfg = dataclasses.replace(cfg, nats=nats.apply(cfg.nats))
    if http_port is not None:
        try:
            cfg = dataclasses.replace(cfg, http=dataclasses.replace(cfg.http, port=http_port))
        except ConfigError as exc:
            raise ConfigError(exc.reason, key="--http-port") from None
    return cfg


class CliAgent(Agent):
    """The Agent with the command line's and the environment's ``[nats]`` settings applied at
    every load (start and each SIGHUP), as ``Agent`` applies ``--http-port`` itself."""

    def __init__(self, config_path: str, nats: NatsOverrides, http_port: int | None) -> None:
        self._overrides = nats
        super().__init__(config_path, http_port=http_port)

    def _load(self) -> AgentConfig:
        cfg = super()._load()
        return dataclasses.replace(cfg, nats=self._overrides.apply(cfg.nats))


async def run(config_path: str, nats: NatsOverrides | None = None, http_port: int | None = None) -> int:
    stop, reload = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def on_hup() -> None:
        reloading()  # at once, not at the main loop's next round: systemd ties it to its reload
        reload.set()

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    agent = CliAgent(config_path, nats or NatsOverrides({}, {}), http_port)
    try:
        await agent.prepare()
        # The first line on stdout (launchers and tests read it): HTTP answers from now on.
        print(f"{PROG}: starting, http on port {agent.http_port}", flush=True)
        # READY=1 comes from agent.run once /ready would answer 200 (systemctl start returns then).
        notify(f"STATUS=starting: NATS, then {len(agent.programs)} workers")
        if await agent.start(stop):
            notify(f"STATUS=waiting for {len(agent.programs)} workers")
            await agent.run(stop, reload)
    finally:
        notify("STOPPING=1")
        await agent.stop()
    return EXIT_OK


def run_command(opts: argparse.Namespace) -> int:
    try:
        nats = nats_overrides(opts)
        cfg = apply_overrides(load_agent_config(opts.config), nats, opts.http_port)
    except ConfigError as exc:
        print(f"{PROG}: configuration error: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    for name in NATS_ENV:  # read once: supervisord, the workers and Triton do not inherit them
        os.environ.pop(name, None)
    logs.configure(cfg.logging.level, file=cfg.logging.file, rotate_bytes=cfg.logging.rotate_bytes,
                   backups=cfg.logging.backups, component="agent", node=cfg.node.name)
    try:
        return asyncio.run(run(opts.config, nats, opts.http_port))
    except ConfigError as exc:
        log.error("agent_failed", error=exc.message, code=exc.code)
        print(f"{PROG}: configuration error: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except TdistError as exc:
        log.error("agent_failed", error=exc.message, code=exc.code)
        print(f"{PROG}: {exc.message}", file=sys.stderr)
        return EXIT_FAILURE


def _main(argv: Sequence[str] | None) -> int:
    opts = build_parser().parse_args(argv)
    if opts.command == "check-config":
        return check_config(opts.file, host_checks=not opts.no_host_checks, import_timeout=opts.import_timeout)
    return run_command(opts)


def main(argv: Sequence[str] | None = None) -> int:
    return quiet_pipe(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
