"""Issue 14: every subcommand against the same bad paths and flags, and one test per item it lists.

The subcommands are discovered from ``deepopt.cli.build_parser()``, so one added later is covered the day
it is added.  A refusal must be exit status 2, one line on stderr naming the flag or file, and happen
before any compute: nothing but the run marker is written.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deepopt import __version__
from deepopt.cli import build_parser, main
from deepopt.runs import RUN_MARKER, run_command_of

# Options a subcommand requires besides --out, by command (values are filled from the fixtures below).
REQUIRED = {"hope eval": lambda run: ["--checkpoint", str(run)], "select": lambda _: ["adam"]}


def leaf_commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> dict[str, argparse.ArgumentParser]:
    """``"hope train" -> its parser`` for every runnable subcommand."""
    leaves = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                leaves.update(leaf_commands(sub, (*prefix, name)))
    return leaves if leaves or not prefix else {" ".join(prefix): parser}


COMMANDS = leaf_commands(build_parser())


def options(command: str) -> set[str]:
    return {s for a in COMMANDS[command]._actions for s in a.option_strings}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished ``hope train --smoke`` run."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["hope", "train", "--smoke", "--steps", "2", "--out", str(run), "--threads", "1"]) == 0
    return run


def argv(command: str, trained: Path, *extra: str) -> list[str]:
    required = [a for a in COMMANDS[command]._actions if a.required]  # options and positional arguments
    assert not required or command in REQUIRED, f"add the required arguments of `{command}` to REQUIRED"
    fast = ["--threads", "1"] if "--threads" in options(command) else []
    return [*command.split(), "--smoke", *fast, *REQUIRED.get(command, lambda _: [])(trained), *extra]


def refused(capsys, args: list[str], *named: str) -> str:
    """``args`` exit with status 2 and one stderr line that contains each of ``named``; returns the line."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for text in named:
        assert text in err, (text, err)
    return err


def log_lines(err: str, desc: str) -> list[str]:
    """The progress lines of ``desc`` on a non-terminal stderr, cut to ``desc: n/total``: whole lines, no bar."""
    assert "\r" not in err and "\x1b" not in err, err
    return [re.match(rf"({re.escape(desc)}: \d+/\d+) ", line).group(1) for line in err.splitlines()
            if line.startswith(f"{desc}: ")]


def outputs(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} - {RUN_MARKER} if folder.is_dir() else set()


