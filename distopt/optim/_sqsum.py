"""Whole-tensor sums of squares of float32 CPU tensors, many tensors in one native call.

A memory-bound read on one CPU core runs at the speed of the misses it keeps in flight: one
read stream (``torch.dot``, ``_foreach_norm``: one tensor after another, front to back) reached
~9-10 GB/s on the project's machine, where a loop reading 8 parts of each tensor at once reached
~14 GB/s.  Lamb's global clip norm and NvNovoGrad's per-tensor norms read every gradient once
per step (ViT-S: 88 MB, 15% of Lamb's step), and neither BLAS, ATen nor inductor's sum loops
read one tensor in several streams.  So :func:`sq_sums` hands every tensor's address and size to
a small C++ loop, built on first use with the C++ compiler ``torch.compile`` uses (compiled
mode only: ``DISTOPT_KERNELS=eager`` builds nothing) and kept in a cache directory; it walks
each tensor in 8 equal parts at once and accumulates in float64 (each sum is exact to float64
rounding of the squares, closer than a float32 dot).  At more than one torch thread the tensors
are shared out among that many OpenMP threads (torch's own runtime, where torch runs on
libgomp; each sum still one thread's, so the same numbers at every count): a serial loop there
was a serial part of the step while every kernel around it ran on all threads.  Where it cannot
be built or loaded the
callers keep their torch path (:func:`available` is ``False``; a warning says why, once).

The library lives in ``$DISTOPT_CACHE_DIR`` (default: ``distopt`` in
``$TORCHINDUCTOR_CACHE_DIR`` when that is set, else ``$XDG_CACHE_HOME/distopt`` or
``~/.cache/distopt``), named by a hash of its source, compiler and flags; built into a
temporary directory beside it and renamed, so processes building it at once never load a
partial file.  Building it takes ~1 s of the first step, once per cache.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from array import array
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["available", "eligible", "addresses", "sq_sums", "SOURCE", "ENABLED"]

log = logging.getLogger(__name__)

#: switch for comparisons: ``False`` makes :func:`available` say no (the callers' torch path)
ENABLED = True

#: the loop: per tensor, 8 parts of 16-element blocks read together (8 streams), float64
#: accumulators per lane; the remainder (under 128 elements) after them.  ``target_clones``
#: (GCC, x86-64): an AVX-512, an AVX2 and a plain version of the per-tensor sum, chosen by the
#: CPU at load time.  With ``threads > 1`` (built with OpenMP, see ``_OPENMP``) the tensors are
#: shared out among that many threads, one tensor at a time (``schedule(dynamic, 1)``): each
#: sum is still one thread's, so the numbers are the same at every thread count.
SOURCE = r"""
#include <stdint.h>
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DISTOPT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DISTOPT_CLONES
#endif
#define PARTS 8
#define LANES 16
static DISTOPT_CLONES __attribute__((noinline)) double distopt_sq_sum(const float* x,
                                                                        const int64_t n) {
  const int64_t q = (n / (PARTS * LANES)) * LANES;
  double acc[PARTS][LANES];
  for (int j = 0; j < PARTS; j++)
    for (int l = 0; l < LANES; l++) acc[j][l] = 0.0;
  for (int64_t i = 0; i < q; i += LANES) {
    for (int j = 0; j < PARTS; j++) {
      const float* y = x + j * q + i;
      for (int l = 0; l < LANES; l++) {
        const double d = y[l];
        acc[j][l] += d * d;
      }
    }
  }
  double s = 0.0;
  for (int j = 0; j < PARTS; j++)
    for (int l = 0; l < LANES; l++) s += acc[j][l];
  for (int64_t i = PARTS * q; i < n; i++) {
    const double d = x[i];
    s += d * d;
  }
  return s;
}
extern "C" void distopt_sq_sums(const float* const* xs, const int64_t* ns, int64_t m,
                                double* out, int threads) {
#ifdef _OPENMP
  if (threads > 1 && m > 1) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t t = 0; t < m; t++) out[t] = distopt_sq_sum(xs[t], ns[t]);
    return;
  }
