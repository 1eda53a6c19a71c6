"""The CLI without ``higher`` (the H200 image has none): only ``deepopt.meta_train``'s higher backend needs it, so
``deepopt bench``, ``meta-train`` and ``evaluate`` run, ``deepopt --help`` lists every subcommand, and the higher
names say in one line which package they need.  A subcommand whose module cannot import a package (here
safetensors, blocked) is still listed, and running it is a one-line error naming the package."""

import subprocess
import sys

BLOCKED = "import sys; sys.modules[{!r}] = None; from deepopt.cli import main; raise SystemExit(main({!r}))"


def _run(argv, blocked="higher"):
    return subprocess.run([sys.executable, "-c", BLOCKED.format(blocked, argv)], capture_output=True, text=True,
                          timeout=300)


def test_bench_meta_train_and_evaluate_run_without_higher(tmp_path):
    out = _run(["bench", "--smoke", "--optimizers", "SGD", "--out", str(tmp_path / "bench")])
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "bench" / "bench.json").exists()
    assert "deepopt.meta_train" not in out.stderr
    trained = _run(["meta-train", "--smoke", "--out", str(tmp_path / "mt")])
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert (tmp_path / "mt" / "optimizer" / "config.json").exists()
    evaluated = _run(["evaluate", "--smoke", "--tasks", "tabular_mlp", "--methods", "adamw,learned",
                      "--optimizer", str(tmp_path / "mt" / "optimizer"), "--out", str(tmp_path / "ev")])
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert (tmp_path / "ev" / "results.csv").exists()
    listed = _run(["--help"])
    assert listed.returncode == 0 and all(c in listed.stdout for c in ("bench", "meta-train", "hope", "compare"))


def test_the_higher_backend_names_its_package_in_one_line():
    code = ("import sys; sys.modules['higher'] = None\n"
            "import deepopt.meta_train as mt\n"
            "assert 'higher_unroll_loss' not in mt.__all__\n"
            "from deepopt.meta_train import higher_unroll_loss")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        "ModuleNotFoundError: deepopt.meta_train.higher_unroll_loss needs the 'higher' package, which is not "
        "installed (pip install higher)")


def test_a_subcommand_whose_package_is_missing_refuses_in_one_line(tmp_path):
    refused = _run(["hope", "train", "--smoke", "--out", str(tmp_path / "hope")], blocked="safetensors")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "deepopt hope: error: needs the 'safetensors' package, which is not installed (pip install safetensors)"]
    assert not (tmp_path / "hope").exists()
    listed = _run(["--help"], blocked="safetensors")
    assert listed.returncode == 0 and "hope" in listed.stdout and "bench" in listed.stdout
