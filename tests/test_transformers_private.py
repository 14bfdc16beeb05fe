"""The private ``transformers.Trainer`` APIs ``DistoptTrainer`` uses: all in one module, still there.

``distopt/integrations/_transformers_private.py`` is the only place that overrides, calls or sets a
private Trainer method or attribute.  These checks fail loudly when a transformers release renames
or reshapes one of them (before a training run silently stops clipping or checkpointing sharded
state), or when private Trainer API use leaks into another module of the integration.  No
processes are spawned; the cost is importing transformers.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
INTEGRATIONS = ROOT / "distopt" / "integrations"

#: the private Trainer methods distopt overrides or calls, with the parameters it relies on
PRIVATE_METHODS = {
    "_clip_grad_norm": ["self", "model"],
    "_get_grad_norm": ["self", "model", "grad_norm"],
    "_save_optimizer_and_scheduler": ["self", "output_dir"],
    "_load_optimizer_and_scheduler": ["self", "checkpoint"],
    "_prepare_inputs": ["self", "inputs"],
}
OVERRIDDEN = set(PRIVATE_METHODS) - {"_prepare_inputs"}


def test_private_trainer_methods_still_have_their_signatures():
    from transformers import Trainer

    for name, params in PRIVATE_METHODS.items():
        method = getattr(Trainer, name, None)
        assert method is not None, f"transformers.Trainer.{name} is gone"
        assert list(inspect.signature(method).parameters) == params, (name, params)
    # _get_grad_norm(model, grad_norm=None): None means "compute it"
    assert inspect.signature(Trainer._get_grad_norm).parameters["grad_norm"].default is None


def test_trainer_still_uses_the_flag_and_the_wrapped_model_as_relied_on():
    from transformers import Trainer

    # _created_lr_scheduler: set by create_scheduler, and makes each train() rebuild the schedule
    assert re.search(
        r"self\._created_lr_scheduler\s*=\s*True", inspect.getsource(Trainer.create_scheduler)
    )
    setup = inspect.getsource(Trainer._prepare_for_training)
    assert re.search(r"if self\._created_lr_scheduler:\s*\n\s*self\.lr_scheduler = None", setup)
    # _wrap_model: model_wrapped goes through it, and DDP is added only when it returns trainer.model
    assert "self._wrap_model(self.model_wrapped)" in setup
    assert re.search(r"use_accelerator_prepare = model is self\.model", setup)
    # the training loop clips through the two overridden methods, in this order
    loop = inspect.getsource(Trainer)
    clip = loop.index("grad_norm = self._clip_grad_norm(model)")
    assert clip < loop.index("grad_norm = self._get_grad_norm(model, grad_norm=grad_norm)")


def test_private_trainer_api_lives_in_one_module():
    from transformers import Trainer

    from distopt.integrations._transformers_private import _TrainerPrivateHooks
    from distopt.integrations.transformers import DistoptTrainer

    def overrides(cls: type) -> set[str]:
        return {
            n
            for n in vars(cls)
            if n.startswith("_") and not n.startswith("__") and hasattr(Trainer, n)
        }

    assert overrides(_TrainerPrivateHooks) == OVERRIDDEN
    assert overrides(DistoptTrainer) == set(), (
        "a private Trainer method overridden outside the hooks"
    )
    # The other modules touch only distopt's own private names (never a Trainer one).
    own = set(vars(DistoptTrainer)) | set(vars(_TrainerPrivateHooks))
    for path in [INTEGRATIONS / "transformers.py", *INTEGRATIONS.glob("_transformers_*.py")]:
        if path.name == "_transformers_private.py":
            continue
        for name in set(re.findall(r"(?:self|trainer)\.(_\w+)", path.read_text())):
            assert name in own or name.startswith("_distopt_"), (path.name, name)
            assert not hasattr(Trainer, name), (path.name, name)
