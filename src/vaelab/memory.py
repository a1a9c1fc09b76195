"""How much memory this machine has free, and refusing work that cannot fit before allocating it.

An allocation larger than the machine ends in an allocator's traceback, or worse, in swapping; an
estimate made first ends in one line that says how much is needed and how much there is.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vaelab.errors import UserError


def available(device: torch.device | str = "cpu") -> int | None:
    """Bytes free for this process: the GPU's free memory, or Linux's MemAvailable; None where unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def require(needed: int, what: str, fix: str, device: torch.device | str = "cpu") -> None:
    """Refuse ``what`` when it needs more than the ``needed`` bytes that are free."""
    free = available(device)
    if free is not None and needed > free:
        raise UserError(
            f"{what} need about {needed / 2**30:,.1f} GiB of memory, and {free / 2**30:,.1f} GiB are free here; {fix}"
        )
