"""Direct kernel calls that call inductor's generated code itself (``_kernel.GENERATED``).

:class:`distopt.optim._kernel_compile.Compiled` calls a kernel's compiled graph directly after
the first call with each signature.  Where the wrappers around inductor's generated code (AOT
autograd's runtime wrapper, ``CompiledFxGraph.__call__``) did nothing for a graph at that first
call except mark the inputs it writes, the direct calls call the generated code and mark those
inputs themselves.  Real inductor builds (one small C++ kernel per rule), one process.
"""

from __future__ import annotations

import pytest
import torch

from distopt import _torch_private as tp
from distopt.optim import _kernel as K
from distopt.optim import _kernel_compile as KC

pytestmark = pytest.mark.skipif(tp.inductor_compiler({}) is None, reason="no inductor entry in this torch")


def _in_place(p, g, m, s):
    m2 = m * s[0] + g
    p.copy_(p - s[1] * m2)
    m.copy_(m2)


def _fresh_outputs(p, g, s):
    u = p * s[0] + g
    return u, (u * u).sum(dtype=torch.float64)


def _aliased_output(p, g, s):
    p.add_(g * s[0])
    return p.view(-1)


def _direct_call(c: KC.Compiled):
    (entry,) = c._for_threads(torch.get_num_threads() == 1)[1].values()
    return entry[0]


def _run(fn, generated: bool, monkeypatch, steps: int = 4):
    monkeypatch.setattr(K, "GENERATED", generated)
    c = KC.Compiled(K._named(fn, f"{fn.__name__}_{generated}"), "inductor", dict(K.COMPILE_OPTIONS))
    gen = torch.Generator().manual_seed(0)
    p, g, m = (torch.randn(3000, generator=gen) for _ in range(3))
    s = torch.tensor([0.9, 0.01], dtype=torch.float64)
    outs, versions = [], []
    for _ in range(steps):
        v = (p._version, m._version)
        args = (p, g, m, s) if fn is _in_place else (p, g, s)
        out = c(*args)
        versions.append((p._version - v[0], m._version - v[1]))
        if out is not None:
            outs.append(tuple(o.clone() for o in out) if isinstance(out, tuple) else out)
    return c, (p, m), outs, versions


def test_in_place_rule_calls_the_generated_code_and_marks_what_it_writes(monkeypatch):
    """A rule that writes two inputs: its direct calls reach the generated code (not the
    wrappers) and bump exactly the written inputs' version counters once per call, as the
    wrappers do; bit for bit the same values as the calls through the wrappers."""
    c, (p, m), _, versions = _run(_in_place, True, monkeypatch)
    want_c, (want_p, want_m), _, want_versions = _run(_in_place, False, monkeypatch)
    assert _direct_call(c).__qualname__ == "_marking.<locals>.marked"
    assert _direct_call(want_c).__name__ == "boxed"
    assert versions == want_versions == [(1, 1)] * 4
    assert torch.equal(p, want_p) and torch.equal(m, want_m)


def test_rule_with_fresh_outputs_calls_the_generated_code(monkeypatch):
    """Fresh outputs (a buffer and a float64 sum), no input written: the generated code's
    boxed ``call`` itself, and the same outputs as through the wrappers."""
    c, _, outs, versions = _run(_fresh_outputs, True, monkeypatch)
    _, _, want, _ = _run(_fresh_outputs, False, monkeypatch)
    call = _direct_call(c)
    assert call.__name__ == "call" and call.__qualname__ != "_marking.<locals>.marked"
    assert versions == [(0, 0)] * 4
    for got, exp in zip(outs, want):
        assert all(torch.equal(a, b) for a, b in zip(got, exp))


def test_rule_returning_a_view_of_an_input_keeps_the_wrappers(monkeypatch):
    """An output that aliases an input is rebuilt by the runtime wrapper (a view of the
    caller's tensor); such a graph keeps calling through the wrappers, and its output is
    still a view of the caller's parameter."""
    c, (p, _), outs, _ = _run(_aliased_output, True, monkeypatch)
    assert _direct_call(c).__name__ == "boxed"
    assert all(o.data_ptr() == p.data_ptr() for o in outs)
    assert all(o._base is p for o in outs)


def test_passed_through_refuses_anything_the_wrappers_changed():
    """``_passed_through``: the generated code must have got the caller's very arguments and
    returned the very outputs the wrappers returned, nothing more or less."""
    a, b = torch.zeros(3), torch.ones(3)
    out = [b]
    assert KC._passed_through((a, 3), out, [[a, 3], [b]])
    assert not KC._passed_through((a, 3), out, [[a.clone(), 3], [b]])  # another tensor
    assert not KC._passed_through((a, 3), out, [[a, 4], [b]])  # another size
    assert not KC._passed_through((a, 3), out, [[a, 3], [b, a]])  # an extra (mutation) output
    assert not KC._passed_through((a, 3), [b.view(-1)], [[a, 3], [b]])  # a rebuilt alias
    assert not KC._passed_through((a, 3), out, [])  # the generated code was not reached


def test_calls_under_inference_mode(monkeypatch):
    """Inference tensors have no version counter: a kernel called in ``torch.inference_mode``
    on them (and on a normal parameter written there) works, gives eager's numbers and marks
    the normal tensor as the calls through the wrappers do."""
    got = {}
    for generated in (True, False):
        monkeypatch.setattr(K, "GENERATED", generated)
        fn = K._named(_aliasless, f"aliasless_inference_{generated}")
        c = KC.Compiled(fn, "inductor", dict(K.COMPILE_OPTIONS))
        p = torch.arange(3000, dtype=torch.float32) / 3000
        s = torch.tensor([0.5], dtype=torch.float64)
        bumps = []
        with torch.inference_mode():
            g = torch.ones(3000)
            q = torch.zeros(3000)  # an inference tensor written in place
            for _ in range(3):
                v = p._version
                c(p, g, q, s)
                bumps.append(p._version - v)
        got[generated] = (p, q, bumps)
    (p, q, bumps), (want_p, want_q, want_bumps) = got[True], got[False]
    assert bumps == want_bumps
    assert torch.equal(p, want_p) and torch.equal(q, want_q)
    torch.testing.assert_close(p, torch.arange(3000, dtype=torch.float32) / 3000 + 1.5)
    torch.testing.assert_close(q, torch.full((3000,), 3.0))


def _aliasless(p, g, q, s):
    p.copy_(p + g * s[0])
    q.copy_(q + g)
