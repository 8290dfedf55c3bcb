"""The data plane's guards before UCX (pure): worker-address checks, the request layout, the
endpoint cache's bounds and retirement, the rate-limited drop log."""

from __future__ import annotations

import asyncio
import random
import struct
from typing import Any

import pytest

from tdist.data_plane import ucx_address
from tdist.data_plane.ucx import (
    REQUEST_MAX,
    REQUEST_TAG,
    BadRequest,
    DropLog,
    EndpointCache,
    encode_request,
    new_reply_tag,
    parse_request,
)

# Worker addresses UCX 1.21 (ucxx 0.52) packed on this machine: address version 1 (the default)
# and 2 (UCX_ADDRESS_VERSION=v2); transports self, tcp (two devices), sysv, posix, cma.
V1 = bytes.fromhex(
    "20d6a36aa1e0af466a0000637577cc2b320040975000000000004f030088001d02459d1c8aa301060002c0000202cf1917b75138"
    "9763344bd7e037370013230082894101120102f0b33e5ec57179f6f9ffffef00000000cf1917b75138539e3e4bd7e03737011323"
    "0082ed0d0208f0b33e5ec57179768d5377cc2b320000705077ccab33004f23008809000400000000000308f0b33e5ec5717976a7"
    "d377cc2b320000705077ccab33004f230088255f0000040000c00408f0b33e5ec5717976478bbd37063600242e5077ccab330092"
    "210084255f00008580"
)
V2 = bytes.fromhex(
    "5102edd92058d72369af000063754426000080001b0088a7c14f34a802afc001060002c0000202cf190c015a0000408b0082a043"
    "01120102f0b33e5ec57179f6f9ffffef00000000cf190c015a0100408b0082e3bb0208f0b33e5ec57179768d5344e5430081009b"
    "00882c000b00000000000308f0b33e5ec5717976a7d344e5430081009b00881b330000040000c00488f0b33e5ec5717976478bfb"
    "55430000009900841b330000"
)


@pytest.mark.parametrize("address", [V1, V2])
def test_real_addresses_parse_to_their_transports(address: bytes) -> None:
    layout = ucx_address.parse(address)
    assert [(t.dev_addr_len, t.iface_addr_len) for t in layout.transports] == [
        (0, 8), (6, 2), (18, 2), (8, 8), (8, 8), (8, 4)
    ]
    assert ucx_address.AddressChecker(address).check(address) == layout


def test_another_process_with_the_same_transports_passes() -> None:
    other = bytearray(V1)
    other[1:9] = bytes(8)  # another worker uuid
    ucx_address.AddressChecker(V1).check(bytes(other))


@pytest.mark.parametrize("address", [V1, V2])
def test_every_truncation_and_any_extension_is_refused(address: bytes) -> None:
    for cut in range(len(address)):
        with pytest.raises(ucx_address.BadAddress):
            ucx_address.parse(address[:cut])
    with pytest.raises(ucx_address.BadAddress, match="after the last device"):
        ucx_address.parse(address + b"\x00")


@pytest.mark.parametrize("header", [0x27, 0x25, 0xFF, 0x0F, 0x02])
def test_unknown_address_versions_are_refused(header: int) -> None:
    # UCX asserts (aborts the process) on these: address.c, ucp_address_unpack_header
    with pytest.raises(ucx_address.BadAddress, match="unknown address version"):
        ucx_address.parse(bytes([header]) + V1[1:])


def test_other_header_flags_or_version_are_refused_by_the_checker() -> None:
    checker = ucx_address.AddressChecker(V1)
    with pytest.raises(ucx_address.BadAddress, match="differ"):
        checker.check(V2)
    with pytest.raises(ucx_address.BadAddress):
        checker.check(bytes([0x60]) + V1[1:])  # + client id flag: 8 more bytes expected


