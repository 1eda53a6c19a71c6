"""Meta-training runs: resume after a crash or a kill, the learned optimizer as a drop-in, the CLI."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from deepopt.meta_train import (
    InnerState,
    MetaParams,
    MetaTrainConfig,
    MetaTrainer,
    Unroll,
    held_out_task,
    sample_task,
)
from deepopt.meta_train.evaluate import load_learned, speedup, steps_to_reach
from safetensors.torch import load_file

import deepopt
from deepopt import cli
from deepopt.checkpoint import save_pretrained

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(meta_steps=6, unroll=3, horizon=6, tasks_per_step=2, save_every=2, hparams={"lr": 0.03})


class Crash(RuntimeError):
    pass


def assert_same_run(a: MetaTrainer, b: MetaTrainer) -> None:
    assert a.step == b.step
    for k in a.meta.raw:
        assert torch.equal(a.meta.raw[k], b.meta.raw[k]), k
    assert a.history == b.history
    sa, sb = a.opt.state_dict()["state"], b.opt.state_dict()["state"]
    for pid in sa:
        for key in sa[pid]:
            assert torch.equal(sa[pid][key], sb[pid][key])


@pytest.mark.parametrize("estimator", ["backprop", "es", "pes"])
def test_resume_after_crash_equals_uninterrupted_run(tmp_path, estimator):
    config = MetaTrainConfig(estimator=estimator, es_pairs=4, **SMALL)
    reference = MetaTrainer(config)
    reference.run(progress=False)

    def crash_at_3(trainer: MetaTrainer) -> None:
        if trainer.step == 3:  # after the step-2 checkpoint, before the step-4 one
            raise Crash

    with pytest.raises(Crash):
        MetaTrainer(config, tmp_path).run(progress=False, callback=crash_at_3)
    resumed = MetaTrainer(config, tmp_path)
    assert resumed.step == 2
    resumed.run(progress=False)
    assert_same_run(resumed, reference)
    assert [h["meta_step"] for h in resumed.history] == list(range(1, 7))


def test_vectorized_meta_step_equals_looped():
    """Same-structure slots (the quadratic family) run as one vmapped TaskStack: the same run as looping."""
    config = dict(rule="adam", family="quadratic", meta_steps=4, unroll=3, horizon=6, tasks_per_step=3,
                  dtype="float64")
    looped, vectorized = (MetaTrainer(MetaTrainConfig(vectorize=v, **config)) for v in (False, True))
    assert [len(g) for g in vectorized._groups()] == [3]
    looped.run(progress=False)
    vectorized.run(progress=False)
    for a, b in zip(looped.history, vectorized.history):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-10)


def test_resume_refuses_a_different_config(tmp_path):
    MetaTrainer(MetaTrainConfig(**{**SMALL, "meta_steps": 2}), tmp_path).run(progress=False)
    with pytest.raises(ValueError, match="unroll"):
        MetaTrainer(MetaTrainConfig(**{**SMALL, "unroll": 2}), tmp_path)
    longer = MetaTrainer(MetaTrainConfig(**{**SMALL, "meta_steps": 3}), tmp_path)  # extending is allowed
    assert longer.step == 2


@pytest.mark.parametrize(
    "field,value",
    [
        ("rule", "lion"),
        ("outer", "val"),
        ("unroll", 0),
        ("horizon", 7),
        ("meta_lr", 0.0),
        ("estimator", "reinforce"),
        ("vectorize", 1),
    ],
)
def test_config_validation(field, value):
    with pytest.raises((ValueError, TypeError), match=field):
        MetaTrainConfig(**{**SMALL, field: value})


def test_meta_training_lowers_the_outer_loss():
    """A short run from a too-small initial lr: the meta-optimizer raises lr and the outer loss on an
    unseen task of the family drops."""
    config = MetaTrainConfig(
        rule="momentum",
        meta_steps=15,
        unroll=10,
        horizon=10,
        tasks_per_step=1,
        meta_lr=0.1,
        hparams={"lr": 0.002},
    )
    trainer = MetaTrainer(config)
    probe = Unroll(trainer.meta, sample_task("digits", 12345), 10)
    with torch.no_grad():
        before = probe.loss(dict(trainer.meta.raw), InnerState.fresh(probe.task))[0]
    trainer.run(progress=False)
    with torch.no_grad():
        after = probe.loss(dict(trainer.meta.raw), InnerState.fresh(probe.task))[0]
    assert trainer.history[-1]["lr"] > 0.004
    assert after < before - 0.01


def test_from_pretrained_round_trip_on_unseen_model(tmp_path):
    """A learned DMGD saved with save_pretrained is a working DeepMomentum on a model it never saw, taking
    exactly the steps of the torch.func engine with the same meta-parameters."""
    f64 = torch.float64
    meta = MetaParams("deep_momentum", dtype=f64, lr=0.05, hidden=8, key_dim=8)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # stand-in for trained values: move every meta-parameter
        for p in meta.raw.values():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=f64))
    save_pretrained(tmp_path, *meta.export())
    task = held_out_task("wine_mlp", 0, f64)
    model = task.model
    opt = deepopt.DeepMomentum.from_pretrained(tmp_path, model.parameters())
    assert isinstance(opt, torch.optim.Optimizer)
    assert load_learned(tmp_path, model.parameters()).defaults["lr"] == opt.defaults["lr"]
    engine = Unroll(meta, task, 8).loss(dict(meta.raw), InnerState.fresh(task))[1]
    losses = []
    for t in range(8):
        x, y = task.train_batch(t)
        opt.zero_grad()
        loss = task.criterion(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, engine.params[name].detach(), rtol=1e-10, atol=1e-12)
    assert losses[-1] < losses[0]
    # an override replaces a saved hyperparameter
    assert deepopt.DeepMomentum.from_pretrained(tmp_path, model.parameters(), lr=0.5).defaults["lr"] == 0.5


def test_speedup_metric():
    learned = [3.0, 2.0, 1.0]
    assert steps_to_reach([3.0, 2.5, 1.0], 1.0) == 2
    assert steps_to_reach([3.0, 2.5], 1.0) is None
    assert speedup(learned, [[3, 2.5, 2, 1.5, 1.0], [3, 2, 1.2, 0.9, 0.5]], 2, budget=2) == (1.5, False)
    assert speedup(learned, [[3, 2.5, 2, 1.5, 1.2]], 2, budget=2) == (2.0, True)


def _cli(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "deepopt.cli",
        "meta-train",
        "--smoke",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


def test_cli_smoke_and_resume_after_kill(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # 1. the smoke pipeline end to end
    done = subprocess.run(
        _cli(tmp_path / "smoke"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    run = tmp_path / "smoke"
    for name in ("report.json", "curves.csv", "curves.png", "trainer_state.pt", "optimizer/config.json"):
        assert (run / name).is_file(), name
    report = json.loads((run / "report.json").read_text())
    assert report["optimizer"] == "DeepMomentum"
    for task in report["tasks"].values():
        assert set(task) == {"seeds", "speedup_mean", "speedup_std", "learned_beats_adam", "learned_beats_adam_decay"}
        for seed in task["seeds"].values():
            assert seed["speedup"] > 0 and seed["learned"] > 0
            assert seed["adam_decay_best"] == [0.003, 0.1] or seed["adam_decay_best"] == [0.03, 0.1]
            assert seed["learned_beats_adam_decay"] == (seed["learned"] < seed["adam_decay_tuned"])
    header = (run / "curves.csv").read_text().splitlines()[0]
    assert header == "kind,task,optimizer,lr,seed,step,loss"
    # the default DeepMomentum run anneals its lr over the horizon (p learned) and learns β₂ from 0.95
    config = report["config"]
    assert config["hparams"]["lr_horizon"] == config["horizon"] == report["learned_hparams"]["lr_horizon"]
    assert config["hparams"]["beta2"] == 0.95 and config["learn"][-2:] == ["lr_power", "beta2"]
    assert report["learned_hparams"]["beta2"] != 0.95 and report["learned_hparams"]["lr_power"] != 1.0

    # 2. SIGKILL a longer run at its first checkpoint, run it again: same result as uninterrupted
    extra = ("--meta-steps", "12", "--save-every", "1", "--eval-tasks", "wine_mlp")
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli(killed, *extra), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 60
    while not (killed / "trainer_state.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_at_kill = torch.load(killed / "trainer_state.pt", weights_only=True)["step"]
    assert 1 <= step_at_kill < 12
    resumed = subprocess.run(
        _cli(killed, *extra, "--resume"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"from meta-step {step_at_kill}" in resumed.stdout
    config = MetaTrainConfig(**json.loads((killed / "report.json").read_text())["config"])
    reference = MetaTrainer(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI runs it (--threads 1): two threads round the tiny matmuls differently
    try:
        reference.run(progress=False)
    finally:
        torch.set_num_threads(threads)
    saved = load_file(killed / "optimizer" / "memory.safetensors")
    _, _, tensors = reference.meta.export()
    for k in ("W1", "W2"):
        torch.testing.assert_close(saved[k], tensors[k], rtol=1e-6, atol=1e-7)
    assert reference.history == MetaTrainer(config, killed).history


@pytest.mark.parametrize("rule", ["sgd", "momentum", "adam", "delta_momentum"])
def test_learned_hyperparameters_round_trip(tmp_path, rule):
    meta = MetaParams(rule)
    with torch.no_grad():
        for p in meta.raw.values():
            p.add_(0.1)
    save_pretrained(tmp_path, *meta.export())
    model = held_out_task("wine_mlp", 0).model
    opt = load_learned(tmp_path, model.parameters())
    assert type(opt).__name__ == meta.export()[0]
    with torch.no_grad():
        expected = meta.hparams()
    for key in meta.learned_keys():
        got, want = opt.defaults[key], expected[key]
        assert torch.allclose(torch.as_tensor(got, dtype=torch.float32), torch.as_tensor(want)), key


def test_tabular_and_mixed_families_are_small_problems_from_other_data():
    """The ``tabular`` family cuts problems from digits (feature and class subsets, relabelled 0…C−1) or
    iris — never the held-out wine and breast-cancer data — and ``mixed`` draws from both families; a
    meta-step on it runs."""
    seen = set()
    for seed in range(12):
        task = sample_task("tabular", seed)
        x, y = task.full_batch
        classes = int(y.max()) + 1
        assert set(y.unique().tolist()) == set(range(classes)) and 2 <= classes <= 5
        assert task.name.startswith(("iris", "digits")) and x.shape[1] <= 32
        assert task.model(x).shape == (x.shape[0], classes)
        seen.add(sample_task("mixed", seed).name.split("_")[0])
    assert "digits" in seen and any(s != "digits" for s in seen)
    trainer = MetaTrainer(MetaTrainConfig(rule="deep_momentum", family="mixed", meta_steps=1, unroll=2, horizon=2,
                                          hparams={"lr": 0.03, "hidden": 4, "key_dim": 8}))
    record = trainer.meta_step()
    assert record["outer_loss"] is not None and record["dropped"] == 0


def test_device_option_moves_tasks_and_refuses_a_missing_gpu():
    """``Task.to`` keeps the batch stream (indices from CPU generators) and the loss; ``device="cuda"`` on a
    machine without CUDA is refused when the config is built, before any compute."""
    for task in (sample_task("digits", 3), sample_task("quadratic", 3)):
        moved = task.to("cpu")
        assert moved.model is not task.model
        for t in (0, 5):
            assert torch.equal(moved.train_batch(t)[0], task.train_batch(t)[0])
            assert torch.equal(moved.loss(moved.init_params(), moved.train_batch(t)),
                               task.loss(task.init_params(), task.train_batch(t)))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            MetaTrainConfig(device="cuda")
    with pytest.raises(ValueError, match="cpu, cuda or cuda:N"):
        MetaTrainConfig(device="tpu")


def test_small_and_broad_families_are_memorisable_problems_from_other_data():
    """The ``small`` family has 64–400 training rows of a teacher-labelled Gaussian problem or a digits/iris cut
    (never wine or breast cancer), deterministic in the seed, that an MLP memorises within the meta-training
    horizon (Adam drives the full-split loss towards 0, as on the held-out wine task); ``broad`` draws from
    digits, tabular and small, and a meta-step on it runs."""
    from deepopt.meta_train.evaluate import loss_curve

    sources = set()
    for seed in range(12):
        task = sample_task("small", seed)
        x, y = task.full_batch
        assert 64 <= x.shape[0] <= 400 and x.shape[1] <= 32
        assert task.name.startswith(("iris", "digits", "teacher"))
        sources.add(task.name[:5])
        assert task.model(x).shape == (x.shape[0], int(y.max()) + 1)
        again = sample_task("small", seed)
        assert torch.equal(again.full_batch[0], x) and torch.equal(again.train_batch(7)[1], task.train_batch(7)[1])
        assert task.heldout_batch(0)[0].shape[0] == task.train_batch(0)[0].shape[0]
    assert {"teach", "digit"} <= sources
    for seed in (3, 5):
        curve = loss_curve(sample_task("small", seed), lambda p: deepopt.Adam(p, lr=0.02), 200)
        assert curve[-1] < 0.01 * curve[0]
    drawn = {sample_task("broad", seed).name for seed in range(12)}
    assert any(n.startswith("digits_") for n in drawn) and any("r_w" in n for n in drawn)
    assert any("f" in n.split("_")[0] and "r" not in n.split("_")[0][-4:] for n in drawn)
    trainer = MetaTrainer(MetaTrainConfig(rule="deep_momentum", family="broad", meta_steps=1, unroll=2, horizon=2,
                                          hparams={"lr": 0.03, "hidden": 4, "key_dim": 8}))
    record = trainer.meta_step()
    assert record["outer_loss"] is not None and record["dropped"] == 0


def test_late_weight_scales_each_truncation_by_its_position_in_the_horizon(tmp_path):
    """``late_weight = p`` multiplies the meta-gradient of a truncation ending at inner step t by (t/horizon)^p
    (first truncation of 2 steps in a horizon of 8: 4^-p), p = 0 is the unweighted run; a checkpoint written
    before the field existed resumes as p = 0, and p < 0 is refused."""
    base = dict(rule="deep_momentum", family="quadratic", meta_steps=1, unroll=2, horizon=8,
                hparams={"lr": 0.03, "hidden": 4, "key_dim": 8})
    norms = {p: MetaTrainer(MetaTrainConfig(late_weight=p, **base)).meta_step()["grad_norm"] for p in (0.0, 1.5)}
    assert norms[0.0] > 0
    assert norms[1.5] == pytest.approx(norms[0.0] * 4**-1.5, rel=1e-5)
    trainer = MetaTrainer(MetaTrainConfig(**base), tmp_path)
    trainer.run(progress=False)
    state = torch.load(tmp_path / "trainer_state.pt", weights_only=True)
    del state["config"]["late_weight"]
    torch.save(state, tmp_path / "trainer_state.pt")
    assert MetaTrainer(MetaTrainConfig(**base), tmp_path).step == 1
    with pytest.raises(ValueError, match="different run"):
        MetaTrainer(MetaTrainConfig(late_weight=1.0, **base), tmp_path)
    with pytest.raises(ValueError, match="late_weight"):
        MetaTrainConfig(late_weight=-1.0)


def test_lr_horizon_schedule_scales_each_step_and_round_trips(tmp_path):
    """DeepMomentum's opt-in training-progress schedule: with ``lr_horizon = N`` step t moves the weights by
    exactly max(1 − (t − 1)/N, 1/N)^p times the unscheduled step (fp64, same memory trajectory): after N it keeps
    the last step size, never stopping; the multi-tensor path equals the per-tensor rule path, ``lr_horizon = 0``
    is today's optimizer, bad values are refused, and a learned optimizer saves N and p; ``load_learned`` (the
    ``meta-train`` evaluation) runs it over the evaluation's N, ``from_pretrained`` over ``total_steps``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(3, (32,))
    grads = []
    for _ in range(7):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])

    def deltas(**kw):  # the step each of 7 fixed gradient lists causes
        params = [p.detach().clone().requires_grad_() for p in model.parameters()]
        opt = deepopt.DeepMomentum(params, lr=0.01, hidden=4, key_dim=4, preconditioner="adam", **kw)
        out = []
        for gs in grads:
            before = [p.detach().clone() for p in params]
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
            out.append([p.detach() - b for p, b in zip(params, before)])
        return out

    plain = deltas()
    assert all(torch.equal(a, b) for da, db in zip(plain, deltas(lr_horizon=0)) for a, b in zip(da, db))
    for foreach in (None, False):
        scheduled = deltas(lr_horizon=5, lr_power=1.5, foreach=foreach)
        for t, (d_s, d_p) in enumerate(zip(scheduled, plain), start=1):
            h = max(1 - (t - 1) / 5, 1 / 5) ** 1.5
            for a, b in zip(d_s, d_p):
                torch.testing.assert_close(a, h * b, rtol=1e-12, atol=1e-15)
        assert all(a.abs().max() > 0 for d in scheduled[5:] for a in d)
    for bad, err in (({"lr_horizon": -1}, ValueError), ({"lr_horizon": 2.5}, TypeError),
                     ({"lr_power": -0.5}, ValueError)):
        with pytest.raises(err, match=next(iter(bad))):
            deepopt.DeepMomentum(model.parameters(), **bad)
    meta = MetaParams("deep_momentum", learn=("lr", "lr_power"), lr=0.01, lr_horizon=200, lr_power=0.7)
    save_pretrained(tmp_path, *meta.export())
    opt = load_learned(tmp_path, held_out_task("wine_mlp", 0).model.parameters())
    assert opt.defaults["lr_horizon"] == 200 and opt.defaults["lr_power"] == pytest.approx(0.7)
    opt = deepopt.DeepMomentum.from_pretrained(tmp_path, held_out_task("wine_mlp", 0).model.parameters())
    assert opt.defaults["lr_horizon"] == 0  # no run length given: no horizon, it trains for any number of steps
    opt = deepopt.DeepMomentum.from_pretrained(tmp_path, held_out_task("wine_mlp", 0).model.parameters(),
                                               total_steps=750)
    assert opt.defaults["lr_horizon"] == 750


