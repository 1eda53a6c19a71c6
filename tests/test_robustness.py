import csv
import json
import math

import pytest

from deepopt import cli, robustness
from deepopt.robustness import OPTIMIZERS, RunSpec, run, summarize, train_run

TINY = {"seeds": 2, "steps": 20, "lrs": (0.03, 0.3), "tune_seeds": 1, "eval_every": 5, "progress": False}


def spec(**overrides) -> RunSpec:
    base = {"task": "digits", "optimizer": "momentum", "noise": "gaussian", "level": 1.0, "seed": 0, "lr": 0.1,
            "steps": 30, "eval_every": 10, "target": 1.0}
    return RunSpec(**{**base, **overrides})


def without_curve(record):
    return {k: v for k, v in record.items() if k != "curve"}


@pytest.mark.parametrize("noise, level", [("gaussian", 1.0), ("student_t", 2.0), ("multiplicative", 1.0),
                                          ("dropout", 0.5), ("label", 0.3), ("batch", 30.0)])
def test_same_seed_same_run_and_noise_changes_the_run(noise, level):
    a, b = train_run(spec(noise=noise, level=level)), train_run(spec(noise=noise, level=level))
    assert a == b
    clean = train_run(spec(noise=noise, level=0.0))
    assert a["final_train_loss"] != clean["final_train_loss"]
    assert train_run(spec(noise=noise, level=level, seed=1))["final_train_loss"] != a["final_train_loss"]
    assert not a["diverged"] and a["final_train_loss"] < a["initial_train_loss"]
    assert len(a["curve"]) == 4 and a["curve"][0] == a["initial_train_loss"]


def test_every_optimizer_trains_and_reaches_the_target():
    for name in OPTIMIZERS:
        r = train_run(spec(optimizer=name, noise="none", level=0.0, lr=0.01 if "adam" in name else 0.5))
        assert not r["diverged"] and r["final_accuracy"] > 0.5, name
        assert r["steps_to_target"] is not None and 0 < r["steps_to_target"] <= 30, name


def test_quadratic_task_and_small_batches():
    full = train_run(spec(task="quadratic", noise="none", level=0.0, lr=0.5, steps=60))
    small = train_run(spec(task="quadratic", noise="batch", level=63.0, lr=0.5, steps=60))
    assert full["batch_size"] == 768 and small["batch_size"] == 12
    assert full["final_accuracy"] is None
    assert full["final_train_loss"] < 0.3 * full["initial_train_loss"]
    assert small["final_train_loss"] > full["final_train_loss"]
    records = run(task="quadratic", optimizers=("sgd",), levels=(0.0, 0.5), seeds=1, steps=10, lrs=(0.5,),
                  tune_seeds=1, progress=False)  # default noises: all but label noise
    assert {r["noise"] for r in records} == {"gaussian", "student_t", "multiplicative", "dropout", "batch"}


@pytest.mark.parametrize("optimizer, noise, level, lr", [
    ("sgd", "none", 0.0, 1e6),                  # exploding loss
    ("momentum", "gaussian", 1e39, 0.1),        # Inf gradient: deepopt raises, the run records it
    ("torch_adam", "gaussian", 1e39, 0.1),      # Inf gradient, no raise: NaN weights, NaN loss
])
def test_a_diverged_run_is_recorded_not_raised(optimizer, noise, level, lr):
    r = train_run(spec(optimizer=optimizer, noise=noise, level=level, lr=lr, steps=20))
    assert r["diverged"] and r["steps_to_target"] is None
    assert math.isnan(r["final_train_loss"]) and math.isnan(r["final_test_loss"])
    assert all(math.isfinite(v) for v in r["curve"])


def test_divergence_never_poisons_the_aggregates(tmp_path):
    records = run(optimizers=("sgd", "momentum"), noises=("gaussian",), levels=(0.0, 1e39), out=tmp_path,
                  **TINY)
    assert len(records) == 8
    assert all(r["diverged"] for r in records if r["level"] > 0)
    assert not any(r["diverged"] for r in records if r["level"] == 0)
    summary = json.loads((tmp_path / "summary.json").read_text())
    noisy = [c for c in summary["cells"] if c["level"] > 0]
    for cell in noisy:
        assert cell["n_diverged"] == 2
        # a diverged run counts at its initial loss: finite, and worse than the clean run
        assert math.isfinite(cell["train_loss"]["mean"]) and cell["degradation"]["train_loss"]["factor"] > 1
    assert (tmp_path / "degradation.png").stat().st_size > 0


