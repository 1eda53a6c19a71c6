"""Class-incremental continual learning (which stdlib package?): snippets, labels, ``hope class-incremental``."""

import json

import pytest
import torch

from deepopt.cli import main
from deepopt.hope import continual, data


def test_snippets_come_from_their_class_and_score_only_the_label():
    streams = continual.package_streams(("email", "xml"))
    train = [streams["email"][0], streams["xml"][0]]
    x, y = continual.snippet_batch(train, [0, 1], 4, 40, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 40) and (x < data.VOCAB_SIZE).all()
    assert (y[:, :-1] == -100).all() and y[:, -1].tolist() == [256, 257, 256, 257]
    for b in range(4):  # the bytes are a window of the class's own source
        src = bytes(train[b % 2].tolist())
        assert bytes(x[b].tolist()) in src
    test_email = streams["email"][1]
    assert bytes(test_email[:200].tolist()) not in bytes(streams["email"][0].tolist())  # held-out part
    with pytest.raises(ValueError, match="too little source"):
        continual.package_streams(("no_such_package",))


def test_class_incremental_smoke_reports_retention_per_task(tmp_path, capsys):
    out = tmp_path / "cil"
    assert main(["hope", "class-incremental", "--smoke", "--models", "hope", "hope-carry", "transformer", "--out",
                 str(out), "--threads", "1", "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["chance"] == 0.25 and report["tasks"] == [[0, 1], [2, 3]]
    for model in ("hope", "hope-carry", "transformer"):
        s = report["summary"][model]
        assert len(s["accuracy_matrix"]) == 2 and len(s["retention"]) == 2
        assert all(0 <= a <= 1 for row in s["accuracy_matrix"] for a in row)
    assert (out / "accuracy.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        main(["hope", "class-incremental", "--smoke", "--packages", "email", "xml", "http", "--out",
              str(tmp_path / "bad")])
    assert "multiple of --classes-per-task" in capsys.readouterr().err
