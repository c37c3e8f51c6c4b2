"""What this machine is: the CPU model and its feature flags. The one place that reads
``/proc/cpuinfo``."""

from __future__ import annotations

import functools
import platform


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first processor's ``key: value`` lines of /proc/cpuinfo (empty without /proc)."""
    out: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    if out:
                        break
                    continue
                key, _, value = line.partition(":")
                out.setdefault(key.strip().lower(), value.strip())
    except OSError:
        pass
    return out


def cpu_model() -> str:
    """The CPU's marketing name (``model name``), else what :mod:`platform` knows."""
    info = _cpuinfo()
    return info.get("model name") or platform.processor() or platform.machine() or "unknown"


def cpu_features() -> str:
    """The CPU feature flags (x86 ``flags`` / ARM ``Features``), sorted, which
    ``-march=native`` code depends on; a machine without /proc gives its architecture."""
    info = _cpuinfo()
    flags = info.get("flags") or info.get("features")
    return " ".join(sorted(flags.split())) if flags else (platform.machine() or "unknown")