#endif
  for (int64_t t = 0; t < m; t++) out[t] = distopt_sq_sum(xs[t], ns[t]);
}
"""

_FLAGS = ("-O3", "-shared", "-fPIC", "-x", "c++")
#: build with OpenMP (``-fopenmp``) where torch's CPU threads are OpenMP's (its parallel backend):
#: the library then needs ``libgomp.so.1``, which the loader finds already loaded by torch (the
#: same runtime and thread pool as torch's and inductor's kernels; a second runtime's threads
#: would spin against them); elsewhere a serial build (``threads`` is ignored)
_OPENMP = ("-fopenmp",)
_lib: ctypes.CDLL | None = None
_state: str = ""  # "" not tried, "ok", "failed"


def _compiler() -> str | None:
    for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++"):
        if c and shutil.which(c):
            return c
    return None


def _cache_dir() -> str:
    """``$DISTOPT_CACHE_DIR``, else ``distopt`` in ``$TORCHINDUCTOR_CACHE_DIR`` (a fresh inductor
    cache, as for a cold-start measurement, then builds this afresh too), else
    ``$XDG_CACHE_HOME/distopt`` or ``~/.cache/distopt``."""
    d = os.environ.get("DISTOPT_CACHE_DIR")
    if d:
        return d
    ind = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if ind:
        return os.path.join(ind, "distopt")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "distopt")


def _built(cxx: str, version: str, flags: tuple[str, ...]) -> str:
    """The path of the library built with ``flags`` (built now unless the cache has it)."""
    key = hashlib.sha256("\0".join([SOURCE, cxx, version, *flags]).encode()).hexdigest()[:20]
    d = _cache_dir()
    path = os.path.join(d, f"sqsum-{key}.so")
    if not os.path.exists(path):
        os.makedirs(d, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=d) as tmp:
            src, out = os.path.join(tmp, "sqsum.cpp"), os.path.join(tmp, "sqsum.so")
            with open(src, "w") as f:
                f.write(SOURCE)
            res = subprocess.run(
                [cxx, *flags, src, "-o", out], capture_output=True, text=True, timeout=300
            )
            if res.returncode != 0:
                raise RuntimeError(f"{cxx} failed: {res.stderr.strip()[-2000:]}")
            os.replace(out, path)  # atomic: a concurrent build's file is whole
    return path


def _build() -> ctypes.CDLL:
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found ($CXX, g++, c++, clang++)")
    version = subprocess.run(
        [cxx, "--version"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    last: Exception | None = None
    # with OpenMP where torch runs on GCC's libgomp, else (or should that build fail) serial
    for flags in ((_FLAGS + _OPENMP,) if _openmp(version) else ()) + (_FLAGS,):
        try:
            path = _built(cxx, version, flags)
            break
        except RuntimeError as exc:
            last = exc
    else:
        raise last  # type: ignore[misc]
    lib = ctypes.CDLL(path)
    fn = lib.distopt_sq_sums
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    return lib


def _openmp(version: str) -> bool:
    """Whether to build with OpenMP: Linux, a GCC compiler (``version``: its ``--version``; its
    ``-fopenmp`` links ``libgomp.so.1``), and torch's CPU threads on that same runtime (its
    parallel backend is OpenMP and a ``libgomp.so.1`` is loaded in this process, which the
    library's own need of that name then resolves to)."""
    if (
        not sys.platform.startswith("linux")
        or "clang" in version.lower()
        or "parallel backend: OpenMP" not in torch.__config__.parallel_info()
    ):
        return False
    try:
        with open("/proc/self/maps") as f:
            # exactly this name: a wheel's renamed copy (libgomp-<hash>.so.1) would leave the
            # loader to bring in the system's libgomp.so.1 beside it, a second runtime
            return any(line.rstrip().endswith("/libgomp.so.1") for line in f)
    except OSError:
        return False


def available() -> bool:
    """Whether :func:`sq_sums` can run: ``ENABLED``, compiled mode (see
    :func:`distopt.optim._kernel.mode`), and the library built or found (once per process; a
    failure is logged as a warning once and then this stays ``False``)."""
    global _lib, _state
    if not ENABLED:
        return False
    from distopt.optim import _kernel as K

    if K.mode() != "compile":
        return False
    if _state == "":
        try:
            _lib = _build()
            _state = "ok"
        except Exception as exc:  # noqa: BLE001 - any build/load failure: the torch path
            _state = "failed"
            log.warning(
                "distopt: building the native sum-of-squares loop failed (%s: %s); gradient "
                "norms use torch ops (set %s=eager to skip native builds)",
                type(exc).__name__,
                exc,
                K.ENV,
            )
    return _state == "ok"


def eligible(t: Tensor) -> bool:
    """Whether :func:`sq_sums` takes ``t``: a contiguous float32 CPU tensor, not a subclass."""
    return type(t) is Tensor and t.dtype is _F32 and t.is_cpu and t.is_contiguous()


_F32 = torch.float32


def addresses(tensors: Sequence[Tensor]) -> tuple[array, array] | None:
    """The data addresses and element counts of ``tensors`` for the native loop, or ``None``
    when one of them is not :func:`eligible` (one pass: the per-tensor checks and reads cost
    ~0.15 us each, ~0.1 ms per step for ViT-S's 152 gradients)."""
    ptrs, sizes = [], []
    for t in tensors:
        if not eligible(t):
            return None
        ptrs.append(t.data_ptr())
        sizes.append(t.numel())
    return array("q", ptrs), array("q", sizes)


def sq_sums(tensors: Sequence[Tensor]) -> Tensor:
    """``out[i] = sum(tensors[i] ** 2)`` (float64, on the CPU), one native call for all.

    Only after :func:`available` said yes, for tensors :func:`eligible` takes (checked here:
    the loop reads raw memory, so anything else is refused with a ``ValueError``)."""
    if _lib is None:
        raise RuntimeError("sq_sums: the native loop is not available (call available() first)")
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor) or not eligible(t):
            what = (
                f"{t.dtype} on {t.device}, contiguous={t.is_contiguous()}"
                if isinstance(t, Tensor)
                else type(t).__name__
            )
            raise ValueError(
                f"sq_sums: tensors[{i}] must be a contiguous float32 CPU tensor, got {what}"
            )
    return _sums(tensors)


_threads = torch.get_num_threads


def _sums(tensors: Sequence[Tensor], packed: tuple[array, array] | None = None) -> Tensor:
    """:func:`sq_sums` for tensors the caller checked with :func:`eligible` (``packed``: their
    :func:`addresses`, when the caller has them already)."""
    m = len(tensors)
    out = torch.empty(m, dtype=torch.float64)
    if m:
        if packed is None:
            packed = addresses(tensors)
            if packed is None:
                raise ValueError("_sums: every tensor must be eligible() (see sq_sums)")
        ptrs, sizes = packed
        if len(ptrs) != m or len(sizes) != m:
            raise ValueError(f"_sums: {len(ptrs)} addresses for {m} tensors")
        # array.array instead of ctypes arrays: ~7 us instead of ~100 for 152 tensors
        # at torch's thread count: more than 1 shares the tensors out among OpenMP's threads
        _lib.distopt_sq_sums(  # type: ignore[union-attr]
            ptrs.buffer_info()[0], sizes.buffer_info()[0], m, out.data_ptr(), _threads()
        )
    return out