@pytest.mark.parametrize("argv,message", [
    (["--preconditioner", "identity", "--beta2", "0.9"], "--beta2 and learning beta2 are the adam preconditioner's"),
    (["--preconditioner", "identity", "--learn", "lr,beta2"], "add --preconditioner adam"),
    (["--rule", "sgd", "--lr-horizon", "10"], "deep_momentum options, not ones of sgd"),
    (["--lr-horizon", "-1"], "lr_horizon must be an int >= 0"),
    (["--preconditioner", "identity", "--relative-eps", "1"], "--relative-eps is the adam preconditioner's"),
    (["--relative-eps", "-1"], "--relative-eps must be >= 0, got -1.0"),
])
def test_cli_refuses_schedule_and_beta2_misuse(tmp_path, argv, message, capsys):
    with pytest.raises(SystemExit):
        cli.main(["meta-train", "--smoke", "--no-progress", "--out", str(tmp_path / "run"), *argv])
    assert message in capsys.readouterr().err


def test_lm_cnn_and_general_families_are_held_out_from_the_evaluation_suite():
    """``lm``: byte-level GPTs (≤ 2 layers, ≤ 64 wide) on the standard library's *code*; ``cnn``: CNNs on synthetic
    8×8 images; ``general`` mixes them with digits MLPs and tabular/small problems.  Deterministic in the seed, and
    none is a task of ``deepopt evaluate``'s suite (no prose LM, no digits CNN, no breast cancer, no HOPE)."""
    from deepopt.meta_train.tasks import TinyLM

    lm = sample_task("lm", 4)
    x, y = lm.train_batch(3)
    assert lm.name.startswith("lm_code_") and x.shape == y.shape and torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(sample_task("lm", 4).train_batch(3)[0], x)
    assert isinstance(lm.model, TinyLM) and len(lm.model.blocks) <= 2 and lm.model.embed.weight.shape[1] <= 64
    assert 4.5 < float(lm.loss(lm.init_params(), (x, y))) < 6.5  # ≈ log 256 at init
    cnn = sample_task("cnn", 2)
    xc, yc = cnn.full_batch
    assert cnn.name.startswith("cnn_synth") and xc.shape[1] == 64 and 3 <= int(yc.max()) + 1 <= 10
    assert cnn.model(xc[:5]).shape == (5, int(yc.max()) + 1)
    names = [sample_task("general", seed).name for seed in range(40)]
    kinds = {n.split("_")[0] for n in names}
    assert {"lm", "cnn", "digits"} <= kinds and any("iris" in n or "teacher" in n or "f" in n[6:9] for n in names)
    assert not any("prose" in n or "breast" in n or "hope" in n for n in names)


