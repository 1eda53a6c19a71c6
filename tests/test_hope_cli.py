"""``deepopt hope`` CLI: smoke runs of every subcommand, exact resume after a kill, DDP == single process."""

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deepopt.checkpoint import load_tensors, torch_load
from deepopt.cli import main
from deepopt.hope.model import n_params
from deepopt.hope.train import model_config

ROOT = Path(__file__).resolve().parents[1]


def hope(*args) -> int:
    return main(["hope", *map(str, args), "--no-progress", "--threads", "1"])


def rejected(capsys, match: str, *args) -> None:
    """The CLI refuses ``args`` with exit status 2 and a one-line error matching ``match``."""
    with pytest.raises(SystemExit) as exit_info:
        hope(*args)
    assert exit_info.value.code == 2
    assert re.search(match, capsys.readouterr().err)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_train_smoke_writes_report_metrics_plot_and_model_that_eval_reads(tmp_path, capsys):
    out = tmp_path / "run"
    assert hope("train", "--smoke", "--out", out) == 0
    for f in ("report.json", "metrics.csv", "loss.png", "checkpoint.pt", "model.safetensors", "model_config.json"):
        assert (out / f).is_file(), f
    report = json.loads((out / "report.json").read_text())
    rows = read_csv(out / "metrics.csv")
    assert len(rows) == report["steps"] == 6
    assert float(rows[-1]["val_loss"]) < float(rows[2]["val_loss"]) + 0.5  # finite and sane
    assert report["n_params"] > 0 and report["val_ppl"] == pytest.approx(torch.tensor(report["val_loss"]).exp().item())
    assert report["tokenizer"] == "bytes" and report["vocab_size"] == 256 and report["val_bytes_per_token"] == 1
    assert report["val_bits_per_byte"] == pytest.approx(report["val_loss"] / math.log(2))
    assert not (out / "tokenizer.json").exists()  # a run without one is a byte run
    assert hope("eval", "--smoke", "--checkpoint", out, "--out", tmp_path / "ev") == 0
    ev = json.loads((tmp_path / "ev" / "eval_report.json").read_text())["results"]
    assert set(ev) == {"code", "prose"} and all(r["val_ppl"] > 1 for r in ev.values())
    rejected(capsys, "--resume", "train", "--smoke", "--out", out)  # never clobbers an existing run
    rejected(capsys, "options differ", "train", "--smoke", "--out", out, "--resume", "--lr", "0.01")


@pytest.mark.parametrize("optimizer", ["deep_momentum", "delta_momentum", "torch_adamw"])
def test_any_outer_optimizer_trains_hope(tmp_path, optimizer):
    args = ("--smoke", "--steps", "3", "--optimizer", optimizer, "--lr", "0.01", "--out", tmp_path)
    assert hope("train", *args) == 0
    rows = read_csv(tmp_path / "metrics.csv")
    assert all(torch.isfinite(torch.tensor(float(r["train_loss"]))) for r in rows)


@pytest.mark.parametrize("bad, match", [
    (("--steps", "0"), "--steps"), (("--lr", "-1"), "--lr"), (("--device", "tpu"), "device"),
    (("--data", "/nonexistent/file.txt"), "not a readable file"),
])
def test_bad_train_options_are_rejected_clearly(tmp_path, capsys, bad, match):
    rejected(capsys, match, "train", "--smoke", "--out", tmp_path, *bad)


def test_resume_after_kill_is_bit_identical(tmp_path):
    common = ("--smoke", "--steps", "24", "--val-every", "6", "--ckpt-every", "1")
    ref = tmp_path / "ref"
    assert hope("train", *common, "--out", ref) == 0
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "deepopt.cli", "hope", "train", *common, "--out", str(killed), "--no-progress",
           "--threads", "1"]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    step = 0
    while step < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
        try:
            step = torch_load(killed / "checkpoint.pt")["step"]
        except (FileNotFoundError, RuntimeError, EOFError, KeyError):  # not written yet
            step = 0
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    stopped_at = torch_load(killed / "checkpoint.pt")["step"]
    assert 3 <= stopped_at < 24
    assert hope("train", *common, "--out", killed, "--resume") == 0
    a, b = load_tensors(ref / "model.safetensors"), load_tensors(killed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = torch_load(ref / "checkpoint.pt"), torch_load(killed / "checkpoint.pt")
    assert sa["optimizer"]["state"].keys() == sb["optimizer"]["state"].keys()
    for k, st in sa["optimizer"]["state"].items():
        assert all(torch.equal(v, sb["optimizer"]["state"][k][n]) for n, v in st.items())
    for ra, rb in zip(read_csv(ref / "metrics.csv"), read_csv(killed / "metrics.csv"), strict=True):
        assert (ra["train_loss"], ra["val_loss"]) == (rb["train_loss"], rb["val_loss"])


def test_two_process_ddp_matches_single_process_on_the_same_global_batch(tmp_path):
    common = ("--smoke", "--steps", "3", "--dtype", "float64", "--batch-size", "4", "--val-every", "3")
    single = tmp_path / "single"
    assert hope("train", *common, "--out", single) == 0
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "deepopt.cli", "hope", "train", *common, "--out", str(ddp), "--no-progress", "--threads", "1"]
    res = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=240, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((ddp / "report.json").read_text())["world_size"] == 2
    a, b = load_tensors(single / "model.safetensors"), load_tensors(ddp / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-12) for k in a)
    la = [float(r["train_loss"]) for r in read_csv(single / "metrics.csv")]
    lb = [float(r["train_loss"]) for r in read_csv(ddp / "metrics.csv")]
    assert la == pytest.approx(lb, abs=1e-12)


