"""Optional C kernels, compiled for the host on first use and cached; every caller falls back to PyTorch.

The C sources ship with the package. The first use compiles one with the system's C compiler (`$CC`, else
cc, gcc or clang) at -O3 for this CPU (-march=native) into the user cache, under a name that hashes the source,
the flags and the CPU, so a shared home directory never serves one CPU another's build. The library is written
atomically, so processes that build at once (torchrun ranks) do not see half a file. Set `VQGAN_NATIVE=0` to
use PyTorch only. When no compiler works, the kernels are reported unavailable once (logged) and PyTorch runs.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

SOURCES = Path(__file__).resolve().parent


def switched_on(variable: str) -> bool:
    """An on/off environment setting, on unless set to 0, false, no or off."""
    return os.environ.get(variable, "1").strip().lower() not in ("0", "false", "no", "off")


def enabled() -> bool:
    return switched_on("VQGAN_NATIVE")


def threads() -> int:
    """Threads for a kernel: PyTorch's intra-op count, at most the cores this process may run on."""
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cores))


def cache_dir() -> Path:
    root = os.environ.get("VQGAN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "vqgan")
    return Path(root) / "native"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and feature flags (Linux), else the platform name."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.platform() + platform.processor()


@cache
def load(name: str) -> ctypes.CDLL | None:
    """The compiled library of `<name>.c`, or None when native kernels are off or cannot be built here."""
    if not enabled():
        return None
    compiler = _compiler()
    if compiler is None:
        log.info("no C compiler found (set CC): %s runs on PyTorch only", name)
        return None
    source = SOURCES / f"{name}.c"
    # OpenMP where the compiler has it (the step then runs on PyTorch's own threads); some compilers (Apple's
    # on ARM) lack -march=native
    for flags in (["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"], ["-O3"]):
        flags = [*flags, "-shared", "-fPIC", "-pthread"]
        key = hashlib.sha256(source.read_bytes() + " ".join([compiler, *flags]).encode()
                             + _cpu_signature().encode()).hexdigest()[:16]
        target = cache_dir() / f"{name}-{key}.so"
        try:
            if not target.exists():
                _build(compiler, flags, source, target)
            return ctypes.CDLL(str(target))
        except (OSError, subprocess.SubprocessError) as err:
            reason = getattr(err, "stderr", None) or str(err)
            log.info("could not build %s with %s %s: %s", name, compiler, " ".join(flags), str(reason).strip()[:500])
    log.info("native %s kernel unavailable: running on PyTorch only", name)
    return None


def _build(compiler: str, flags: list[str], source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, str(source), "-o", tmp, "-lm"], check=True, capture_output=True, text=True,
                       timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