def test_a_known_transport_with_other_address_lengths_is_tolerated_beside_a_matching_one() -> None:
    """Another host's build or devices may pack a transport differently (the three-host cluster
    test: posix/sysv 16/8 beside 8/8 here); the address is taken while another shared transport
    matches, and refused when none does."""
    layout = ucx_address.parse(V1)
    assert layout.transports[-1].iface_addr_len == 4
    # cma's interface address is 4 bytes here; claim 5 and add a byte to stay well-formed.
    # The address ends with cma's length byte, its 4 bytes, then an empty last device (2 bytes).
    pos = len(V1) - 2 - 4 - 1
    assert V1[pos] & 0x3F == 4
    longer = V1[:pos] + bytes([V1[pos] + 1]) + V1[pos + 1 : pos + 5] + b"\x00" + V1[pos + 5 :]
    ucx_address.parse(longer)  # well-formed, and other transports still match this process's
    ucx_address.AddressChecker(V1).check(longer)
    only_cma = ucx_address.AddressChecker(V1)
    only_cma._lengths = {t.name_csum: {(t.dev_addr_len, t.iface_addr_len)} for t in layout.transports[-1:]}
    with pytest.raises(ucx_address.BadAddress, match="same address layout"):
        only_cma.check(longer)


def test_no_devices_no_transports_or_non_finite_attributes_are_refused() -> None:
    with pytest.raises(ucx_address.BadAddress, match="no devices"):
        ucx_address.parse(V1[:9] + b"\xff")
    nan = bytearray(V1)
    nan[13:17] = struct.pack("<f", float("nan"))  # header, uuid, md, device length, checksum: then overhead
    with pytest.raises(ucx_address.BadAddress, match="non-finite"):
        ucx_address.parse(bytes(nan))


def test_random_bytes_only_ever_give_bad_address() -> None:
    rng = random.Random(5)
    checker = ucx_address.AddressChecker(V1)
    accepted = 0
    for _ in range(20000):
        data = bytearray(rng.choice([V1, V2]))
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(len(data))
            if rng.random() < 0.8:
                data[i] = rng.randrange(256)
            else:
                del data[i]
        try:
            checker.check(bytes(data))
            accepted += 1
        except ucx_address.BadAddress:
            pass
    for _ in range(5000):
        with pytest.raises(ucx_address.BadAddress):
            checker.check(rng.randbytes(rng.randrange(0, 300)))
    assert 0 < accepted < 20000


# --- the request message ----------------------------------------------------------------


def test_request_round_trip() -> None:
    tag = new_reply_tag()
    req = parse_request(encode_request(1, "ab" * 16, 7, tag, V1))
    assert (req.command, req.tensor_id, req.consumer_id, req.reply_tag, req.address) == (1, "ab" * 16, 7, tag, V1)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "length"),
        (b"\xff" * 8, "length"),
        (b"\xff" * (REQUEST_MAX + 1), "length"),
        (encode_request(9, "00" * 16, 1, 2, V1), "unknown command"),
        (encode_request(255, "00" * 16, 1, 2, V1), "unknown command"),
        (encode_request(1, "00" * 16, 1, 3, V1), "reply tag"),
        (encode_request(1, "00" * 16, 1, REQUEST_TAG - 1, V1), "reply tag"),
        (encode_request(1, "00" * 16, 1, 2, V1)[:-1], "disagrees"),
        (encode_request(1, "00" * 16, 1, 2, V1) + b"\x00", "disagrees"),
    ],
)
def test_bad_requests_are_refused(data: bytes, reason: str) -> None:
    with pytest.raises(BadRequest, match=reason):
        parse_request(data)


def test_random_messages_only_ever_give_bad_request() -> None:
    rng = random.Random(6)
    for _ in range(20000):
        try:
            parse_request(rng.randbytes(rng.randrange(0, 400)))
        except BadRequest:
            pass


def test_reply_tags_are_even_random_and_clear_of_the_request_tag() -> None:
    tags = {new_reply_tag() for _ in range(1000)}
    assert len(tags) == 1000
    assert all(t % 2 == 0 and t + 1 != REQUEST_TAG and t != REQUEST_TAG for t in tags)


