"""Build the same model + optimizer in every way of running (for resume and accumulation tests)."""

from __future__ import annotations

import torch
import torch.distributed as dist

import distopt
from tests.problems import UnevenModel, uneven_batch, uneven_loss

MODES = ("single", "ddp", "zero1", "zero2", "fsdp2")


def build(mode: str, make_opt, scalar_shape=(1,)):
    """(model_for_training, optimizer, plain_module) in ``mode``; same initial values everywhere."""
    torch.manual_seed(0)
    raw = UnevenModel(scalar_shape=scalar_shape)
    if mode == "single":
        return raw, make_opt(raw.parameters()), raw
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(raw, find_unused_parameters=True)
        return model, make_opt(model.parameters()), raw
    if mode in ("zero1", "zero2"):
        opt = make_opt(raw.parameters())
        model, opt = distopt.shard(raw, opt, stage=int(mode[-1]))
        return model, opt, raw
    if mode == "fsdp2":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:
            from torch.distributed._composable.fsdp import fully_shard
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        fully_shard(raw, mesh=mesh)
        return raw, make_opt(raw.parameters()), raw
    raise ValueError(mode)


def train_steps(model, opt, start: int, stop: int, sched=None, lrs=None):
    r = dist.get_rank() if dist.is_initialized() else 0
    w = dist.get_world_size() if dist.is_initialized() else 1
    for t in range(start, stop):
        img, tok, target = uneven_batch(t)
        n = img.shape[0] // w
        sl = slice(r * n, (r + 1) * n)
        opt.zero_grad(set_to_none=True)
        loss = uneven_loss(model, (img[sl], tok[sl], target[sl]), t)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if lrs is not None:
            lrs.append([g["lr"] for g in opt.param_groups])


def full_params(raw) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in raw.named_parameters():
        t = p.full_tensor() if type(p).__name__ == "DTensor" else p
        out[n] = t.detach().clone()
    return out