def unwritable_folder(tmp_path: Path) -> Path:
    """An existing folder that this process cannot create files in (root ignores mode bits: then /sys)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o500)
        return folder
    try:
        probe = Path("/sys") / ".deepopt-probe"
        probe.write_text("")
        probe.unlink()
    except OSError:
        return Path("/sys")
    pytest.skip("no folder that root cannot write to")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_declares_its_out_folder(command):
    """``deepopt.runs.add_out_option`` gives every command --out/--overwrite and the outputs it writes."""
    parser = COMMANDS[command]
    assert parser.get_default("run_command") == command
    assert parser.get_default("run_outputs") and {"--out", "--overwrite"} <= options(command)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_bad_out_is_refused_before_any_compute(command, trained, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    # items 6, 7 and 3: a file, a folder that cannot be created, a folder that cannot be written to
    refused(capsys, argv(command, trained, "--out", str(afile)), "--out", str(afile), "is a file")
    assert afile.read_text() == "keep me"
    refused(capsys, argv(command, trained, "--out", str(afile / "run")), "--out", "cannot create")
    locked = unwritable_folder(tmp_path)
    before = outputs(locked)
    refused(capsys, argv(command, trained, "--out", str(locked)), "--out", str(locked), "not writable")
    assert outputs(locked) == before

    # another command's run
    other = next(c for c in sorted(COMMANDS) if c != command and c not in COMMANDS[command].get_default("run_shares"))
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / RUN_MARKER).write_text(json.dumps({"command": other}))
    refused(capsys, argv(command, trained, "--out", str(theirs)), "--out", f"`deepopt {other}` run")
    assert outputs(theirs) == set()

    # item 1: an existing run of this command is kept unless --overwrite (or --resume)
    ours = tmp_path / "ours"
    ours.mkdir()
    first = COMMANDS[command].get_default("run_outputs")[0]
    (ours / first).write_text("the previous run")
    refused(capsys, argv(command, trained, "--out", str(ours)), "--out", "already holds", "--overwrite")
    assert outputs(ours) == {first} and (ours / first).read_text() == "the previous run"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_bad_flags_are_one_line(command, trained, tmp_path, capsys):
    out = tmp_path / "out"
    refused(capsys, argv(command, trained, "--out", str(out), "--no-such-flag"), "--no-such-flag")
    if "--threads" in options(command):
        refused(capsys, [*argv(command, trained, "--out", str(out)), "--threads", "0"], "--threads", ">= 1")
    if "--device" in options(command) and not torch.cuda.is_available():  # item 10
        refused(capsys, argv(command, trained, "--out", str(out), "--device", "cuda"), "--device", "CUDA")
    if "--resume" in options(command):  # item 15: nothing to resume in a new (e.g. mistyped) folder
        refused(capsys, argv(command, trained, "--out", str(out), "--resume"), "--resume", str(out))
        refused(capsys, argv(command, trained, "--out", str(out), "--resume", "--overwrite"), "--resume")
    assert outputs(out) == set()


# ------------------------------------------------------------------------------------------- bench
def test_bench_sizes(tmp_path, capsys):
    """Items 5, 12, 13: --repeats 0 and --warmup -1 are refused up front; --smoke keeps an explicit --repeats."""
    out = tmp_path / "bench"
    refused(capsys, ["bench", "--smoke", "--repeats", "0", "--out", str(out)], "--repeats", ">= 1")
    refused(capsys, ["bench", "--smoke", "--warmup", "-1", "--out", str(out)], "--warmup", ">= 0")
    assert not out.exists()
    assert main(["bench", "--smoke", "--repeats", "2", "--optimizers", "SGD", "--threads", "1", "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    assert (report["repeats"], report["warmup"]) == (2, 1)
    captured = capsys.readouterr()
    assert captured.out.rstrip().endswith(f"wrote {out}")
    assert log_lines(captured.err, "bench") == ["bench: 0/1", "bench: 1/1"]  # item 21: no bar in a log, lines


# ------------------------------------------------------------------------------------------- robustness
TINY_STUDY = ["robustness", "--optimizers", "sgd", "adam", "--noises", "gaussian", "--levels", "1", "--seeds", "2",
              "--steps", "6", "--lrs", "0.1", "--tune-seeds", "1", "--eval-every", "3", "--no-progress"]


def test_robustness_keeps_and_resumes_a_study(tmp_path, capsys):
    """Items 1 and 3: a study is appended run by run to runs.jsonl; an existing study is not replaced, and
    --resume after a late failure (here: results.csv never written, runs.jsonl cut mid-line) reruns only
    the missing runs and gives the same results."""
    out = tmp_path / "study"
    assert main([*TINY_STUDY, "--out", str(out)]) == 0
    results = (out / "results.csv").read_text()
    lines = (out / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 2 + 2 * 2 * 2  # tuning (optimizer, lr) + study (optimizer, level, seed)
    refused(capsys, [*TINY_STUDY, "--out", str(out)], "--out", "already holds", "--resume")
    assert (out / "results.csv").read_text() == results

    for name in outputs(out) - {"runs.jsonl"}:
        (out / name).unlink()
    (out / "runs.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:40])  # killed while writing line 4
    assert main([*TINY_STUDY, "--out", str(out), "--resume"]) == 0
    assert (out / "results.csv").read_text() == results
    assert (out / "runs.jsonl").read_text().splitlines() == lines  # the torn line dropped, the rest rerun


def test_robustness_killed_mid_study_keeps_its_runs(tmp_path):
    """Item 1/3 with a real SIGKILL: the runs finished before the kill stay in runs.jsonl and --resume
    completes the study without running them again; --overwrite starts a new one."""
    out = tmp_path / "killed"
    grid = ["--levels", "1", "2", "--seeds", "3", "--steps", "30"]  # 2 tuning + 2 × 3 × 3 study runs
    cmd = [sys.executable, "-m", "deepopt.cli", *TINY_STUDY, *grid, "--out", str(out)]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log = out / "runs.jsonl"
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not (log.is_file() and log.read_text().count("\n") >= 2):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the study ended before it could be killed"
    kept = log.read_text().splitlines()
    assert 2 <= len(kept) < 2 + 2 * 3 * 3 and not (out / "results.csv").exists()
    assert main([*TINY_STUDY, *grid, "--out", str(out), "--resume"]) == 0
    lines = log.read_text().splitlines()
    assert len(lines) == 2 + 2 * 3 * 3 and lines[:len(kept) - 1] == kept[:-1]  # the last may be torn
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 2 * 3 * 3
    assert main([*TINY_STUDY, "--out", str(out), "--overwrite"]) == 0  # a new study replaces it
    assert len(log.read_text().splitlines()) == 2 + 2 * 2 * 2


# ------------------------------------------------------------------------------------------- meta-train
def test_meta_train_checks_sizes_first_and_resumes_its_evaluation(tmp_path, capsys):
    """Item 4: --eval-seeds 0 is refused before meta-training; the evaluation is written task by task to
    eval.jsonl and a re-run skips the tasks already evaluated."""
    out = tmp_path / "meta"
    base = ["meta-train", "--smoke", "--no-progress", "--meta-steps", "2", "--eval-steps", "5", "--out", str(out)]
    refused(capsys, [*base, "--eval-seeds", "0"], "--eval-seeds", ">= 1")
    assert outputs(out) == set()
    assert main(base) == 0
    report = json.loads((out / "report.json").read_text())
    entries = (out / "eval.jsonl").read_text().splitlines()
    assert len(entries) == 2  # one per held-out task of --smoke
    (out / "eval.jsonl").write_text(entries[0] + "\n")  # killed during the second task's evaluation
    (out / "report.json").unlink()
    refused(capsys, base, "--out", "already holds", "--resume")
    assert main([*base, "--resume"]) == 0
    again = json.loads((out / "report.json").read_text())
    assert {k: v for k, v in again.items() if k != "meta_train_seconds"} == \
        {k: v for k, v in report.items() if k != "meta_train_seconds"}
    assert (out / "eval.jsonl").read_text().splitlines()[0] == entries[0]


# ------------------------------------------------------------------------------------------- hope
def test_hope_eval_never_overwrites_the_training_report(trained, capsys):
    """Item 2: eval into its checkpoint's folder writes eval_report.json beside the training report.json."""
    report = (trained / "report.json").read_text()
    assert main(["hope", "eval", "--smoke", "--checkpoint", str(trained), "--out", str(trained), "--threads", "1"]) == 0
    assert (trained / "report.json").read_text() == report
    assert json.loads((trained / "eval_report.json").read_text())["command"] == "eval"
    assert capsys.readouterr().out.rstrip().endswith(f"wrote {trained}")
    refused(capsys, ["hope", "eval", "--smoke", "--checkpoint", str(trained), "--out", str(trained)],
            "already holds", "--overwrite")
    assert main(["hope", "eval", "--smoke", "--checkpoint", str(trained / "model.safetensors"),  # item 9c
                 "--out", str(trained), "--overwrite", "--threads", "1"]) == 0