# --- the endpoint cache -------------------------------------------------------------------


class FakeEndpoints:
    """Stands in for UCX endpoints: records which are created and aborted (pure bookkeeping)."""

    def __init__(self) -> None:
        self.created: list[bytes] = []
        self.aborted: list[str] = []
        self.gate: asyncio.Event | None = None
        self.now = 0.0

    async def create(self, key: bytes) -> str:
        if self.gate is not None:
            await self.gate.wait()
        if key == b"bad":
            raise ucx_address.BadAddress("bad")
        self.created.append(key)
        return f"ep{len(self.created)}:{key.decode()}"

    def abort(self, ep: Any) -> None:
        self.aborted.append(ep)

    def cache(self, size: int = 2, idle: float = 10.0) -> EndpointCache:
        return EndpointCache(self.create, self.abort, size, idle, clock=lambda: self.now)


async def test_endpoints_are_reused_and_bounded_least_recently_used_first() -> None:
    fake = FakeEndpoints()
    cache = fake.cache(size=2)
    for key in (b"a", b"b", b"a"):
        cache.release(await cache.acquire(key, 1))
    assert fake.created == [b"a", b"b"] and fake.aborted == []
    cache.release(await cache.acquire(b"c", 1))  # b is the least recently used
    assert fake.aborted == ["ep2:b"] and len(cache) == 2 and b"b" not in cache


async def test_busy_endpoints_are_not_evicted() -> None:
    fake = FakeEndpoints()
    cache = fake.cache(size=1)
    a = await cache.acquire(b"a", 1)
    b = await cache.acquire(b"b", 1)  # over the bound, but a is in use
    assert fake.aborted == [] and len(cache) == 2
    cache.release(a)
    cache.release(b)
    cache.release(await cache.acquire(b"c", 1))
    assert sorted(fake.aborted) == ["ep1:a", "ep2:b"]


async def test_idle_endpoints_are_closed_by_the_sweep() -> None:
    fake = FakeEndpoints()
    cache = fake.cache(size=8, idle=10.0)
    cache.release(await cache.acquire(b"a", 1))
    busy = await cache.acquire(b"b", 1)
    fake.now = 11.0
    assert cache.sweep() == 1
    assert fake.aborted == ["ep1:a"] and b"b" in cache
    cache.release(busy)
    fake.now = 30.0
    assert cache.sweep() == 1 and len(cache) == 0


async def test_a_failed_user_retires_its_endpoint_without_failing_the_others() -> None:
    fake = FakeEndpoints()
    cache = fake.cache()
    slow = await cache.acquire(b"a", 1)
    healthy = await cache.acquire(b"a", 1)
    assert slow is healthy
    cache.release(slow, failed=True)  # e.g. a timed-out pull
    assert fake.aborted == []  # the healthy pull still uses it
    fresh = await cache.acquire(b"a", 1)
    assert fresh is not healthy and fake.created == [b"a", b"a"]  # new pulls get a fresh endpoint
    cache.release(healthy)
    assert fake.aborted == ["ep1:a"]  # closed once its last user left
    cache.release(fresh)
    assert fake.aborted == ["ep1:a"]


async def test_a_bad_address_is_not_cached() -> None:
    fake = FakeEndpoints()
    cache = fake.cache()
    with pytest.raises(ucx_address.BadAddress):
        await cache.acquire(b"bad", 1)
    assert len(cache) == 0


async def test_a_creation_that_times_out_is_closed_when_it_completes() -> None:
    fake = FakeEndpoints()
    fake.gate = asyncio.Event()
    cache = fake.cache()
    with pytest.raises(TimeoutError):
        await cache.acquire(b"a", 0.01)
    assert len(cache) == 0
    fake.gate.set()
    await asyncio.sleep(0.01)
    assert fake.aborted == ["ep1:a"]


