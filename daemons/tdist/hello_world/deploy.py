"""Run a deployment file on this machine (the hello world by default), and optionally a client.

    python -m tdist.hello_world.deploy                     # start, wait for Ctrl-C
    python -m tdist.hello_world.deploy --client --requests 100 --concurrency 16

By default this runs ``tdist-agent`` on the file (it starts the embedded nats-server
and the workers under supervisord) and waits for its ``/ready``. With ``--no-agent``
it starts the nats-server and ``tdist-worker`` processes itself. With ``--client ...``
it then runs ``tdist-client`` with the rest of the arguments, drains everything
(SIGTERM) and exits with the client's exit code.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

from tdist.config import load_worker_file, read_toml
from tdist.errors import ConfigError
from tdist.process import free_port
from tdist.worker.spawn import spawn_worker
from tdist.nats_server import EmbeddedNatsServer, NatsServerOptions


def worker_entries(config: str) -> list[tuple[str, int]]:
    """(name, count) of every [[workers]] entry, each validated as tdist-worker will read it."""
    entries = read_toml(config).get("workers")
    if not isinstance(entries, list) or not entries:
        raise ConfigError("needs at least one [[workers]] entry", file=config, key="workers")
    out = []
    for i, entry in enumerate(entries):
        name = entry.get("name") if isinstance(entry, dict) else None
        count = entry.get("count", 1) if isinstance(entry, dict) else None
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ConfigError("count must be a whole number >= 0", file=config, key=f"workers[{i}].count")
        load_worker_file(config, str(name))  # full validation, errors name file and key
        out.append((str(name), count))
    return out


def start_worker(config: str, name: str, index: int, nats_url: str, log_dir: Path) -> tuple[subprocess.Popen[str], str]:
    worker = spawn_worker(["--config", config, "--worker", name, "--nats-url", nats_url],
                          log_dir / f"{name}.{index}.log")
    return worker.proc, worker.worker_id


def serve_or_run_client(nats_url: str, namespace: str, client_args: list[str] | None) -> int:
    """With client arguments, run tdist-client against the deployment (its exit code); else wait for Ctrl-C."""
    if client_args is not None:
        return subprocess.call([sys.executable, "-m", "tdist.client.cli", "--nats-url", nats_url,
                                "--namespace", namespace, *client_args])
    print("Workers started ... press Ctrl-C to exit", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    return 0


def through_agent(config: str, nats_port: int | None, client_args: list[str] | None) -> int:
    """Run tdist-agent on ``config``; wait for /ready; run the client; drain with SIGTERM."""
    try:
        file = load_worker_file(config, worker_entries(config)[0][0])
    except ConfigError as exc:
        print(f"deploy: configuration error: {exc}", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "tdist.agent.main", "--config", config, "--http-port", "0"]
    nats_url = file.nats.servers[0]
    if nats_port is not None:
        host = urlparse(nats_url).hostname or "127.0.0.1"
        nats_url = f"nats://{host}:{nats_port or free_port(host)}"
        cmd += ["--nats-url", nats_url]
    os.makedirs("logs", exist_ok=True)
    with open(os.path.join("logs", "agent.log"), "ab") as agent_log:  # its JSON log lines
        agent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=agent_log, text=True)
    try:
        assert agent.stdout is not None
        line = agent.stdout.readline()
        if "http on port" not in line:
            print(f"deploy: tdist-agent failed to start (exit {agent.wait()}); see logs/agent.log", file=sys.stderr)
            return 1
        port = int(line.rsplit(" ", 1)[1])
        print(f"tdist-agent up (pid {agent.pid}, log logs/agent.log), nats at {nats_url}, "
              f"http on 127.0.0.1:{port}", flush=True)
        if not _wait_ready(port, agent, timeout=300):
            print("deploy: the agent's workers did not become ready", file=sys.stderr)
            return 1
        print(f"deployment ready: {_get(port, '/ready')[1].strip()}", flush=True)
        code = serve_or_run_client(nats_url, file.request_plane.namespace, client_args)
        agent.send_signal(signal.SIGTERM)
        agent_code = agent.wait(300)
        print(f"tdist-agent drained its workers and exited with {agent_code}", flush=True)
        return code or agent_code
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        if agent.stdout:
            agent.stdout.close()


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return 0, str(e)


def _wait_ready(port: int, agent: subprocess.Popen[str], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and agent.poll() is None:
        if _get(port, "/ready")[0] == 200:
            return True
        time.sleep(0.2)
    return False


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    client_args: list[str] | None = None
    if "--client" in argv:
        at = argv.index("--client")
        argv, client_args = argv[:at], argv[at + 1 :]
    parser = argparse.ArgumentParser(prog="python -m tdist.hello_world.deploy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="etc/tdist/agent.toml")
    parser.add_argument("--nats-port", type=int, help="embedded server port (0: a free one); default from the file")
    parser.add_argument("--log-dir", default="logs", help="where each process writes its JSON log (--no-agent)")
    parser.add_argument("--no-agent", action="store_true", help="start the workers here instead of via tdist-agent")
    args = parser.parse_args(argv)
    if not args.no_agent:
        return through_agent(args.config, args.nats_port, client_args)
    try:
        entries = worker_entries(args.config)
        file = load_worker_file(args.config, entries[0][0])
    except ConfigError as exc:
        print(f"deploy: configuration error: {exc}", file=sys.stderr)
        return 2
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    namespace = file.request_plane.namespace
    server: EmbeddedNatsServer | None = None
    workers: list[subprocess.Popen[str]] = []
    try:
        nats_url = file.nats.servers[0]
        if file.nats.embedded:
            where = urlparse(nats_url)
            port = args.nats_port if args.nats_port is not None else (where.port or 4222)
            server = EmbeddedNatsServer(NatsServerOptions(host=where.hostname or "127.0.0.1", port=port,
                                                          log_file=str(log_dir / "nats-server.out")))
            server.start()
            nats_url = server.url
            print(f"nats-server up at {nats_url} (pid {server.pid}, JetStream), namespace {namespace!r}", flush=True)
        for name, count in entries:
            for i in range(count):
                proc, worker_id = start_worker(args.config, name, i, nats_url, log_dir)
                workers.append(proc)
                print(f"worker {worker_id} up (pid {proc.pid}, log {log_dir / f'{name}.{i}.log'})", flush=True)
        code = serve_or_run_client(nats_url, namespace, client_args)
        for proc in workers:
            proc.send_signal(signal.SIGTERM)
        exits = [proc.wait(120) for proc in workers]
        print(f"workers drained and exited with {exits}", flush=True)
        return code if code else (0 if all(e == 0 for e in exits) else 1)
    except (RuntimeError, OSError) as exc:
        print(f"deploy: {exc}", file=sys.stderr)
        return 1
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout:
                proc.stdout.close()
        if server is not None:
            server.stop()
            print("nats-server stopped", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
