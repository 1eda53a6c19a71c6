"""Issue 21, items 6 and 7: no flag combination loses or mixes a run, a write failure is one line, logs show progress.

Per subcommand (listed from ``deepopt.cli.build_parser()``, so one added later must be added to ``TINY``):

* ``test_overwrite_is_checked_first_and_replaces_the_whole_run``: a refused ``--overwrite`` (an argument each command
  can only refuse late, after reading its inputs: the cases of the issue) leaves the old run byte for byte, a
  refused command leaves no folder, and an ``--overwrite`` that runs leaves nothing of the old run (plots included);
  every file a command writes is one of its declared outputs.
* ``test_a_full_disk_is_one_line``: every write hits a real write error (``RLIMIT_FSIZE``: the kernel refuses any
  byte past the limit, through torch's C++ writer, safetensors' Rust one and Python's alike): exit 2, one line
  naming the file.  ``test_no_space_left_on_device`` does the same on a real full file system where this process
  may mount one.
* ``test_a_corrupt_resume_file_is_one_line``: each file ``--resume`` reads, corrupted: exit 2, one line naming it,
  the run left as it was.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli_errors import COMMANDS, outputs, refused

from deepopt.cli import main
from deepopt.runs import RUN_MARKER, LineProgress, progress_bar

# The smallest run of each command (seconds), and a second valid run whose outputs are named differently.
TINY: dict[str, list[str]] = {
    "bench": ["--smoke", "--optimizers", "SGD", "--repeats", "1", "--warmup", "0", "--threads", "1"],
    "robustness": ["--task", "quadratic", "--optimizers", "sgd", "adam", "--noises", "gaussian", "--levels", "1",
                   "--seeds", "2", "--steps", "4", "--lrs", "0.1", "--tune-seeds", "1", "--eval-every", "2",
                   "--no-progress"],
    "meta-train": ["--smoke", "--no-progress", "--meta-steps", "1", "--eval-steps", "4", "--eval-tasks", "wine_mlp"],
    "hope train": ["--smoke", "--steps", "2", "--threads", "1", "--no-progress"],
    "hope eval": ["--smoke", "--checkpoint", "{trained}", "--domains", "code", "--threads", "1"],
    "hope continual": ["--smoke", "--steps", "1", "--models", "transformer", "--threads", "1", "--no-progress"],
    "hope niah": ["--smoke", "--steps", "1", "--models", "transformer", "--eval-samples", "1", "--threads", "1",
                  "--no-progress"],
    "hope mqar": ["--smoke", "--steps", "1", "--models", "transformer", "--eval-samples", "1", "--threads", "1",
                  "--no-progress"],
    "hope class-incremental": ["--smoke", "--steps", "1", "--models", "transformer", "--test-samples", "1",
                               "--threads", "1", "--no-progress"],
    "evaluate": ["--smoke", "--tasks", "tabular_mlp", "--methods", "adamw,learned", "--lrs", "0.003,0.03", "--seeds",
                 "1", "--threads", "1"],
    "select": ["dmgd-general", "--smoke", "--lrs", "0.003,0.03", "--threads", "1"],
    "compare": ["--smoke", "--tasks", "digits_mlp", "--optimizers", "momentum", "--lrs", "1", "--seeds", "1",
                "--threads", "1"],
}
# A second run, other options (so other output names where they depend on the options, e.g. one plot per noise
# model or per model): after it replaced the first with --overwrite, no file of the first may be left.
SECOND: dict[str, list[str]] = {
    "robustness": ["--noises", "dropout", "--levels", "0.5"],
    "hope mqar": ["--models", "hope"],
}
# An argument each command refuses only after reading its inputs or building its task (issue 21: these deleted
# the old run under --overwrite, or failed after minutes of compute).
LATE: dict[str, tuple[list[str], str]] = {
    "bench": (["--repeats", "0"], "--repeats"),
    "robustness": (["--seeds", "0"], "seeds"),
    "meta-train": (["--hidden", "-1"], "hidden"),
    "hope train": (["--data", "{missing}"], "{missing}"),
    "hope eval": (["--data", "{missing}"], "{missing}"),
    "hope continual": (["--domain-b", "code"], "--domain-a and --domain-b"),
    "hope niah": (["--eval-contexts", "0"], "--eval-contexts 0"),
    "hope mqar": (["--widths", "12"], "--widths"),
    "hope class-incremental": (["--classes-per-task", "3"], "--packages"),
    "evaluate": (["--optimizer", "nosuch"], "--optimizer"),
    "select": (["--seeds", "0"], "--seeds"),
    "compare": (["--span", "0"], "--span"),
}


def test_every_command_is_covered():
    missing = sorted(set(COMMANDS) - set(TINY))
    assert not missing, f"add the tiniest run of {missing} to TINY and a late-refused argument to LATE"
    assert set(LATE) == set(TINY)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from deepopt.hope.cli import DEFAULTS
    from deepopt.hope.data import load_corpus

    load_corpus("prose", None, DEFAULTS["max_bytes"][1])  # the --smoke data cached, as code is by this run
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["hope", "train", "--smoke", "--steps", "2", "--out", str(run), "--threads", "1", "--no-progress"]) == 0
    return run


def fill(args: list[str], trained: Path, tmp_path: Path) -> list[str]:
    return [a.format(trained=trained, missing=tmp_path / "missing.txt") for a in args]


def tiny(command: str, trained: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [*command.split(), *fill(TINY[command], trained, tmp_path), *extra]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def declared(command: str) -> tuple[str, ...]:
    return COMMANDS[command].get_default("run_outputs")


@pytest.mark.parametrize("command", sorted(TINY))
def test_overwrite_is_checked_first_and_replaces_the_whole_run(command, trained, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(tiny(command, trained, tmp_path, "--out", str(out))) == 0
    capsys.readouterr()
    written = outputs(out)
    undeclared = {n for n in written if not any(fnmatch.fnmatchcase(n, p) for p in declared(command))}
    assert not undeclared, f"`{command}` writes {undeclared}, not in its add_out_option outputs"
    # the old run also holds a file of each output pattern that the new run will not write (a plot of another noise
    # model, say), and one we did not write at all
    for pattern in declared(command):
        if "*" in pattern:
            (out / pattern.replace("*", "of-the-old-run")).write_text("old")
    (out / "notes.txt").write_text("the user's, not the run's")
    before = snapshot(out)

    late, named = LATE[command]
    bad = fill(late, trained, tmp_path)
    refused(capsys, tiny(command, trained, tmp_path, *bad, "--out", str(out), "--overwrite"),
            *fill([named], trained, tmp_path))
    assert snapshot(out) == before, "a refused --overwrite changed the old run"
    refused(capsys, tiny(command, trained, tmp_path, *bad, "--out", str(tmp_path / "new")))
    assert not (tmp_path / "new").exists(), "a refused command left a folder"
    monkeypatch.chdir(tmp_path)  # the default --out, runs/<timestamp>-<command>
    refused(capsys, tiny(command, trained, tmp_path, *bad))
    assert not (tmp_path / "runs").exists(), "a refused command left a folder"

    started = time.time() - 1
    assert main(tiny(command, trained, tmp_path, *SECOND.get(command, []), "--out", str(out), "--overwrite")) == 0
    left = {p.name for p in out.iterdir() if p.name != "notes.txt"
            and max(q.stat().st_mtime for q in [p, *p.rglob("*")]) < started}
    assert not left, f"the overwrite kept {left} of the old run beside the new one"
    assert (out / "notes.txt").read_text() == "the user's, not the run's"
    assert json.loads((out / RUN_MARKER).read_text())["command"] == command
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != RUN_MARKER]


def test_an_overwrite_keeps_the_run_it_shares(trained, tmp_path, capsys):
    """``hope eval --overwrite`` into a training run replaces its own report, never the training run's files."""
    run = tmp_path / "run"
    run.mkdir()
    for p in trained.iterdir():
        (run / p.name).write_bytes(p.read_bytes())
    common = ["hope", "eval", "--smoke", "--checkpoint", str(run), "--domains", "code", "--threads", "1"]
    assert main([*common, "--out", str(run)]) == 0
    training = {k: v for k, v in snapshot(run).items() if not k.startswith("eval_")}
    assert main([*common, "--out", str(run), "--overwrite"]) == 0
    assert {k: v for k, v in snapshot(run).items() if not k.startswith("eval_")} == training


