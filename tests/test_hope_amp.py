"""``--amp bf16``: the forward pass runs in bfloat16 under autocast and HOPE / Transformer++ still train."""

import json

import pytest
import torch

from deepopt.cli import main
from deepopt.hope.data import load_corpus, train_batch
from deepopt.hope.model import LanguageModel
from deepopt.hope.train import Trainer, make_optimizer, model_config


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # conftest's fixture puts the count back


def losses(variant: str, amp: str, steps: int = 30) -> tuple[list[float], LanguageModel]:
    corpus = load_corpus("code", max_bytes=200_000)
    torch.manual_seed(0)
    model = LanguageModel(model_config(variant, "smoke"))
    trainer = Trainer(model, make_optimizer("adamw", model, 1e-2, 0.0), lr=1e-2, steps=steps, warmup=2, amp=amp)
    return [trainer.step(*train_batch(corpus.train, 4, 48, 0, s)) for s in range(steps)], model


@pytest.mark.parametrize("variant", ["hope", "transformer"])
def test_bf16_autocast_trains_like_float32(variant):
    fp32, _ = losses(variant, "none")
    bf16, model = losses(variant, "bf16")
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(torch.randint(0, 256, (1, 20)))
    assert logits.dtype == torch.bfloat16  # the forward really runs in bf16
    assert bf16 != fp32
    first, last = sum(bf16[:5]) / 5, sum(bf16[-5:]) / 5
    assert last < first - 0.5  # it learns
    assert abs(last - sum(fp32[-5:]) / 5) < 0.15  # and about as well as in float32


def test_amp_flag_reaches_the_run_and_bad_values_are_refused(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["hope", "train", "--smoke", "--amp", "bf16", "--out", str(out), "--threads", "1", "--no-progress"]
    assert main(args) == 0
    assert json.loads((out / "report.json").read_text())["args"]["amp"] == "bf16"
    with pytest.raises(ValueError, match="amp"):
        Trainer(LanguageModel(model_config("hope", "smoke")), None, lr=1.0, steps=1, amp="fp8")
