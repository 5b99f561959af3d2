"""GET /sdapi/v1/memory's numbers, in A1111's shape (its `get_memory`).

- `ram`: `used` is this process's resident memory, `total` the machine's memory, `free` their
  difference (A1111's definitions); from psutil when it is installed, else from
  /proc/self/status and /proc/meminfo; `{"error": ...}` where neither can be read.
- `cuda`: where torch sees a CUDA device, the first device's `system` (free, used, total from
  the driver) and the caching allocator's `active`, `allocated`, `reserved`, `inactive`
  (current, peak) and `events` (retries, oom), as A1111 gives for its one device; craftserve
  adds `devices`: the same for every visible device, by name (`cuda:0`, ...). Without CUDA:
  `{"error": "unavailable"}`, as A1111. All in bytes.
"""

from __future__ import annotations

import os
from typing import Any


def _proc_kib(path: str, key: str) -> int:
    with open(path, encoding="ascii") as file:
        for line in file:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{path} has no {key}")


def ram() -> dict[str, Any]:
    try:
        try:
            import psutil
        except ImportError:
            rss = _proc_kib("/proc/self/status", "VmRSS")
            total = _proc_kib("/proc/meminfo", "MemTotal")
        else:
            rss = psutil.Process(os.getpid()).memory_info().rss
            total = psutil.virtual_memory().total
    except Exception as exc:  # noqa: BLE001 - A1111 answers the error in its place
        return {"error": str(exc)}
    return {"free": total - rss, "used": rss, "total": total}


def _device(index: int) -> dict[str, Any]:
    import torch

    free, total = torch.cuda.mem_get_info(index)
    stats = torch.cuda.memory_stats(index)

    def pair(name: str) -> dict[str, int]:
        return {"current": int(stats.get(f"{name}.all.current", 0)),
                "peak": int(stats.get(f"{name}.all.peak", 0))}

    return {
        "system": {"free": free, "used": total - free, "total": total},
        "active": pair("active_bytes"),
        "allocated": pair("allocated_bytes"),
        "reserved": pair("reserved_bytes"),
        "inactive": pair("inactive_split_bytes"),
        "events": {"retries": int(stats.get("num_alloc_retries", 0)),
                   "oom": int(stats.get("num_ooms", 0))},
    }


def cuda() -> dict[str, Any]:
    try:
        import torch

        if not torch.cuda.is_available():
            return {"error": "unavailable"}
        devices = {f"cuda:{i}": _device(i) for i in range(torch.cuda.device_count())}
    except Exception as exc:  # noqa: BLE001 - A1111 answers the error in its place
        return {"error": str(exc)}
    return {**devices["cuda:0"], "devices": devices}