def test_trainer_draws_a_horizon_per_task_and_unrolls_the_schedule_over_it(tmp_path):
    """``horizons``: each new task draws its horizon (deterministically), a slot keeps its task that long, and a
    scheduled rule is unrolled with ``lr_horizon`` = the task's horizon; checkpoints carry it (and PES particles)."""
    config = MetaTrainConfig(rule="deep_momentum", family="quadratic", estimator="pes", es_pairs=2, unroll=2,
                             horizons=[2, 4, 6], tasks_per_step=3, meta_steps=3, save_every=1,
                             hparams={"lr": 0.05, "keys": "momenta", "hidden": 3, "preconditioner": "adam",
                                      "lr_horizon": 100})
    trainer = MetaTrainer(config, tmp_path)
    trainer.meta_step()
    horizons = [s.horizon for s in trainer.slots]
    assert set(horizons) <= {2, 4, 6} and horizons == [trainer._horizon_of(s.seed) for s in trainer.slots]
    assert all(trainer._unroll(s.task, s.horizon).overrides == {"lr_horizon": s.horizon} for s in trainer.slots)
    assert all(s.inner.particles is not None for s in trainer.slots)
    trainer.save()
    again = MetaTrainer(config, tmp_path)
    assert [s.horizon for s in again.slots] == horizons and again.cpu_seconds == trainer.cpu_seconds
    with pytest.raises(ValueError, match="multiples of unroll"):
        MetaTrainConfig(unroll=2, horizons=[3])


