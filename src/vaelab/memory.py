"""How much memory this machine has free, and refusing work that cannot fit before allocating it.

An allocation larger than the machine ends in an allocator's traceback, or worse, in swapping; an
estimate made first ends in one line that says how much is needed and how much there is.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vaelab.errors import UserError


def available(device: torch.device | str = "cpu") -> int | None:
    """Bytes free for this process: the GPU's free memory; on the CPU the least of what Linux, this
    process's container and its address-space limit leave (:func:`cpu_free`); None where none is known."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return cpu_free()


def cpu_free(proc: Path = Path("/proc"), cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The least of: MemAvailable (the host's, inside a container too); the container's limit less its
    use (cgroup v2 ``memory.max`` - ``memory.current``, v1 ``memory.limit_in_bytes`` - ``memory.usage_in_bytes``,
    reclaimable page cache not counted as used); the address-space limit (``ulimit -v``, ``prlimit --as``)
    less this process's virtual size. None where none of them is known."""
    readings = [_meminfo(proc / "meminfo"), _cgroup_free(cgroup), _address_space_free(proc / "self" / "status")]
    known = [r for r in readings if r is not None]
    return max(0, min(known)) if known else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _field(text: str | None, name: str) -> int | None:
    """The number after ``name`` in a ``/proc``-style or ``memory.stat`` text, or None."""
    for line in (text or "").splitlines():
        parts = line.replace(":", " ").split()
        if parts[:1] == [name] and len(parts) > 1 and parts[1].isdigit():
            return int(parts[1])
    return None


def _meminfo(path: Path) -> int | None:
    kib = _field(_read(path), "MemAvailable")
    return None if kib is None else kib * 1024


def _cgroup_free(root: Path) -> int | None:
    for folder, limit_name, usage_name, cache_name in (
        (root, "memory.max", "memory.current", "inactive_file"),  # v2
        (root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),  # v1
    ):
        limit, usage = _read(folder / limit_name), _read(folder / usage_name)
        if limit is None or usage is None or not limit.strip().isdigit() or not usage.strip().isdigit():
            continue  # absent, or "max": no limit
        if int(limit) >= 2**60:  # v1 says "no limit" with a huge number
            return None
        cache = _field(_read(folder / "memory.stat"), cache_name) or 0
        return int(limit) - (int(usage) - min(cache, int(usage)))
    return None


def _address_space_free(status: Path) -> int | None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    vm_kib = _field(_read(status), "VmSize")
    return soft - (vm_kib or 0) * 1024


def require(needed: int, what: str, fix: str, device: torch.device | str = "cpu") -> None:
    """Refuse ``what`` when it needs more than the ``needed`` bytes that are free."""
    free = available(device)
    if free is not None and needed > free:
        raise UserError(
            f"{what} need about {needed / 2**30:,.1f} GiB of memory, and {free / 2**30:,.1f} GiB are free here; {fix}"
        )
