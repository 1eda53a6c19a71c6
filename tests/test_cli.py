"""The ``deepopt`` command line: every subcommand has help, and ``bench --smoke`` writes its table."""

import json
import subprocess
import sys

import pytest

from deepopt.cli import build_parser


def subcommands() -> list[str]:
    parser = build_parser()
    return sorted(parser._subparsers._group_actions[0].choices)


def test_every_subcommand_has_help(capsys):
    names = subcommands()
    assert "bench" in names
    for name in names:
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([name, "--help"])
        assert exit_info.value.code == 0
        assert "--" in capsys.readouterr().out


def test_bench_smoke_writes_ratios(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "deepopt.cli", "bench", "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((out / "bench.json").read_text())["rows"]
    fused = [r for r in rows if r["optimizer"] == "torch Adam fused"]
    assert fused and fused[0]["vs_fused_adam"] == 1.0
    assert {r["optimizer"] for r in rows} >= {"Adam", "DeltaMomentum", "DeepMomentum h=16"}
    assert "× fused Adam" in proc.stdout


def test_bad_option_values_exit_with_one_line(capsys):
    from deepopt.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["robustness", "--noises", "label", "--levels", "0", "4", "--smoke", "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "fraction must be in [0.0, 1.0]" in err and "Traceback" not in err
