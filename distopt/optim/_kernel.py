"""Single-pass optimizer updates: each optimizer states its per-element maths once.

An optimizer's update is a *rule*: a pure function of one tensor's values::

    def rule(p, g, st, s, *, <static options>):
        # p, g: parameter and gradient values; st: {state name: values}; s: {scalar name: 0-dim
        # tensor}.  Element-wise torch ops only (no in-place, no reductions, no host reads).
        ...
        return new_p, {state name: new values, ...}   # only the states it changes

:func:`apply` runs a rule over the :class:`~distopt.optim._core.ParamView`\\ s of a param group:

* **compiled** (the default where ``torch.compile`` can build kernels: a C++ compiler for CPU
  tensors, Triton for CUDA): one ``torch.compile(dynamic=True, fullgraph=True)`` kernel per
  (rule, options) reads every input once and writes every output once, in place; tensors are
  flattened so one dynamic-shape kernel serves every size, and small tensors are concatenated
  into one call (each call costs tens of microseconds of guards and wrappers, whatever its
  size).  The flat inputs are
  detached aliases (no view base for dynamo to guard on; same storage and version counter), so
  each (rule, options, phase) compiles once, on CPU once for 1 thread (serial C++) and once
  for more (``THREADS_KEYED``).  After the first
  call with each argument signature a kernel is called without entering dynamo
  (:class:`Compiled`: ~50-250 us per call saved, a quarter of a memory-bound step);
* **eager** (``DISTOPT_KERNELS=eager``, :func:`set_mode("eager") <set_mode>`, or where
  compiling is not possible or fails): the *same function* called with ordinary torch ops, in
  cache-sized chunks of large tensors.

The scalars (learning rate, bias corrections, ...) are host floats the optimizer computes per
parameter; they travel as one packed float64 tensor per distinct set of values, so a new
learning rate never recompiles anything.

``torch.amp.GradScaler``: an optimizer whose updates all go through :func:`apply` sets
``_step_supports_amp_scaling = True``.  The scaler then sets ``grad_scale`` and ``found_inf``
(device tensors) on the optimizer instead of unscaling the gradients and reading ``found_inf``
on the host; :func:`apply` multiplies the gradient by ``1 / grad_scale`` inside the kernel,
keeps every output at its old value where ``found_inf`` is non-zero (``torch.where``: no host
read), and takes the step back from each parameter's ``step`` counter.

Statistics over whole tensors (the cautious mask's mean, trust-ratio norms): ``apply(...,
ctx=ctx, sums=("name", ...))`` calls the same rule first with ``phase="sums"``, where it returns
``{name: per-element values}``; the runner sums each over the local tensor (one read pass),
adds them across ranks in one :meth:`StepContext.reduce`, and calls the rule again with
``phase="update"``, where ``s[name]`` holds the whole tensor's sum (float64, accumulated in
float64).  In one ``fused`` call both calls of the rule get the same ``st`` mapping: a rule may
leave values of its sums phase there (under names that are no state) for its update phase, which
inductor then computes once; separate sums and update calls get fresh mappings (the update phase
must recompute them when they are missing).  Compiled, a tensor no rank shares takes both phases in one ``fused`` kernel call (no
reduction needed in between), and equal-sized small tensors are stacked as the rows of one call
whose ``s[name]`` is an ``(n, 1)`` column: a rule qualifies when it casts every value derived
from the sums to the data's dtype before it meets a tensor (``r.to(g.dtype)``, a no-op for a
0-dim float64 that meets float32 anyway), checked once by a probe (see :mod:`._kernel_plan`,
which holds the runner).  The flat aliases of parameters and states are kept across steps.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from distopt.optim._core import ParamView, StepContext
from distopt.optim._kernel_compile import Compiled

__all__ = [
    "apply",
    "Compiled",
    "compiled_kernel",
    "set_mode",
    "mode",
    "scaler_of",
    "agreement",
    "cautious",
    "CAUTION_SUMS",
    "MODES",
    "ENV",
    "cbrt",
]

log = logging.getLogger(__name__)

#: environment variable choosing how rules run: ``compile`` or ``eager``
ENV = "DISTOPT_KERNELS"
MODES = ("compile", "eager")
#: eager mode works through large tensors in chunks of this many elements (cache-sized
#: temporaries instead of fresh tensor-sized allocations per op)
EAGER_CHUNK = 1 << 16
#: compiled mode concatenates tensors smaller than this into one kernel call
SMALL = 1 << 15

#: inductor options of every kernel.  ``cpp.dynamic_threads``: a CPU kernel asks OpenMP for the
#: thread count when it runs (``torch.set_num_threads`` now), instead of the count at its first
#: compile being written into the C++ code (1 thread compiles a serial loop, and torch.compile
#: does not recompile when the count changes: a kernel first run at 1 thread stayed serial); the
#: build for 1 thread replaces it by ``cpp.threads=1`` (see ``THREADS_KEYED``)
#: ``cpp.vec_isa_ok``: take the CPU's vector ISA from its cpuid flags instead of building and
#: loading a probe library per ISA first (inductor's check: ~10 s of the first cold compile in
#: a fresh cache, paid by whichever optimizer compiles first); should the compiler not support
#: the ISA after all, the compile fails and the rule runs eagerly, with a warning
#: (``size_asserts`` off: the generated code's per-call checks of every input's sizes and
#: strides, ~25 us a call on caches a kernel has just flushed, repeat what dynamo's guards and
#: the direct calls' signature already established)
COMPILE_OPTIONS = {"cpp.dynamic_threads": True, "cpp.vec_isa_ok": True, "size_asserts": False}
#: the ``torch.compile`` backend, a name or a callable (tests count the graphs of every rule with
#: a backend that runs them as traced, without building C++)
BACKEND = "inductor"
#: call compiled kernels directly after the first call with each argument signature (see
#: :class:`Compiled`); ``False``: every call through dynamo (for comparisons)
DIRECT = True
#: compute a kernel's scalar maths once per call (see :func:`_hoist_scalars`)
HOIST = True
#: direct calls call inductor's generated code itself where the wrappers around it do nothing
#: for the graph (see ``_kernel_compile._passed_through``); ``False``: through the wrappers
GENERATED = True
#: build each CPU kernel twice at most, by ``torch.get_num_threads()`` at the call: for 1 thread
#: serial C++ without OpenMP (``cpp.dynamic_threads`` gave every loop of every call an OpenMP
#: region, even at 1 thread), for more ``COMPILE_OPTIONS``' build without scalar hoisting (each
#: hoisted batch is a 16-element loop, one more OpenMP region per call: a fork and join of the
#: workers for nothing); ``False``: one build with ``COMPILE_OPTIONS`` and hoisting for every
#: count (for comparisons)
THREADS_KEYED = True

_mode: str | None = None
_kernels: dict[Any, Callable[..., None]] = {}
_failed: set[Any] = set()

Rule = Callable[..., tuple[Tensor, Mapping[str, Tensor]]]


def set_mode(value: str | None) -> None:
    """Run rules ``"compile"``\\ d or ``"eager"``; ``None``: back to ``$DISTOPT_KERNELS`` / the default."""
    global _mode
    if value is not None and value not in MODES:
        raise ValueError(f"kernel mode must be one of {MODES} or None, got {value!r}")
    _mode = value


def mode() -> str:
    """The current mode: :func:`set_mode`'s value, else ``$DISTOPT_KERNELS``, else ``compile``."""
    if _mode is not None:
        return _mode
    env = os.environ.get(ENV, "").strip().lower()
    if env and env not in MODES:
        raise ValueError(f"${ENV} must be one of {MODES}, got {env!r}")
    return env or "compile"


