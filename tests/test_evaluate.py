"""``deepopt evaluate``: the held-out suite, its baselines, metrics, outputs and resume."""

import csv
import json
import math

import pytest
import torch

from deepopt import cli
from deepopt.evaluate import (
    ABLATIONS,
    MAX_EXTENSIONS,
    TASKS,
    build_problem,
    iqm,
    iqm_interval,
    make_method,
    parse_optimizer,
    summarise,
    table,
)


def test_smoke_study_writes_every_output_and_resumes_without_rerunning(tmp_path, learned, capsys):
    """The CLI's ``--smoke`` study over all four tasks with the ablations: one CSV row per run, the summary's
    tuned lrs, CIs, speed-ups, IQM and targets, the README table and plot; ``--resume`` reruns nothing."""
    out = tmp_path / "study"
    argv = ["evaluate", "--smoke", "--optimizer", str(learned), "--ablations", "--out", str(out)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "| task |" in text and text.rstrip().endswith(f"wrote {out}")
    rows = list(csv.DictReader((out / "results.csv").open()))
    per_seed = 2 * 2 + 3 + len(ABLATIONS) + 1  # adamw, muon sweeps; learned sweep + untuned; ablations; AdamW 2T
    # and each 3-point sweep whose best lr is at its edge (the learned one here) extended by up to MAX_EXTENSIONS
    learned_lrs = {task: sorted({float(r["lr"]) for r in rows if r["task"] == task and r["method"] == "learned"})
                   for task in TASKS}
    assert all(3 <= len(v) <= 3 + MAX_EXTENSIONS for v in learned_lrs.values()), learned_lrs
    assert len(rows) == len(TASKS) * (per_seed - 3) + sum(map(len, learned_lrs.values()))
    summary = json.loads((out / "summary.json").read_text())
    for task in TASKS:
        entry = summary["tasks"][task]
        assert {"adamw", "muon", "learned", "learned_untuned", *(f"ablation:{a}" for a in ABLATIONS)} == \
            set(entry["methods"])
        assert entry["methods"]["adamw"]["tuned_lr"] in (3e-3, 3e-2) and len(entry["speedup"]) == 1
        assert entry["methods"]["learned_untuned"]["lr"] == pytest.approx(0.002)
    assert set(summary["targets"]) == {"untuned_final_loss_at_most_tuned_adamw", "speedup_iqm_at_least_1.2"}
    # the smoke AdamW sweep (two lrs) is not a tuned baseline: no target verdict, and the table says why
    assert summary["adamw_sweep_lrs"] == 2 and all(t["met"] is None for t in summary["targets"].values())
    assert "no verdict: AdamW saw 2 lr(s)" in text
    assert (out / "evaluate.png").stat().st_size > 0 and "speed-up" in (out / "table.md").read_text()
    lines = (out / "runs.jsonl").read_text().splitlines()
    assert cli.main([*argv[:-2], "--out", str(out), "--resume"]) == 0
    assert "[1/" not in capsys.readouterr().out  # nothing rerun
    assert (out / "runs.jsonl").read_text().splitlines() == lines


@pytest.mark.parametrize("argv,message", [
    (["--tasks", "mnist"], "--tasks: unknown task"), (["--lrs", "0.1,x"], "--lrs must be"),
    (["--optimizer", "nope"], "is not a shipped learned optimizer"), (["--seeds", "0"], "--seeds must be >= 1"),
    (["--optimizer", "adamw", "--ablations"], "--ablations switches off"),
    (["--methods", "muon"], "--methods must list adamw"),
    (["--optimizer", "dmgd-dog:seed=0.5"], "--optimizer 'dmgd-dog:seed=0.5': seed must be an int"),
    (["--optimizer", "dmgd-dog:bogus=1"], "unknown hyperparameter(s) ['bogus']"),
    (["--optimizer", "momentum:nesterov=maybe"], "--optimizer 'momentum:nesterov=maybe': nesterov must be a bool"),
    (["--optimizer", "adam:betas=3"], "betas must be a pair"),
])
def test_bad_arguments_are_one_line_and_leave_no_folder(tmp_path, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate", "--smoke", *argv, "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_optimizer_specs_and_methods(learned):
    """A folder (or shipped name) is a learned optimizer run over the task's steps with its own schedule; a class
    takes options and the script's warm-up + cosine; Muon takes the hidden matrices (not embeddings or the head)
    with AdamW-matched lrs; every method puts weight decay on matrices only."""
    spec = parse_optimizer(f"{learned}:eta=0.0")
    assert spec.pretrained == str(learned) and spec.options == {"eta": 0.0} and spec.base_lr == pytest.approx(0.002)
    cls_spec = parse_optimizer("momentum:preconditioner=adam,momentum=0.8")
    assert cls_spec.cls_name == "momentum" and cls_spec.options == {"preconditioner": "adam", "momentum": 0.8}
    problem = build_problem("char_lm", 0, smoke=True)
    opt, schedulers = make_method("learned", spec, problem.model, 0.002, 50, problem.adam_betas)
    assert opt.defaults["lr_horizon"] == 50 and opt.defaults["eta"] == 0.0 and not schedulers
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert all(p.dim() >= 2 for p in opt.param_groups[0]["params"])
    opt, schedulers = make_method("ablation:no_deep", spec, problem.model, 0.002, 50, problem.adam_betas)
    assert opt.defaults["hidden"] == 0 and opt.defaults["memory_init"] is None
    for method, n_schedulers in (("adamw", 1), ("adamw_constant", 0)):  # the same AdamW, with and without schedule
        opt, schedulers = make_method(method, None, problem.model, 1e-3, 50, problem.adam_betas)
        assert isinstance(opt, torch.optim.AdamW) and len(schedulers) == n_schedulers
        assert opt.defaults["betas"] == problem.adam_betas and [g["weight_decay"] for g in opt.param_groups] == [0.1, 0]
    assert opt.param_groups[0]["lr"] == 1e-3
    opt, schedulers = make_method("muon", None, problem.model, 1e-3, 50, problem.adam_betas)
    muon, adam = opt.optimizers
    embed = problem.model.embed.weight
    assert all(embed is not p for g in muon.param_groups for p in g["params"])
    matrix = muon.param_groups[0]["params"][0]
    rows, cols = matrix.shape[0], matrix[0].numel()
    assert muon.param_groups[0]["initial_lr"] == pytest.approx(1e-3 * 0.2 * max(rows, cols) ** 0.5
                                                               / max(1.0, rows / cols) ** 0.5)
    assert len(schedulers) == 2
    cnn = build_problem("digits_cnn", 0, smoke=True).model
    opt, _ = make_method("muon", None, cnn, 1e-3, 50, (0.9, 0.999))
    head = list(cnn.parameters())[-2]
    assert all(head is not p for g in opt.optimizers[0].param_groups for p in g["params"])
    assert sum(len(g["params"]) for g in opt.optimizers[0].param_groups) == 2  # the two convolutions


def test_speedup_counts_tuned_adamw_steps_and_censors_at_2t():
    """speed-up = (first step at which tuned AdamW, over T or 2T steps, reaches the untuned learned loss)/T;
    censored at 2 when neither run does; IQM over tasks × seeds."""
    def row(method, lr, seed, steps, final, curve=None, scale=1.0):
        return dict(task="t", method=method, lr=lr, seed=seed, steps=steps, final=final, scale=scale,
                    curve=curve or [(steps, final)])
    results = [row("adamw", 0.1, s, 10, 1.0, [(0, 3.0), (5, 1.5), (10, 1.0)]) for s in (0, 1)]
    results += [row("adamw", 0.3, s, 10, 2.0) for s in (0, 1)]
    results += [row("adamw", 0.1, 0, 20, 0.5, [(0, 3.0), (10, 1.2), (16, 0.8), (20, 0.5)]),
                row("adamw", 0.1, 1, 20, 0.95, [(0, 3.0), (20, 0.95)])]
    results += [row("muon", 0.1, s, 10, 1.1) for s in (0, 1)]
    results += [row("learned", 0.002, 0, 10, 1.5), row("learned", 0.002, 1, 10, 0.9)]
    summary = summarise(results, ["t"], [0, 1])
    entry = summary["tasks"]["t"]
    assert entry["methods"]["adamw"]["tuned_lr"] == 0.1
    assert [u["speedup"] for u in entry["speedup"]] == [0.5, 2.0] and [u["censored"] for u in entry["speedup"]] == [
        False, True]
    assert entry["untuned_at_most_tuned_adamw"] == (1.2 <= 1.0)
    assert entry["methods"]["learned_untuned"]["ci95"] == pytest.approx(12.706 * 0.6 / 2 ** 0.5 / 2 ** 0.5)
    assert iqm([1, 2, 3, 100]) == pytest.approx(2.5) and iqm([1.0] * 3) == 1.0
    assert summary["speedup_iqm_ci95"] == [0.5, 2.0]  # two seeds, 0.5 and 2.0: the replicates span both ends
    assert "(95% interval 0.50–2.00, each task's seeds redrawn;" in table(summary, "c")
    assert summary["mean_log_ratio"] == pytest.approx(math.log(1.2))  # untuned 1.2 against tuned AdamW's 1.0
    assert "mean log ratio of the untuned loss to tuned AdamW's +0.182" in table(summary, "c")
    row_of = next(line for line in table(summary, "c").splitlines() if line.startswith("| t "))
    assert "1.0000 ± " in row_of and "(n = 1)" not in row_of  # two seeds: a 95% interval
    one_seed = summarise([r for r in results if r["seed"] == 0], ["t"], [0])
    row_of = next(line for line in table(one_seed, "c").splitlines() if line.startswith("| t "))
    assert "±" not in row_of and "1.0000 (n = 1)" in row_of  # one seed: no interval is printed as ± 0
    # AdamW at two lrs is no tuned baseline: no verdict; at three, the targets are judged
    assert [t["met"] for t in summary["targets"].values()] == [None, None] and "no verdict" in table(summary, "c")
    swept = summarise(results + [row("adamw", 0.03, s, 10, 3.0) for s in (0, 1)], ["t"], [0, 1])
    assert swept["adamw_sweep_lrs"] == 3 and swept["tasks"]["t"]["methods"]["adamw"]["tuned_lr"] == 0.1
    assert swept["targets"]["untuned_final_loss_at_most_tuned_adamw"]["met"] is False
    assert swept["targets"]["speedup_iqm_at_least_1.2"]["met"] is True  # IQM of 0.5 and 2.0: 1.25
    assert "untuned_at_most_either_adamw" not in swept and "constant lr" not in table(swept, "c")
    # AdamW at a constant lr beside it: reported, and the untuned optimizer judged against the better schedule too
    beaten = [dict(r, final=r["final"] + 1.0) if r["method"] == "adamw" else r for r in results]  # AdamW 2.0
    for final, expected in ((1.69, 1), (1.09, 0)):  # untuned mean 1.2 vs min(2.0 cosine, final + 0.01 constant)
        both = summarise(beaten + [row("adamw_constant", lr, s, 10, final + lr) for lr in (0.01, 0.1) for s in (0, 1)],
                         ["t"], [0, 1])
        assert both["tasks"]["t"]["methods"]["adamw_constant"]["tuned_lr"] == 0.01
        assert both["tasks"]["t"]["untuned_at_most_tuned_adamw"] and both["untuned_at_most_either_adamw"] == expected
        text = table(both, "c")
        assert "AdamW, constant lr (tuned lr)" in text and f"two schedules: {expected} of 1" in text
    assert summarise(results + [row("adamw_constant", 0.1, s, 10, 0.5) for s in (0, 1)], ["t"], [0, 1])["tasks"][
        "t"]["speedup"] == entry["speedup"]  # speed-ups stay against AdamW with its cosine


def test_iqm_interval_redraws_seeds_within_tasks():
    """The stratified bootstrap: constant tasks give a point; a task whose seeds disagree widens the interval
    around the IQM; each replicate keeps every task's seed count (a task is never dropped); the same seed
    gives the same interval."""
    assert iqm_interval([[1.5] * 3, [1.5] * 3]) == (1.5, 1.5)
    fragile = [[0.30, 0.35, 2.0], [0.20, 0.15, 0.25], [2.0, 2.0, 2.0], [1.3, 1.3, 1.4]]  # the 2026-12-07 suite
    lo, hi = iqm_interval(fragile)
    assert lo < iqm(fragile[0] + fragile[1] + fragile[2] + fragile[3]) < hi and hi - lo > 0.3
    assert iqm_interval(fragile) == (lo, hi) and iqm_interval(fragile, seed=1) != (lo, hi)
    # a task of all-2.0 seeds and one of all-0.2: every replicate holds 3 of each, so the IQM never moves
    assert iqm_interval([[2.0] * 3, [0.2] * 3]) == (iqm([2.0] * 3 + [0.2] * 3),) * 2


def test_suite_tasks_are_held_out_and_deterministic():
    """Each task is built the same from its seed, on data and architectures meta-training never samples."""
    for task in TASKS:
        a, b = build_problem(task, 1, smoke=True), build_problem(task, 1, smoke=True)
        for p, q in zip(a.model.parameters(), b.model.parameters()):
            assert torch.equal(p, q)
        assert torch.equal(a.batch(3)[0], b.batch(3)[0])
        assert a.val_loss(a.model) == pytest.approx(b.val_loss(b.model))


def test_pretrained_lr_benchmark_runs_the_family_and_refuses_a_bad_name(tmp_path):
    """``benchmarks/pretrained_lr.py --smoke``: tasks of the shipped optimizer's own family, a loss per multiplier
    with its ratio to the shipped lr's (1.00 for the shipped lr itself), the summary table; a bad name exits 2."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "pretrained_lr.py"
    out = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    runs = [line for line in lines if line.startswith("[")]
    assert len(runs) == 2 and all("×1 " in line and "(1.00; log-train" in line for line in runs)
    assert any(line.startswith("| all | 2 |") for line in lines) and "pick the same multiplier on" in lines[-1]
    bad = subprocess.run([sys.executable, str(script), "--name", str(tmp_path / "none")], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "--name" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_untuned_only_runs_the_learned_optimizer_at_its_own_lr(tmp_path, learned):
    """``--untuned-only``: one learned run per task and seed, at its shipped lr; no "learned, tuned lr" entry (n/a in
    the table), the untuned one and its speed-ups as usual."""
    out = tmp_path / "untuned"
    assert cli.main(["evaluate", "--smoke", "--optimizer", str(learned), "--tasks", "tabular_mlp", "--methods",
                     "adamw,learned", "--untuned-only", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [float(r["lr"]) for r in rows if r["method"] == "learned"] == [pytest.approx(0.002)]
    summary = json.loads((out / "summary.json").read_text())
    entry = summary["tasks"]["tabular_mlp"]
    assert "learned" not in entry["methods"] and entry["methods"]["learned_untuned"]["lr"] == pytest.approx(0.002)
    assert len(entry["speedup"]) == 1 and summary["command"].endswith("--untuned-only")
    row = next(line for line in (out / "table.md").read_text().splitlines() if line.startswith("| tabular_mlp"))
    assert row.count("n/a") == 2  # Muon (not run) and the learned optimizer's tuned lr
