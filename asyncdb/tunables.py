"""The C library tuning node processes start with, chosen by measuring this machine.

Large frames are copied into and out of shared memory. glibc on x86 switches such
copies to non-temporal stores above a threshold (by default near the size of the last-
level cache). A lower threshold skips the read-for-ownership of cache lines the other
process reads next, and on some machines that nearly doubles a copy; on others (virtual
machines with 4 KiB-page memfd memory among them) it halves it. So the driver measures,
once per process: a short copy out of a memfd mapping in two small child processes, one
with glibc's default and one with the lower threshold, and node processes get the lower
threshold only where it was clearly faster. A GLIBC_TUNABLES the user set is kept.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

NT_THRESHOLD = "glibc.cpu.x86_non_temporal_threshold=0x400000"  # 4 MiB
PROBE_BYTES = 16 << 20
MARGIN = 1.10  # the lower threshold must beat the default by this factor

# Pure Python (no numpy) so each probe starts in a few milliseconds: a memoryview
# slice assignment is one memcpy, which is what the C library tuning changes. Three
# sources in turn, as a receiver reads frames other processes wrote: not in its cache.
_PROBE = """
import mmap, os, sys, time
n, k = int(sys.argv[1]), 3
fd = os.memfd_create("asyncdb-probe", os.MFD_CLOEXEC)
os.ftruncate(fd, k * n)
mm = mmap.mmap(fd, k * n)
whole = memoryview(mm)
whole[:] = b"\\1" * (k * n)
sources = [whole[i * n : (i + 1) * n] for i in range(k)]
dst = memoryview(bytearray(n))
times = []
for i in range(4 * k):
    t = time.perf_counter()
    dst[:] = sources[i % k]
    times.append(time.perf_counter() - t)
times = sorted(times[k:])
print(n / times[len(times) // 2] / 1e9)
"""

_lock = threading.Lock()
_decided: dict[str, str | None] = {}
probe_figures: dict[str, float] = {}


def memfd_copy_probe(tunables: str | None, nbytes: int = PROBE_BYTES) -> float:
    """GB/s of a copy out of a memfd mapping in a fresh process with `tunables`."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    out = subprocess.run([sys.executable, "-I", "-S", "-c", _PROBE, str(nbytes)], env=env,
                         capture_output=True, text=True, timeout=60, check=True)
    return float(out.stdout.strip())


def node_tunables() -> str | None:
    """GLIBC_TUNABLES for node processes: the user's, else the measured choice (None:
    glibc's defaults). Measured on the first call, then remembered."""
    user = os.environ.get("GLIBC_TUNABLES")
    if user is not None:
        return user
    with _lock:
        if "choice" not in _decided:
            _decided["choice"] = _measure()
        return _decided["choice"]


def _measure() -> str | None:
    try:
        default = max(memfd_copy_probe(None), memfd_copy_probe(None))
        lowered = max(memfd_copy_probe(NT_THRESHOLD), memfd_copy_probe(NT_THRESHOLD))
    except (OSError, ValueError, subprocess.SubprocessError):
        return None  # no memfd here, or the probe failed: glibc's own choice
    probe_figures.update({"default_gbps": default, "nt_4mib_gbps": lowered})
    return NT_THRESHOLD if lowered > MARGIN * default else None
