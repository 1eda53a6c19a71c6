"""``benchmarks/gpu_check.sh``, the device run of issue 22, checked where no GPU is (``--cpu-smoke``): it keeps to its
budget section by section and always writes its report, so a lent device's few minutes are not lost to the script;
and ``benchmarks/gpu_report.py`` holds only the rows the targets name to them."""

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
SECTIONS = ["cuda-tests", "bench", "bench-shipped", "bench-tf32", "hope-eager-64", "hope-compile-64", "compare"]


def _gpu_report():
    spec = importlib.util.spec_from_file_location("gpu_report", ROOT / "benchmarks" / "gpu_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_smoke_keeps_to_a_tight_budget_and_writes_its_report(tmp_path):
    """At a 60 s budget most sections run out of time: each is stopped or skipped at its share (never past its
    limit, beyond the 5 s grace of SIGKILL), and the report is still written and printed last."""
    out = tmp_path / "check"
    run = subprocess.run(["bash", str(SCRIPT), str(out), "--cpu-smoke", "--budget", "60"], capture_output=True,
                         text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = (out / "sections.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["section", "status", "seconds", "limit"]
    table = [row.split("\t") for row in rows[1:]]
    assert [name for name, *_ in table] == SECTIONS
    for name, status, seconds, limit in table:
        assert status in ("ok", "timeout", "skipped"), (name, status)
        if status != "skipped":
            assert int(seconds) <= int(limit) + 6, (name, seconds, limit)
    report = json.loads((out / "report.json").read_text())
    assert [s["section"] for s in report["sections"]] == SECTIONS
    assert (out / "report.md").is_file() and json.loads((out / "env.json").read_text())["cpu_smoke"] is True
    compact = run.stdout.split(f"wrote {out}/report.md and report.json\n", 1)[1].strip().splitlines()
    assert compact[0].startswith("tests ") and compact[-1].startswith("section ")  # a cut section is named last


@pytest.mark.parametrize("args", [["--budget", "30"], ["--budget", "5m"], ["--bogus"]])
def test_bad_arguments_are_one_line_and_exit_2(tmp_path, args):
    run = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "check"), *args], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "check").exists()


def test_report_holds_only_the_shipped_step_to_its_target(tmp_path):
    """``momenta_step.py``'s rows: the shipped optimizer as a user builds it is held to ≤ 2× fused AdamW; its torch
    path and the fixed-lr predecessor are references (no target), and the compact table names each row."""
    (tmp_path / "bench-shipped.log").write_text(
        "1M-10 (1.0M parameters, 10 tensors) on cuda, 1 threads, median of 10 round-robin steps:\n"
        "  torch AdamW fused               0.47 ms    1.00x torch AdamW fused\n"
        "  DeepMomentum.pretrained         0.90 ms    1.91x torch AdamW fused\n"
        "    the same, torch path         28.07 ms   59.66x torch AdamW fused\n"
        "    dmgd-general (fixed lr)       1.56 ms    3.31x torch AdamW fused\n")
    report = _gpu_report()
    momenta_step = importlib.util.spec_from_file_location("momenta_step", ROOT / "benchmarks" / "momenta_step.py")
    labels = importlib.util.module_from_spec(momenta_step)
    momenta_step.loader.exec_module(labels)
    assert report.SHIPPED_STEP == labels.SHIPPED  # the report reads the label the benchmark prints
    rows = {r["optimizer"]: (r["target"], r["met"]) for r in report.shipped(tmp_path)}
    assert rows == {"DeepMomentum.pretrained": (2.0, True), "the same, torch path": (None, None),
                    "dmgd-general (fixed lr)": (None, None)}
