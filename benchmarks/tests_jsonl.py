"""A pytest plugin (``-p tests_jsonl``, with ``benchmarks/`` on ``PYTHONPATH``) that appends one JSON line per
finished test phase to ``$TESTS_JSONL``: node id, phase, outcome, seconds, and the failure text.  Written as each
test ends (by the controller under xdist), so a run stopped by a time budget still leaves what it found; junit XML
and xdist's failure summary only appear at the end."""

from __future__ import annotations

import json
import os


def pytest_runtest_logreport(report) -> None:
    path = os.environ.get("TESTS_JSONL")
    if not path or os.environ.get("PYTEST_XDIST_WORKER"):  # xdist: the controller writes the workers' reports
        return
    if report.when != "call" and report.outcome == "passed":
        return  # setup/teardown that passed say nothing
    line = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
            "seconds": round(report.duration, 3)}
    if report.failed:
        line["longrepr"] = str(report.longrepr)[-4000:]
    elif report.skipped and isinstance(report.longrepr, tuple):
        line["reason"] = str(report.longrepr[-1])[:300]
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()