def copy_run(src: Path, dst: Path, *names: str) -> Path:
    dst.mkdir()
    for name in names:
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_hope_eval_names_a_missing_or_corrupt_file(trained, tmp_path, capsys):
    """Items 8 and 9: one line naming the file, before any evaluation."""
    def eval_refused(checkpoint: Path, *named: str) -> None:
        out = tmp_path / "ev"
        refused(capsys, ["hope", "eval", "--smoke", "--checkpoint", str(checkpoint), "--out", str(out)], *named)
        assert outputs(out) == set()

    eval_refused(tmp_path / "nope", "--checkpoint", str(tmp_path / "nope"), "does not exist")
    eval_refused(tmp_path, str(tmp_path), "holds no saved model")
    (tmp_path / "notes.txt").write_text("x")
    eval_refused(tmp_path / "notes.txt", "--checkpoint", "is a file")
    corrupt = copy_run(trained, tmp_path / "corrupt", "model_config.json")
    (corrupt / "model.safetensors").write_bytes((trained / "model.safetensors").read_bytes()[:100])
    eval_refused(corrupt, str(corrupt / "model.safetensors"), "corrupt")
    truncated = copy_run(trained, tmp_path / "truncated", "model.safetensors")
    (truncated / "model_config.json").write_text((trained / "model_config.json").read_text()[:30])
    eval_refused(truncated, str(truncated / "model_config.json"), "not valid JSON")
    missing = copy_run(trained, tmp_path / "missing", "model.safetensors")
    eval_refused(missing, str(missing / "model_config.json"))
    torn = copy_run(trained, tmp_path / "torn", "checkpoint.pt")
    (torn / "checkpoint.pt").write_bytes((trained / "checkpoint.pt").read_bytes()[:1000])
    eval_refused(torn, str(torn / "checkpoint.pt"), "not a readable torch checkpoint")