@pytest.mark.parametrize("command,extra,keys", [
    ("continual", ("--models", "hope"), ("ppl_a_after_a", "ppl_b_after_a", "ppl_a_after_b", "ppl_b_after_b")),
    ("niah", ("--models", "hope", "--eval-contexts", "112"), ("digit_accuracy", "exact_accuracy")),
])
def test_continual_and_niah_under_two_process_ddp_match_single_process(tmp_path, command, extra, keys):
    common = ("--smoke", "--steps", "2", "--dtype", "float64", "--batch-size", "4", *extra)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert hope(command, *common, "--out", single) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "deepopt.cli", "hope", command, *common, "--out", str(ddp), "--no-progress", "--threads", "1"]
    res = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=240, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((ddp / "report.json").read_text())["world_size"] == 2
    for a, b in zip(read_csv(single / "results.csv"), read_csv(ddp / "results.csv"), strict=True):
        for k in keys:
            assert float(a[k]) == pytest.approx(float(b[k]), rel=1e-9), k
    # the trainers really split the global batch across the two processes
    odd = [c if c != "4" else "3" for c in cmd] + ["--overwrite"]
    res = subprocess.run(odd, env=subprocess_env(), capture_output=True, text=True, timeout=240, check=False)
    assert res.returncode != 0 and "divisible by the world size 2" in res.stderr


def test_optimizer_options_reach_the_outer_optimizer(tmp_path, capsys):
    out = tmp_path / "run"
    assert hope("train", "--smoke", "--steps", "2", "--optimizer", "deep_momentum", "--optimizer-option",
                "preconditioner=adam", "--optimizer-option", "key_source=preconditioned", "--optimizer-option",
                "lr_decay=0.5", "--out", out) == 0
    state = torch_load(out / "checkpoint.pt")
    groups = state["optimizer"]["param_groups"]
    assert all(g["preconditioner"] == "adam" and g["key_source"] == "preconditioned" and g["lr_decay"] == 0.5
               for g in groups)
    rejected(capsys, "unknown hyperparameter.*hidden", "train", "--smoke", "--optimizer", "adam",
             "--optimizer-option", "hidden=3", "--out", tmp_path / "bad")
    rejected(capsys, "KEY=VALUE", "train", "--smoke", "--optimizer-option", "hidden", "--out", tmp_path / "bad")


def test_continual_smoke_reports_forgetting_for_both_models(tmp_path):
    assert hope("continual", "--smoke", "--steps", "3", "--out", tmp_path) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["summary"]) == {"hope", "transformer"}
    rows = read_csv(tmp_path / "results.csv")
    assert len(rows) == 2 and (tmp_path / "loss.png").is_file()
    for r in rows:
        assert float(r["forgetting_a"]) == pytest.approx(float(r["ppl_a_after_b"]) - float(r["ppl_a_after_a"]))


def test_niah_smoke_reports_accuracy_per_context(tmp_path):
    assert hope("niah", "--smoke", "--steps", "2", "--models", "hope", "--out", tmp_path) == 0
    rows = read_csv(tmp_path / "results.csv")
    assert [int(r["context"]) for r in rows] == [112, 224]  # 1x and 2x the training context
    assert all(0 <= float(r["digit_accuracy"]) <= 1 for r in rows)


