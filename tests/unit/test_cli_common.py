"""The command lines' shared rules: NATS settings precedence, errors naming the flag, ConfigError.reason."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from tdist.agent.config import parse_agent_config
from tdist.cli_common import add_nats_arguments, nats_overrides
from tdist.config import NatsConfig, parse_nats, _Table
from tdist.errors import ConfigError
from tdist.worker.main import build_parser, resolve


def flags(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_nats_arguments(p)
    return p.parse_args(list(argv))


def secret(tmp: Path, name: str, value: str) -> str:
    path = tmp / name
    path.write_text(value + "\n")
    path.chmod(0o600)
    return str(path)


FILE = NatsConfig(servers=("nats://file:4222",), user="file-user", password="file-pw")


def test_flags_win_over_the_environment_which_wins_over_the_file(tmp_path: Path) -> None:
    env = {"TDIST_NATS_URL": "nats://env-a:4222, nats://env-b:4222", "TDIST_NATS_USER": "env-user",
           "TDIST_NATS_PASSWORD": "env-pw"}
    assert nats_overrides(flags(), {}).apply(FILE) == FILE
    from_env = nats_overrides(flags(), env).apply(FILE)
    assert from_env.servers == ("nats://env-a:4222", "nats://env-b:4222")
    assert (from_env.user, from_env.password) == ("env-user", "env-pw")
    from_flags = nats_overrides(flags("--nats-url", "nats://flag:4222", "--password-file",
                                      secret(tmp_path, "pw", "flag-pw")), env).apply(FILE)
    assert from_flags.servers == ("nats://flag:4222",)
    assert (from_flags.user, from_flags.password) == ("env-user", "flag-pw")  # per setting


def test_a_credential_from_flag_or_environment_replaces_all_of_the_files(tmp_path: Path) -> None:
    token = nats_overrides(flags(), {"TDIST_NATS_TOKEN": "t0k"}).apply(FILE)
    assert (token.user, token.password, token.token) == (None, None, "t0k")
    creds = tmp_path / "x.creds"
    creds.write_text("creds")
    by_flag = nats_overrides(flags("--creds", str(creds)), {}).apply(FILE)
    assert (by_flag.user, by_flag.password, by_flag.creds_file) == (None, None, str(creds))
    url_only = nats_overrides(flags("--nats-url", "nats://x:1"), {}).apply(FILE)
    assert (url_only.user, url_only.password) == ("file-user", "file-pw")  # a URL is no credential


def test_errors_name_the_flag_or_the_variable(tmp_path: Path) -> None:
    cases = [
        (flags("--nats-url", "nohost"), {}, "--nats-url"),
        (flags(), {"TDIST_NATS_URL": "nohost"}, "TDIST_NATS_URL"),
        (flags("--user", "u"), {}, "--user"),
        (flags(), {"TDIST_NATS_USER": "u"}, "TDIST_NATS_USER"),
        (flags("--user", "u"), {"TDIST_NATS_TOKEN": "t"}, "--user"),
    ]
    for args, env, named in cases:
        with pytest.raises(ConfigError) as err:
            nats_overrides(args, env).apply(NatsConfig())
        assert err.value.key is not None and err.value.key.split("/")[0] == named, err.value
        assert "nats." not in err.value.message
    with pytest.raises(ConfigError, match="TDIST_NATS_CREDS: file .* not found"):
        nats_overrides(flags(), {"TDIST_NATS_CREDS": str(tmp_path / "nope")})
    readable = secret(tmp_path, "pw", "x")
    Path(readable).chmod(0o644)
    with pytest.raises(ConfigError, match="--password-file: .* readable by others"):
        nats_overrides(flags("--password-file", readable), {})
    with pytest.raises(ConfigError, match="^TDIST_NATS_CREDS: a creds file needs"):
        creds = tmp_path / "c.creds"
        creds.write_text("c")
        nats_overrides(flags(), {"TDIST_NATS_CREDS": str(creds)}).apply(NatsConfig(embedded=True))


def test_the_worker_reads_the_environment_except_with_the_agents_nats_file(tmp_path: Path) -> None:
    nats_file = tmp_path / "nats.toml"
    nats_file.write_text('[nats]\nservers = ["nats://agent:4222"]\n')
    env = {"TDIST_NATS_URL": "nats://env:4222"}
    base = ["--name", "w", "--operator", "name=a,implementation=m:C"]
    assert resolve(build_parser().parse_args(base), env).nats.servers == ("nats://env:4222",)
    with_file = build_parser().parse_args([*base, "--nats-file", str(nats_file)])
    assert resolve(with_file, env).nats.servers == ("nats://agent:4222",)
    flag = build_parser().parse_args([*base, "--nats-file", str(nats_file), "--nats-url", "nats://flag:1"])
    assert resolve(flag, env).nats.servers == ("nats://flag:1",)


def test_worker_flags_are_named_in_errors() -> None:
    base = ["--name", "w", "--operator", "name=a,implementation=m:C"]
    for extra, flag in ((["--ack-wait", "0.1"], "--ack-wait"), (["--namespace", "a.b"], "--namespace"),
                        (["--registry-ttl", "0"], "--registry-ttl"), (["--tensor-lease", "0"], "--tensor-lease")):
        with pytest.raises(ConfigError) as err:
            resolve(build_parser().parse_args([*base, *extra]), {})
        assert err.value.key == flag and err.value.message.startswith(f"{flag}: ")


def test_config_error_reason_is_the_bare_reason() -> None:
    err = ConfigError("cannot import 'x': ModuleNotFoundError: no", file="/f.toml", key="a.b")
    assert err.message == "/f.toml:a.b: cannot import 'x': ModuleNotFoundError: no"
    assert err.reason == "cannot import 'x': ModuleNotFoundError: no"
    # Re-raised with the full key by the parsers: the reason survives whole, colons and all.
    with pytest.raises(ConfigError) as nats_err:
        parse_nats(_Table({"servers": ["no-scheme: here"]}, "/f.toml", "nats"))
    assert nats_err.value.reason == "server URL 'no-scheme: here' needs a scheme (nats://, tls://)"
    assert nats_err.value.message == f"/f.toml:nats.servers: {nats_err.value.reason}"
    with pytest.raises(ConfigError) as http_err:
        parse_agent_config({"http": {"port": 70000}}, "/f.toml")
    assert (http_err.value.key, http_err.value.reason) == ("http.port", "must be between 0 and 65535")
