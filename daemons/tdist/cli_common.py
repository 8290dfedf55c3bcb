"""What the three command lines (``tdist-agent``, ``tdist-worker``, ``tdist-client``) share.

* **Exit codes**: 0 success, 1 a runtime failure, 2 a usage or configuration error (argparse's
  own code for a bad flag, kept for a bad value or file too), 130 interrupted (Ctrl-C).
* **NATS connection settings**, the same flags and environment variables everywhere;
  precedence: flag, then environment, then the configuration file, then the default.
* ``--version`` (the installed ``tdist`` distribution's version).
* **A closed standard output** (``tdist-client ls --json | head -1``) ends the command quietly:
  stdout is pointed at /dev/null (Python's documented recipe, "Note on SIGPIPE", so that the
  interpreter's last flush cannot fail again) and the command exits 0, not 141 or 1: the reader
  stopped reading because it had what it wanted, and a non-zero code would fail
  ``set -o pipefail`` scripts that only wanted the first line.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import os
import select
import sys
from collections.abc import Callable, Mapping
from typing import Any

from tdist.config import NatsConfig, read_secret_file
from tdist.errors import ConfigError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

ENV_URL = "TDIST_NATS_URL"
ENV_USER = "TDIST_NATS_USER"
ENV_PASSWORD = "TDIST_NATS_PASSWORD"
ENV_TOKEN = "TDIST_NATS_TOKEN"
ENV_CREDS = "TDIST_NATS_CREDS"
NATS_ENV = (ENV_URL, ENV_USER, ENV_PASSWORD, ENV_TOKEN, ENV_CREDS)

EXIT_CODES = """\
exit codes:
  0  success
  1  runtime failure{runtime}
  2  usage or configuration error (a bad flag, value or file; the message names it)"""

NATS_EPILOG = f"""\
NATS connection: flags win over the environment, which wins over the configuration file:
  --nats-url URL (repeatable)   ${ENV_URL} (comma-separated)
  --user NAME                   ${ENV_USER}
  --password-file FILE          ${ENV_PASSWORD}
  --token-file FILE             ${ENV_TOKEN}
  --creds FILE                  ${ENV_CREDS} (a NATS credentials file, JWT and seed)
A user, password, token or creds file given by flag or environment replaces every credential
of the file (they do not mix). Secret files others can read are refused."""


def epilog(runtime: str = "", *extra: str) -> str:
    """The ``--help`` epilog: ``extra`` paragraphs, then the exit codes (``runtime``: what 1 means here)."""
    return "\n\n".join([*extra, EXIT_CODES.format(runtime=f": {runtime}" if runtime else "")])


def version() -> str:
    """The installed distribution's version (the package's own when run from a source tree)."""
    try:
        return importlib.metadata.version("tdist")
    except importlib.metadata.PackageNotFoundError:
        from tdist import __version__

        return __version__


def add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"{parser.prog} {version()}",
                        help="print the version and exit 0")


def subcommand_default(suppress: bool, default: Any = None) -> dict[str, Any]:
    """``add_argument``'s ``default`` for a flag that both the main parser and a subcommand take:
    ``default`` on the main parser; SUPPRESS on the subcommand's copy (``suppress``), so that an
    absent flag there does not overwrite what the main parser read before the subcommand's name."""
    return {"default": argparse.SUPPRESS if suppress else default}


def add_nats_arguments(group: Any, *, suppress: bool = False) -> None:
    """The connection flags (``suppress``: for a subcommand's copy, see ``subcommand_default``)."""
    default = subcommand_default(suppress)
    group.add_argument("--nats-url", action="append", metavar="URL", **default,
                       help=f"NATS server URL (repeatable; or ${ENV_URL}, comma-separated)")
    group.add_argument("--user", metavar="NAME", **default, help=f"NATS user (or ${ENV_USER})")
    group.add_argument("--password-file", metavar="FILE", **default,
                       help=f"read the NATS password from FILE (or ${ENV_PASSWORD})")
    group.add_argument("--token-file", metavar="FILE", **default,
                       help=f"read the NATS token from FILE (or ${ENV_TOKEN})")
    group.add_argument("--creds", metavar="FILE", **default,
                       help=f"NATS credentials file (or ${ENV_CREDS})")


