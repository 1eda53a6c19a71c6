"""MQAR (Zoology multi-query associative recall): the task's structure, bad settings, ``deepopt hope mqar --smoke``."""

import csv
import json
import re

import pytest
import torch

from deepopt.cli import main
from deepopt.hope.mqar import check_setting, mqar_batch


@pytest.mark.parametrize("seq_len, n_pairs", [(64, 4), (64, 16), (256, 64), (129, 8)])
def test_every_query_asks_a_key_of_the_context_and_scores_its_value(seq_len, n_pairs):
    vocab = 8192
    x, y = mqar_batch(3, seq_len, n_pairs, vocab, torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (3, seq_len)
    for b in range(3):
        keys, values = x[b, 0:2 * n_pairs:2], x[b, 1:2 * n_pairs:2]
        assert len(set(keys.tolist())) == n_pairs and (keys >= 1).all() and (keys < vocab // 2).all()
        assert (values >= vocab // 2).all() and (values < vocab).all()
        answer = dict(zip(keys.tolist(), values.tolist()))
        scored = (y[b] != -100).nonzero().flatten()
        assert len(scored) == n_pairs and (scored >= 2 * n_pairs).all()  # queries come after the pairs
        asked = [int(x[b, t]) for t in scored]
        assert sorted(asked) == sorted(answer)  # every key asked once
        assert all(int(y[b, t]) == answer[int(x[b, t])] for t in scored)
        after = scored[scored + 1 < seq_len] + 1
        echoed = sum(int(x[b, t]) == int(y[b, t - 1]) for t in after)
        assert echoed <= 1  # as in Zoology the input after a query is noise, not its value
    again = mqar_batch(3, seq_len, n_pairs, vocab, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], x) and torch.equal(again[1], y)


@pytest.mark.parametrize("seq_len, n_pairs, vocab", [(15, 4, 8192), (64, 0, 8192), (64, 8, 16)])
def test_impossible_settings_are_rejected(seq_len, n_pairs, vocab):
    with pytest.raises(ValueError, match="pairs|keys"):
        check_setting(seq_len, n_pairs, vocab)


def test_mqar_smoke_writes_report_results_and_a_plot_per_model(tmp_path, capsys):
    out = tmp_path / "mqar"
    assert main(["hope", "mqar", "--smoke", "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["vocab_size"] == 8192
    assert set(report["accuracy"]) == {"hope d32", "transformer-conv d32", "transformer d32"}  # the recall default
    n = report["n_params"]
    assert abs(n["hope d32"] - n["transformer d32"]) / n["hope d32"] < 0.01  # equal parameters
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["model"] for r in rows} == {"hope", "transformer-conv", "transformer"}
    assert all(0 <= float(r["accuracy"]) <= 1 for r in rows)
    assert (out / "accuracy_hope.png").stat().st_size > 0 and (out / "accuracy_transformer.png").stat().st_size > 0
    with pytest.raises(SystemExit) as exit_info:
        main(["hope", "mqar", "--smoke", "--train-settings", "16x8", "--out", str(tmp_path / "bad")])
    assert exit_info.value.code == 2
    assert re.search(r"16x8.*length >= 4 x pairs", capsys.readouterr().err)