_compilable: dict[tuple[str, str], bool] = {}


def _can_compile(device: torch.device) -> bool:
    """Whether rules on ``device`` can be compiled: a C++ compiler on ``PATH`` for CPU tensors,
    Triton for CUDA.  Asked once per device type (and ``$CXX``), not at every step: the
    ``PATH`` search costs tens of microseconds per call."""
    key = (device.type, os.environ.get("CXX", ""))
    ok = _compilable.get(key)
    if ok is None:
        ok = _compilable[key] = _probe_compiler(device)
    return ok


def _probe_compiler(device: torch.device) -> bool:
    if not hasattr(torch, "compile"):
        return False
    if device.type == "cpu":
        return any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++"))
    if device.type == "cuda":
        import importlib.util

        return importlib.util.find_spec("triton") is not None
    return False


def scaler_of(opt: Any) -> tuple[Tensor | None, Tensor | None]:
    """``(grad_scale, found_inf)`` that ``torch.amp.GradScaler`` set on ``opt`` for this step."""
    return getattr(opt, "grad_scale", None), getattr(opt, "found_inf", None)


# --------------------------------------------------------------------------- the kernel body


def _kernel_factory(
    rule: Rule,
    states: tuple[str, ...],
    scalars: tuple[str, ...],
    options: tuple[tuple[str, Any], ...],
    sums: tuple[str, ...],
    phase: str,
) -> Callable[..., Any]:
    """The kernel of one ``phase``: ``sums`` (returns the float64 whole-tensor sums), ``update``
    (stores the rule's outputs in place) or ``fused`` (both in one call: the sums of an
    unsharded tensor need no reduction in between).  ``*_rows``: the same over a 2-D stack of
    equal-sized small tensors, one tensor per row (sums per row, ``stats`` one row each)."""
    opts = dict(options)
    rows = phase.endswith("_rows")
    base = phase.removesuffix("_rows")

    def kernel(
        p: Tensor,
        g: Tensor,
        sts: tuple[Tensor, ...],
        sc: Tensor,
        stats: Tensor | None,
        inv_scale: Tensor | None,
        found_inf: Tensor | None,
    ) -> Any:
        if inv_scale is not None:
            g = g * inv_scale
        s = dict(zip(scalars, sc.unbind(0)))
        old = dict(zip(states, sts))
        if base != "update":
            parts = rule(p, g, old, s, phase="sums", **opts)
            if base == "sums":
                return _sum_parts([parts[k] for k in sums], rows)
            # fused: each sum straight into s (no stacked buffer written and taken apart)
            s.update((k, _sum_one(parts[k], rows)) for k in sums)
        elif stats is not None:  # 0-dim per name, or one (n, 1) column per name for rows
            s.update(zip(sums, stats.t().unsqueeze(-1).unbind(0) if rows else stats.unbind(0)))
        kw = dict(opts, phase="update") if sums else opts
        new_p, new = rule(p, g, old, s, **kw)
        _store([(p, new_p)] + [(old[k], v) for k, v in new.items()], found_inf)
        return None

    # one code object per (rule, options, phase): torch.compile's cache and recompile limit are
    # per code object, so rules never evict each other's kernels
    return _named(kernel, f"distopt_{rule.__name__}_{phase}")


