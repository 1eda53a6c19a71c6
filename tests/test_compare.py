"""``deepopt compare``: the protocol (same sweep for all, best lr by validation loss, seeds at the best),
the parameter split of Muon/M3, the outputs of ``--smoke``, and argument errors."""

import csv
import json
import math

import pytest
import torch
from torch import nn

import deepopt
from deepopt import compare
from deepopt.cli import main


def test_every_optimizer_gets_the_same_span_around_its_recommended_lr():
    for name, centre in compare.RECOMMENDED_LR.items():
        lrs = compare.sweep_lrs(centre, 5, 1.0)
        assert len(lrs) == 5 and math.isclose(lrs[2], centre), name
        assert math.isclose(lrs[-1] / lrs[0], 100.0) and all(b > a for a, b in zip(lrs, lrs[1:]))


def test_muon_and_m3_step_hidden_matrices_only():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    matrices, rest = compare.hidden_matrices(model)
    assert [p is model[2].weight for p in matrices] == [True]
    assert len(rest) == len(list(model.parameters())) - 1
    for name in compare.SPLIT:
        main_opt, adamw = compare.make_optimizer(name, model, compare.RECOMMENDED_LR[name])
        assert main_opt.param_groups[0]["params"] == [model[2].weight]
        assert isinstance(adamw, torch.optim.AdamW)
        assert math.isclose(adamw.param_groups[0]["lr"], compare.RECOMMENDED_LR["torch_adamw"])


def test_the_shipped_learned_optimizer_runs_at_its_lr_with_its_schedule_over_the_run():
    """``shipped``: ``DeepMomentum.pretrained`` centred on the lr it learned, its schedule's horizon the run's steps
    (what the device script's compare section runs when the package ships one)."""
    assert compare.RECOMMENDED_LR["shipped"] == deepopt.pretrained.hparams()["lr"]
    assert "shipped" not in compare.DEFAULT_OPTIMIZERS
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    (opt,) = compare.make_optimizer("shipped", model, 2e-3, 77)
    assert isinstance(opt, deepopt.DeepMomentum) and opt.param_groups[0]["lr"] == 2e-3
    assert opt.param_groups[0]["lr_horizon"] == 77 and len(opt.param_groups[0]["params"]) == 4
    spec = compare.RunSpec("digits_mlp", "shipped", compare.RECOMMENDED_LR["shipped"], 0, "sweep", "smoke")
    record = compare.train_run(spec)
    assert not record["diverged"] and math.isfinite(record["val_loss"])


def test_a_diverging_run_is_recorded_not_raised():
    spec = compare.RunSpec("digits_mlp", "torch_sgd_momentum", 1e4, 0, "sweep", "smoke")
    record = compare.train_run(spec)
    assert record["diverged"] and record["val_loss"] == math.inf


def test_best_lr_and_seeds_follow_the_protocol(tmp_path):
    summary = compare.run(["digits_mlp"], ["torch_adamw", "m3"], tmp_path, size="smoke", lrs=3, seeds=2)
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * (3 + 1)
    for name in ("torch_adamw", "m3"):
        sweep = [r for r in rows if r["optimizer"] == name and r["phase"] == "sweep"]
        best = min(sweep, key=lambda r: float(r["val_loss"]))
        seeded = [r for r in rows if r["optimizer"] == name and r["phase"] == "seeds"]
        assert [r["seed"] for r in seeded] == ["1"] and seeded[0]["lr"] == best["lr"]
        result = summary["results"]["digits_mlp"][name]
        assert math.isclose(result["best_lr"], float(best["lr"]))
        assert math.isclose(result["mean"], (float(best["val_loss"]) + float(seeded[0]["val_loss"])) / 2)


def test_resume_keeps_finished_runs_and_trains_the_rest(tmp_path):
    """A study killed after some runs: ``resume`` keeps them (not retrained) and ends as a fresh study does."""
    fresh = compare.run(["digits_mlp"], ["torch_adamw"], tmp_path / "a", size="smoke", lrs=3, seeds=2)
    (tmp_path / "b").mkdir()
    lines = (tmp_path / "a" / "results.csv").read_text().splitlines(True)
    (tmp_path / "b" / "results.csv").write_text("".join(lines[:3]) + lines[3][:10])  # 2 runs and a torn line
    kept = compare.read_results(tmp_path / "b" / "results.csv")
    assert len(kept) == 2
    resumed = compare.run(["digits_mlp"], ["torch_adamw"], tmp_path / "b", size="smoke", lrs=3, seeds=2,
                          resume=True)
    assert resumed == fresh
    rows = (tmp_path / "b" / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 and rows[1:3] == [line.rstrip("\r\n") for line in lines[1:3]]


def test_smoke_cli_writes_every_output(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["compare", "--smoke", "--threads", "1", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    for name in compare.OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == set(compare.TASKS)
    assert all(set(r) == set(compare.DEFAULT_OPTIMIZERS) for r in summary["results"].values())
    assert {(t["optimizer"], t["task"]) for t in summary["targets"]} >= {("m3", "char_lm"), ("m3", "hope_lm")}
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(compare.TASKS) * len(compare.DEFAULT_OPTIMIZERS) * (2 + 1)
    assert "| m3 |" in (out / "table.md").read_text()
    with pytest.raises(SystemExit) as exc:  # an existing run is never overwritten unless asked
        main(["compare", "--smoke", "--out", str(out)])
    assert exc.value.code == 2


@pytest.mark.parametrize("argv,word", [(["--lrs", "0"], "--lrs"), (["--span", "0"], "--span"),
                                       (["--device", "tpu"], "--device"), (["--workers", "0"], "--workers")])
def test_bad_arguments_are_named(tmp_path, capsys, argv, word):
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--smoke", "--out", str(tmp_path / "x"), *argv])
    assert exc.value.code == 2 and word in capsys.readouterr().err
    assert not (tmp_path / "x" / "results.csv").exists()