@dataclasses.dataclass(frozen=True)
class NatsOverrides:
    """``[nats]`` values given by flags or the environment, each with where it came from."""

    values: Mapping[str, Any]
    """NatsConfig field -> value."""
    sources: Mapping[str, str]
    """NatsConfig field -> the flag or variable that gave it (named in errors)."""

    def apply(self, base: NatsConfig) -> NatsConfig:
        """``base`` (the file's settings) with these values; a ConfigError names the flag or variable."""
        if not self.values:
            return base
        changes = dict(self.values)
        if CREDENTIAL_FIELDS & changes.keys():
            for name in CREDENTIAL_FIELDS | {"password_file", "token_file"}:
                changes.setdefault(name, None)
        try:
            return dataclasses.replace(base, **changes)
        except ConfigError as exc:
            fields = _FIELDS_OF_KEY.get(exc.key or "", ())
            named = [self.sources[f] for f in fields if f in self.sources]
            raise ConfigError(exc.reason, key="/".join(named) if named else exc.key) from None


CREDENTIAL_FIELDS = frozenset({"user", "password", "token", "creds_file"})
_FIELDS_OF_KEY: dict[str, tuple[str, ...]] = {
    "nats.servers": ("servers",),
    "nats.user": ("user", "password"),
    "nats.token": ("token", "user"),
    "nats.creds_file": ("creds_file",),
    "nats.tls_cert_file": ("tls_cert_file", "tls_key_file"),
}
"""A NatsConfig validation error's key -> the fields whose sources it concerns."""


def nats_overrides(args: argparse.Namespace, environ: Mapping[str, str] | None = None, *,
                   use_environment: bool = True) -> NatsOverrides:
    """The connection settings of the flags in ``args`` (absent ones: None or missing), then of
    the environment. Secret files are read here (``read_secret_file``: refused if others can
    read them); a missing creds file is an error naming its flag or variable."""
    env: Mapping[str, str] = (os.environ if environ is None else environ) if use_environment else {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}

    def take(name: str, value: Any, source: str) -> None:
        if value is not None and name not in values:
            values[name], sources[name] = value, source

    urls = getattr(args, "nats_url", None)
    take("servers", tuple(urls) if urls else None, "--nats-url")
    take("user", getattr(args, "user", None), "--user")
    password, token = getattr(args, "password", None), getattr(args, "token", None)
    password_file, token_file = getattr(args, "password_file", None), getattr(args, "token_file", None)
    for flag, given, path in (("--password", password, password_file), ("--token", token, token_file)):
        if given is not None and path is not None:
            raise ConfigError(f"give {flag} or {flag}-file, not both", key=f"{flag}-file")
    if password_file is not None:
        take("password", read_secret_file(password_file, file=None, key="--password-file"), "--password-file")
    if token_file is not None:
        take("token", read_secret_file(token_file, file=None, key="--token-file"), "--token-file")
    take("password", password, "--password")
    take("token", token, "--token")
    take("creds_file", getattr(args, "creds", None), "--creds")

    if env.get(ENV_URL, "").strip():
        take("servers", tuple(u.strip() for u in env[ENV_URL].split(",") if u.strip()), ENV_URL)
    take("user", env.get(ENV_USER) or None, ENV_USER)
    take("password", env.get(ENV_PASSWORD) or None, ENV_PASSWORD)
    take("token", env.get(ENV_TOKEN) or None, ENV_TOKEN)
    take("creds_file", env.get(ENV_CREDS) or None, ENV_CREDS)
    creds = values.get("creds_file")
    if creds is not None and not os.path.isfile(creds):
        raise ConfigError(f"file {creds!r} not found", key=sources["creds_file"])
    return NatsOverrides(values, sources)


def stdout_closed() -> bool:
    """Has standard output's reader gone (a pipe or socket whose other end is closed)?"""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def silence_stdout() -> None:
    """Point stdout at /dev/null: its reader is gone, and the interpreter's last flush must not fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def write_output(write: Callable[[], None]) -> None:
    """Run ``write`` (prints to stdout, then a flush); if stdout's reader is gone, the rest of the
    output is dropped quietly and the caller goes on (its exit code stays its own)."""
    try:
        write()
        sys.stdout.flush()
    except BrokenPipeError:
        if not stdout_closed():
            raise
        silence_stdout()


def quiet_pipe(main: Callable[[], int]) -> int:
    """Run ``main``; a closed standard output ends it quietly with exit 0 (see the module's
    docstring). A BrokenPipeError from anything else (a socket) is not swallowed."""
    try:
        try:
            code = main()
        except SystemExit:  # argparse after --help, --version or a usage error: flush while we can catch
            sys.stdout.flush()
            raise
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        if not stdout_closed():
            raise
        silence_stdout()
        return EXIT_OK