def _sum_one(x: Tensor, rows: bool) -> Tensor:
    """The whole-tensor sum of ``x`` (float64 accumulation: more exact than float32, and
    inductor's CPU reduction to float64 vectorises without its cascade-sum helper): 0-dim, or
    an ``(n, 1)`` column of per-row sums when ``rows``."""
    return x.sum(dim=-1, keepdim=True, dtype=torch.float64) if rows else x.sum(dtype=torch.float64)


def _sum_parts(parts: list[Tensor], rows: bool) -> Tensor:
    """:func:`_sum_one` of each of ``parts``, stacked: ``(k,)``, or ``(n, k)`` per row when
    ``rows``."""
    if rows:
        return torch.cat([_sum_one(x, True) for x in parts], -1)
    return torch.stack([_sum_one(x, False) for x in parts])


def _store(outs: Iterable[tuple[Tensor, Tensor]], found_inf: Tensor | None) -> None:
    """``dst.copy_(val)`` for each ``(dst, val)`` of ``outs``; where ``found_inf`` (a device
    tensor set by ``GradScaler``) is non-zero every ``dst`` keeps its old value (``torch.where``:
    no host read).  The in-place store of every kernel (traceable by ``torch.compile``)."""
    for dst, val in outs:
        if found_inf is not None:
            val = torch.where(found_inf > 0, dst, val)
        dst.copy_(val)


