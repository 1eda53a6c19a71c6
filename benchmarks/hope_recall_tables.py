"""Markdown tables of a recall study (``benchmarks/hope_recall.sh``): every ``hope mqar`` / ``hope niah`` report
under a folder, as the best-lr table (test accuracy, mean ± std over seeds, and the plateau share) and the lr
sweep (validation accuracy and final train loss of every lr at the first seed).

Usage: python benchmarks/hope_recall_tables.py OUT [OUT ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _cell(c: dict, niah: bool) -> str:
    text = f"{c['accuracy']:.3f} ± {c['accuracy_std']:.3f} [{c['value_share']:.2f}]"
    if c["copy_plateau"] >= 0.5:
        text += " **copy**"
    if niah and "digit_accuracy_needle_removed" in c:
        text += f"; removed {c['digit_accuracy_needle_removed']:.3f}"
    for stored in ("needle", "pair"):  # gradient share on the stored tokens by depth (their token share)
        if f"{stored}_gradient_share_by_layer" in c:
            by_depth = "/".join(f"{v:.2f}" for v in c[f"{stored}_gradient_share_by_layer"])
            text += f"; grad {by_depth} ({c[f'{stored}_token_fraction']:.2f})"
    if c["diverged_seeds"]:
        text += f" ({c['diverged_seeds']} diverged)"
    return text


def _ordered(by_model: dict) -> dict:
    """HOPE first, then Transformer++ with its conv, then the others (the JSON reports sort their keys)."""
    order = ("hope", "transformer-conv", "transformer")
    return dict(sorted(by_model.items(), key=lambda kv: next(
        (i for i, m in enumerate(order) if kv[0].split(" ")[0] == m), len(order))))


def tables(report: dict) -> str:
    niah = report["command"] == "niah"
    table, sweep = _ordered(report["table"]), _ordered(report["sweep"])
    cells = sorted({c for row in table.values() for c in row},
                   key=lambda c: int(c) if niah else tuple(int(v) for v in c.split("x")))
    if niah:
        title = (f"{report['task']}, trained at {report['train_context']}, {report['steps']} steps: value-token "
                 f"accuracy (chance {report['chance_digit_accuracy']}) ± std over seeds [share of answers that are a "
                 "needle's value]; needle removed; gradient share on the needle entering block 1/2/… (its token "
                 "share)")
        heads = [f"{c} ({int(c) / report['train_context']:g}×)" for c in cells]
    else:
        settings = " ".join(f"{a}x{b}" for a, b in report["train_settings"])
        title = (f"MQAR, trained on {settings}, vocabulary {report['vocab_size']}, {report['steps']} steps, batch "
                 f"{report['batch_size']}: query accuracy ± std over seeds [share of answers that are one of the "
                 "context's values; **copy** = copy-without-binding plateau]; gradient share on the pairs entering "
                 "block 1/2/… (their token share)")
        heads = cells
    lines = [f"**{title}**", "", "| model | best lr | seeds | " + " | ".join(heads) + " |",
             "|---|---|---|" + "---|" * len(cells)]
    for model, row in table.items():
        first = next(iter(row.values()))
        lines.append(f"| {model} | {first['lr']:g} | {first['seeds']} | "
                     + " | ".join(_cell(row[c], niah) if c in row else "-" for c in cells) + " |")
    lrs = sorted({lr for row in sweep.values() for lr in row}, key=float)
    lines += ["", "lr sweep at the first seed: validation accuracy (final train loss)", "",
              "| model | " + " | ".join(lrs) + " |", "|---|" + "---|" * len(lrs)]
    for model, row in sweep.items():
        lines.append(f"| {model} | " + " | ".join(
            "-" if lr not in row else "diverged" if row[lr]["diverged"] else
            f"{row[lr]['val_accuracy']:.3f} ({row[lr]['final_train_loss']:.2f})" for lr in lrs) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", type=Path)
    args = p.parse_args()
    for folder in args.folders:
        reports = sorted(folder.glob("*/report.json")) + ([folder / "report.json"] if (folder / "report.json")
                                                          .is_file() else [])
        if not reports:
            raise SystemExit(f"{folder}: no report.json of a `deepopt hope mqar/niah` run under it")
        for path in reports:
            report = json.loads(path.read_text())
            if report.get("command") in ("mqar", "niah") and "table" in report:
                print(f"### {path.parent}\n\n{tables(report)}\n")
        timing = folder / "timing.json"
        if timing.is_file():
            t = json.loads(timing.read_text())
            print(f"study ({t['size']}): wall {t['wall_s'] / 60:.1f} min, CPU {t['cpu_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