# ------------------------------------------------------------------------------------------- write failures
def run_cli(args: list[str], file_size_limit: int | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``deepopt ARGS`` in a new process, with writes past ``file_size_limit`` bytes refused by the kernel (EFBIG)."""
    code = "import sys\nfrom deepopt.cli import main\n"
    if file_size_limit is not None:
        code = (f"import resource, signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
                f"resource.setrlimit(resource.RLIMIT_FSIZE, ({file_size_limit}, resource.RLIM_INFINITY))\n") + code
    code += f"sys.exit(main({args!r}))\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


PROGRESS = re.compile(r"[^:]+: \d+(/\d+)? .*\d+:\d\d elapsed")  # deepopt.runs.LineProgress


def one_line_naming(proc: subprocess.CompletedProcess, folder: Path, reason: str) -> str:
    """Exit status 2 and one stderr line naming a file in ``folder`` (or the data cache) and ``reason``."""
    err = "".join(line for line in proc.stderr.splitlines(keepends=True) if not PROGRESS.match(line))
    assert proc.returncode == 2, proc.stderr
    assert err.count("\n") == 1 and "Traceback" not in err, proc.stderr
    named = re.search(r"error: (\S+): ", err)
    assert named and (Path(named.group(1)).is_relative_to(folder)
                      or Path(named.group(1)).is_relative_to(os.environ["DEEPOPT_CACHE"])), err
    assert reason in err, err
    return err


@pytest.mark.parametrize("command", sorted(TINY))
def test_a_full_disk_is_one_line(command, trained, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(tiny(command, trained, tmp_path, "--out", str(out)), file_size_limit=400)
    err = one_line_naming(proc, out, "File too large")
    assert f"{out}/" in err, "the data cache, not an output, hit the limit"
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")], "a torn temporary file was left"


def mount_full_disk(folder: Path) -> bool:
    """Mount an 8 KiB tmpfs (two pages: the run marker fits, little else) on ``folder`` if this process may."""
    folder.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


@pytest.mark.parametrize("command", ["hope train", "robustness", "meta-train"])
def test_no_space_left_on_device(command, trained, tmp_path, capsys):
    """A really full file system (ENOSPC) under torch.save (hope train: the issue's traceback), the appended
    runs.jsonl (robustness: the issue's `[Errno 28]` without the file) and meta-train's checkpoints."""
    disk = tmp_path / "disk"
    if not mount_full_disk(disk):
        pytest.skip("cannot mount a small tmpfs here (not root); test_a_full_disk_is_one_line covers the writes")
    try:
        out = disk / "run"
        with pytest.raises(SystemExit) as exit_info:
            main(tiny(command, trained, tmp_path, "--out", str(out)))
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, err
        assert err.count("\n") == 1 and f"{out}/" in err and "No space left on device" in err, err
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


# ------------------------------------------------------------------------------------------- corrupt resume files
GARBAGE = b"\xff\xfe\x00garbage\n" * 3 + b"\x80"


def corrupt_text(path: Path) -> None:
    """Binary garbage among the lines of a results file (a kill tears only the last line)."""
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:1]) + GARBAGE + b"\n" + b"".join(lines[1:]))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:300])


RESUMED: dict[str, list[tuple[str, object]]] = {  # command -> the files --resume reads, and how to corrupt each
    "robustness": [("runs.jsonl", corrupt_text)],
    "compare": [("results.csv", corrupt_text)],
    "meta-train": [("trainer_state.pt", truncate), ("eval.jsonl", corrupt_text)],
    "hope train": [("checkpoint.pt", truncate)],
    "hope mqar": [("runs.jsonl", corrupt_text)],
    "hope niah": [("runs.jsonl", corrupt_text)],
    "evaluate": [("runs.jsonl", corrupt_text)],
    "select": [("runs.jsonl", corrupt_text)],
}


def test_every_resumable_command_is_covered():
    resumable = {c for c in COMMANDS if "--resume" in {s for a in COMMANDS[c]._actions for s in a.option_strings}}
    assert resumable == set(RESUMED), "add the files --resume reads to RESUMED"


@pytest.mark.parametrize("command,name,corrupt", [(c, n, f) for c, files in RESUMED.items() for n, f in files])
def test_a_corrupt_resume_file_is_one_line(command, name, corrupt, trained, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny(command, trained, tmp_path, "--out", str(out))) == 0
    capsys.readouterr()
    corrupt(out / name)
    before = snapshot(out)
    refused(capsys, tiny(command, trained, tmp_path, "--out", str(out), "--resume"), str(out / name))
    assert snapshot(out) == before


# ------------------------------------------------------------------------------------------- progress in a log
def test_progress_lines_in_a_log(capsys, monkeypatch):
    """Off a terminal: a line when the work starts, one per tenth of it (or every ``every`` s), one at the end;
    with the postfix the caller set last.  ``enabled=False`` prints nothing."""
    bar = progress_bar(total=20, desc="phase", unit="step")
    assert isinstance(bar, LineProgress)
    for i in range(20):
        bar.set_postfix(loss=1.0 / (i + 1))
        bar.update(1)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" ")[1] for line in lines] == ["0/20"] + [f"{2 * k}/20" for k in range(1, 11)]
    assert lines[1].startswith("phase: 2/20 step (10%), 0:00 elapsed, ~0:00 left, loss 0.5")
    assert lines[-1].endswith("loss 0.05")

    monkeypatch.setattr(LineProgress, "every", 0.0)  # a slow phase: a line at every update
    for _ in progress_bar(range(3), desc="slow"):
        pass
    assert len(capsys.readouterr().err.splitlines()) == 4
    for _ in progress_bar(range(3), desc="quiet", enabled=False):
        pass
    assert capsys.readouterr().err == ""


def test_a_long_command_closes_with_its_targets_and_files(tmp_path, capsys):
    """meta-train (the main job) ends with the target, met or not, and the files to open, then `wrote`."""
    out = tmp_path / "meta"
    assert main(["meta-train", *TINY["meta-train"], "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"wrote {out}"
    at = lines.index("targets:")
    assert re.match(r"  \[(met|NOT met)\] final loss below Adam with a tuned 1/t decay in a majority of seeds on >= 1 "
                    r"of 1 held-out tasks", lines[at + 1])
    opened = lines[lines.index("open:") + 1:-1]
    assert [line.split()[0] for line in opened] == [str(out / "curves.png"), str(out / "report.json"),
                                                    str(out / "optimizer")]


# ------------------------------------------------------------------------------------------- two runs, one folder
def parsed(*argv: str):
    from deepopt.cli import build_parser

    return build_parser().parse_args(list(argv))


def test_runs_started_together_never_share_a_folder(tmp_path, monkeypatch, capsys):
    """Two runs with the default --out in the same second get a folder each; a run into a new folder that another
    run claimed while this one was still reading its inputs is refused, not mixed into it."""
    from deepopt import runs

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runs.time, "strftime", lambda fmt, *a: "20250101-000000")
    first, second = parsed("bench", "--smoke"), parsed("bench", "--smoke")
    runs.check_out(first)
    runs.check_out(second)  # both checked before either started: both chose runs/20250101-000000-bench
    assert runs.prepare_out(first) == Path("runs/20250101-000000-bench")
    assert runs.prepare_out(second) == Path("runs/20250101-000000-bench-2")
    assert runs.run_command_of(Path("runs/20250101-000000-bench-2")) == "bench"

    out = tmp_path / "shared"
    late = parsed("bench", "--smoke", "--out", str(out))
    runs.check_out(late)  # ... reads its inputs while another run starts in the same new folder:
    assert main(["bench", *TINY["bench"], "--out", str(out)]) == 0
    with pytest.raises(runs.UsageError, match="already holds"):
        runs.prepare_out(late)
    empty = tmp_path / "claimed"
    late = parsed("bench", "--smoke", "--out", str(empty))
    runs.check_out(late)
    runs.prepare_out(parsed("bench", "--smoke", "--out", str(empty)))  # claimed, no output written yet
    with pytest.raises(runs.UsageError, match="another deepopt run started in this folder"):
        runs.prepare_out(late)


def test_a_killed_start_leaves_nothing_behind(tmp_path):
    """What a run killed mid-write leaves (a replaced run's folder, a temporary file of an output) is cleared when
    the next run starts; temporary files of another command sharing the folder are left to it."""
    from deepopt import runs

    out = tmp_path / "run"
    runs.prepare_out(parsed("hope", "train", "--smoke", "--out", str(out)))
    (out / ".deepopt-replaced-abc").mkdir()
    (out / ".report.json.x1y2.tmp").write_text("torn")
    (out / ".eval_report.json.x1y2.tmp").write_text("hope eval is writing this")
    runs.prepare_out(parsed("hope", "train", "--smoke", "--out", str(out), "--overwrite"))
    assert sorted(p.name for p in out.iterdir()) == [".deepopt-run.json", ".eval_report.json.x1y2.tmp"]


# ------------------------------------------------------------------------------------------- plots
def test_loss_intervals_never_reach_zero():
    """compare.png's interval comes from the log losses: positive where mean ± t·sd/√n of two seeds is not."""
    from deepopt.compare import log_interval
    from deepopt.robustness import mean_ci

    assert mean_ci([0.1, 0.2])[1] < 0
    centre, low, high = log_interval([0.1, 0.2])
    assert 0 < low < 0.1 and 0.2 < high and abs(centre - 0.2 ** 0.5 * 0.1 ** 0.5) < 1e-12


def test_no_optimizer_hides_another():
    """Every robustness optimizer gets its own line style and marker, so two identical curves both show."""
    from deepopt.robustness import OPTIMIZERS, _styles

    styles = _styles(OPTIMIZERS)
    assert len({(s["ls"], s["marker"]) for s in styles.values()}) == len(OPTIMIZERS)
    assert len({s["marker"] for s in styles.values()}) == len(OPTIMIZERS)


def test_niah_plots_accuracy_against_context(trained, tmp_path, monkeypatch):
    """`hope niah` draws accuracy (y) against the evaluated context lengths (x), with the chance level marked."""
    from deepopt.hope import cli

    drawn, plot = {}, cli.plot_curves

    def recorded(path: Path, *args, **kwargs) -> None:  # what is drawn, then drawn
        drawn[path.name] = (args, kwargs)
        plot(path, *args, **kwargs)

    monkeypatch.setattr(cli, "plot_curves", recorded)
    out = tmp_path / "niah"
    assert main([*tiny("hope niah", trained, tmp_path), "--eval-contexts", "160", "112", "--out", str(out)]) == 0
    (title, curves), options = drawn["accuracy.png"]
    assert options["ylabel"] == "accuracy" and options["hlines"] == [("chance (per token)", 0.1)]
    assert set(curves) == {"transformer, answer tokens", "transformer, exact"}
    assert [x for x, _ in curves["transformer, answer tokens"]] == [112, 160]
    assert all(0 <= y <= 1 for pts in curves.values() for _, y in pts) and (out / "accuracy.png").is_file()


def test_meta_train_plots_the_tuned_decay_baseline(tmp_path, capsys):
    """curves.png (and curves.csv) hold the Adam with a tuned 1/t decay that the target is judged against."""
    import csv

    out = tmp_path / "meta"
    assert main(["meta-train", *TINY["meta-train"], "--out", str(out)]) == 0
    with open(out / "curves.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["kind"] == "eval"]
    assert {r["optimizer"] for r in rows} == {"learned", "adam", "adam_decay", "momentum"}
    report = json.loads((out / "report.json").read_text())["tasks"]["wine_mlp"]["seeds"]["0"]
    decayed = [float(r["loss"]) for r in rows if r["optimizer"] == "adam_decay"]
    assert len(decayed) == 5 and decayed[-1] == pytest.approx(report["adam_decay_tuned"])
