"""The timm / transformers facades: exact signatures and defaults, and one-line migration."""

from __future__ import annotations

import ast
import copy
import importlib.util
import inspect
import pickle
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import distopt.optim as do
from tests.references import load_timm_optim, load_transformers_optim

P = inspect.Parameter

# --------------------------------------------------------------------------- helpers


def _params_of(sig: inspect.Signature) -> list[tuple[str, object, object]]:
    return [(n, p.kind, p.default) for n, p in sig.parameters.items() if n != "self"]


def _same_default(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_default(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _assert_same_signature(ours, seed_params, what, allow_extra=False):
    """Same parameters, kinds and defaults; with ``allow_extra``, a compatible superset.

    A compatible superset has every seed parameter, in the seed's order, with the seed's kind
    and default; the extra ones are optional (have a default, or are ``*args``/``**kwargs``).
    """
    mine = _params_of(inspect.signature(ours))
    seed_names = [n for n, _, _ in seed_params]
    my_names = [n for n, _, _ in mine]
    if allow_extra:
        assert set(seed_names) <= set(my_names), f"{what}: missing {set(seed_names) - set(my_names)}"
        order = [n for n in my_names if n in seed_names]
        assert order == seed_names, f"{what}: seed parameters reordered: {order} != {seed_names}"
        for n, kind, default in mine:
            if n not in seed_names:
                assert default is not P.empty or kind in (P.VAR_KEYWORD, P.VAR_POSITIONAL), \
                    f"{what}: extra parameter {n} is required"
    else:
        assert my_names == seed_names, f"{what}: parameters {my_names} != seed {seed_names}"
    by_name = {n: (k, d) for n, k, d in mine}
    for name, kind, default in seed_params:
        k, d = by_name[name]
        assert k == kind, f"{what}.{name}: kind {k} != seed {kind}"
        assert _same_default(d, default), f"{what}.{name}: default {d!r} != seed {default!r}"


def _timm_dir() -> Path | None:
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "optim"


def _ast_signature(fn: ast.FunctionDef) -> list[tuple[str, object, object]]:
    """(name, kind, default) of a function definition parsed from source (no import)."""
    P = inspect.Parameter
    a = fn.args

    def value(node):
        if node is None:
            return P.empty
        if isinstance(node, ast.Name) and node.id == "required":
            from torch.optim.optimizer import required

            return required
        return ast.literal_eval(node)

    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    out = []
    for arg, dflt in zip(positional, defaults):
        kind = P.POSITIONAL_ONLY if arg in a.posonlyargs else P.POSITIONAL_OR_KEYWORD
        out.append((arg.arg, kind, value(dflt)))
    if a.vararg:
        out.append((a.vararg.arg, P.VAR_POSITIONAL, P.empty))
    for arg, dflt in zip(a.kwonlyargs, a.kw_defaults):
        out.append((arg.arg, P.KEYWORD_ONLY, value(dflt)))
    if a.kwarg:
        out.append((a.kwarg.arg, P.VAR_KEYWORD, P.empty))
    return [x for x in out if x[0] != "self"]


def _timm_def(filename: str, name: str, method: str | None = "__init__"):
    root = _timm_dir()
    if root is None:
        pytest.skip("timm is not installed")
    tree = ast.parse((root / filename).read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name and method:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == method:
                    return _ast_signature(item)
        if isinstance(node, ast.FunctionDef) and node.name == name and method is None:
            return _ast_signature(node)
    raise AssertionError(f"{name} not found in timm/optim/{filename}")


def _facade(module, name):
    try:
        return getattr(module, name)
    except AttributeError as exc:
        pytest.skip(str(exc))


# --------------------------------------------------------------------------- timm signatures

TIMM_CLASSES = {  # facade name -> (timm file, timm class)
    "AdaBelief": ("adabelief.py", "AdaBelief"),
    "Adafactor": ("adafactor.py", "Adafactor"),
    "Adahessian": ("adahessian.py", "Adahessian"),
    "AdamP": ("adamp.py", "AdamP"),
    "AdamWLegacy": ("adamw.py", "AdamWLegacy"),
    "Lamb": ("lamb.py", "Lamb"),
    "Lars": ("lars.py", "Lars"),
    "Lookahead": ("lookahead.py", "Lookahead"),
    "MADGRAD": ("madgrad.py", "MADGRAD"),
    "NAdamLegacy": ("nadam.py", "NAdamLegacy"),
    "Nadam": ("nadam.py", "NAdamLegacy"),
    "NvNovoGrad": ("nvnovograd.py", "NvNovoGrad"),
    "RAdamLegacy": ("radam.py", "RAdamLegacy"),
    "RMSpropTF": ("rmsprop_tf.py", "RMSpropTF"),
    "SGDP": ("sgdp.py", "SGDP"),
}
TORCH_CLASSES = ["SGD", "Adam", "AdamW", "NAdam", "RAdam", "Adamax", "RMSprop", "Adagrad", "Adadelta"]
TIMM_FUNCTIONS = {
    "create_optimizer_v2": "_optim_factory.py",
    "create_optimizer": "_optim_factory.py",
    "optimizer_kwargs": "_optim_factory.py",
    "list_optimizers": "_optim_factory.py",
    "get_optimizer_class": "_optim_factory.py",
    "param_groups_weight_decay": "_param_groups.py",
    "param_groups_layer_decay": "_param_groups.py",
}


@pytest.mark.parametrize("name", sorted(TIMM_CLASSES))
def test_timm_class_signatures(name):
    import distopt.compat.timm as T

    filename, seed_name = TIMM_CLASSES[name]
    seed = _timm_def(filename, seed_name)
    _assert_same_signature(_facade(T, name).__init__, seed, f"distopt.compat.timm.{name}")


@pytest.mark.parametrize("name", TORCH_CLASSES)
def test_timm_reexported_torch_class_signatures(name):
    import distopt.compat.timm as T

    seed = _params_of(inspect.signature(getattr(torch.optim, name).__init__))
    _assert_same_signature(_facade(T, name).__init__, seed, f"distopt.compat.timm.{name}",
                           allow_extra=True)


@pytest.mark.parametrize("name", sorted(TIMM_FUNCTIONS))
def test_timm_function_signatures(name):
    import distopt.compat.timm as T

    seed = _timm_def(TIMM_FUNCTIONS[name], name, method=None)
    _assert_same_signature(getattr(T, name), seed, f"distopt.compat.timm.{name}")


def test_timm_exports_everything_it_documents():
    import distopt.compat.timm as T

    for name in T.__all__:
        if name in TIMM_CLASSES or name in TORCH_CLASSES:
            continue  # classes whose distopt base has not landed are skipped above
        assert callable(getattr(T, name)), name


# --------------------------------------------------------------------------- transformers signatures

# transformers >= 5 dropped these; their 4.x signatures (transformers/optimization.py and
# optimization_tf.py) are the seed.
TRANSFORMERS_4X = {
    "AdamW": [("params", P.POSITIONAL_OR_KEYWORD, P.empty), ("lr", P.POSITIONAL_OR_KEYWORD, 1e-3),
              ("betas", P.POSITIONAL_OR_KEYWORD, (0.9, 0.999)), ("eps", P.POSITIONAL_OR_KEYWORD, 1e-6),
              ("weight_decay", P.POSITIONAL_OR_KEYWORD, 0.0),
              ("correct_bias", P.POSITIONAL_OR_KEYWORD, True),
              ("no_deprecation_warning", P.POSITIONAL_OR_KEYWORD, False)],
    # TF: (learning_rate, beta_1, ...); the PyTorch form takes params first
    "AdamWeightDecay": [("params", P.POSITIONAL_OR_KEYWORD, P.empty),
                        ("learning_rate", P.POSITIONAL_OR_KEYWORD, 0.001),
                        ("beta_1", P.POSITIONAL_OR_KEYWORD, 0.9), ("beta_2", P.POSITIONAL_OR_KEYWORD, 0.999),
                        ("epsilon", P.POSITIONAL_OR_KEYWORD, 1e-7), ("amsgrad", P.POSITIONAL_OR_KEYWORD, False),
                        ("weight_decay_rate", P.POSITIONAL_OR_KEYWORD, 0.0),
                        ("include_in_weight_decay", P.POSITIONAL_OR_KEYWORD, None),
                        ("exclude_from_weight_decay", P.POSITIONAL_OR_KEYWORD, None),
                        ("name", P.POSITIONAL_OR_KEYWORD, "AdamWeightDecay"),
                        ("kwargs", P.VAR_KEYWORD, P.empty)],
    # TF create_optimizer + the keyword-only params= of the PyTorch form
    "create_optimizer": [("init_lr", P.POSITIONAL_OR_KEYWORD, P.empty),
                         ("num_train_steps", P.POSITIONAL_OR_KEYWORD, P.empty),
                         ("num_warmup_steps", P.POSITIONAL_OR_KEYWORD, P.empty),
                         ("min_lr_ratio", P.POSITIONAL_OR_KEYWORD, 0.0),
                         ("adam_beta1", P.POSITIONAL_OR_KEYWORD, 0.9),
                         ("adam_beta2", P.POSITIONAL_OR_KEYWORD, 0.999),
                         ("adam_epsilon", P.POSITIONAL_OR_KEYWORD, 1e-8),
                         ("adam_clipnorm", P.POSITIONAL_OR_KEYWORD, None),
                         ("adam_global_clipnorm", P.POSITIONAL_OR_KEYWORD, None),
                         ("weight_decay_rate", P.POSITIONAL_OR_KEYWORD, 0.0),
                         ("power", P.POSITIONAL_OR_KEYWORD, 1.0),
                         ("include_in_weight_decay", P.POSITIONAL_OR_KEYWORD, None),
                         ("params", P.KEYWORD_ONLY, P.empty)],
}


def _transformers_names():
    import distopt.compat.transformers as TR

    return [n for n in TR.__all__ if n not in ("SchedulerType",)]


@pytest.mark.parametrize("name", _transformers_names())
def test_transformers_signatures(name):
    import distopt.compat.transformers as TR

    ours = _facade(TR, name)
    ours_fn = ours.__init__ if isinstance(ours, type) else ours
    tf = load_transformers_optim()
    seed_obj = None if tf is None else getattr(tf, name, None)
    if seed_obj is not None and name not in ("AdamWeightDecay", "create_optimizer"):
        seed_fn = seed_obj.__init__ if isinstance(seed_obj, type) else seed_obj
        seed = _params_of(inspect.signature(seed_fn))
    elif name in TRANSFORMERS_4X:
        seed = TRANSFORMERS_4X[name]
    elif tf is None:
        pytest.skip("transformers is not installed")
    else:
        pytest.skip(f"transformers {name} not in the installed version")
    # schedules may add optional parameters (last_epoch, base_lrs); optimizers may not
    _assert_same_signature(ours_fn, seed, f"distopt.compat.transformers.{name}",
                           allow_extra=name not in TRANSFORMERS_4X and name != "Adafactor")


def test_transformers_scheduler_type_values():
    import distopt.compat.transformers as TR

    tf = load_transformers_optim()
    if tf is None:
        pytest.skip("transformers is not installed")
    ours = {m.value for m in TR.SchedulerType}
    theirs = {m.value for m in tf.SchedulerType}
    # transformers >= 5 additions that distopt.schedules does not provide (yet)
    assert theirs - {"greedy", "cosine_warmup_with_min_lr"} <= ours


# --------------------------------------------------------------------------- behaviour


def test_unsupported_options_are_loud_and_switches_ignored():
    import distopt.compat.timm as T

    params = [nn.Parameter(torch.randn(3, 3))]
    with pytest.raises(NotImplementedError, match="clipping_threshold"):
        T.AdamWLegacy(params, clipping_threshold=1.0)
    with pytest.raises(NotImplementedError, match="capturable"):
        T.AdamW(params, capturable=True)
    opt = T.AdamW(params, foreach=False, fused=True)
    assert isinstance(opt, do.AdamW) and opt.defaults["weight_decay"] == 1e-2
    clone = pickle.loads(pickle.dumps(opt))
    assert type(clone) is T.AdamW
    assert type(copy.deepcopy(opt)) is T.AdamW


def test_timm_facade_numbers_match_timm():
    import distopt.compat.timm as T
    from tests.problems import make_params, run_quadratic

    for module, name, kw in (("lamb", "Lamb", {"lr": 1e-2, "weight_decay": 0.02}),
                             ("adamp", "AdamP", {"lr": 1e-2, "weight_decay": 0.02}),
                             ("adafactor", "Adafactor", {"lr": 1e-2})):
        mod = load_timm_optim(module)
        if mod is None:
            pytest.skip("timm is not installed")
        p1, p2 = make_params(), make_params()
        run_quadratic(_facade(T, name)(p1, **kw), p1, 6)
        run_quadratic(getattr(mod, name)(p2, **kw), p2, 6)
        for a, b in zip(p1, p2):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_timm_layer_decay_groups_have_scaled_lr_and_no_lr_scale():
    import distopt.compat.timm as T
    from tests.test_factory import MiniViT

    model = MiniViT()
    opt = T.create_optimizer_v2(model, "adamw", lr=1e-2, weight_decay=0.05, layer_decay=0.5)
    assert type(opt) is T.AdamW
    lrs = sorted({round(g["lr"], 12) for g in opt.param_groups})
    assert lrs == sorted(round(1e-2 * 0.5**i, 12) for i in range(5))
    assert all("lr_scale" not in g and g["initial_lr"] == g["lr"] for g in opt.param_groups)
    # direct use of the group builder keeps timm's shape (lr_scale, no lr)
    groups = T.param_groups_layer_decay(model, layer_decay=0.5)
    assert all("lr_scale" in g and "lr" not in g for g in groups)


def test_transformers_adamw_legacy_arithmetic():
    from distopt.compat import transformers as optimization

    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = optimization.AdamW([p], lr=0.1, weight_decay=0.5)
    assert opt.defaults["eps"] == 1e-6 and opt.defaults["transformers_order"] is True
    p.grad = torch.tensor([0.5, 0.25])
    opt.step()
    # step 1: m = 0.1 g, v = 0.001 g^2; step = lr * sqrt(1-b2)/(1-b1) = 0.1*sqrt(.001)/.1
    g = torch.tensor([0.5, 0.25])
    upd = (0.1 * g) / ((0.001 * g * g).sqrt() + 1e-6) * (0.1 * 0.001**0.5 / 0.1)
    expect = (torch.tensor([1.0, -2.0]) - upd) * (1 - 0.1 * 0.5)
    torch.testing.assert_close(p.detach(), expect)


# --------------------------------------------------------------------------- one-line migration

TIMM_SNIPPET = """
{import_line}
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 2))
optimizer = create_optimizer_v2(model, "lamb", lr=5e-3, weight_decay=0.05)
x, y = torch.randn(32, 8), torch.randn(32, 2)
for _ in range(5):
    optimizer.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    optimizer.step()
result = [p.detach().clone() for p in model.parameters()]
"""

TRANSFORMERS_SNIPPET = """
{import_line}
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
optimizer = optimization.Adafactor(model.parameters(), lr=1e-2, scale_parameter=False,
                                   relative_step=False, warmup_init=False)
scheduler = optimization.get_linear_schedule_with_warmup(optimizer, num_warmup_steps=2,
                                                         num_training_steps=10)
x, y = torch.randn(32, 8), torch.randn(32, 2)
for _ in range(6):
    optimizer.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    optimizer.step()
    scheduler.step()
result = [p.detach().clone() for p in model.parameters()]
lrs = scheduler.get_last_lr()
"""


def _run(snippet: str, import_line: str) -> dict:
    ns: dict = {}
    exec(textwrap.dedent(snippet.format(import_line=import_line)), ns)  # noqa: S102
    return ns


def test_timm_snippet_runs_with_a_one_line_import_change():
    ours = _run(TIMM_SNIPPET, "from distopt.compat.timm import create_optimizer_v2")
    assert all(torch.isfinite(p).all() for p in ours["result"])
    # the same training with timm's Lamb (timm's factory needs torchvision: build the groups
    # as timm's factory does, by hand)
    mod = load_timm_optim("lamb")
    if mod is None:
        return

    def timm_factory(model, opt, lr, weight_decay):
        decay = [p for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith(".bias")]
        no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith(".bias")]
        return mod.Lamb([{"params": no_decay, "weight_decay": 0.0},
                         {"params": decay, "weight_decay": weight_decay}], lr=lr, weight_decay=0.0)

    ns: dict = {"create_optimizer_v2": timm_factory}
    exec(textwrap.dedent(TIMM_SNIPPET.format(import_line="")), ns)  # noqa: S102
    for a, b in zip(ours["result"], ns["result"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_transformers_snippet_runs_with_a_one_line_import_change():
    ours = _run(TRANSFORMERS_SNIPPET, "from distopt.compat import transformers as optimization")
    assert all(torch.isfinite(p).all() for p in ours["result"])
    if load_transformers_optim() is None:
        return
    theirs = _run(TRANSFORMERS_SNIPPET, "from transformers import optimization")
    for a, b in zip(ours["result"], theirs["result"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert ours["lrs"] == pytest.approx(theirs["lrs"])


def test_transformers_create_optimizer_pytorch_form():
    from distopt.compat import transformers as optimization

    if not hasattr(do, "AdamWeightDecay"):
        pytest.skip("distopt.optim.AdamWeightDecay has not landed yet")
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 1))
    opt, sched = optimization.create_optimizer(1e-2, num_train_steps=10, num_warmup_steps=2,
                                               weight_decay_rate=0.01,
                                               params=model.named_parameters())
    lrs = []
    for _ in range(10):
        opt.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(5e-3) and lrs[1] == pytest.approx(1e-2)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert isinstance(sched, optimization.WarmUp)