def _store_foreach(outs: Sequence[tuple[Tensor, Tensor]], found_inf: Tensor | None) -> None:
    """:func:`_store` as ONE in-place ``torch._foreach_copy_``: inductor writes it straight into
    the destinations (its re-inplacing of foreach ops), so a later read of a destination in the
    same graph reads the stored value; with a ``copy_`` per destination the new values may stay
    in per-call buffers that a later loop copies in."""
    vals = [v if found_inf is None else torch.where(found_inf > 0, d, v) for d, v in outs]
    torch._foreach_copy_([d for d, _ in outs], vals)


def compiled_kernel(
    fn: Callable[..., Any], hoist: bool = True, options: Mapping[str, Any] | None = None
) -> Callable[..., Any]:
    """``fn`` compiled with the runner's backend and options (see :class:`Compiled`);
    ``hoist=False``: its per-call scalar maths is left where the graph has it (no
    ``_kernel_compile._hoist_scalars``); ``options``: inductor options for this kernel only,
    merged over the runner's (``COMPILE_OPTIONS``, ``emulate_precision_casts``); not used with
    another backend (``BACKEND`` a callable or another name)."""
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(
            f"compiled_kernel: options must be a mapping of inductor option names to values "
            f"or None, got {type(options).__name__}"
        )
    merged = None
    if BACKEND == "inductor":
        merged = {**COMPILE_OPTIONS, **_precision_option(), **(options or {})}
    return Compiled(fn, BACKEND, merged, hoist)


@functools.cache
def inductor_options() -> frozenset[str]:
    """The option names this torch's inductor lists (``torch._inductor.list_options``, the list
    ``torch.compile``'s docstring names; empty without inductor), looked up once."""
    try:
        from torch._inductor import list_options
    except ImportError:  # pragma: no cover - no inductor in this torch
        return frozenset()
    return frozenset(list_options())


@functools.cache
def _precision_option() -> dict[str, bool]:
    """Inductor's ``emulate_precision_casts``, where this torch lists it (looked up at the first
    compiled kernel, not at import).  Without it inductor drops a rounding to a low-precision
    dtype that a fused kernel converts back: Big Vision's ``u.to(bfloat16)`` before its
    momentum's lerp (as timm and the eager form round it) left a bfloat16 first moment one unit
    in the last place off eager's in ~40% of its elements after 4 steps (with it: 0.02%, the
    float32 differences any compiled kernel has).  The option acts only on casts to a
    low-precision dtype."""
    return (
        {"emulate_precision_casts": True} if "emulate_precision_casts" in inductor_options() else {}
    )


