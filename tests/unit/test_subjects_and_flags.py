"""NATS names (tdist.names), the tdist-worker flags, and the worker state machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from tdist import names
from tdist.config import LoggingConfig, NatsConfig, OperatorConfig, RequestPlaneConfig
from tdist.errors import ConfigError
from tdist.worker.main import build_parser, parse_operator_flag, resolve
from tdist.worker.states import InvalidTransition, WorkerState, check_transition


def nats_match(pattern: str, subject: str) -> bool:
    """NATS subject matching: '*' is one token, '>' one or more trailing tokens."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


# --- names ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "echo", "Echo_v2", "tok-enize", "0", "x" * 64])
def test_valid_names(name: str) -> None:
    assert names.check_name("operator", name) == name


@pytest.mark.parametrize("name", ["", "a.b", "a b", "a*", "a>", "x" * 65, "é", "a/b", "a\n", None, 5])
def test_invalid_names(name: object) -> None:
    with pytest.raises(ConfigError, match="must be 1-64 characters") as info:
        names.check_name("operator", name)  # type: ignore[arg-type]
    assert info.value.key == "operator"


def test_check_name_key_can_differ_from_kind() -> None:
    with pytest.raises(ConfigError) as info:
        names.check_name("worker name", "a.b", key="name")
    assert info.value.key == "name"
    assert "worker name 'a.b'" in info.value.message


def test_subjects() -> None:
    assert names.stream_name("demo") == "TDIST_demo"
    assert names.stream_subjects("demo") == ["tdist.demo.req.>"]
    assert names.request_subject("demo", "echo", 2) == "tdist.demo.req.echo.2"
    assert names.directed_subject("demo", "echo", 2, "w-1") == "tdist.demo.req.echo.2.w-1"
    assert names.cancel_subject("demo", "r1") == "tdist.demo.cancel.r1"
    assert names.shared_consumer("echo", 2) == "echo_v2"
    assert names.directed_consumer("w-1") == "direct_w-1"


def test_every_request_subject_is_in_the_stream() -> None:
    (stream_filter,) = names.stream_subjects("demo")
    assert nats_match(stream_filter, names.request_subject("demo", "echo", 1))
    assert nats_match(stream_filter, names.directed_subject("demo", "echo", 1, "w-1"))
    assert not nats_match(stream_filter, names.cancel_subject("demo", "r1"))
    assert not nats_match(stream_filter, names.request_subject("other", "echo", 1))


def test_directed_filter_matches_directed_subjects_of_its_worker_only() -> None:
    pattern = names.directed_filter("demo", "w-1")
    assert pattern == "tdist.demo.req.*.*.w-1"
    assert nats_match(pattern, names.directed_subject("demo", "echo", 1, "w-1"))
    assert nats_match(pattern, names.directed_subject("demo", "tokenize", 7, "w-1"))
    assert not nats_match(pattern, names.directed_subject("demo", "echo", 1, "w-2"))
    assert not nats_match(pattern, names.directed_subject("other", "echo", 1, "w-1"))
    # The shared subject has one token less, so the directed consumer never takes shared requests.
    assert not nats_match(pattern, names.request_subject("demo", "echo", 1))


def test_shared_subject_does_not_match_directed_requests() -> None:
    shared = names.request_subject("demo", "echo", 1)
    assert nats_match(shared, shared)
    assert not nats_match(shared, names.directed_subject("demo", "echo", 1, "w-1"))


def test_cancel_wildcard_matches_cancel_subjects() -> None:
    assert nats_match(names.cancel_wildcard("demo"), names.cancel_subject("demo", "r-42"))
    assert not nats_match(names.cancel_wildcard("demo"), names.cancel_subject("other", "r-42"))


def test_bucket_and_advisory_names() -> None:
    assert names.workers_bucket("demo") == "tdist_demo_workers"
    assert names.nodes_bucket("demo") == "tdist_demo_nodes"
    assert names.max_deliveries_advisory("demo") == "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.TDIST_demo.*"


# --- --operator -----------------------------------------------------------------------


def test_caller_inbox_subjects() -> None:
    inbox = "_INBOX.Zt5cYx2Q7L8pQ1"
    reply = names.reply_subject(inbox, "a1b2")
    assert reply == f"{inbox}.r.a1b2" and names.caller_inbox(reply) == inbox
    for subject in (names.finals_subject(inbox, 3), names.pub_ack_subject(inbox, "k"),
                    names.split_notice_subject(inbox, 7)):
        assert nats_match(f"{inbox}.>", subject)  # all on the caller's one subscription
    assert names.finals_subject(inbox, 3) == f"{inbox}.b.3"


@pytest.mark.parametrize("reply", ["_INBOX.abc", "r.x", ".r.x", "_INBOX.abc.r.", "_INBOX.abc.r.x.y", "inbox"])
def test_a_reply_subject_not_of_a_tdist_caller_has_no_caller_inbox(reply: str) -> None:
    assert names.caller_inbox(reply) is None  # answered on its own subject, never batched


def test_parse_operator_flag() -> None:
    op = parse_operator_flag(
        "name=echo,implementation=pkg.mod:Echo,version=3,max_inflight=8,param.delay=0.5,param.name=abc,param.n=2"
    )
    assert op == OperatorConfig(
        name="echo",
        implementation="pkg.mod:Echo",
        version=3,
        max_inflight=8,
        parameters={"delay": 0.5, "name": "abc", "n": 2},
    )
    assert isinstance(op.parameters["delay"], float)
    assert isinstance(op.parameters["name"], str)


