"""In-context learning ablations: η-at-cap fraction, ``in_context_ablations`` and ``hope eval --ablations``."""

import json
import math

import pytest
import torch

from deepopt.cli import main
from deepopt.hope.ablation import eta_saturation, in_context_ablations, mean_nll
from deepopt.hope.model import LanguageModel
from deepopt.hope.train import model_config


def batches(vocab: int = 256, n: int = 2):
    gen = torch.Generator().manual_seed(0)
    return [(x[:, :-1], x[:, 1:]) for x in (torch.randint(0, vocab, (2, 25), generator=gen) for _ in range(n))]


def test_eta_saturation_counts_steps_at_the_cap():
    torch.manual_seed(0)
    model = LanguageModel(model_config("hope", "smoke"))
    data = batches()
    assert 0 <= eta_saturation(model, data) < 0.05  # sigmoid(b_η = −1) is far from the cap
    for bias, expected in ((1e4, 1.0), (-1e4, 0.0)):
        for blk in model.blocks:
            blk.titans.f.b_eta.data.fill_(bias)
        assert eta_saturation(model, data) == expected
    assert all(blk.titans.f.eta_log is None for blk in model.blocks)  # recording is switched off again
    assert eta_saturation(LanguageModel(model_config("transformer", "smoke")), data) is None


def test_ablations_switch_each_part_off_and_leave_the_model_learning():
    torch.manual_seed(0)
    model = LanguageModel(model_config("hope", "smoke"))
    with torch.no_grad():
        for blk in model.blocks:  # make the memories move enough to matter
            blk.titans.f.b_eta.fill_(3.0)
    data = batches()
    full = mean_nll(model, data)
    out = in_context_ablations(model, data)
    assert out["val_loss"] == full
    for name in ("no_cms_updates", "no_titans_updates"):
        assert out[f"val_loss_{name}"] != full
        assert out[f"ppl_ratio_{name}"] == pytest.approx(math.exp(out[f"val_loss_{name}"] - full), rel=1e-12)
    assert mean_nll(model, data) == full  # every memory learns again afterwards


def test_eval_ablations_and_switches_from_the_cli(tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--no-progress", "--threads", "1"]
    assert main(["hope", "train", "--smoke", "--cms-periods", "4,8,inf", "--out", str(run), *common]) == 0
    assert json.loads((run / "report.json").read_text())["config"]["cms_periods"] == [4, 8, None]
    with pytest.raises(SystemExit):
        main(["hope", "train", "--smoke", "--cms-periods", "0,inf", "--out", str(tmp_path / "bad"), *common])
    assert "--cms-periods" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    reports = {}
    for name, flags in (("full", ["--ablations"]), ("no-cms", ["--no-cms-updates"])):
        out = tmp_path / name
        assert main(["hope", "eval", "--smoke", "--checkpoint", str(run), "--domains", "code", "--out", str(out),
                     *flags, *common]) == 0
        reports[name] = json.loads(next(out.glob("*report.json")).read_text())["results"]["code"]
    full = reports["full"]
    assert {"ppl_ratio_no_cms_updates", "ppl_ratio_no_titans_updates", "eta_at_cap"} <= set(full)
    assert 0 <= full["eta_at_cap"] <= 1
    assert reports["no-cms"]["val_loss"] == pytest.approx(full["val_loss_no_cms_updates"], rel=1e-6)