def _named(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """A copy of the function ``fn`` whose code object is named ``name`` (same globals,
    defaults and closure).  ``torch.compile``'s cache and recompile limit are per code object:
    a kernel factory gives each (rule, options, phase) its own, so kernels never evict each
    other, and profiles show the name."""
    code = fn.__code__.replace(co_name=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


class _Kernels:
    """The compiled and eager forms of one (rule, states, scalars, options, sums)."""

    def __init__(self, key: tuple, compiled: bool):
        self.key, self.compiled = key, compiled
        # (phase, compiled) -> its kernel, for this runner call: the module cache's key holds
        # the rule's whole key (hashing it costs ~1 us per kernel call)
        self._got: dict[tuple[str, bool], Callable[..., Any]] = {}

    def get(self, phase: str, compiled: bool) -> Callable[..., Any]:
        fn = self._got.get((phase, compiled))
        if fn is None:
            fn = self._got[(phase, compiled)] = self._get(phase, compiled)
        return fn

    def _get(self, phase: str, compiled: bool) -> Callable[..., Any]:
        rule, states, scalars, options, sums = self.key
        k = (self.key, phase, compiled)
        fn = _kernels.get(k)
        if fn is None:
            fn = _kernel_factory(rule, states, scalars, options, sums, phase)
            if compiled:
                # a rule may opt out of scalar hoisting (``rule.hoist_scalars = False``): Lamb's
                # fused kernel stores its u once only when nothing else is reduced before it
                fn = compiled_kernel(fn, hoist=getattr(rule, "hoist_scalars", True))
            _kernels[k] = fn
        return fn

    def call(self, phase: str, flat: bool, *args: Any) -> Any:
        """Run compiled when possible (flattened args), else eagerly (chunked for big tensors)."""
        if self.compiled and flat:
            try:
                return self.get(phase, True)(*args)
            except Exception as exc:  # noqa: BLE001 - any compile failure: the same maths eagerly
                if phase.endswith("_rows"):  # the runner takes those tensors one by one instead
                    raise _plan.RowsFailed(phase) from exc
                _compile_failed(self.key, self.key[0], exc)
                self.compiled = False
        fn = self.get(phase, False)
        if phase != "update" or not flat:
            return fn(*args)
        return _plan.eager_chunks(fn, *args)


# --------------------------------------------------------------------------- the runner


def apply(
    opt: Any,
    rule: Rule,
    views: Sequence[ParamView],
    states: Sequence[str],
    scalars: Mapping[str, float] | Sequence[Mapping[str, float]],
    *,
    ctx: StepContext | None = None,
    sums: Sequence[str] = (),
    stats: Sequence[Tensor] | None = None,
    **options: Any,
) -> None:
    """Update ``views`` in place with ``rule`` (see the module docstring).

    ``states``: the state names the rule reads (each ``view.state[name]``, like the data);
    ``scalars``: host floats, one mapping for every view or one per view; ``options``: static
    Python values passed to the rule as keywords (each distinct set gets its own kernel);
    ``sums``: whole-tensor sums the update needs (then ``ctx`` reduces them across ranks).
    ``stats``: the caller's values of ``sums`` instead, one float64 tensor of shape
    ``(len(sums),)`` per view on its device, already whole-tensor (added across ranks): no
    sums pass and no reduction here, the rule's ``phase="update"`` only (``ctx`` not needed).
    Under ``GradScaler`` the rule sees the unscaled gradient: statistics of the gradient must
    be of the unscaled one too.
    ``opt`` is the optimizer (its ``grad_scale`` / ``found_inf``, set by ``GradScaler``).
    Call it once per param group and step: a step skipped by ``found_inf`` is taken back from
    each view's ``step`` counter here.
    """
    if not views:
        return
    states, sums = tuple(states), tuple(sums)
    if stats is not None:
        _check_stats(stats, views, sums)
    elif sums and ctx is None:
        raise ValueError("apply: `sums` needs the StepContext (ctx=) to reduce them across ranks")
    per_view = [scalars] * len(views) if isinstance(scalars, Mapping) else list(scalars)
    if len(per_view) != len(views):
        raise ValueError(f"apply: {len(per_view)} scalar sets for {len(views)} views")
    names = tuple(per_view[0])
    grad_scale, found_inf = scaler_of(opt)
    key = (rule, states, names, tuple(sorted(options.items())), sums)
    dev0 = views[0].data.device
    kern = _Kernels(key, mode() == "compile" and key not in _failed and _can_compile(dev0))
    _plan.run(kern, views, states, per_view, names, sums, ctx, grad_scale, found_inf, stats)

    if found_inf is not None:  # a skipped step does not count
        for v in views:
            step = v.state.get("step")
            if isinstance(step, Tensor):
                step.sub_(found_inf.to(step.device, step.dtype))


def _check_stats(stats: Sequence[Tensor], views: Sequence[ParamView], sums: tuple) -> None:
    if not sums:
        raise ValueError("apply: `stats` are the values of `sums`; give the names as sums=(...)")
    if len(stats) != len(views):
        raise ValueError(f"apply: {len(stats)} stats tensors for {len(views)} views (one per view)")
    shape = (len(sums),)
    for i, (st, v) in enumerate(zip(stats, views)):
        if not (
            isinstance(st, Tensor)
            and st.shape == shape
            and st.dtype == torch.float64
            and st.device == v.data.device
        ):
            got = (
                f"{tuple(st.shape)} {st.dtype} on {st.device}"
                if isinstance(st, Tensor)
                else type(st).__name__
            )
            raise ValueError(
                f"apply: stats[{i}] must be a float64 tensor of shape {shape} (one value per "
                f"name in sums={sums}) on {v.data.device}, got {got}"
            )


def _compile_failed(key: Any, rule: Rule, exc: Exception) -> None:
    if key not in _failed:
        _failed.add(key)
        log.warning(
            "distopt: compiling the %s update failed (%s: %s); running it eagerly "
            "(set %s=eager to skip compiling)",
            rule.__name__,
            type(exc).__name__,
            exc,
            ENV,
        )


# --------------------------------------------------------------------------- shared rule pieces

#: the whole-tensor sum the cautious mask needs (pass as ``sums=`` with a ``numel`` scalar)
CAUTION_SUMS = ("agree",)


def agreement(u: Tensor, g: Tensor) -> dict[str, Tensor]:
    """``phase="sums"`` of the cautious mask (arXiv:2411.16085): where ``u`` and ``g`` agree in sign."""
    return {"agree": (u * g > 0).to(u.dtype)}


def cautious(u: Tensor, g: Tensor, s: Mapping[str, Tensor]) -> Tensor:
    """``u * 1[u g > 0] / max(mean over the whole tensor, 1e-3)`` (``s["agree"]``: the count,
    ``s["numel"]``: the parameter's size)."""
    mask = (u * g > 0).to(u.dtype)
    # the per-tensor mean cast first (what a 0-dim float64 becomes against ``u`` anyway), so a
    # column of statistics (stacked small tensors, see _kernel_plan.rows_ok) gives the same numbers
    return u * (mask / torch.clamp(s["agree"] / s["numel"], min=1e-3).to(u.dtype))


def gradient_in(g: Tensor, p: Tensor, wd: Tensor | None, maximize: bool) -> Tensor:
    """The gradient a rule works with: negated for ``maximize``, plus ``wd * p`` (L2 decay
    added to the gradient) when ``wd`` is given."""
    if maximize:
        g = -g
    if wd is not None:
        g = g + wd * p
    return g


def ema_sq(v: Tensor, x: Tensor, beta: Tensor) -> Tensor:
    """``beta * v + (1 - beta) * x^2``, rounded as ``v.mul_(beta).addcmul_(x, x, value=1 - beta)``
    (so the eager form matches torch's and timm's multi-tensor arithmetic bit for bit)."""
    return torch.addcmul(v * beta, (1.0 - beta) * x, x)


#: ``float32`` bit pattern offset of the cube-root estimate (Kahan's: ``bits(x) / 3 + C`` is
#: ``cbrt(x)`` within ~5% for every normal ``x``)
_CBRT_BIAS = 709921077


def cbrt(x: Tensor) -> Tensor:
    """Cube root of ``x >= 0`` (``float32``) with multiplies and two divisions, no ``pow``.

    ``x.pow(1 / 3)`` compiles to a vector ``powf`` call that costs several times the memory
    traffic of the whole update (MADGRAD was 4x fused AdamW).  Here: an estimate from the
    exponent bits divided by 3, then two Halley steps ``y * (y^3 + 2x) / (2y^3 + x)`` (cubic
    convergence: within 3e-7 of the true cube root for normal ``x``, closer than ``powf`` with
    the exponent rounded to ``float32``).  ``0``, ``inf`` and NaN map to themselves; subnormal
    ``x`` (below 1.2e-38) to a value below 1e-12.
    """
    if x.dtype != torch.float32:
        return x.pow(1.0 / 3.0)
    bits = x.view(torch.int32).to(torch.float32) * (1.0 / 3.0)
    y = (bits.to(torch.int32) + _CBRT_BIAS).view(torch.float32)
    for _ in range(2):
        y3 = y * y * y
        y = y * ((y3 + 2.0 * x) / (2.0 * y3 + x))
    return torch.where((x > 0) & (x < float("inf")), y, x)


from distopt.optim import _kernel_plan as _plan  # noqa: E402 - the runner imports this module
