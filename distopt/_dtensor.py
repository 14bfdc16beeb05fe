"""DTensor, recognised in one place for every layer of distopt (it imports only torch).

A DTensor is recognised by ``isinstance`` against torch's own class,
``torch.distributed.tensor.DTensor`` (``torch.distributed._tensor.DTensor`` on torch < 2.4).
The class is looked up among the modules already imported instead of being imported here:
importing ``torch.distributed.tensor`` costs about a second, and no DTensor can exist before
its module has been imported (FSDP2 and ``distribute_tensor`` import it), so a process that
never uses DTensor never pays for it.  A torch without DTensor has no such module: nothing is
a DTensor there.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import Tensor

__all__ = ["dtensor_type", "is_dtensor", "local_and_sharding", "local_tensor"]

_MODULES = ("torch.distributed.tensor", "torch.distributed._tensor")
_found: type | None = None


def dtensor_type() -> type | None:
    """torch's DTensor class, or None while no DTensor module is imported (or torch has none)."""
    global _found
    if _found is None:
        for name in _MODULES:
            cls = getattr(sys.modules.get(name), "DTensor", None)
            if isinstance(cls, type):
                _found = cls
                break
    return _found


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    cls = dtensor_type()
    return cls is not None and isinstance(t, cls)


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor; any other tensor as it is."""
    return t.to_local() if is_dtensor(t) else t


def local_and_sharding(p: Tensor) -> tuple[Tensor, bool, Any]:
    """Local tensor of a DTensor, whether it is split across ranks, and the process group.

    Raises NotImplementedError for placements other than dim-0 sharding (FSDP2's layout) on
    a 1-D mesh or the shard dimension of a 2-D (HSDP) mesh.
    """
    from torch.distributed.tensor import Shard

    local = p.to_local()
    placements = p.placements
    mesh = p.device_mesh
    sharded_dims = [i for i, pl in enumerate(placements) if isinstance(pl, Shard)]
    if not sharded_dims:
        return local, False, None
    for i in sharded_dims:
        if placements[i].dim != 0:
            raise NotImplementedError(
                f"distopt supports DTensor parameters sharded on dim 0 (FSDP2's layout), got {placements}"
            )
    if mesh.ndim == 1:
        group = mesh.get_group()
    else:  # HSDP: shard dimension of a 2-D mesh
        if len(sharded_dims) != 1:
            raise NotImplementedError(f"unsupported DTensor placements {placements}")
        group = mesh.get_group(sharded_dims[0])
    return local, True, group
