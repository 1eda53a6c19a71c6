"""The recall evaluations' fairness machinery: Transformer++'s short conv, equal lr tuning, the plateau diagnostic."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from deepopt.cli import main
from deepopt.hope import niah
from deepopt.hope.model import HopeConfig, LanguageModel, n_params
from deepopt.hope.mqar import mqar_config, mqar_eval
from deepopt.hope.recall import RUNS_FILE, plateau, tuned_runs


def test_transformer_conv_is_parameter_matched_causal_and_used():
    hope, plain, conv = (LanguageModel(mqar_config(v, 64, 2, 512)) for v in ("hope", "transformer", "transformer-conv"))
    assert conv.cfg.short_conv == 4 and plain.cfg.short_conv == 0
    assert n_params(conv.cfg) == n_params(plain.cfg) and abs(n_params(conv.cfg) - n_params(hope.cfg)) < 64
    assert conv.cfg.ffn_hidden < plain.cfg.ffn_hidden  # the conv's taps come out of the FFN
    assert all(b.attn.f.conv.weight.shape == (4, 3 * 64) for b in conv.blocks)
    torch.manual_seed(0)
    x = torch.randint(0, 512, (2, 24))
    later = x.clone()
    later[:, 12:] = torch.randint(0, 512, (2, 12))
    conv.eval()
    with torch.no_grad():
        a, b = conv(x)[0], conv(later)[0]
        assert torch.equal(a[:, :12], b[:, :12]) and not torch.allclose(a[:, 12:], b[:, 12:])  # causal
        for blk in conv.blocks:
            blk.attn.f.conv.weight[1:].zero_()  # identity taps: the conv does nothing
        shifted = conv(x)[0]
    assert not torch.allclose(a, shifted)  # the earlier taps change the output


@pytest.mark.parametrize("bad", [-1, True, 2.0])
def test_short_conv_rejects_bad_widths_and_hope(bad):
    with pytest.raises(ValueError, match="short_conv"):
        HopeConfig(model="transformer", short_conv=bad)
    with pytest.raises(ValueError, match="short_conv"):
        HopeConfig(model="hope", short_conv=4)
    cfg = HopeConfig(model="transformer", short_conv=4)
    assert HopeConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


class _Answerer(nn.Module):
    """Answers each MQAR query with the asked key's value (``bind``) or with the sequence's first value."""

    def __init__(self, n_pairs: int, bind: bool, vocab: int = 512) -> None:
        super().__init__()
        self.embed, self.n, self.bind, self.vocab = nn.Embedding(vocab, 1), n_pairs, bind, vocab

    def forward(self, x):
        keys, values = x[:, 0:2 * self.n:2], x[:, 1:2 * self.n:2]
        hit = x[:, :, None] == keys[:, None, :]  # (B, T, n): which pair's key sits at t
        value = (hit * values[:, None, :]).sum(-1) if self.bind else values[:, :1].expand_as(x)
        return nn.functional.one_hot(value, self.vocab).float(), None


@pytest.mark.parametrize("n_pairs", [4, 8])
def test_plateau_flags_a_value_copied_without_its_key_and_not_recall(n_pairs):
    copy = mqar_eval(_Answerer(n_pairs, bind=False), 64, n_pairs, 64, 16, 0, 512)
    assert copy["value_share"] == 1 and abs(copy["accuracy"] - 1 / n_pairs) < 0.06
    assert copy["copy_plateau"] and abs(copy["bound_share"] - 1 / n_pairs) < 0.06
    recall = mqar_eval(_Answerer(n_pairs, bind=True), 64, n_pairs, 64, 16, 0, 512)
    assert recall == {"accuracy": 1.0, "value_share": 1.0, "bound_share": 1.0, "copy_plateau": False}
    assert not plateau(0.0, 0.0, 4)["copy_plateau"]  # answers no value at all: not this plateau
    assert not plateau(0.25, 0.25, 1)["copy_plateau"]  # one value: nothing to confuse it with


def test_mk_niah_values_line_up_with_the_answer_for_every_needle():
    from deepopt.hope import data

    prose = data.load_corpus("prose", max_bytes=200_000).train
    x, y, values = niah._niah_batch("mk-niah", prose, 3, 400, 0, 1)
    assert values.shape == (3, niah.MK_NEEDLES, 400)
    for b in range(3):
        answer = y[b] != -100
        text = data.decode(x[b])
        rows = [data.decode(v[answer]) for v in values[b]]
        assert data.decode(y[b][answer]) in rows  # the asked value is one of them
        assert all(f"is: {v}." in text for v in rows)  # every value is a needle's in the context
        assert (values[b][:, ~answer] == -1).all()


def _fake_train(scores):
    calls = []

    def train(model, lr, seed):
        calls.append((model, lr, seed))
        val, loss, diverged = scores[(model, lr)]
        return {"val_accuracy": val, "final_train_loss": loss, "diverged": diverged, "eval": [], "seed_seen": seed}

    return train, calls


def test_tuned_runs_sweeps_at_the_first_seed_and_runs_the_rest_at_the_best_lr(tmp_path):
    from deepopt.runs import JsonLines

    scores = {("a", 1.0): (0.5, 1.0, False), ("a", 2.0): (0.9, 2.0, False), ("a", 3.0): (0.0, 9.9, True),
              ("b", 1.0): (0.7, 0.4, False), ("b", 2.0): (0.7, 0.3, False), ("b", 3.0): (0.7, 0.2, True)}
    train, calls = _fake_train(scores)
    log = JsonLines(tmp_path / RUNS_FILE, resume=False)
    runs, best = tuned_runs(["a", "b"], [1.0, 2.0, 3.0], [0, 5, 6], train, log)
    assert best == {"a": 2.0, "b": 2.0}  # b: a tie on accuracy goes to the lower loss; a diverged run never wins
    assert calls == [("a", 1.0, 0), ("a", 2.0, 0), ("a", 3.0, 0), ("a", 2.0, 5), ("a", 2.0, 6),
                     ("b", 1.0, 0), ("b", 2.0, 0), ("b", 3.0, 0), ("b", 2.0, 5), ("b", 2.0, 6)]
    assert [r["best_lr"] for r in runs[:5]] == [False, True, False, True, True]
    assert [r["sweep"] for r in runs[:5]] == [True, True, True, False, False]
    again, calls2 = _fake_train(scores)  # resumed: every run is read back, none trained
    runs2, best2 = tuned_runs(["a", "b"], [1.0, 2.0, 3.0], [0, 5, 6], again,
                              JsonLines(tmp_path / RUNS_FILE, resume=True))
    assert calls2 == [] and best2 == best and [r["seed_seen"] for r in runs2] == [r["seed_seen"] for r in runs]


def _seeded_train(model, lr, seed):
    """A run whose numbers depend on its model, lr and seed only, through torch's global RNG (as a real run's)."""
    torch.manual_seed(seed + 1000 * int(lr * 1e3) + (model == "b"))
    val = float(torch.rand(())) + (0.5 if lr == 2.0 else 0.0)
    return {"val_accuracy": val, "final_train_loss": float(torch.randn(())), "diverged": False, "eval": [],
            "pid": os.getpid()}


def test_parallel_jobs_run_the_same_runs_in_other_processes_and_resume(tmp_path):
    from deepopt.runs import JsonLines

    args = (["a", "b"], [1.0, 2.0, 3.0], [0, 5, 6], _seeded_train)
    serial, best = tuned_runs(*args, JsonLines(tmp_path / "serial.jsonl", resume=False))
    log = JsonLines(tmp_path / RUNS_FILE, resume=False)
    parallel, best2 = tuned_runs(*args, log, jobs=3, threads=1)
    assert best2 == best == {"a": 2.0, "b": 2.0}
    strip = ("pid", "wall_s", "cpu_s")
    assert [{k: v for k, v in r.items() if k not in strip} for r in parallel] == \
        [{k: v for k, v in r.items() if k not in strip} for r in serial]
    assert os.getpid() not in {r["pid"] for r in parallel} and len({r["pid"] for r in parallel}) == 10
    assert len(log.done) == 10  # every run logged by this process
    again = JsonLines(tmp_path / RUNS_FILE, resume=True)
    assert tuned_runs(*args[:3], lambda *a: pytest.fail("resumed runs are read back"), again, jobs=2)[1] == best


def test_a_failed_parallel_run_stops_the_others_and_keeps_the_finished_ones(tmp_path):
    from deepopt.runs import JsonLines

    def train(model, lr, seed):
        if lr == 3.0:
            raise FloatingPointError("lr 3 blew up")
        return _seeded_train(model, lr, seed)

    log = JsonLines(tmp_path / RUNS_FILE, resume=False)
    with pytest.raises(RuntimeError, match=r"(?s)\('a', 3\.0, 0\) failed.*FloatingPointError: lr 3 blew up"):
        tuned_runs(["a"], [1.0, 2.0, 3.0], [0, 5], train, log, jobs=2, threads=1)
    assert set(JsonLines(tmp_path / RUNS_FILE, resume=True).done) <= {"a|lr=1|seed=0", "a|lr=2|seed=0"}


def test_niah_jobs_match_one_process_and_bad_jobs_are_refused(tmp_path, capsys):
    common = ["hope", "niah", "--smoke", "--task", "s-niah-1", "--context", "160", "--models", "hope",
              "transformer-conv", "--lrs", "3e-3", "1e-2", "--seeds", "0", "1", "--steps", "2", "--batch-size", "2",
              "--eval-samples", "2", "--threads", "1", "--no-progress"]
    reports = []
    for jobs in ("1", "2"):
        assert main([*common, "--jobs", jobs, "--out", str(tmp_path / jobs)]) == 0
        runs = [json.loads(line) for line in (tmp_path / jobs / RUNS_FILE).read_text().splitlines()]
        reports.append({r["key"]: {k: r["value"][k] for k in ("final_train_loss", "loss_curve", "val_accuracy",
                                                                "eval")} for r in runs if r["key"] != "identity"})
    assert reports[0] == reports[1] and len(reports[0]) == 6
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*common, "--jobs", "0", "--out", str(tmp_path / "bad")])
    assert exit_info.value.code == 2
    assert "--jobs must be >= 1" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_jobs_run_on_the_cpu_only():
    from argparse import Namespace

    from deepopt.hope.recall import check_jobs

    args = Namespace(jobs=2, progress=True)
    with pytest.raises(ValueError, match="--jobs 2: parallel runs are CPU processes"):
        check_jobs(args, torch.device("cuda"))
    with pytest.raises(ValueError, match="torchrun"):
        check_jobs(args, torch.device("cpu"), world=2)
    check_jobs(args, torch.device("cpu"))
    assert args.progress is False


def test_mqar_sweep_reports_every_lr_and_resumes_from_its_runs(tmp_path, capsys):
    out = tmp_path / "mqar"
    common = ["hope", "mqar", "--smoke", "--models", "transformer-conv", "transformer", "--lrs", "1e-3", "1e-2",
              "--seeds", "0", "1", "--threads", "1", "--no-progress", "--out", str(out)]
    assert main(common) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["sweep"]) == {"transformer-conv d32", "transformer d32"}
    assert all(set(v) == {"0.001", "0.01"} for v in report["sweep"].values())
    assert set(report["best_lr"].values()) <= {1e-3, 1e-2} and report["lrs"] == [1e-3, 1e-2]
    lines = (out / RUNS_FILE).read_text().splitlines()
    assert len(lines) == 1 + 2 * 2 + 2 * 1  # identity, the sweep at seed 0, seed 1 at the best lr
    cell = report["table"]["transformer d32"]["64x4"]
    assert cell["seeds"] == 2 and {"value_share", "bound_share", "copy_plateau"} <= set(cell)
    # a killed run: its report is gone, its runs.jsonl stays; --resume reads the runs back (a marked value shows)
    entries = [json.loads(line) for line in lines]
    entries[1]["value"]["val_accuracy"] = 0.777
    (out / RUNS_FILE).write_text("".join(json.dumps(e) + "\n" for e in entries))
    (out / "report.json").unlink()
    assert main([*common, "--resume"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["sweep"]["transformer-conv d32"]["0.001"]["val_accuracy"] == 0.777
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # other options than the killed run's
        main([*common[:-2], "--steps", "7", "--out", str(out), "--resume"])
    assert exit_info.value.code == 2 and "--resume: options differ" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["hope", "mqar", "--smoke", "--lr", "1e-3", "--lrs", "1e-2", "--out", str(tmp_path / "both")])
    assert exit_info.value.code == 2 and "--lr" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["hope", "mqar", "--smoke", "--lrs", "0", "--out", str(tmp_path / "zero")])
    assert exit_info.value.code == 2 and "--lrs" in capsys.readouterr().err


def test_mqar_heads_and_memory_width_reach_every_model_and_bad_values_are_refused(tmp_path, capsys):
    out = tmp_path / "mqar"
    assert main(["hope", "mqar", "--smoke", "--models", "hope", "transformer-conv", "--widths", "32", "--heads", "1",
                 "--mem-hidden", "8", "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    configs = json.loads((out / "report.json").read_text())["model_configs"]
    assert configs["hope d32"]["n_heads"] == configs["transformer-conv d32"]["n_heads"] == 1
    assert configs["hope d32"]["mem_hidden"] == 8
    hope, conv = (HopeConfig(**configs[k]) for k in ("hope d32", "transformer-conv d32"))
    assert abs(n_params(conv) - n_params(hope)) < 64  # the baseline's FFN re-matched to the narrower memory
    assert n_params(hope) < n_params(HopeConfig(**{**configs["hope d32"], "mem_hidden": 16}))
    for flags, named in ((["--heads", "5"], "--heads"), (["--heads", "16"], "--heads"),  # 48/16: odd heads (RoPE)
                         (["--heads", "0"], "--heads"), (["--mem-hidden", "0"], "--mem-hidden")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main(["hope", "mqar", "--smoke", "--widths", "48", *flags, "--out", str(tmp_path / "bad")])
        assert exit_info.value.code == 2 and named in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_resume_may_add_models_and_reads_back_those_already_trained(tmp_path):
    out = tmp_path / "mqar"
    common = ["hope", "mqar", "--smoke", "--vocab-size", "512", "--threads", "1", "--no-progress", "--out", str(out)]
    assert main([*common, "--models", "transformer"]) == 0
    first = json.loads((out / RUNS_FILE).read_text().splitlines()[1])
    assert main([*common, "--models", "transformer-conv", "transformer", "--resume"]) == 0
    entries = [json.loads(line) for line in (out / RUNS_FILE).read_text().splitlines()]
    assert [e["key"] for e in entries] == ["identity", first["key"], "d32|transformer-conv|lr=0.003|seed=0"]
    assert entries[1] == first  # read back, not trained again
    assert set(json.loads((out / "report.json").read_text())["table"]) == {"transformer d32", "transformer-conv d32"}


def test_recall_study_smoke_writes_both_reports_its_tables_and_its_time(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run(["bash", str(root / "benchmarks" / "hope_recall.sh"), "--smoke", str(tmp_path)], cwd=root,
                         env=env, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("mqar", "s-niah-1"):
        report = json.loads((tmp_path / name / "report.json").read_text())
        assert set(report["table"]) >= {"hope", "transformer-conv", "transformer"} or \
            set(report["table"]) >= {"hope d32", "transformer-conv d32", "transformer d32"}
        assert all(len(v) == 2 for v in report["sweep"].values())  # the smoke sweep: two lrs
    assert "| hope | " in res.stdout and "lr sweep" in res.stdout and "study (smoke)" in res.stdout
    timing = json.loads((tmp_path / "timing.json").read_text())
    assert timing["wall_s"] >= 0 and timing["cpu_s"] > 0
    again = subprocess.run(["bash", str(root / "benchmarks" / "hope_recall.sh"), "--smoke", str(tmp_path)], cwd=root,
                           env=env, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0 and again.stdout.count("done, skipped") == 2  # a finished study is not rerun
    bad = subprocess.run(["bash", str(root / "benchmarks" / "hope_recall.sh"), "--device", "tpu"], cwd=root,
                         env=env, capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2 and "--device takes cuda" in bad.stderr


def _bisect_module():
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "hope_mqar_bisect.py"
    spec = importlib.util.spec_from_file_location("hope_mqar_bisect", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mqar_bisect_variants_train_and_report():
    """``benchmarks/hope_mqar_bisect.py``: every variant trains (finite loss) and reports accuracies and bound
    shares in [0, 1]; a reference variant replaces the Titans branch of every block, ``hope`` keeps it."""
    bisect = _bisect_module()
    torch.set_num_threads(1)
    for variant in ("hope", *bisect.VARIANTS):
        r = bisect.run(variant, steps=2, lr=3e-3, seed=0, eval_samples=4)
        assert r["final_train_loss"] == pytest.approx(r["final_train_loss"]) and r["final_train_loss"] > 0
        for cell in ("64x4", "64x8", "128x4"):
            assert 0 <= r[cell]["accuracy"] <= 1 and 0 <= r[cell]["bound_share"] <= 1
    kinds = {type(b.titans.f).__name__ for b in bisect.build("delta", 0).blocks}
    assert kinds == {"ReferenceMemory"}
    assert {type(b.titans.f).__name__ for b in bisect.build("hope", 0).blocks} == {"SelfModifyingTitans"}
    with pytest.raises(ValueError, match="variant must be"):
        bisect.build("nope", 0)


def test_mqar_bisect_delta_memory_reads_back_orthonormal_writes():
    """The ``delta`` reference memory at β = 1 with orthonormal keys reads each written value back exactly."""
    bisect = _bisect_module()
    mem = bisect.ReferenceMemory(bisect.WIDTH, "delta")
    dh = mem.dh
    keys = torch.eye(dh)[:3]
    values = torch.randn(3, dh)
    q = torch.cat([keys, keys])  # three writes, then three reads of the same keys
    k = torch.cat([keys, torch.zeros(3, dh)])
    v = torch.cat([values, torch.zeros(3, dh)])
    with torch.no_grad():
        mem.beta.bias.fill_(1e4)  # β = 1 on the writes; the read tokens' zero keys write nothing
    mem._qkv = lambda x: tuple(t.expand(1, mem.H, -1, -1) for t in (q, k, v))
    mem.out = nn.Identity()
    y = mem(torch.zeros(1, 6, bisect.WIDTH)).view(1, 6, mem.H, dh)
    torch.testing.assert_close(y[0, 3:, 0], values)


def test_mqar_bisect_init_options():
    """``--orthogonal-w2`` makes the memory's static W₂ orthogonal with singular values 2; ``--kv-w1-std`` sets the
    std of M_k's and M_v's W₁."""
    bisect = _bisect_module()
    mem = bisect.build("mlp-memory", 0, orthogonal_w2=True).blocks[0].titans.f
    torch.testing.assert_close(torch.linalg.svdvals(mem.M2.detach()), torch.full((bisect.HEADS, mem.dh), 2.0))
    gauss = bisect.build("mlp-memory", 0).blocks[0].titans.f
    assert torch.linalg.svdvals(gauss.M2.detach()).min() < 1.5
    small = bisect.build("delta-separate-u", 0, kv_w1_std=0.02).blocks[0].titans.f
    big = bisect.build("delta-separate-u", 0).blocks[0].titans.f
    torch.testing.assert_close(small.W1 / 0.02, big.W1 / 0.5)


def test_recall_diag_pair_accuracy_counts_each_query_at_its_pair_and_gap():
    """``benchmarks/hope_recall_diag.py``'s MQAR breakdown: a model that recalls only the even-numbered pairs scores
    1 on those and 0 on the others, every query counted once, and its gap buckets add up to its accuracy."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "hope_recall_diag.py"
    spec = importlib.util.spec_from_file_location("hope_recall_diag", path)
    diag = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diag)
    vocab, length, pairs = 64, 64, 8

    class EvenPairs(nn.Module):
        def forward(self, x):
            logits = torch.zeros(*x.shape, vocab)
            for b in range(x.shape[0]):
                for t in range(2 * pairs, x.shape[1]):
                    hits = (x[b, 0:2 * pairs:2] == x[b, t]).nonzero()
                    if len(hits) and hits[0, 0] % 2 == 0:
                        logits[b, t, x[b, 2 * hits[0, 0] + 1]] = 1
            return logits, None

    out = diag.pair_accuracy(EvenPairs(), {"mqar_vocab": vocab}, length, pairs, samples=20, seed=0)
    assert [a for a, _ in out["by_pair_index"]] == [1.0, 0.0] * (pairs // 2)
    assert all(n == 20 for _, n in out["by_pair_index"])  # each pair is asked once per sequence
    gaps = out["by_gap_8_tokens"]
    assert sum(n for _, n in gaps) == 20 * pairs
    assert sum(a * n for a, n in gaps if n) == pytest.approx(20 * pairs / 2, abs=0.01)  # accuracies to 4 places
