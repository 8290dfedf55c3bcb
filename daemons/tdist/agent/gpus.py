"""GPU discovery (nvidia-smi + sysfs NUMA information) and the assignment of GPUs to instances."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tdist import logs

log = logs.get_logger("tdist.agent.gpus")

SYS = Path("/sys")


@dataclass(frozen=True)
class GpuInfo:
    index: int
    pci_bus_id: str | None = None
    """sysfs spelling: ``0000:3b:00.0``."""
    numa_node: int | None = None
    cpus: str | None = None
    """The NUMA node's CPU list in kernel syntax (``0-15,32-47``), for ``taskset -c``."""


def sysfs_bus_id(nvidia_bus_id: str) -> str:
    """``00000000:3B:00.0`` (nvidia-smi: 8-digit domain, upper case) -> ``0000:3b:00.0`` (sysfs)."""
    domain, _, rest = nvidia_bus_id.strip().partition(":")
    return f"{domain[-4:]}:{rest}".lower()


def numa_node_of(bus_id: str, sys_root: Path = SYS) -> int | None:
    try:
        node = int((sys_root / "bus" / "pci" / "devices" / bus_id / "numa_node").read_text().strip())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None  # -1: the host reports no NUMA affinity


def cpulist_of(numa_node: int, sys_root: Path = SYS) -> str | None:
    try:
        text = (sys_root / "devices" / "system" / "node" / f"node{numa_node}" / "cpulist").read_text().strip()
    except OSError:
        return None
    return text or None


def parse_nvidia_smi(output: str, sys_root: Path = SYS) -> tuple[GpuInfo, ...]:
    """Lines of ``index, pci.bus_id`` (``--format=csv,noheader``) -> GpuInfo with NUMA details."""
    gpus = []
    for line in output.splitlines():
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        try:
            index = int(parts[0])
        except ValueError:
            continue
        bus = sysfs_bus_id(parts[1]) if len(parts) > 1 and parts[1] else None
        node = numa_node_of(bus, sys_root) if bus else None
        cpus = cpulist_of(node, sys_root) if node is not None else None
        gpus.append(GpuInfo(index=index, pci_bus_id=bus, numa_node=node, cpus=cpus))
    return tuple(sorted(gpus, key=lambda g: g.index))


def detect_gpus(nvidia_smi: str = "nvidia-smi", timeout: float = 20.0, sys_root: Path = SYS) -> tuple[GpuInfo, ...]:
    """The host's GPUs through nvidia-smi; () when there is no nvidia-smi or it fails (CPU host)."""
    exe = shutil.which(nvidia_smi)
    if exe is None:
        return ()
    try:
        out = subprocess.run(
            [exe, "--query-gpu=index,pci.bus_id", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=timeout, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("gpu_detect_failed", error=str(exc))
        return ()
    if out.returncode != 0:
        log.warning("gpu_detect_failed", returncode=out.returncode, stderr=out.stderr.strip()[-500:])
        return ()
    return parse_nvidia_smi(out.stdout, sys_root)


def describe_gpus(indices: Sequence[int], detected: Sequence[GpuInfo] = ()) -> tuple[GpuInfo, ...]:
    """GpuInfo for an explicit ``gpus = [...]`` list: NUMA details from ``detected`` where it has the index."""
    known = {g.index: g for g in detected}
    return tuple(known.get(i, GpuInfo(index=i)) for i in indices)


def assign_gpus(available: Sequence[int], per_instance: Sequence[int]) -> list[tuple[int, ...]]:
    """Give each instance ``per_instance[k]`` GPUs: contiguous blocks of ``available``, in order.

    Instances asking for 0 GPUs get ``()`` (CPU workers). Raises ValueError when the GPUs run out.
    """
    out: list[tuple[int, ...]] = []
    pos = 0
    for n in per_instance:
        if n < 0:
            raise ValueError(f"an instance cannot ask for {n} GPUs")
        if pos + n > len(available):
            raise ValueError(f"{sum(per_instance)} GPUs needed, {len(available)} available")
        out.append(tuple(available[pos:pos + n]))
        pos += n
    return out


def cpus_for(gpus: Sequence[GpuInfo]) -> str | None:
    """The CPU list to pin an instance using ``gpus`` to, or None when any GPU's NUMA CPUs are unknown.

    GPUs on several NUMA nodes give the union of those nodes' CPU lists.
    """
    if not gpus or any(g.cpus is None for g in gpus):
        return None
    lists: list[str] = []
    for g in gpus:
        if g.cpus not in lists:
            lists.append(g.cpus)  # type: ignore[arg-type]
    return ",".join(lists)
