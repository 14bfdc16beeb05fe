"""The save plan (replicated tensors written once, bytes balanced over the ranks) and the direct
read of contiguous tensors on load (no ``torch.load`` per item, every byte still checked)."""

from __future__ import annotations

import io
import json

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._dedup_save_plans import dedup_save_plans
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import (
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)

import distopt
import distopt.checkpoint as ckpt
from distopt.checkpoint import _direct, _reader


def _item(fqn: str, numel: int) -> WriteItem:
    size = torch.Size([numel])
    chunk = ChunkStorageMetadata(offsets=torch.Size([0]), sizes=size)
    data = TensorWriteData(chunk=chunk, properties=TensorProperties(dtype=torch.float32), size=size)
    return WriteItem(index=MetadataIndex(fqn), type=WriteItemType.TENSOR, tensor_data=data)


def _bytes(plans: list[SavePlan]) -> list[int]:
    return [sum(it.tensor_storage_size() for it in p.items) for p in plans]


def test_save_plan_writes_each_replicated_tensor_once_balanced():
    # each rank's own rows (ZeRO state) plus four parameters every rank holds, rank 0 listed first
    shared = [_item(f"model/w{i}", n) for i, n in enumerate((80, 60, 40, 20))]
    plans = [
        SavePlan([_item("optim/a/rows0", 100), *shared]),
        SavePlan([_item("optim/a/rows1", 100), *shared]),
    ]
    ours = _direct.balance_replicated(plans)
    kept = [it.index.fqn for p in ours for it in p.items if it.index.fqn.startswith("model/")]
    assert sorted(kept) == sorted(it.index.fqn for it in shared)  # each written exactly once
    assert _bytes(ours) == [800, 800]  # 4 bytes per element: 100+80+20 = 100+60+40 elements
    theirs = dedup_save_plans(plans)  # DCP's default: rank 0's own rows counted before rank 1's
    assert max(_bytes(theirs)) > max(_bytes(ours)), _bytes(theirs)


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(40, 30))
        self.b = torch.nn.Parameter(torch.randn(30))  # small: inside the zip's small segments
        self.t = torch.nn.Parameter(torch.randn(30, 20).t())  # not contiguous: torch.load path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.w + self.b) @ self.t.t()


def _trained(tmp_path):
    torch.manual_seed(0)
    net = _Net()
    opt = distopt.optim.AdamW(net.parameters(), lr=1e-2)
    net(torch.randn(3, 40)).sum().backward()
    opt.step()
    ckpt.save(tmp_path / "c", model=net, optimizer=opt)
    return net, opt


def _fresh():
    torch.manual_seed(1)
    net = _Net()
    return net, distopt.optim.AdamW(net.parameters(), lr=1e-2)


def test_contiguous_tensors_are_read_directly_and_checked(tmp_path, monkeypatch):
    net, opt = _trained(tmp_path)
    marker = json.loads((tmp_path / "c" / "COMMITTED").read_text())
    name = next(n for n in marker["files"] if n.endswith(".distcp"))
    md = FileSystemReader(str(tmp_path / "c")).read_metadata()
    offset = {i.fqn: s.offset for i, s in md.storage_data.items()}
    length = {i.fqn: s.length for i, s in md.storage_data.items()}
    listed = set(marker["files"][name]["rowmajor"])
    assert offset["model/w"] in listed and offset["model/b"] in listed
    assert offset["model/t"] not in listed and offset["optim/t/exp_avg"] not in listed

    loaded_by_torch: list[int] = []
    orig = _reader.ChecksumReader._load_item
    monkeypatch.setattr(_reader.ChecksumReader, "_load_item",
                        lambda self, f, fd, rel, info: loaded_by_torch.append(info.offset)
                        or orig(self, f, fd, rel, info))  # fmt: skip
    net2, opt2 = _fresh()
    w_storage = net2.w.data_ptr()
    ckpt.load(tmp_path / "c", model=net2, optimizer=opt2)
    assert sorted(loaded_by_torch) == sorted(o for o in offset.values() if o not in listed)
    assert net2.w.data_ptr() == w_storage  # read into the parameter itself
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)
    for p, q in zip(net.parameters(), net2.parameters()):
        for k, v in opt.state[p].items():
            assert torch.equal(v, opt2.state[q][k]), k

    # one flipped bit in the small bias's tensor bytes (not a segment of its own) is caught
    raw = (tmp_path / "c" / name).read_bytes()
    off = offset["model/b"]
    start = _direct._data_start(raw[off : off + length["model/b"]], 30 * 4)
    assert start is not None
    bad = bytearray(raw)
    bad[off + start + 7] ^= 0x04
    (tmp_path / "c" / name).write_bytes(bytes(bad))
    net3, opt3 = _fresh()
    with pytest.raises(ckpt.CheckpointError, match=rf"{name}.*corrupted") as ei:
        ckpt.load(tmp_path / "c", model=net3, optimizer=opt3)
    assert ei.value.corrupt


def test_data_start_finds_the_tensor_bytes_of_a_saved_tensor():
    t = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    buf = io.BytesIO()
    torch.save(t, buf)
    blob = buf.getvalue()
    start = _direct._data_start(blob, t.numel() * 8)
    assert start is not None and blob[start : start + t.numel() * 8] == t.numpy().tobytes()
    assert _direct._data_start(blob, t.numel() * 4) is None  # another size: not this layout
    assert _direct._data_start(b"not a zip", 8) is None


def test_collector_paused_during_sync_save_and_load_only(tmp_path, monkeypatch):
    import gc

    seen: list = []
    torch.manual_seed(0)
    net = _Net()
    opt = distopt.optim.AdamW(net.parameters(), lr=1e-2)
    stage = lambda s: seen.append((s, gc.isenabled()))  # noqa: E731
    ckpt.save(tmp_path / "c", model=net, optimizer=opt, _on_stage=stage)
    assert ("start", True) in seen and ("marker_written", False) in seen, seen
    assert gc.isenabled()
    seen.clear()
    ckpt.save(tmp_path / "d", model=net, optimizer=opt, async_=True, _on_stage=stage)
    ckpt.wait()
    assert ("marker_written", True) in seen, seen  # training goes on beside it: left alone
    orig = _reader.ChecksumReader.read_data
    monkeypatch.setattr(_reader.ChecksumReader, "read_data",
                        lambda self, *a: seen.append(("read", gc.isenabled())) or orig(self, *a))  # fmt: skip
    ckpt.load(tmp_path / "c", model=net, optimizer=opt)
    assert seen[-1] == ("read", False) and gc.isenabled()
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load(tmp_path / "nothing", model=net, optimizer=opt)
    with pytest.raises(ckpt.CheckpointError):
        ckpt.save(tmp_path / "c", model=net, optimizer=opt, overwrite=False)
    assert gc.isenabled()
