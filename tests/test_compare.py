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
from deepopt.schedules import warmup_cosine_factor


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
    spec = compare.RunSpec("digits_mlp", "shipped", compare.RECOMMENDED_LR["shipped"], 0, "sweep", "smoke",
                           schedule=compare.LEARNED)
    record = compare.train_run(spec)
    assert not record["diverged"] and math.isfinite(record["val_loss"])
    for name, schedule in (("shipped", "cosine"), ("torch_adamw", compare.LEARNED), ("torch_adamw", "linear")):
        with pytest.raises(ValueError, match="schedule"):  # a script schedule on top of the learned one, or none
            compare.train_run(compare.RunSpec("digits_mlp", name, 1e-3, 0, "sweep", "smoke", schedule=schedule))


@pytest.mark.parametrize("schedule", compare.SCHEDULES)
def test_every_optimizer_trains_under_its_runs_schedule(monkeypatch, schedule):
    """``cosine``: each optimizer's lr at step t is lr·warmup_cosine_factor(t) (5% warm-up, cosine to 0), in both
    parts of the split ones; ``constant``: lr throughout; ``shipped``: no script schedule on its learned one."""
    seen: dict[str, list[list[float]]] = {}
    made = compare.make_optimizer

    def recording(name, model, lr, steps=None):
        opts = made(name, model, lr, steps)
        for i, opt in enumerate(opts):
            log = seen.setdefault(f"{name}/{i}", [])
            opt.register_step_pre_hook(lambda o, *_, log=log: log.append([g["lr"] for g in o.param_groups]))
        return opts

    monkeypatch.setattr(compare, "make_optimizer", recording)
    steps = compare.SIZES["smoke"]["digits_mlp"]["steps"]
    warmup = max(1, round(0.05 * steps))
    for name in ("torch_adamw", "m3", "shipped"):
        spec = compare.RunSpec("digits_mlp", name, 1e-3, 0, "sweep", "smoke",
                               schedule=compare.LEARNED if name == "shipped" else schedule)
        assert math.isfinite(compare.train_run(spec)["val_loss"])
    for key, log in seen.items():
        name = key.split("/")[0]
        assert len(log) == steps, key
        base = log[0][0] / (1.0 if schedule == "constant" or name == "shipped" else 1.0 / warmup)
        for t, lrs in enumerate(log):
            factor = (warmup_cosine_factor(t, steps, warmup) if schedule == "cosine" and name != "shipped"
                      else 1.0)
            assert all(math.isclose(lr, base * factor, rel_tol=1e-9) for lr in lrs), (key, t)
    assert seen["m3/1"][-1][0] > 0 and (schedule == "constant" or seen["m3/1"][-1][0] < seen["m3/1"][1][0])


def test_the_schedule_is_swept_with_the_lr_and_a_resumed_study_adds_one(tmp_path):
    """Each (lr, schedule) is a run of the sweep; the best pair is seeded; resuming a one-schedule study with both
    keeps its runs and trains the other schedule's; ``shipped`` runs its learned schedule only."""
    compare.run(["digits_mlp"], ["torch_adamw", "shipped"], tmp_path, size="smoke", lrs=2, seeds=1,
                schedules=("constant",))
    summary = compare.run(["digits_mlp"], ["torch_adamw", "shipped"], tmp_path, size="smoke", lrs=2, seeds=2,
                          resume=True)
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    sweep = [(r["optimizer"], r["schedule"]) for r in rows if r["phase"] == "sweep"]
    assert sorted(sweep) == sorted([("shipped", "learned")] * 2 + [("torch_adamw", "constant")] * 2
                                   + [("torch_adamw", "cosine")] * 2)
    for name in ("torch_adamw", "shipped"):
        best = min((r for r in rows if r["optimizer"] == name and r["phase"] == "sweep"),
                   key=lambda r: float(r["val_loss"]))
        (seeded,) = [r for r in rows if r["optimizer"] == name and r["phase"] == "seeds"]
        assert (seeded["lr"], seeded["schedule"]) == (best["lr"], best["schedule"])
        assert summary["results"]["digits_mlp"][name]["schedule"] == best["schedule"]


def test_a_diverging_run_is_recorded_not_raised():
    spec = compare.RunSpec("digits_mlp", "torch_sgd_momentum", 1e4, 0, "sweep", "smoke")
    record = compare.train_run(spec)
    assert record["diverged"] and record["val_loss"] == math.inf