def test_summary_statistics_on_known_records():
    def record(opt, level, seed, loss, diverged=False):
        return {"optimizer": opt, "noise": "gaussian", "level": level, "seed": seed, "lr": 0.1,
                "diverged": diverged, "final_accuracy": None, "initial_accuracy": None,
                **{f"final_{k}": math.nan if diverged else loss for k in ("train_loss", "val_loss", "test_loss")},
                **{f"initial_{k}": 8.0 for k in ("train_loss", "val_loss", "test_loss")}}
    records = [record("a", 0.0, 0, 1.0), record("a", 0.0, 1, 2.0), record("a", 1.0, 0, 2.0),
               record("a", 1.0, 1, 8.0), record("b", 0.0, 0, 1.0), record("b", 0.0, 1, 1.0),
               record("b", 1.0, 0, 1.5), record("b", 1.0, 1, math.nan, diverged=True)]
    summary = summarize(records)
    cell = {(c["optimizer"], c["level"]): c for c in summary["cells"]}
    assert cell[("a", 1.0)]["degradation"]["train_loss"]["factor"] == pytest.approx(math.sqrt(2 * 4))
    assert cell[("b", 1.0)]["train_loss"]["mean"] == pytest.approx((1.5 + 8.0) / 2)
    assert cell[("b", 1.0)]["n_diverged"] == 1
    lo, hi = cell[("a", 1.0)]["train_loss"]["ci_low"], cell[("a", 1.0)]["train_loss"]["ci_high"]
    assert lo < 5.0 < hi and hi - 5.0 == pytest.approx(12.706 * 3.0 * math.sqrt(2) / math.sqrt(2), rel=1e-3)
    ranking = summary["ranking"]["train_loss"]
    assert ranking["gaussian"]["least_degraded"] == "a"  # b's diverged seed counts as 8/1
    assert ranking["overall"]["degradation"]["b"]["factor"] == pytest.approx(math.sqrt(1.5 * 8))


def test_tuning_takes_the_smallest_of_lrs_that_tie_within_rounding():
    def tuned(losses: dict[float, float]) -> float:
        records = [{"optimizer": "o", "noise": "none", "level": 0.0, "lr": lr, "diverged": not math.isfinite(v),
                    "final_val_loss": v} for lr, v in losses.items()]
        best, table = robustness._best_lrs(records, list(losses))
        assert table[("o", "none", 0.0)]["lr"] == best[("o", "none", 0.0)]
        return best[("o", "none", 0.0)]

    # the noisy quadratic's Adam sweep: seven lrs reach the optimum, the lowest by 1e-9 is rounding
    assert tuned({0.01: 0.0494, 0.03: 0.046074, 0.3: 0.0460739, 3.0: 0.0460738, 10.0: 0.046074}) == 0.03
    assert tuned({0.01: 0.0494, 0.03: 0.0461, 0.3: 0.0460}) == 0.3  # 0.2% apart: not a tie
    assert tuned({0.1: math.inf, 1.0: math.inf}) == 0.1


def test_parallel_workers_give_the_same_records():
    grid = {"optimizers": ("sgd", "deep_momentum"), "noises": ("dropout", "label"), "levels": (0.0, 0.5)}
    serial = run(**grid, **TINY)
    parallel = run(**grid, workers=2, **TINY)
    assert [without_curve(r) for r in serial] == [without_curve(r) for r in parallel]
    assert len(serial) == 2 * 2 * 2 * 2
    zero = [r for r in serial if r["level"] == 0]
    assert {r["noise"] for r in zero} == {"dropout", "label"}  # the shared clean run is reported per noise


