"""Host memory kept for reuse: glibc's ``malloc`` stops handing large freed blocks back to the kernel.

PyTorch's CPU allocator is ``malloc`` with no cache of its own. glibc serves every request above 32 MiB
(its largest ``mmap`` threshold) with a fresh ``mmap`` and gives it back with ``munmap`` when the tensor is
freed, so each such tensor pays one page fault and one zeroing per 4 KiB page of it, at every step. At
1024 px many of a training step's tensors are that large (HQ-SAM's (2, 64, 256, 256) float32 features are
33.5 MB): kept, a vit_b HQ-SAM epoch from stored embeddings is 14-16% faster on 2 CPU cores
(benchmarks/README.md, "Host memory kept for reuse").

``keep_freed_memory`` tells glibc (``mallopt``) to serve large blocks from its heap like small ones and to
keep up to ``TRIM_THRESHOLD`` of freed memory at the heap's top instead of returning it, so a freed block's
pages are reused without faults. The price: the process holds the memory it freed, about 3 times the
large tensors alive at once (``benchmarks/host_memory.py``), until it ends. ``samflow``'s commands call it
when they start; ``SAMFLOW_KEEP_FREED_MEMORY=0`` turns it off, and it is left alone where the user chose
the allocator's behaviour (``MALLOC_*_`` or ``GLIBC_TUNABLES`` set, or another ``malloc`` preloaded:
jemalloc, tcmalloc).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping

__all__ = ["ENV", "TRIM_THRESHOLD", "glibc", "keep_freed_memory"]

#: ``SAMFLOW_KEEP_FREED_MEMORY=0`` leaves ``malloc`` as it is.
ENV = "SAMFLOW_KEEP_FREED_MEMORY"

#: The freed memory at the heap's top that glibc keeps before it trims (the largest ``mallopt`` takes).
TRIM_THRESHOLD = 2**31 - 1

# glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

#: Environment variables with which the user chose the allocator's behaviour themselves.
_USER_CHOICES = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def glibc() -> bool:
    """Whether this process runs on GNU libc (most Linux distributions; not musl, macOS or Windows)."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError, AttributeError):  # not a name of this platform's confstr, or none at all
        return False


def _user_chose_allocator(environ: Mapping[str, str]) -> bool:
    if any(name in environ for name in _USER_CHOICES):
        return True
    # a malloc setting of GLIBC_TUNABLES; another allocator preloaded (jemalloc, tcmalloc, mimalloc)
    return "malloc" in environ.get("GLIBC_TUNABLES", "") or "malloc" in environ.get("LD_PRELOAD", "")


def keep_freed_memory(environ: Mapping[str, str] | None = None) -> bool:
    """Keep freed host memory for reuse (see the module's docstring); whether it was set.

    Nothing is done (False) off glibc (macOS, Windows, musl), with ``SAMFLOW_KEEP_FREED_MEMORY=0``, or
    where the user set glibc's ``MALLOC_*_`` / ``GLIBC_TUNABLES`` malloc settings or preloaded another
    allocator. It affects the whole process from the call on, and the processes it forks (data-loader
    workers); what was allocated before stays where it is.
    """
    environ = os.environ if environ is None else environ
    if environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not glibc() or _user_chose_allocator(environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # the trim threshold first: with it unset, a heap without mmap would be trimmed at every free
    return bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(mallopt(_M_MMAP_MAX, 0))
