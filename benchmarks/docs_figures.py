"""Redraw the figures of docs/compare.md and docs/robustness.md from the summaries stored beside them (no training):
the plots of ``deepopt compare`` and ``deepopt robustness`` as the current code draws them.

    python benchmarks/docs_figures.py [--out docs/figures]

The tiny-HOPE robustness figure draws the cells of ``robustness_hope_m3_deep_summary.json`` (m3 and the redesigned
deep_momentum, re-run) and those of ``robustness_hope_summary.json`` for the other optimizers, as the text does.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path
from typing import Any

from deepopt.compare import plot
from deepopt.robustness import plot_summary

FIGURES = Path(__file__).resolve().parent.parent / "docs" / "figures"


def _floats(obj: Any) -> Any:
    """Undo ``deepopt.compare._json_safe``: "inf" back to ∞, null back to NaN."""
    if isinstance(obj, dict):
        return {k: _floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_floats(v) for v in obj]
    if obj in ("inf", "-inf"):
        return float(obj)
    return math.nan if obj is None else obj


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=FIGURES, help="where the PNGs go (default docs/figures)")
    out = parser.parse_args().out

    summary = _floats(json.loads((FIGURES / "compare_cpu_summary.json").read_text()))
    config = summary["config"]  # the study's order (the JSON's keys are sorted)
    summary["results"] = {t: {o: summary["results"][t][o] for o in config["optimizers"]} for t in config["tasks"]}
    plot(summary, out / "compare_cpu.png")

    with tempfile.TemporaryDirectory() as tmp:  # plot_summary writes PNG and SVG of both plots; keep the PNGs used
        for task in ("digits", "quadratic", "hope"):
            summary = json.loads((FIGURES / f"robustness_{task}_summary.json").read_text())
            if task == "hope":
                redone = json.loads((FIGURES / "robustness_hope_m3_deep_summary.json").read_text())
                kept = [c for c in summary["cells"] if c["optimizer"] not in redone["config"]["optimizers"]]
                summary["cells"] = kept + redone["cells"]
                summary["config"]["optimizers"] = ["sgd", "momentum", "adam", "delta_momentum", "deep_momentum",
                                                   "m3", "torch_adam"]
            plot_summary(summary, Path(tmp), f"robustness_{task}_")
            names = ["loss_vs_level", "degradation"] if task == "digits" else ["loss_vs_level"]
            for name in names:
                (out / f"robustness_{task}_{name}.png").write_bytes((Path(tmp) / f"robustness_{task}_{name}.png")
                                                                    .read_bytes())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