def test_a_killed_training_run_is_evaluated_from_its_checkpoint(trained, tmp_path, capsys):
    """Item 16: a run killed before it saved its model leaves checkpoint.pt; eval reads the model from it."""
    killed = copy_run(trained, tmp_path / "killed", "checkpoint.pt")  # the last checkpoint is the final model
    common = ["hope", "eval", "--smoke", "--domains", "code", "--threads", "1"]
    assert main([*common, "--checkpoint", str(killed / "checkpoint.pt"), "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--checkpoint", str(trained), "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / x / "eval_report.json").read_text())["results"] for x in "ab")
    assert a == b


def test_hope_train_flags_and_completion_line(tmp_path, capsys):
    """Items 14, 15, 18, 21."""
    out = tmp_path / "run"
    refused(capsys, ["hope", "train", "--smoke", "--val-every", "0", "--out", str(out)], "--val-every", ">= 1")
    refused(capsys, ["hope", "train", "--smoke", "--resume", "--out", str(out)], "--resume", str(out), "holds no")
    assert not out.exists()
    assert main(["hope", "train", "--smoke", "--steps", "2", "--threads", "1", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.rstrip().splitlines()[-1] == f"wrote {out}"
    assert log_lines(captured.err, "hope train hope") == ["hope train hope: 0/2", "hope train hope: 1/2",
                                                          "hope train hope: 2/2"]  # lines, not a bar, in a log


# ------------------------------------------------------------------------------------------- the rest
def test_version(capsys):
    """Item 17."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert re.fullmatch(rf"deepopt {re.escape(__version__)} \(torch .+\)\n", capsys.readouterr().out)


def test_outputs_are_world_readable(trained):
    """Item 19: every output file has the mode a plain open() gives (0644 under umask 022), checkpoints
    and reports included."""
    mask = os.umask(0o022)
    os.umask(mask)
    assert mask == 0o022, "this test assumes the usual umask"
    modes = {p.name: p.stat().st_mode & 0o777 for p in trained.iterdir() if p.is_file()}
    assert {"report.json", "checkpoint.pt", "model.safetensors", "loss.png"} <= set(modes)
    assert set(modes.values()) == {0o644}, modes


def test_tests_use_a_temporary_cache():
    """Item 20: the HOPE cache of the test session is not ~/.cache/deepopt."""
    from deepopt.hope.data import cache_dir

    home = Path.home() / ".cache" / "deepopt"
    assert cache_dir() != home and not cache_dir().is_relative_to(home)
    assert Path(os.environ["DEEPOPT_CACHE"]).name.startswith("deepopt-test-cache-")


def test_run_marker_names_the_command(trained):
    assert run_command_of(trained) == "hope train"
