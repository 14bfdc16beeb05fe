"""Per-rank memory and traffic figures of a ZeRO engine (``ShardedModule.shard_info``)."""

from __future__ import annotations

from typing import Any

from torch import Tensor


def shard_info(engine: Any) -> dict[str, Any]:
    """Per-rank bytes of parameters, gradient shards and optimizer state, and traffic."""
    opt = engine.optimizer
    state_bytes = 0
    replicated_state_bytes = 0
    for s in engine.slots:
        st = opt.state.get(engine.shards[s.index], {})
        for name, v in st.items():
            if isinstance(v, Tensor):
                nb = v.numel() * v.element_size()
                if hasattr(opt, "state_is_sharded") and not opt.state_is_sharded(name, v, s.shape):
                    replicated_state_bytes += nb
                else:
                    state_bytes += nb
    local_numel = sum(s.local_numel(engine.rank) for s in engine.slots)
    total_numel = sum(s.rows * s.row_numel for s in engine.slots)
    return {
        "rank": engine.rank,
        "world_size": engine.world,
        "replicas": engine.replicas,
        "stage": engine.stage,
        "params_total": total_numel,
        "params_local": local_numel,
        "param_bytes_local": sum(
            s.local_numel(engine.rank) * engine.shards[s.index].element_size() for s in engine.slots
        ),
        "state_bytes_local": state_bytes + replicated_state_bytes,
        "state_bytes_sharded": state_bytes,
        "state_bytes_replicated": replicated_state_bytes,
        "grad_shard_bytes": sum(
            t.numel() * t.element_size() for t in engine._grad_out if t is not None
        ),
        "buckets": len(engine.buckets),
        # the persistent flat communication buffers (allocated at a bucket's first reduction)
        "comm_buffer_bytes": sum(b.nbytes() for b in engine._buffers if b is not None),
        "comm": engine.stats.as_dict(),
    }