def test_niah_takes_heads_and_memory_width_and_refuses_sizes_its_width_does_not_allow(tmp_path, capsys):
    """``--heads`` / ``--mem-hidden`` reach every model's config (Transformer++ re-matched to HOPE's parameters); a
    head count that does not divide the width is a one-line error before any folder is made."""
    out = tmp_path / "run"
    assert hope("niah", "--smoke", "--steps", "2", "--models", "hope", "transformer", "--heads", "4", "--mem-hidden",
                "4", "--out", out) == 0
    report = json.loads((out / "report.json").read_text())
    runs = [json.loads(line)["value"] for line in (out / "runs.jsonl").read_text().splitlines()]
    sized = {r["model"]: r["n_params"] for r in runs if "n_params" in r}
    for model in ("hope", "transformer"):
        cfg = model_config(model, "smoke", n_heads=4, mem_hidden=4, vocab_size=report["vocab_size"])
        assert sized[model] == n_params(cfg) != n_params(model_config(model, "smoke", vocab_size=cfg.vocab_size))
    assert report["args"]["heads"] == 4 and report["args"]["mem_hidden"] == 4
    rejected(capsys, r"--heads 3 at --size smoke \(hope\): d_model \(32\) must be divisible by n_heads \(3\)",
             "niah", "--smoke", "--models", "hope", "--heads", "3", "--out", tmp_path / "bad")
    rejected(capsys, "--mem-hidden must be >= 1", "niah", "--smoke", "--mem-hidden", "0", "--out", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_bpe_train_records_its_tokenizer_and_eval_uses_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert hope("train", "--smoke", "--tokenizer", "bpe", "--vocab-size", "300", "--out", out) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["tokenizer"] == "bpe" and report["vocab_size"] == report["config"]["vocab_size"] == 300
    assert json.loads((out / "model_config.json").read_text())["vocab_size"] == 300
    assert json.loads((out / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    bpt = report["val_bytes_per_token"]
    assert 1 < bpt < 4 and report["val_bits_per_byte"] == pytest.approx(report["val_loss"] / math.log(2) / bpt)
    assert report["val_ppl_per_byte"] == pytest.approx(math.exp(report["val_loss"] / bpt))
    assert hope("eval", "--smoke", "--checkpoint", out, "--out", tmp_path / "ev") == 0
    ev = json.loads((tmp_path / "ev" / "eval_report.json").read_text())
    assert ev["tokenizer"] == "bpe" and ev["vocab_size"] == 300
    code = ev["results"]["code"]  # the same model, tokenizer and validation windows as the run's last validation
    assert code["val_loss"] == pytest.approx(report["val_loss"], rel=1e-5)
    assert code["bits_per_byte"] == pytest.approx(report["val_bits_per_byte"], rel=1e-5)
    rejected(capsys, r"options differ.*tokenizer", "train", "--smoke", "--out", out, "--resume")
    assert hope("train", "--smoke", "--tokenizer", "bpe", "--vocab-size", "300", "--out", out, "--resume") == 0


def test_bpe_options_are_rejected_clearly(tmp_path, capsys, monkeypatch):
    rejected(capsys, "--vocab-size applies to --tokenizer bpe only", "train", "--smoke", "--out", tmp_path,
             "--vocab-size", "300")
    rejected(capsys, r"--vocab-size must be in \[257, 65536\]", "train", "--smoke", "--out", tmp_path,
             "--tokenizer", "bpe", "--vocab-size", "256")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if `tokenizers` were not installed
    rejected(capsys, r'--tokenizer bpe: .*pip install "deepopt\[bpe\]"', "niah", "--smoke", "--out", tmp_path,
             "--tokenizer", "bpe")
    assert not any(tmp_path.iterdir())


def test_continual_and_niah_run_with_bpe(tmp_path):
    bpe = ("--smoke", "--steps", "2", "--tokenizer", "bpe", "--vocab-size", "300")
    assert hope("continual", *bpe, "--models", "hope", "--out", tmp_path / "c") == 0
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert report["tokenizer"] == "bpe" and report["vocab_size"] == 300
    row = read_csv(tmp_path / "c" / "results.csv")[0]
    assert float(row["bpb_a_after_b"]) > 0 and float(row["ppl_a_after_b"]) > 1
    assert hope("niah", *bpe, "--models", "hope", "--out", tmp_path / "n") == 0
    report = json.loads((tmp_path / "n" / "report.json").read_text())
    assert report["tokenizer"] == "bpe" and report["chance_digit_accuracy"] is None
    assert all(0 <= float(r["digit_accuracy"]) <= 1 for r in read_csv(tmp_path / "n" / "results.csv"))


def test_throughput_benchmark_smoke_reports_ratios_and_flops(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "hope_throughput.py"), "--smoke", "--threads", "1",
           "--out", str(tmp_path)]
    res = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=240, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert {r["model"] for r in report["rows"]} == {"hope", "transformer"}
    assert all(r["tok_per_s"] > 0 and r["mflop_per_token"] > 0 for r in report["rows"])
    for ratio in report["ratios"].values():
        assert ratio["tok_per_s_ratio"] > 0 and ratio["flop_ratio"] > 0


def test_throughput_scan_reference_turns_the_scan_kernels_off_on_cuda_only(monkeypatch, capsys):
    """``--scan-reference`` measures HOPE with its scan ops on their torch reference (both kernels' ``use_triton``
    off while the CUDA steps run, in-process; ``--scan-reference cms|titans``: one module's); on the CPU, where no
    kernel runs, it is refused with exit status 2."""
    import importlib.util

    from deepopt.hope import cms_kernels, titans_kernels

    spec = importlib.util.spec_from_file_location("hope_throughput", ROOT / "benchmarks" / "hope_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--smoke", "--scan-reference"])
    assert exit_info.value.code == 2 and "--scan-reference needs --device cuda" in capsys.readouterr().err
    monkeypatch.setattr(titans_kernels, "use_triton", True)
    monkeypatch.setattr(cms_kernels, "use_triton", True)
    seen = []

    def measure(model, size, ctx, *args):  # the CUDA step itself cannot run here: record the routing it would see
        seen.append((titans_kernels.use_triton, cms_kernels.use_triton))
        return {"model": model, "context": ctx, "batch": 1, "n_params": 1, "tok_per_s": 1.0, "peak_mib": 1.0,
                "mflop_per_token": 1.0, "ops_per_step": 1}

    monkeypatch.setattr(bench, "measure", measure)
    assert bench.main(["--smoke", "--device", "cuda", "--scan-reference"]) == 0
    assert seen and set(seen) == {(False, False)}
    for choice, routing in (("cms", (True, False)), ("titans", (False, True))):  # one module's kernels only
        monkeypatch.setattr(titans_kernels, "use_triton", True)
        monkeypatch.setattr(cms_kernels, "use_triton", True)
        seen.clear()
        assert bench.main(["--smoke", "--device", "cuda", "--scan-reference", choice]) == 0
        assert seen and set(seen) == {routing}, choice


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs this repository's git history")
def test_throughput_before_a_revision_alternates_workers_and_refuses_an_unknown_one(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "hope_throughput.py"), "--smoke", "--threads", "1",
           "--rounds", "2"]
    res = subprocess.run([*cmd, "--before", "HEAD", "--out", str(tmp_path)], env=subprocess_env(), capture_output=True,
                         text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    contexts = json.loads((tmp_path / "before.json").read_text())["contexts"]
    assert set(contexts) == {"64", "128"}  # the smoke contexts
    for ctx in contexts.values():
        assert len(ctx["rounds"]) == 2 and all(r["before_tok_per_s"] > 0 < r["now_tok_per_s"] for r in ctx["rounds"])
        assert ctx["median_before_over_now"] > 0
    assert res.stdout.count(" round ") == 4 and res.stdout.count("median of 2 rounds") == 2
    bad = subprocess.run([*cmd, "--before", "no-such-revision"], env=subprocess_env(), capture_output=True, text=True,
                         timeout=120, check=False)
    assert bad.returncode == 2 and "--before no-such-revision" in bad.stderr


def test_recompute_chunks_flag_reaches_the_saved_model_config(tmp_path):
    out = tmp_path / "run"
    assert hope("train", "--smoke", "--steps", "2", "--recompute-chunks", "--out", out) == 0
    assert json.loads((out / "model_config.json").read_text())["recompute_chunks"] is True


def test_gpu_report_gives_the_reference_runs_no_target(tmp_path):
    """``benchmarks/gpu_report.py`` reads section 3's runs by folder (mode-context): the eager run is held to the
    issue's target, the scans' reference runs (``reference``, ``cms-reference``) are the kernels' baselines."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_report", ROOT / "benchmarks" / "gpu_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    for mode in ("eager", "reference", "cms-reference"):
        folder = tmp_path / "hope" / f"{mode}-2048"
        folder.mkdir(parents=True)
        rows = [{"model": m, "context": 2048, "tok_per_s": t} for m, t in (("hope", 600.0), ("transformer", 1000.0))]
        (folder / "report.json").write_text(json.dumps({
            "size": "base", "rows": rows,
            "ratios": {"2048": {"tok_per_s_ratio": 0.6, "peak_mem_ratio": 1.5, "flop_ratio": 1.0}}}))
    got = {r["mode"]: (r["target"], r["met"]) for r in report.hope(tmp_path)}
    assert got == {"eager": (0.5, True), "reference": (None, None), "cms-reference": (None, None)}
