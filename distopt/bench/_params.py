"""Parameter sets for the optimizer benchmarks (shapes only: no model, no forward pass)."""

from __future__ import annotations

import torch

__all__ = ["vit_shapes", "make_params"]


def vit_shapes(
    dim: int = 384,
    depth: int = 12,
    mlp_ratio: int = 4,
    patch: int = 16,
    in_chans: int = 3,
    tokens: int = 197,
    num_classes: int = 1000,
) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a ViT's parameters, in ``named_parameters()`` order.

    The defaults are ViT-S/16 at 224x224 with a 1000-class head (timm's
    ``vit_small_patch16_224``): 4 + 12 * 12 + 4 = 152 tensors, 22,050,664 parameters.
    """
    hidden = dim * mlp_ratio
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("cls_token", (1, 1, dim)),
        ("pos_embed", (1, tokens, dim)),
        ("patch_embed.proj.weight", (dim, in_chans, patch, patch)),
        ("patch_embed.proj.bias", (dim,)),
    ]
    for i in range(depth):
        b = f"blocks.{i}"
        shapes += [
            (f"{b}.norm1.weight", (dim,)),
            (f"{b}.norm1.bias", (dim,)),
            (f"{b}.attn.qkv.weight", (3 * dim, dim)),
            (f"{b}.attn.qkv.bias", (3 * dim,)),
            (f"{b}.attn.proj.weight", (dim, dim)),
            (f"{b}.attn.proj.bias", (dim,)),
            (f"{b}.norm2.weight", (dim,)),
            (f"{b}.norm2.bias", (dim,)),
            (f"{b}.mlp.fc1.weight", (hidden, dim)),
            (f"{b}.mlp.fc1.bias", (hidden,)),
            (f"{b}.mlp.fc2.weight", (dim, hidden)),
            (f"{b}.mlp.fc2.bias", (dim,)),
        ]
    shapes += [
        ("norm.weight", (dim,)),
        ("norm.bias", (dim,)),
        ("head.weight", (num_classes, dim)),
        ("head.bias", (num_classes,)),
    ]
    return shapes


def quick_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """A small ViT-like set (same structure, 2 blocks of width 64) for tests."""
    return vit_shapes(dim=64, depth=2, patch=4, tokens=17, num_classes=10)


def make_params(
    shapes: list[tuple[str, tuple[int, ...]]], seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[list[torch.nn.Parameter], list[torch.Tensor]]:
    """Parameters (``randn * 0.02``) and gradients (``randn * 1e-3``) of the given shapes."""
    g = torch.Generator().manual_seed(seed)
    params, grads = [], []
    for _, shape in shapes:
        params.append(torch.nn.Parameter((torch.randn(shape, generator=g) * 0.02).to(dtype)))
        grads.append((torch.randn(shape, generator=g) * 1e-3).to(dtype))
    return params, grads
