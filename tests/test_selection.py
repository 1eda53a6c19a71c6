"""``deepopt select``: meta-trained candidates scored on the validation suite against tuned AdamW, the choice, its
outputs and resume, and the suite's separation from the held-out one."""

import json
import math

import pytest
from deepopt.meta_train.tasks import FAMILIES

from deepopt import cli
from deepopt.evaluate import TASKS, VALIDATION_TASKS, build_problem
from deepopt.selection import score


def test_smoke_selection_scores_each_candidate_from_its_runs_and_resumes(tmp_path, learned, capsys):
    """Two candidates share one AdamW sweep; each score is the mean log ratio of its untuned loss to tuned AdamW's,
    recomputed here from runs.jsonl; the chosen one has the lowest; --resume reruns nothing."""
    out = tmp_path / "sel"
    argv = ["select", str(learned), "adam:lr=0.003", "--smoke", "--out", str(out)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    runs = [json.loads(line)["value"] for line in (out / "runs.jsonl").read_text().splitlines()]
    assert len(runs) == len(VALIDATION_TASKS) * (2 + 2)  # AdamW at the two smoke lrs, each candidate untuned
    selection = json.loads((out / "selection.json").read_text())
    assert selection["tasks"] == list(VALIDATION_TASKS)
    for c in selection["candidates"]:
        logs = []
        for task in VALIDATION_TASKS:
            adamw = min((r for r in runs if r["task"] == task and r["method"] == "adamw"), key=lambda r: r["final"])
            mine = [r for r in runs if r["task"] == task and r["method"] == "learned" and r["optimizer"] ==
                    c["optimizer"]]
            assert len(mine) == 1 and c["tasks"][task]["adamw_lr"] == adamw["lr"]
            logs.append(math.log(mine[0]["final"] / adamw["final"]))
        assert c["score"] == pytest.approx(sum(logs) / len(logs))
    scores = {c["optimizer"]: c["score"] for c in selection["candidates"]}
    assert selection["chosen"] == min(scores, key=scores.get) and f"chosen: {selection['chosen']}" in text
    assert f"**{selection['chosen']}** (chosen)" in (out / "table.md").read_text()
    lines = (out / "runs.jsonl").read_text().splitlines()
    assert cli.main([*argv, "--resume"]) == 0
    assert "[1/" not in capsys.readouterr().out and (out / "runs.jsonl").read_text().splitlines() == lines


def test_score_tunes_adamw_by_mean_and_a_diverged_candidate_is_never_chosen():
    row = lambda task, method, lr, seed, final, opt="": dict(task=task, method=method, lr=lr, seed=seed,  # noqa: E731
                                                             final=final, optimizer=opt)
    results = [row("t", "adamw", 0.01, 0, 1.0), row("t", "adamw", 0.01, 1, 3.0),  # mean 2.0
               row("t", "adamw", 0.1, 0, 0.5), row("t", "adamw", 0.1, 1, 2.5),    # mean 1.5: tuned
               row("t", "learned", 1.0, 0, 1.0, "a"), row("t", "learned", 1.0, 1, 2.0, "a"),
               row("t", "learned", 1.0, 0, 0.1, "b"), row("t", "learned", 1.0, 1, math.inf, "b")]
    a, b = score(results, "a", ["t"]), score(results, "b", ["t"])
    assert a["tasks"]["t"]["adamw_lr"] == 0.1 and a["tasks"]["t"]["ratio"] == pytest.approx(1.0)
    assert a["score"] == pytest.approx(0.0) and a["at_most_adamw"] == 1
    assert b["score"] == math.inf and b["at_most_adamw"] == 0


@pytest.mark.parametrize("argv,message", [
    (["nosuch"], "CANDIDATE 'nosuch' is not a shipped learned optimizer"),
    (["adam", "adam"], "CANDIDATE: each at most once"),
    (["adam", "--seeds", "0"], "--seeds must be >= 1"),
    (["dmgd-dog", "dmgd-dog:hidden=-1"], "CANDIDATE 'dmgd-dog:hidden=-1': hidden must be an int >= 0"),
    (["dmgd-dog", "dmgd-dog:seed=0"], "CANDIDATE 'dmgd-dog:seed=0' builds the same optimizer as 'dmgd-dog'"),
    (["momentum", "momentum:momentum=0.9"], "'momentum:momentum=0.9' builds the same optimizer as 'momentum'"),
])
def test_bad_candidates_are_one_line_and_leave_no_folder(tmp_path, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["select", "--smoke", *argv, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_validation_tasks_are_neither_held_out_nor_in_a_family():
    """The validation suite shares no task with the held-out one, each task is built the same from its seed, and
    no member of a meta-training family drawn from seeds 0–59 has its parameter shapes."""
    assert not set(VALIDATION_TASKS) & set(TASKS)
    family_shapes = {tuple(tuple(p.shape) for p in FAMILIES[f](s).model.parameters())
                     for f in ("general", "broad", "cnn", "lm") for s in range(60)}
    for task in VALIDATION_TASKS:
        a, b = build_problem(task, 1, smoke=False), build_problem(task, 1, smoke=False)
        assert [p.tolist() for p in a.model.parameters()] == [p.tolist() for p in b.model.parameters()]
        assert a.val_loss(a.model) == pytest.approx(b.val_loss(b.model))
        assert tuple(tuple(p.shape) for p in a.model.parameters()) not in family_shapes, task
