"""The private APIs of torch, Accelerate and DeepSpeed that distopt still uses (see
docs/architecture.md, "Private APIs"): each test fails loudly when a release removes or changes
one, naming it.  One process, no spawn."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import distopt
from distopt import _torch_private as tp


def test_torch_queue_callback_runs_at_the_end_of_backward():
    ran = []
    x = torch.ones(3, requires_grad=True)
    y = x * 2
    y.register_hook(lambda g: tp.queue_end_of_backward(lambda: ran.append(x.grad is not None)))
    y.sum().backward()
    assert ran == [True], "queue_callback did not run once after the gradients were accumulated"


def test_torch_version_counter_moves_on_in_place_writes():
    t = torch.zeros(4)
    v = tp.version_of(t)
    t[1:3].add_(1)  # through a view
    assert tp.version_of(t) > v


def test_torch_fsdp2_root_callback_exists():
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp._fsdp_state import FSDPState
    from torch.distributed.fsdp import FSDPModule

    assert hasattr(FSDPModule, "_get_fsdp_state"), "FSDPModule._get_fsdp_state is gone"
    assert callable(getattr(FSDPState, "_root_post_backward_final_callback", None)), (
        "FSDPState._root_post_backward_final_callback is gone: GradientAccumulator.flush under "
        "FSDP2 needs a new way to reduce the accumulated gradients"
    )


def test_torch_sharded_tensor_from_metadata_builds_uneven_rows():
    import torch.distributed as dist

    from distopt.checkpoint._save_load import row_sharded

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        local = torch.arange(6.0).reshape(3, 2)
        st = row_sharded(local, (3, 2), [(0, 3)], 0)
        assert tuple(st.size()) == (3, 2)
        assert torch.equal(st.local_shards()[0].tensor, local)
    finally:
        dist.destroy_process_group()


def test_accelerate_privates():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import GradientState

    from distopt import _accelerate_private as ap

    assert ap.check_version(), (
        f"Accelerate {accelerate.__version__} is outside the tested range {ap.TESTED}"
    )
    assert callable(getattr(GradientState, "_set_sync_gradients", None)), (
        "GradientState._set_sync_gradients is gone"
    )
    src = inspect.getsource(accelerate.Accelerator.prepare_optimizer)
    assert "_is_accelerate_prepared" in src, (
        "prepare_optimizer no longer honours _is_accelerate_prepared"
    )
    src = inspect.getsource(accelerate.Accelerator.prepare_model)
    assert "_models" in src, "Accelerator no longer keeps its models in _models"
    accelerator = accelerate.Accelerator(cpu=True)
    model = nn.Linear(2, 2)
    opt = distopt.optim.AdamW(model.parameters(), lr=1e-3)
    from distopt.integrations.accelerate import prepare

    pm, popt = prepare(accelerator, model, opt)
    assert any(m is pm for m in ap.held_models(accelerator))
    assert type(popt).__name__ == "DistoptAcceleratedOptimizer" and popt.optimizer is opt
    ap.set_sync_gradients(accelerator, False)
    assert accelerator.sync_gradients is False
    ap.set_sync_gradients(accelerator, True)
    assert accelerator.sync_gradients is True


def test_deepspeed_loss_scale_attributes():
    deepspeed = pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from distopt import _deepspeed_private as dp

    assert dp.check_version(), (
        f"DeepSpeed {deepspeed.__version__} is outside the tested range {dp.TESTED}"
    )
    src = inspect.getsource(DeepSpeedZeroOptimizer)
    for attr in ("custom_loss_scaler", "external_loss_scale", "loss_scale"):
        assert f"self.{attr}" in src, f"DeepSpeedZeroOptimizer no longer has {attr}"
    assert "if self.custom_loss_scaler:" in src or "self.custom_loss_scaler" in src

    class Fake:  # the context manager restores what it changed
        custom_loss_scaler, external_loss_scale, loss_scale = False, None, 8.0

    opt = Fake()
    with dp.gradients_scaled_by(opt, 2.0):
        assert opt.custom_loss_scaler is True and opt.external_loss_scale == 4.0
    assert opt.custom_loss_scaler is False and opt.external_loss_scale is None


def test_torch_inductor_compiler_for_an_own_backend():
    """distopt.optim._kernel.Compiled compiles through inductor from its own backend (to call
    the compiled graph directly later): ``torch._inductor.compile_fx.compile_fx`` with
    ``config_patches``.  Without it the kernels still compile, but every call enters dynamo."""
    fn = tp.inductor_compiler({"cpp.dynamic_threads": True})
    assert callable(fn), (
        "torch._inductor.compile_fx.compile_fx(gm, example_inputs, config_patches=) is gone: "
        "distopt's optimizer kernels lose their direct calls (see _kernel.Compiled)"
    )


def test_torch_inductor_generated_call_is_reachable():
    """``_kernel.Compiled``'s direct calls call inductor's generated code itself where the
    wrappers around it do nothing (``_kernel.GENERATED``): ``compiled_fx_graph`` finds the
    ``CompiledFxGraph`` inside what ``compile_fx`` returned, and ``watch_generated_call`` sees
    a call reach its boxed ``current_callable``.  Without them the kernels keep calling
    through the wrappers (~100 us more a call on cold caches)."""

    def fn(x, y):
        return x * 2.0 + y

    compiled = []

    def backend(gm, example_inputs):
        compiled.append(tp.inductor_compiler({})(gm, example_inputs))
        return compiled[-1]

    f = torch.compile(fn, dynamic=True, fullgraph=True, backend=backend)
    x, y = torch.randn(5), torch.randn(5)
    torch.testing.assert_close(f(x, y), x * 2.0 + y)
    fx = tp.compiled_fx_graph(compiled[0])
    assert fx is not None, (
        "torch._inductor.output_code.CompiledFxGraph (with a boxed current_callable) is no "
        "longer inside compile_fx's wrappers: distopt's kernels lose their generated calls"
    )
    seen = []
    with tp.watch_generated_call(fx, seen) as call:
        out = compiled[0](5, x, y)
    assert callable(call) and len(seen) == 2 and seen[1][0] is out[0]
    torch.testing.assert_close(call([5, x, y])[0], x * 2.0 + y)
