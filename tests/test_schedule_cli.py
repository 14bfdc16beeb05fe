"""``distopt schedule plot|table``."""

from __future__ import annotations

import sys

import pytest

from distopt.cli import main
from distopt.schedules import get_scheduler, list_schedules

matplotlib = pytest.importorskip("matplotlib")


def _check_png(path, size=(480, 280)):
    from PIL import Image

    assert path.stat().st_size < 80_000
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == size
        rgb = im.convert("RGB")
        colors = rgb.getcolors(maxcolors=1 << 16)
    assert colors is not None and len(colors) > 10  # not blank
    white = sum(n for n, c in colors if c == (255, 255, 255))
    assert white < 0.97 * size[0] * size[1]
    # the curve is drawn in the line colour (#1f77b4)
    assert sum(n for n, c in colors if abs(c[0] - 31) + abs(c[1] - 119) + abs(c[2] - 180) < 30) > 100


def test_plot_one(tmp_path, capsys):
    out = tmp_path / "cos.png"
    rc = main(["schedule", "plot", "cosine", "--warmup", "5", "--steps", "50", "-o", str(out)])
    assert rc == 0
    assert str(out) in capsys.readouterr().out
    _check_png(out)


def test_plot_with_kwargs_and_dpi(tmp_path):
    out = tmp_path / "sub" / "r.png"
    rc = main(["schedule", "plot", "cosine_with_restarts", "--kwarg", "num_cycles=3",
               "--dpi", "50", "-o", str(out)])
    assert rc == 0
    _check_png(out, size=(300, 175))


def test_plot_all(tmp_path):
    rc = main(["schedule", "plot", "--all", "--steps", "40", "-o", str(tmp_path)])
    assert rc == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted(f"schedule-{n}.png" for n in list_schedules())
    for name in files:
        _check_png(tmp_path / name)


def test_table_matches_lr_at(capsys):
    rc = main(["schedule", "table", "cosine", "--warmup", "2", "--steps", "10", "--lr", "10"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("# cosine")
    rows = [line.split() for line in lines[2:]]
    assert [int(r[0]) for r in rows] == list(range(11))
    import torch

    sched = get_scheduler("cosine", torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=10.0), 2, 10)
    assert [float(r[1]) for r in rows] == pytest.approx([sched.lr_at(s) for s in range(11)], rel=1e-5)
    assert [float(r[1]) for r in rows[:5]] == pytest.approx([0.0, 5.0, 10.0, 9.61, 8.53], abs=1e-2)


def test_table_kwargs_and_every(capsys):
    rc = main(["schedule", "table", "warmup_stable_decay", "--steps", "20", "--warmup", "2",
               "--kwarg", "num_decay_steps=4", "--kwarg", "decay_type=linear", "--every", "5"])
    assert rc == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.strip().splitlines()[2:]]
    assert [int(r[0]) for r in rows] == [0, 5, 10, 15, 20]
    assert float(rows[-1][1]) == 0.0 and float(rows[1][1]) == 1.0
    for name in ("adafactor", "warmup", "reduce_lr_on_plateau", "constant"):
        assert main(["schedule", "table", name, "--steps", "5"]) == 0


@pytest.mark.parametrize("argv,msg", [
    (["schedule", "table", "cosin"], "valid names"),
    (["schedule", "table", "linear", "--kwarg", "num_cycles=2"], "num_cycles"),
    (["schedule", "table", "linear", "--kwarg", "oops"], "KEY=VALUE"),
    (["schedule", "table", "linear", "--warmup", "200"], "num_warmup_steps"),
    (["schedule", "plot", "-o", "x.png"], "NAME or --all"),
    (["schedule", "plot", "linear", "--all", "-o", "x"], "NAME or --all"),
])
def test_errors(argv, msg, capsys):
    assert main(argv) == 2
    assert msg in capsys.readouterr().err


def test_plot_without_matplotlib(tmp_path, monkeypatch, capsys):
    for mod in list(sys.modules):
        if mod == "matplotlib" or mod.startswith("matplotlib."):
            monkeypatch.setitem(sys.modules, mod, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rc = main(["schedule", "plot", "linear", "-o", str(tmp_path / "x.png")])
    assert rc == 2
    assert "pip install distopt[plot]" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_schedule_help_and_list(capsys):
    assert main(["schedule"]) == 0
    assert "plot" in capsys.readouterr().out
    assert main(["list", "schedules"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in list_schedules())
