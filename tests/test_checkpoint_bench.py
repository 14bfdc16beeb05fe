"""``distopt bench ckpt`` runs end to end at a tiny size (the real sizes are for an idle machine)."""

from __future__ import annotations

import pytest

from distopt.cli import main as cli


@pytest.mark.distributed
def test_bench_ckpt_tiny(capsys, tmp_path):
    modes = "dcp,distopt,distopt-async,torch-save"
    argv = ["bench", "ckpt", "--world", "2", "--size", "tiny", "--repeats", "1", "--warmup", "0",
            "--modes", modes, "--format", "md", "--dir", str(tmp_path)]  # fmt: skip
    assert cli(argv) == 0
    out = capsys.readouterr().out
    rows = [r for r in out.splitlines() if r.startswith("| ") and "---" not in r][1:]
    assert [r.split("|")[1].strip() for r in rows] == modes.split(",")
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert float(cells[1]) > 0 and float(cells[3]) > 0, r
    assert rows[0].split("|")[3].strip() == "1.00"  # the yardstick is plain DCP
    assert "distopt-async: training blocked" in out and "of a synchronous distopt save" in out
    assert list(tmp_path.iterdir()) == []  # checkpoints cleaned up
    assert cli(["bench", "ckpt", "--modes", "nope"]) == 2
    assert "unknown mode" in capsys.readouterr().err