def test_cli_config_file_sets_options_and_the_command_line_wins(tmp_path, capsys):
    """``--config FILE`` (a shipped recipe) sets options by name; an option on the command line wins, before or
    after it; an unknown key, a bad value or a broken file is refused in one line, before any compute."""
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"family": "quadratic", "meta_steps": 2, "unroll": 2, "horizons": [2, 4],
                                  "keys": "momenta", "hidden": 3, "eval_tasks": "wine_mlp", "eval_steps": 4,
                                  "eval_seeds": 1, "estimator": "pes", "es_pairs": 2}))
    out = tmp_path / "run"
    assert cli.main(["meta-train", "--no-progress", "--meta-steps", "1", "--config", str(recipe), "--out",
                     str(out), "--adam-lrs", "0.01", "--adam-decays", "", "--momentum-lrs", "0.1"]) == 0
    config = json.loads((out / "report.json").read_text())["config"]
    assert config["meta_steps"] == 1 and config["family"] == "quadratic" and config["horizons"] == [2, 4]
    assert config["estimator"] == "pes" and config["hparams"]["keys"] == "momenta"
    for content, message in (({"no_such": 1}, "'no_such' is not a meta-train option"),
                             ({"family": "nope"}, "family must be one of"), ("{", "not valid JSON")):
        recipe.write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["meta-train", "--config", str(recipe), "--out", str(tmp_path / "bad")])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("flag,name", [("--activation", "ACTIVATIONS"), ("--lr-adapt", "LR_ADAPTATIONS")])
