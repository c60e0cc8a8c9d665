"""The machine: a one-line description for benchmark tables, and its memory for size checks.

:func:`machine_bytes` is the one estimate of the memory available to a process (the physical
memory, or a container's limit where it is lower); :func:`check_fits` refuses, before
allocating, work whose estimated size exceeds it, with the estimate in the message.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from vcnn.errors import UserError


class TooLargeError(UserError, MemoryError):
    """An input would need more memory than this machine has (refused before allocating)."""


def machine_bytes() -> int:
    """Bytes of memory of this machine, or of its container's limit where that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = Path("/sys/fs/cgroup/memory.max")  # a container's limit (cgroup v2), where set
    try:
        text = limit.read_text().strip()
        if text.isdigit():
            total = min(total, int(text))
    except OSError:
        pass
    return int(total)


def format_bytes(size: float) -> str:
    """``size`` in B, KiB, MiB, GiB, TiB or PiB, three significant digits."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024:
            return f"{size:.3g} {unit}"
        size /= 1024
    return f"{size:.3g} PiB"


def check_fits(
    count: float, bytes_each: float, what: str, *, hint: str, unit: str = "entries"
) -> None:
    """Refuse work whose estimated memory exceeds :func:`machine_bytes`.

    Args:
        count: how many items the work would hold (e.g. cloud entries).
        bytes_each: estimated bytes per item.
        what: the items, for the message (e.g. ``"clouds would hold"``).
        hint: what the user can change, appended to the message.
        unit: what is counted, for the message.

    Raises:
        TooLargeError: "<what> about 3.2e+11 entries (~2.4 TiB); this machine has 62 GiB: <hint>".
    """
    needed = float(count) * float(bytes_each)
    available = machine_bytes()
    if needed > available:
        raise TooLargeError(
            f"{what} about {float(count):.2g} {unit} (~{format_bytes(needed)}); this machine "
            f"has {format_bytes(available)}: {hint}"
        )


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or the platform's processor string)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_summary() -> str:
    """CPU model, core count and the load average when called (shared machines are noisy)."""
    try:
        load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    except OSError:
        load = "unknown"
    return f"{cpu_model()}, {os.cpu_count()} cores, load average {load}"
