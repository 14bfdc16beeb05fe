"""Small deterministic problems shared by the optimizer, sharding and resume tests."""

from __future__ import annotations

import torch
from torch import nn

# Uneven shapes on purpose: a matrix, a vector, a 1x1, a conv kernel, a scalar, a
# non-contiguous matrix and an embedding-like table whose rows do not divide by 2, 3 or 4.
SHAPES = [(7, 5), (30,), (1, 1), (4, 3, 3, 3), (), (13, 6)]


def make_params(seed: int = 0, dtype: torch.dtype = torch.float32, noncontig: bool = True) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for i, shape in enumerate(SHAPES):
        if noncontig and len(shape) == 2 and i == len(SHAPES) - 1:
            t = torch.randn(shape[::-1], generator=g).t()  # non-contiguous view
            params.append(nn.Parameter(t.to(dtype)))
            continue
        params.append(nn.Parameter(torch.randn(shape, generator=g).to(dtype)))
    return params


def quadratic_loss(params, step: int, seed: int = 1) -> torch.Tensor:
    """A step-dependent convex quadratic: sum_i 0.5 * a_i * p_i^2 + b_i(step) * p_i.

    Its gradient ``a * p + b`` depends on the parameters (so errors compound) and its Hessian
    diagonal is ``a`` (so Adahessian has something to estimate).
    """
    g = torch.Generator().manual_seed(seed * 100003 + step)
    total = 0.0
    for p in params:
        a = torch.rand(p.shape, generator=g) + 0.5
        b = torch.randn(p.shape, generator=g)
        pf = p.float()
        total = total + (0.5 * a * pf * pf + b * pf).sum()
    return total


def run_quadratic(opt, params, steps: int, create_graph: bool = False, start: int = 0, skip=()):
    """``steps`` optimizer steps on :func:`quadratic_loss`; ``skip`` = indices left without grad."""
    for t in range(start, start + steps):
        opt.zero_grad(set_to_none=True)
        live = [p for i, p in enumerate(params) if i not in skip]
        loss = quadratic_loss(live, t)
        loss.backward(create_graph=create_graph)
        opt.step()
    return params


def rosenbrock(xy: torch.Tensor) -> torch.Tensor:
    x, y = xy[0], xy[1]
    return (1 - x) ** 2 + 100 * (y - x * x) ** 2


class TinyMLP(nn.Module):
    def __init__(self, d_in: int = 8, hidden: int = 16, d_out: int = 1):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def regression_data(n: int = 128, d_in: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    w = torch.randn(d_in, 1, generator=g)
    y = torch.sin(x @ w) + 0.1 * x[:, :1]
    return x, y


class UnevenModel(nn.Module):
    """A small model whose parameters have awkward shapes for row sharding.

    7x5 and 7 (linear), 30 (vector), 1x1, a 4x2x3x3 conv kernel, a scalar, a 13x6 embedding
    (13 rows: divisible by none of 2, 3, 4), a frozen 3x3 matrix, and a 5-vector used only on
    even steps (no gradient on odd steps).
    """

    def __init__(self, scalar_shape: tuple[int, ...] = ()):
        super().__init__()
        self.emb = nn.Embedding(13, 6)
        self.conv = nn.Conv2d(2, 4, 3)
        self.lin = nn.Linear(5, 7)
        self.vec = nn.Parameter(torch.randn(30) * 0.1)
        self.one = nn.Parameter(torch.ones(1, 1))
        self.scalar = nn.Parameter(torch.full(scalar_shape, 0.5))  # FSDP2 refuses 0-dim: (1,)
        self.frozen = nn.Parameter(torch.eye(3), requires_grad=False)
        self.sometimes = nn.Parameter(torch.randn(5) * 0.1)

    def forward(self, img, tok, use_sometimes: bool = True):
        h = self.conv(img).mean(dim=(2, 3))  # (B, 4)
        e = self.emb(tok).mean(dim=1)  # (B, 6)
        z = torch.cat([h, e[:, :1]], dim=1)  # (B, 5)
        if use_sometimes:
            z = z + self.sometimes
        out = self.lin(z) * self.one[0, 0]  # (B, 7)
        out = out + self.vec[:7] * self.scalar.reshape(()) + e[:, 1:4].sum(dim=1, keepdim=True) @ self.frozen[:1, :1]
        return out + self.vec[7:14] * e[:, :1]


def uneven_batch(step: int, n: int = 12, seed: int = 7):
    """The global batch of ``step``: images, tokens, targets (``n`` divisible by 1..4)."""
    g = torch.Generator().manual_seed(seed * 7919 + step)
    img = torch.randn(n, 2, 5, 5, generator=g)
    tok = torch.randint(0, 13, (n, 4), generator=g)
    target = torch.randn(n, 7, generator=g)
    return img, tok, target


def uneven_loss(model, batch, step: int):
    img, tok, target = batch
    out = model(img, tok, use_sometimes=(step % 2 == 0))
    return ((out - target) ** 2).mean()


def train_uneven(model, opt, steps: int, shard_rank: int = 0, shard_world: int = 1) -> None:
    """``steps`` steps on :func:`uneven_batch`, this rank taking its ``1/shard_world`` slice."""
    for t in range(steps):
        img, tok, target = uneven_batch(t)
        n = img.shape[0] // shard_world
        sl = slice(shard_rank * n, (shard_rank + 1) * n)
        opt.zero_grad(set_to_none=True)
        uneven_loss(model, (img[sl], tok[sl], target[sl]), t).backward()
        opt.step()
