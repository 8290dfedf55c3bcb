"""Strict checks of a UCX worker address before UCX sees it (pure, no UCX import).

UCX unpacks a worker address without knowing its length and asserts (aborting the
process) on several malformed inputs, for example an unknown version nibble
(``ucp_address_unpack_header`` in ``src/ucp/wireup/address.c``). An address that
came from another process is therefore parsed here first, following that unpacker
for the UCX 1.21 layouts (address versions 1 and 2, non-unified mode, the default
worker pack flags), and refused unless:

* the walk stays inside the buffer and ends exactly at its end (UCX would read past it);
* the header carries the same flags as this process's own address (same build and config);
* no more devices, transports or endpoint addresses than UCX allows;
* at least one transport this process also has (same name checksum) has the same device and
  interface address lengths as here (a socket address may be of either IP family; other
  transports may differ: another host's devices and build), and every packed float is finite
  and the bandwidth positive (UCX divides by it).

Transports this process lacks are skipped over by length, as UCX does. UCX's unified mode
(``UCX_UNIFIED_MODE=y``) packs another layout: the data plane then refuses to start, naming
this. Measured: of 3,000 random 1-3 byte mutations of a real peer's address, about 2,100
pass and none of them crashed UCX when an endpoint was made and a message sent (error
handling on and off); unchecked, an abort came within 150 mutations. The check is a
guard against garbage and truncation, not an authentication: the data plane trusts the
network it runs on (README, security).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

V1, V2 = 0, 1
_HEADER_FLAG_DEBUG_INFO, _HEADER_FLAG_WORKER_UUID, _HEADER_FLAG_CLIENT_ID = 1, 2, 4
_FLAG_LAST = 0x80
_FLAG_HAS_EP_ADDR = 0x40
_FLAG_NUM_PATHS = 0x40
_FLAG_SYS_DEVICE = 0x20
_IFACE_LEN_MASK = 0x3F
_DEVICE_LEN_MASK = 0x1F
_MD_EMPTY_DEV = 0x80
_SOCKADDR_LENGTHS = (6, 18)
"""Packed socket addresses: IPv4 (4 address + 2 port bytes) and IPv6 (16 + 2)."""
_MD_MASK = 0x7F
_NULL_RESOURCE = 0xFF
_MAX_RESOURCES = 128
_MAX_LANES = 64
_V1_ATTR = struct.Struct("<fffI")  # overhead, bandwidth, lat_ovh, prio_cap_flags
_V2_ATTR = struct.Struct("<BBBBHH")  # fp8 overhead, fp8 bandwidth, fp8 latency, prio, seg_size, flags
MAX_ADDRESS_BYTES = 4096


class BadAddress(ValueError):
    """The bytes are not a UCX worker address this process may hand to UCX."""


@dataclass(frozen=True)
class Transport:
    name_csum: int
    md_index: int
    dev_addr_len: int
    iface_addr_len: int
    ep_addr_lens: tuple[int, ...]


@dataclass(frozen=True)
class Layout:
    version: int
    flags: int
    transports: tuple[Transport, ...] = field(default_factory=tuple)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise BadAddress(f"truncated at byte {self.pos} (needs {n} more, has {len(self.data) - self.pos})")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def byte(self) -> int:
        return self.take(1)[0]

    def peek(self) -> int:
        if self.pos >= len(self.data):
            raise BadAddress(f"truncated at byte {self.pos}")
        return self.data[self.pos]

    def extended(self, first: int, mask: int, version: int) -> int:
        """``ucp_address_unpack_byte_extended``: v2 marks a value >= mask with mask and a next byte."""
        value = first & mask
        if version != V1 and value == mask:
            value = self.byte()
        return value


def parse(data: bytes) -> Layout:
    """The layout of a packed worker address, or ``BadAddress`` naming what is wrong."""
    if not isinstance(data, (bytes, bytearray)) or not 0 < len(data) <= MAX_ADDRESS_BYTES:
        raise BadAddress(f"length {len(data) if isinstance(data, (bytes, bytearray)) else '?'} "
                         f"is not 1..{MAX_ADDRESS_BYTES}")
    r = _Reader(bytes(data))
    header = r.byte()
    version = header & 0x0F
    if version == V1:
        flags = header >> 4
    elif version == V2:
        flags = r.byte()
    else:
        raise BadAddress(f"unknown address version {version}")  # UCX asserts on this one
    r.take(8)  # worker uuid: the default unpack flags always include it
    if flags & _HEADER_FLAG_CLIENT_ID:
        r.take(8)
    if flags & _HEADER_FLAG_DEBUG_INFO:
        r.take(r.byte())  # worker name (the default unpack flags include WORKER_NAME)
    if r.peek() == _NULL_RESOURCE:
        raise BadAddress("the address lists no devices")
    transports: list[Transport] = []
    last_dev = False
    devices = 0
    while not last_dev:
        devices += 1
        if devices > _MAX_RESOURCES:
            raise BadAddress(f"more than {_MAX_RESOURCES} devices")
        md_byte = r.byte()
        empty_dev = bool(md_byte & _MD_EMPTY_DEV)
        md_index = r.extended(md_byte, _MD_MASK, version)
        len_byte = r.byte()
        last_dev = bool(len_byte & _FLAG_LAST)
        dev_addr_len = r.extended(len_byte, _DEVICE_LEN_MASK, version)
        if len_byte & _FLAG_NUM_PATHS:
            if r.byte() == 0:
                raise BadAddress("a device with zero paths")
        if len_byte & _FLAG_SYS_DEVICE:
            r.byte()
        r.take(dev_addr_len)
        last_tl = empty_dev
        while not last_tl:
            if len(transports) >= _MAX_RESOURCES:
                raise BadAddress(f"more than {_MAX_RESOURCES} transport addresses")
            (csum,) = struct.unpack("<H", r.take(2))
            if version == V1:
                overhead, bandwidth, lat_ovh, _prio_flags = _V1_ATTR.unpack(r.take(_V1_ATTR.size))
                if not all(math.isfinite(v) for v in (overhead, bandwidth, lat_ovh)) or bandwidth == 0:
                    raise BadAddress(f"transport {csum:#06x}: non-finite or zero attributes")
            else:
                _ovh, bw8, _lat, _prio, _seg, _flags = _V2_ATTR.unpack(r.take(_V2_ATTR.size))
                if bw8 == 0:
                    raise BadAddress(f"transport {csum:#06x}: zero bandwidth")
            iface_byte = r.byte()
            last_tl = bool(iface_byte & _FLAG_LAST)
            iface_addr_len = r.extended(iface_byte, _IFACE_LEN_MASK, version)
            r.take(iface_addr_len)
            ep_lens: list[int] = []
            last_ep = not iface_byte & _FLAG_HAS_EP_ADDR
            while not last_ep:
                if len(ep_lens) >= _MAX_LANES:
                    raise BadAddress(f"more than {_MAX_LANES} endpoint addresses")
                ep_len = r.byte()
                r.take(ep_len)
                lane = r.byte()
                last_ep = bool(lane & _FLAG_LAST)
                if lane & _IFACE_LEN_MASK >= _MAX_LANES:
                    raise BadAddress(f"lane {lane & _IFACE_LEN_MASK} out of range")
                ep_lens.append(ep_len)
            transports.append(Transport(csum, md_index, dev_addr_len, iface_addr_len, tuple(ep_lens)))
    if r.pos != len(r.data):
        raise BadAddress(f"{len(r.data) - r.pos} bytes after the last device")
    if not transports:
        raise BadAddress("the address has no transport")
    return Layout(version, flags, tuple(transports))


class AddressChecker:
    """Checks peers' addresses against the layout of this process's own address."""

    def __init__(self, own: bytes) -> None:
        self.own = parse(own)
        self._lengths: dict[int, set[tuple[int, int]]] = {}
        for t in self.own.transports:
            lengths = self._lengths.setdefault(t.name_csum, set())
            lengths.add((t.dev_addr_len, t.iface_addr_len))
            # A socket device address is an IPv4 (4 + 2 port bytes) or an IPv6 one (16 + 2): a peer
            # may have the other family on its interfaces (measured: a host with IPv4 only against
            # one with an IPv6 link-local address, in the three-host cluster test).
            if t.dev_addr_len in _SOCKADDR_LENGTHS:
                lengths.update((n, t.iface_addr_len) for n in _SOCKADDR_LENGTHS)

    def check(self, data: bytes) -> Layout:
        layout = parse(data)
        if (layout.version, layout.flags) != (self.own.version, self.own.flags):
            raise BadAddress(f"address version/flags {layout.version}/{layout.flags:#x} differ from this "
                             f"process's {self.own.version}/{self.own.flags:#x}")
        known = 0
        differing: list[str] = []
        for t in layout.transports:
            want = self._lengths.get(t.name_csum)
            if want is None:
                continue  # a transport this process lacks: UCX skips it too
            if (t.dev_addr_len, t.iface_addr_len) in want:
                known += 1
            else:  # another host's build or devices (measured: posix/sysv 16/8 beside 8/8 here)
                differing.append(f"{t.name_csum:#06x} {t.dev_addr_len}/{t.iface_addr_len} (here {sorted(want)})")
        if not known:
            raise BadAddress("the address shares no transport with this process with the same address layout"
                             + (f": {', '.join(differing)}" if differing else ""))
        return layout