def test_parse_operator_flag_json_params_and_defaults() -> None:
    op = parse_operator_flag('name=a,implementation=m:C,param.on=true,param.s="1",param.none=null,')
    assert op.parameters == {"on": True, "s": "1", "none": None}
    assert (op.version, op.max_inflight) == (1, 1)


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("implementation=m:C", "needs name="),
        ("name=echo", "needs implementation="),
        ("", "needs name="),
        ("name=echo,implementation=m:C,colour=red", "unknown --operator key 'colour'"),
        ("name=echo,implementation=m:C,max_inflight=many", "max_inflight must be an integer, got 'many'"),
        ("name=echo,implementation=m:C,max_inflight=1.5", "max_inflight must be an integer"),
        ("name=echo,implementation=m:C,version=v2", "version must be an integer"),
        ("name=echo,implementation", "is not key=value"),
        ("name=echo,implementation=pkg.mod.Echo", "must be 'module:Class'"),
        ("name=bad.name,implementation=m:C", "operator name 'bad.name'"),
        ("name=echo,implementation=m:C,max_inflight=0", "max_inflight must be at least 1"),
    ],
)
def test_parse_operator_flag_errors(spec: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_operator_flag(spec)
    assert reason in info.value.message


# --- resolve ---------------------------------------------------------------------------


def test_resolve_from_flags() -> None:
    args = build_parser().parse_args(
        [
            "--name", "echoes",
            "--operator", "name=echo,implementation=m:Echo,max_inflight=4",
            "--operator", "name=echo,implementation=m:Echo2,version=2",
            "--nats-url", "nats://a:4222",
            "--nats-url", "nats://b:4222",
            "--namespace", "ns1",
            "--ack-wait", "2.5",
            "--max-deliver", "7",
            "--registry-ttl", "3",
            "--drain-timeout", "0",
            "--log-level", "debug",
            "--log-file", "/tmp/w.jsonl",
        ]
    )  # fmt: skip
    wf = resolve(args)
    assert wf.nats == NatsConfig(servers=("nats://a:4222", "nats://b:4222"))
    assert wf.request_plane == RequestPlaneConfig(namespace="ns1", ack_wait=2.5, max_deliver=7)
    assert wf.logging == LoggingConfig(level="debug", file="/tmp/w.jsonl")
    assert wf.worker.name == "echoes"
    assert (wf.worker.registry_ttl, wf.worker.drain_timeout) == (3.0, 0.0)
    assert wf.worker.operators == (
        OperatorConfig(name="echo", implementation="m:Echo", max_inflight=4),
        OperatorConfig(name="echo", implementation="m:Echo2", version=2),
    )


def test_resolve_from_flags_keeps_defaults() -> None:
    wf = resolve(build_parser().parse_args(["--name", "w", "--operator", "name=a,implementation=m:C"]))
    assert wf.nats == NatsConfig()
    assert wf.request_plane == RequestPlaneConfig()
    assert wf.logging == LoggingConfig()
    assert wf.worker.registry_ttl == 5.0


@pytest.mark.parametrize("argv", [[], ["--name", "w"], ["--operator", "name=a,implementation=m:C"]])
def test_resolve_needs_name_and_operator_without_config(argv: list[str]) -> None:
    with pytest.raises(ConfigError, match="give --name and at least one --operator"):
        resolve(build_parser().parse_args(argv))


def test_resolve_flags_are_validated() -> None:
    base = ["--name", "w", "--operator", "name=a,implementation=m:C"]
    with pytest.raises(ConfigError, match="needs a scheme"):
        resolve(build_parser().parse_args([*base, "--nats-url", "localhost:4222"]))
    with pytest.raises(ConfigError, match="at least 0.5"):
        resolve(build_parser().parse_args([*base, "--ack-wait", "0.1"]))
    with pytest.raises(ConfigError, match="'a.b'"):
        resolve(build_parser().parse_args([*base, "--namespace", "a.b"]))


def test_resolve_flags_override_config_file(tmp_path: Path) -> None:
    path = tmp_path / "w.toml"
    path.write_text(
        '[request_plane]\nnamespace = "file-ns"\nmax_deliver = 4\n'
        '[[workers]]\nname = "one"\n[[workers.operators]]\nname = "a"\nimplementation = "m:A"\n'
        '[[workers]]\nname = "two"\n[[workers.operators]]\nname = "b"\nimplementation = "m:B"\n'
    )
    args = build_parser().parse_args(["--config", str(path), "--worker", "two", "--namespace", "flag-ns"])
    wf = resolve(args)
    assert wf.worker.name == "two"
    assert wf.worker.operators[0].name == "b"
    assert wf.request_plane.namespace == "flag-ns"
    assert wf.request_plane.max_deliver == 4  # not overridden


# --- worker states ------------------------------------------------------------------------

S = WorkerState
ALLOWED = {
    (S.STARTING, S.SERVING),
    (S.STARTING, S.STOPPED),
    (S.SERVING, S.DRAINING),
    (S.SERVING, S.STOPPED),
    (S.DRAINING, S.STOPPED),
}


@pytest.mark.parametrize(("current", "new"), sorted(ALLOWED))
def test_allowed_transitions(current: WorkerState, new: WorkerState) -> None:
    check_transition(current, new)


@pytest.mark.parametrize(
    ("current", "new"), sorted((a, b) for a in S for b in S if (a, b) not in ALLOWED)
)
def test_forbidden_transitions(current: WorkerState, new: WorkerState) -> None:
    with pytest.raises(InvalidTransition, match=f"from {current.value} to {new.value}"):
        check_transition(current, new)
