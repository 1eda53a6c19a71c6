"""The CLI starts where an optional dependency is missing (the H200 image has no ``higher``): ``deepopt bench``
runs, ``deepopt --help`` lists every subcommand, and the subcommand that needs the package says so in one line."""

import subprocess
import sys

BLOCK_HIGHER = "import sys; sys.modules['higher'] = None; from deepopt.cli import main; raise SystemExit(main({}))"


def _run(argv):
    return subprocess.run([sys.executable, "-c", BLOCK_HIGHER.format(argv)], capture_output=True, text=True,
                          timeout=300)


def test_bench_runs_and_meta_train_refuses_in_one_line_without_higher(tmp_path):
    out = _run(["bench", "--smoke", "--optimizers", "SGD", "--out", str(tmp_path / "bench")])
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "bench" / "bench.json").exists()
    assert "deepopt.meta_train" not in out.stderr
    refused = _run(["meta-train", "--smoke", "--out", str(tmp_path / "mt")])
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "deepopt meta-train: error: needs the 'higher' package, which is not installed (pip install higher)"]
    listed = _run(["--help"])
    assert listed.returncode == 0 and all(c in listed.stdout for c in ("bench", "meta-train", "hope", "compare"))