def test_retune_tunes_every_level(tmp_path):
    run(optimizers=("adam",), noises=("multiplicative",), levels=(0.0, 2.0), retune=True, out=tmp_path, **TINY)
    tuned = json.loads((tmp_path / "summary.json").read_text())["tuned_lr"]
    assert {(t["noise"], t["level"]) for t in tuned} == {("multiplicative", 0.0), ("multiplicative", 2.0)}
    assert all(set(t["mean_val_loss_by_lr"]) == {"0.03", "0.3"} for t in tuned)


@pytest.mark.parametrize("kwargs, message", [
    ({"optimizers": ("adamax",)}, "unknown optimizer 'adamax'; accepted: .*deep_momentum.*torch_adam"),
    ({"noises": ("pink",)}, "unknown noise 'pink'; accepted: .*student_t.*label.*batch"),
    ({"levels": (0.0, -0.5)}, "levels must be numbers >= 0"),
    ({"noises": ("dropout",), "levels": (1.0,)}, "level must be in"),
    ({"noises": ("label",), "task": "quadratic"}, "label noise needs a classification task"),
    ({"task": "cifar"}, "unknown task 'cifar'; accepted"),
    ({"metric": "accuracy"}, "metric must be one of"),
    ({"seeds": 0}, "seeds must be an int >= 1"),
    ({"lrs": (0.1, -1.0)}, "lrs must be"),
])
def test_bad_arguments_get_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        run(**{**TINY, **kwargs})


@pytest.mark.parametrize("argv, message", [
    (["--optimizers", "adamax"], "invalid choice: 'adamax'"),
    (["--noises", "pink"], "invalid choice: 'pink'"),
    (["--levels", "-1"], "noise levels must be >= 0"),
])
def test_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        cli.main(["robustness", *argv])
    assert message in capsys.readouterr().err


def test_smoke_cli_writes_every_file(tmp_path, capsys):
    out = tmp_path / "smoke"
    assert cli.main(["robustness", "--smoke", "--out", str(out), "--no-progress"]) == 0
    assert "least" not in capsys.readouterr().err
    names = {"results.csv", "curves.csv", "summary.json"} | {
        f"{stem}.{ext}" for stem in ("loss_vs_level", "degradation", "curves_gaussian", "curves_label")
        for ext in ("png", "svg")}
    assert names <= {p.name for p in out.iterdir()}
    assert all((out / n).stat().st_size > 0 for n in names)
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    smoke = robustness.SMOKE
    assert len(rows) == len(OPTIMIZERS) * len(smoke["noises"]) * 2 * smoke["seeds"]
    assert set(robustness.RESULT_COLUMNS) == set(rows[0])
    assert {r["optimizer"] for r in rows} == set(OPTIMIZERS)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["ranking"]["train_loss"]) == {"gaussian", "label", "overall"}
    assert summary["ranking"]["train_loss"]["overall"]["least_degraded"] in OPTIMIZERS


def test_tiny_hope_language_model_task():
    """The HOPE task: next-byte prediction on stdlib source, label noise corrupting next-byte targets."""
    records = run(task="hope", optimizers=["deep_momentum"], noises=["label"], levels=(0.0, 0.3), seeds=1,
                  steps=4, lrs=(0.03,), tune_seeds=1, eval_every=2, progress=False)
    assert len(records) == 2 and not any(r["diverged"] for r in records)
    clean, noisy = sorted(records, key=lambda r: r["level"])
    assert math.log(256) - 0.5 < clean["initial_test_loss"] < math.log(256) + 0.5  # a 256-way next byte
    assert clean["final_train_loss"] < clean["initial_train_loss"]
    assert noisy["final_train_loss"] != clean["final_train_loss"]


def test_cli_levels_per_noise_model(tmp_path, capsys):
    out = tmp_path / "per-noise"
    argv = ["robustness", "--smoke", "--no-progress", "--out", str(out), "--levels", "gaussian=2", "label=0.3"]
    assert cli.main(argv) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {(r["noise"], float(r["level"])) for r in rows} == {("gaussian", 0.0), ("gaussian", 2.0),
                                                                ("label", 0.0), ("label", 0.3)}
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["robustness", "--smoke", "--no-progress", "--levels", "1", "label=0.3"])
    assert exit_info.value.code == 2 and "not both" in capsys.readouterr().err