async def test_close_all_closes_busy_and_retired_endpoints() -> None:
    fake = FakeEndpoints()
    cache = fake.cache()
    a = await cache.acquire(b"a", 1)
    await cache.acquire(b"a", 1)
    cache.release(a, failed=True)
    await cache.acquire(b"b", 1)
    cache.close_all()
    assert sorted(fake.aborted) == ["ep1:a", "ep2:b"] and len(cache) == 0


def test_drop_log_counts_everything_and_logs_each_reason_once_per_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    from tdist.data_plane import ucx

    logged: list[tuple[str, dict[str, Any]]] = []

    class Recorder:
        def warning(self, event: str, **kw: Any) -> None:
            logged.append((event, kw))

    monkeypatch.setattr(ucx, "log", Recorder())
    now = [0.0]
    drops = DropLog(interval=10.0, clock=lambda: now[0])
    for _ in range(100):
        drops.note("unknown_tag", length=5)
    drops.note("malformed_request")
    now[0] = 10.0
    drops.note("unknown_tag")
    assert drops.total == {"unknown_tag": 101, "malformed_request": 1}
    assert [(kw["reason"], kw["count"]) for _, kw in logged] == [
        ("unknown_tag", 1), ("malformed_request", 1), ("unknown_tag", 100)
    ]


def test_the_fresh_flag_rides_on_the_command() -> None:
    from tdist.data_plane.ucx import FRESH

    req = parse_request(encode_request(1 | FRESH, "00" * 16, 1, 2, V1))
    assert (req.command, req.fresh) == (1, True)
    assert parse_request(encode_request(3, "00" * 16, 1, 2, V1)).fresh is False
    with pytest.raises(BadRequest, match="unknown command"):
        parse_request(encode_request(4 | FRESH, "00" * 16, 1, 2, V1))


async def test_retire_gives_new_users_a_new_endpoint_and_closes_the_old_once_unused() -> None:
    fake = FakeEndpoints()
    cache = fake.cache()
    busy = await cache.acquire(b"a", 1)
    cache.retire(b"a")
    assert fake.aborted == []
    fresh = await cache.acquire(b"a", 1)
    assert fresh is not busy
    cache.release(busy)
    assert fake.aborted == ["ep1:a"]
    cache.release(fresh)
    cache.retire(b"a")  # unused: closed at once
    assert fake.aborted == ["ep1:a", "ep2:a"]
    cache.retire(b"nothing")  # no endpoint: nothing to do


async def test_an_endpoint_ucx_reports_dead_is_replaced() -> None:
    fake = FakeEndpoints()
    dead: set[str] = set()
    cache = EndpointCache(fake.create, fake.abort, 4, 10.0, alive=lambda ep: ep not in dead)
    first = await cache.acquire(b"a", 1)
    cache.release(first)
    dead.add(first.ep)
    second = await cache.acquire(b"a", 1)
    assert second is not first and fake.aborted == [first.ep]


def test_endpoint_cache_settings_are_read_and_checked(tmp_path: Any) -> None:
    from tdist.config import load_worker_file
    from tdist.errors import ConfigError

    base = '[worker]\nname = "w"\n[[worker.operators]]\nname = "e"\nimplementation = "m:E"\n[data_plane]\n'
    path = tmp_path / "w.toml"
    path.write_text(base + "endpoint_cache_size = 16\nendpoint_idle_timeout = 30\n")
    dp = load_worker_file(path).data_plane
    assert (dp.endpoint_cache_size, dp.endpoint_idle_timeout) == (16, 30.0)
    for bad, key in (("endpoint_cache_size = 0", "endpoint_cache_size"), ("endpoint_idle_timeout = 0", "endpoint_idle_timeout")):
        path.write_text(base + bad + "\n")
        with pytest.raises(ConfigError) as info:
            load_worker_file(path)
        assert info.value.key == f"data_plane.{key}"