def test_best_lr_and_seeds_follow_the_protocol(tmp_path):
    summary = compare.run(["digits_mlp"], ["torch_adamw", "m3"], tmp_path, size="smoke", lrs=2, seeds=2,
                          schedules=("cosine",))
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * (2 + 1)  # a 2-lr sweep is all edges: never extended
    for name in ("torch_adamw", "m3"):
        sweep = [r for r in rows if r["optimizer"] == name and r["phase"] == "sweep"]
        best = min(sweep, key=lambda r: float(r["val_loss"]))
        seeded = [r for r in rows if r["optimizer"] == name and r["phase"] == "seeds"]
        assert [r["seed"] for r in seeded] == ["1"] and seeded[0]["lr"] == best["lr"]
        result = summary["results"]["digits_mlp"][name]
        assert math.isclose(result["best_lr"], float(best["lr"]))
        assert math.isclose(result["mean"], (float(best["val_loss"]) + float(seeded[0]["val_loss"])) / 2)


def test_a_best_lr_at_the_edge_of_its_sweep_is_extended_by_a_grid_step():
    """Only a best run at the smallest or largest lr of its own schedule's sweep (3+ lrs) gets a run beyond it."""
    def row(opt, lr, loss, schedule="cosine"):
        return dict(task="t", optimizer=opt, lr=lr, seed=0, phase="sweep", size="smoke", device="cpu",
                    schedule=schedule, val_loss=loss)
    swept = [row("a", lr, loss) for lr, loss in ((0.01, 3.0), (0.1, 2.0), (1.0, 1.0))]  # best at the top edge
    swept += [row("a", lr, 5.0, "constant") for lr in (10.0, 100.0, 1000.0)]  # another schedule's grid
    swept += [row("b", lr, loss) for lr, loss in ((0.01, 1.0), (0.1, 2.0), (1.0, 3.0))]  # best at the bottom edge
    swept += [row("c", lr, loss) for lr, loss in ((0.01, 2.0), (0.1, 1.0), (1.0, 3.0))]  # inside: none
    swept += [row("d", lr, loss) for lr, loss in ((0.1, 1.0), (1.0, 3.0))]  # two lrs: none
    best = compare._best(swept, ["t"], ["a", "b", "c", "d"])
    beyond = {s.optimizer: s for s in compare.edge_extensions(swept, best)}
    assert set(beyond) == {"a", "b"}
    assert math.isclose(beyond["a"].lr, 10.0) and beyond["a"].schedule == "cosine" and beyond["a"].seed == 0
    assert math.isclose(beyond["b"].lr, 0.001) and beyond["b"].phase == "sweep"


def test_resume_keeps_finished_runs_and_trains_the_rest(tmp_path):
    """A study killed after some runs: ``resume`` keeps them (not retrained) and ends as a fresh study does."""
    fresh = compare.run(["digits_mlp"], ["torch_adamw"], tmp_path / "a", size="smoke", lrs=3, seeds=2,
                        schedules=("cosine",))
    (tmp_path / "b").mkdir()
    lines = (tmp_path / "a" / "results.csv").read_text().splitlines(True)
    (tmp_path / "b" / "results.csv").write_text("".join(lines[:3]) + lines[3][:10])  # 2 runs and a torn line
    kept = compare.read_results(tmp_path / "b" / "results.csv")
    assert len(kept) == 2
    resumed = compare.run(["digits_mlp"], ["torch_adamw"], tmp_path / "b", size="smoke", lrs=3, seeds=2,
                          resume=True, schedules=("cosine",))
    assert resumed == fresh
    rows = (tmp_path / "b" / "results.csv").read_text().splitlines()
    assert len(rows) == len(lines) and rows[1:3] == [line.rstrip("\r\n") for line in lines[1:3]]


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
                                       (["--device", "tpu"], "--device"), (["--workers", "0"], "--workers"),
                                       (["--schedule", "linear"], "--schedule")])
def test_bad_arguments_are_named(tmp_path, capsys, argv, word):
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--smoke", "--out", str(tmp_path / "x"), *argv])
    assert exc.value.code == 2 and word in capsys.readouterr().err
    assert not (tmp_path / "x" / "results.csv").exists()
