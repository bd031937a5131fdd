"""xent.reference (the formulas) against torch, and `xent verify`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

import xent
from xent import cli


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(reduction="none", ignore_index=2),
        dict(weight=torch.rand(5, dtype=torch.float64), label_smoothing=0.3),
        dict(weight=torch.rand(5, dtype=torch.float64), reduction="sum"),
    ],
)
@pytest.mark.parametrize("probabilities", [False, True])
def test_reference_matches_torch_in_float64(kwargs, probabilities):
    x = torch.randn(6, 5, 2, dtype=torch.float64)
    if probabilities:
        t = torch.rand(6, 5, 2, dtype=torch.float64)
        kwargs = {k: v for k, v in kwargs.items() if k != "ignore_index"}
    else:
        t = torch.randint(0, 5, (6, 2))
    assert_close(xent.reference.cross_entropy(x, t, **kwargs), F.cross_entropy(x, t, **kwargs))


def test_reference_log_softmax_matches_torch():
    x = torch.randn(4, 9, dtype=torch.float64) * 20
    assert_close(xent.reference.log_softmax(x, 1), torch.log_softmax(x, 1))


def test_reference_nll_matches_torch():
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.tensor([0, 3, -100, 1, 1])
    w = torch.rand(4, dtype=torch.float64)
    for red in ("none", "sum", "mean"):
        assert_close(xent.reference.nll_loss(x, y, w, reduction=red), F.nll_loss(x, y, w, reduction=red))


def test_verify_passes_and_shows_the_tutorial_formula_is_wrong(capsys):
    assert cli.main(["verify"]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") == 4 and "FAIL" not in out
    assert "DISAGREES with torch" in out and "agrees with torch" in out


def test_verify_fails_when_a_result_is_wrong(monkeypatch, capsys):
    real = xent.cross_entropy
    monkeypatch.setattr(xent, "cross_entropy", lambda *a, **k: real(*a, **k) * 1.001)
    assert cli.main(["verify"]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.slow
def test_console_script_entry_point():
    done = subprocess.run([sys.executable, "-m", "xent.cli", "verify"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_bench_runs_small_and_reports_every_implementation(capsys):
    # on the default device: the GPU where there is one
    assert cli.main(["bench", "--tokens", "32", "--hidden", "8", "--vocab", "100", "--repeats", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    impls = ("xent", "naive", "torch") + (("torch-chunked",) if hasattr(F, "linear_cross_entropy") else ())
    for name in ("cross_entropy N=32 V=100", "linear_cross_entropy N=32 H=8 V=100") + impls:
        assert name in out
    rows = [line.split() for line in out.splitlines() if len(line.split()) == 7 and line.split()[0] in impls]
    assert len(rows) == 2 + len(impls) - 1  # xent and torch for cross_entropy; xent, naive (and torch's) for linear
    for row in rows:
        assert float(row[-1]) < 1e-4 and float(row[-2]) < 1e-4  # max |d grad|, |d loss| against the baseline


@pytest.mark.slow
def test_bench_plot(tmp_path, capsys):
    out_file = tmp_path / "bench.png"
    assert (
        cli.main(
            [
                "bench",
                "--what",
                "ce",
                "--tokens",
                "16",
                "--hidden",
                "4",
                "--vocab",
                "32",
                "--repeats",
                "1",
                "--quiet",
                "--no-memory",
                "--plot",
                str(out_file),
                "--plot-vocabs",
                "16,32",
                "--plot-repeats",
                "1",
            ]
        )
        == 0
    )
    assert out_file.stat().st_size > 1000 and out_file.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_bench_plot_draws_only_what_was_asked(tmp_path, monkeypatch):
    """--what ce plots one column (cross_entropy), --what all both."""
    import matplotlib.pyplot as plt

    figures = []
    real = plt.subplots
    monkeypatch.setattr(plt, "subplots", lambda *a, **k: figures.append(real(*a, **k)) or figures[-1])
    base = ["bench", "--tokens", "16", "--hidden", "4", "--vocab", "32", "--repeats", "1", "--quiet", "--no-memory"]
    plot = ["--plot", str(tmp_path / "b.png"), "--plot-vocabs", "16,32", "--plot-repeats", "1"]
    for what, columns, titles in (("ce", 1, ["cross_entropy"]), ("all", 2, ["cross_entropy", "linear_cross_entropy"])):
        assert cli.main([*base, "--what", what, *plot]) == 0
        _, axes = figures[-1]
        assert axes.shape == (2, columns)
        drawn = [axes[0, c].get_title().split(" (")[0].split(",")[0] for c in range(columns)]
        assert drawn == titles


@pytest.mark.parametrize(
    "device, says",
    [
        ("cuda" if not torch.cuda.is_available() else "cuda:99", "CUDA device"),
        ("not-a-device", "not a torch device"),
        ("meta", "runs on cpu or cuda"),
    ],
)
def test_bench_refuses_a_device_it_cannot_use_in_one_line(device, says, capsys):
    assert cli.main(["bench", "--device", device, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err and err.startswith("xent bench: error:")


def test_bench_help_lists_what_choices(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "{all,ce,linear}" in out and "all: both (default)" in out