def test_meta_train_cli_offers_every_choice_of_the_rule(flag, name):
    """``--activation`` and ``--lr-adapt`` list their choices literally (the CLI does not import the rules to build
    its parser); they must be the deep rule's ``ACTIVATIONS`` and ``LR_ADAPTATIONS``."""
    from deepopt.rules import deep

    parser = cli.build_parser("meta-train")
    sub = next(a for a in parser._actions if a.choices and "meta-train" in a.choices).choices["meta-train"]
    action = next(a for a in sub._actions if flag in a.option_strings)
    assert tuple(action.choices) == tuple(getattr(deep, name))


def test_relative_eps_is_meta_trained_with_and_saved(tmp_path):
    """``--relative-eps κ`` runs the inner loops with Adam's floored denominator (the rule's state carries ρ and q)
    and the saved optimizer keeps κ, so ``from_pretrained`` steps as meta-training did."""
    out = tmp_path / "run"
    assert cli.main(["meta-train", "--smoke", "--no-progress", "--relative-eps", "2.5", "--keys", "momenta",
                     "--out", str(out)]) == 0
    config = json.loads((out / "optimizer" / "config.json").read_text())
    assert config["hparams"]["relative_eps"] == 2.5
    params = [torch.nn.Parameter(torch.randn(6, 4))]
    opt = deepopt.DeepMomentum.from_pretrained(out / "optimizer", params, total_steps=5)
    params[0].grad = torch.randn(6, 4)
    opt.step()
    assert opt.defaults["relative_eps"] == 2.5 and float(opt.state[params[0]]["peak_rms"]) > 0
