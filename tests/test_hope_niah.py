"""S-NIAH-style needle tasks: the needle holds the answer, removing it leaves the rest, ``hope niah --task``."""

import json

import pytest
import torch
from torch import nn

from deepopt.cli import main
from deepopt.hope import data, niah


@pytest.mark.parametrize("task", niah.TASKS)
def test_the_answer_is_in_the_needle_and_only_there(task):
    prose = data.load_corpus("prose", max_bytes=200_000).train
    x, y = niah.niah_batch(task, prose, 3, 400, 0, 5)
    gone, y_gone = niah.niah_batch(task, prose, 3, 400, 0, 5, needle=False)
    assert x.shape == y.shape == gone.shape == (3, 400) and torch.equal(y, y_gone)
    for b in range(3):
        value = data.decode(y[b][y[b] != -100])
        text, removed = data.decode(x[b]), data.decode(gone[b])
        assert len(value) == (8 if task == "s-niah-3" else 7)
        key = text.rsplit("special magic number for ", 1)[1].split(" ")[0]
        assert f"magic numbers for {key} is: {value}." in text  # the asked needle holds the answer
        assert f"for {key} is: {value}" not in removed  # and with it removed, nothing else does
        assert text.count("special magic numbers for") == (niah.MK_NEEDLES if task == "mk-niah" else 1)
        assert removed.count("special magic numbers for") == text.count("special magic numbers for") - 1
    with pytest.raises(ValueError, match="length"):
        niah.niah_batch(task, prose, 1, 100, 0, 0)


class _Reader(nn.Module):
    """A stand-in model: logits at t from token t's embedding alone (``window=False``), or from the sum of
    every embedding up to t (``window=True``), which spreads the answer's gradient evenly over the prefix."""

    def __init__(self, window: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head, self.window = nn.Embedding(256, 8), nn.Linear(8, 256), window

    def forward(self, x):
        e = self.embed(x)
        return self.head(e.cumsum(1) if self.window else e), None


def test_needle_gradient_share_is_zero_for_a_model_blind_to_the_past_and_the_needle_fraction_for_an_even_one():
    prose = data.load_corpus("prose", max_bytes=200_000).val
    share, fraction = niah.needle_gradient_share(_Reader(window=False), "s-niah-2", prose, 300, 6, 4, 0)
    assert share == 0 and 0.1 < fraction < 0.3  # the needle is ~58 of 300 tokens
    model = _Reader(window=True)
    share, again = niah.needle_gradient_share(model, "s-niah-2", prose, 300, 6, 4, 0)
    assert again == fraction and abs(share - fraction) < 0.05
    assert not model.embed._forward_hooks and all(p.grad is None for p in model.parameters())  # no leftovers


def test_niah_task_smoke_reports_accuracy_with_and_without_the_needle(tmp_path):
    out = tmp_path / "niah"
    assert main(["hope", "niah", "--smoke", "--task", "s-niah-1", "--context", "192", "--eval-contexts", "192", "384",
                 "--out", str(out), "--threads", "1", "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "s-niah-1" and report["chance_digit_accuracy"] == 0.1
    for row in report["runs"]:
        assert 0 <= row["digit_accuracy"] <= 1 and 0 <= row["digit_accuracy_needle_removed"] <= 1
        assert 0 <= row["needle_gradient_share"] <= 1 and 0 < row["needle_token_fraction"] < 1
    assert {r["context"] for r in report["runs"]} == {192, 384}
