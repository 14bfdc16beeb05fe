"""``distopt bench step --quick`` runs and prints one row per available optimizer."""

from __future__ import annotations

import pytest
import torch

import distopt.optim as do
from distopt.bench.step import GROUPS, _row_label
from distopt.cli import main


def _rows(text):
    return [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]


def test_bench_step_quick_markdown(capsys):
    threads = torch.get_num_threads()
    assert main(["bench", "step", "--quick", "--repeats", "1", "--warmup", "1", "--threads", "1", "--format", "md"]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    distopt_rows = {r.split("|")[1].strip() for r in rows if r.split("|")[2].strip() == "distopt"}
    expected = {_row_label(g) for g in GROUPS if hasattr(do, g.name)}
    assert distopt_rows == expected
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        first, median, ratio = float(cells[2]), float(cells[3]), float(cells[4])
        assert first > 0 and median > 0 and ratio >= 0
    assert "torch.optim.AdamW(fused=True)" in out
    assert torch.get_num_threads() == threads  # --threads is restored afterwards


def test_bench_step_subset_and_errors(capsys):
    assert main(["bench", "step", "--quick", "--repeats", "1", "--warmup", "0", "--optim", "AdamW,Lamb"]) == 0
    out = capsys.readouterr().out
    assert "Lamb" in out and "AdaBelief" not in out
    assert main(["bench", "step", "--quick", "--optim", "NoSuchOpt"]) == 2
    assert "NoSuchOpt".lower() in capsys.readouterr().err.lower()


def test_bench_help_and_bad_format(capsys):
    assert main(["bench"]) == 0
    assert "step" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "step", "--format", "xml"])


def test_bench_step_several_thread_counts_in_one_table(capsys):
    threads = torch.get_num_threads()
    assert main(["bench", "step", "--quick", "--repeats", "1", "--warmup", "0", "--optim", "AdamW",
                 "--threads", "1,2", "--format", "md"]) == 0
    out = capsys.readouterr().out
    rows = [[c.strip() for c in r.strip("|").split("|")] for r in _rows(out)]
    assert "| threads |" in out and "1,2 threads" in out
    for impl in {r[1] for r in rows}:  # every row at both counts, side by side
        assert [r[2] for r in rows if r[1] == impl] == ["1", "2"], impl
    assert torch.get_num_threads() == threads


def test_bench_step_device_errors(capsys):
    assert main(["bench", "step", "--quick", "--device", "tpu"]) == 2
    assert "--device must be cpu or cuda" in capsys.readouterr().err
    assert main(["bench", "step", "--quick", "--threads", "0,1"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "step", "--quick", "--device", "cuda"]) == 2
        assert "no CUDA device is visible" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
def test_bench_step_on_cuda(capsys):
    assert main(["bench", "step", "--quick", "--repeats", "2", "--warmup", "1", "--optim", "AdamW,Lamb",
                 "--device", "cuda", "--format", "md"]) == 0
    out = capsys.readouterr().out
    assert torch.cuda.get_device_name() in out and "Lamb" in out
