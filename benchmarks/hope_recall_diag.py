"""What limits a model's recall, measured on the models a ``deepopt hope mqar|niah --save-models`` run kept.

For every kept model (``OUT/models/<name>/``), on held-out sequences of the run's training setting:

* ``stored gradient share`` per depth (``deepopt.hope.recall.stored_gradient_shares``): the share of the answers'
  gradient, with respect to the residual stream entering each block, that falls on the tokens holding the answer
  (MQAR's key-value pairs, the needle), beside their token share.  Where it stays near or below the token share
  from some depth on, the blocks from there on do not read the stored tokens.
* HOPE, per block: the planted-write read-back of ``M_mem`` at its trained initial state θ₀
  (``deepopt.hope.model.planted_write_readback``: one write, the share of the error it removes at its key, right
  after it and after ``gap`` tokens; at the step the model takes on average on the task's tokens, and at the cap),
  and that step η_t, as a share of the cap (mean, and the share of steps within 10% of it), and σ(b_α) (the decay α_t
  where w_α·u_t = 0; a write fades as α^gap).
* MQAR, at each of the run's evaluated settings: test accuracy by the queried pair's place among the pairs (0 = the
  first written) and by the query's distance from its pair, and accuracy at the first setting's length for 1× to
  2× its pairs: whether the pairs a model loses are the early ones (written over or faded) or any (interference).

Usage: python benchmarks/hope_recall_diag.py OUT [--samples 64] [--all]   (default: the best-lr models only; --all
also reads a run that has not finished)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from deepopt.hope import data, mqar, niah
from deepopt.hope.model import SelfModifyingTitans, planted_write_readback
from deepopt.hope.recall import RUNS_FILE, stored_gradient_shares
from deepopt.hope.train import load_model


def task_batches(options: dict, samples: int, batch_size: int, seed: int):
    """``(x, y, stored)`` batches of the run's training setting (``options``: the run's identity in its
    runs.jsonl) and the typical gap from a stored token to its answer (half the sequence)."""
    if "mqar_vocab" in options:
        length, pairs = options["train_settings"][0]
        batches = [(x, y, torch.arange(length)[None].expand_as(x) < 2 * pairs) for x, y in mqar.held_out_batches(
            length, pairs, samples, batch_size, seed, options["mqar_vocab"])]
        return batches, length // 2
    task, length = options["task"], options["context"]
    prose = data.load_corpus("prose", max_bytes=options["max_bytes"]).val
    pairs = zip(niah.held_out_batches(task, prose, length, samples, batch_size, seed),
                niah.held_out_batches(task, prose, length, samples, batch_size, seed, needle=False))
    return [(x, y, x != gone) for (x, y, _), (gone, _, _) in pairs], length // 2


@torch.no_grad()
def pair_accuracy(model, options: dict, length: int, pairs: int, samples: int, seed: int) -> dict[str, list]:
    """MQAR test accuracy (greedy, ``mqar.mqar_eval``'s sequences) by the queried pair's index among the pairs and
    by the query's distance from its pair in buckets of ``length // 8`` tokens: ``[accuracy, queries]`` each."""
    model.eval()
    width = max(1, length // 8)
    by_pair, by_gap = torch.zeros(pairs, 2), torch.zeros(8, 2)
    for x, y in mqar.held_out_batches(length, pairs, samples, 16, seed, options["mqar_vocab"]):
        answer = model(x)[0].argmax(-1)
        b, t = (y != -100).nonzero(as_tuple=True)
        index = (x[:, 0:2 * pairs:2][b] == x[b, t, None]).int().argmax(-1)  # the queried key's pair
        right = (answer[b, t] == y[b, t]).float()
        gap = ((t - 2 * index) // width).clamp_max(7)
        for table, at in ((by_pair, index), (by_gap, gap)):
            table[:, 0].index_add_(0, at, right)
            table[:, 1].index_add_(0, at, torch.ones_like(right))
    return {name: [[round(float(r / n), 4) if n else None, int(n)] for r, n in table.tolist()]
            for name, table in (("by_pair_index", by_pair), (f"by_gap_{width}_tokens", by_gap))}


def titans_diagnostics(model, batches, gap: int) -> list[dict[str, float]]:
    """Per block of a HOPE model: planted-write read-back (gap 0 and ``gap``) and η_t on ``batches`` / its cap."""
    layers = [m for m in model.modules() if isinstance(m, SelfModifyingTitans)]
    for layer in layers:
        layer.eta_log = []
    with torch.no_grad():
        for x, _, _ in batches:
            model(x)
    out = []
    g = torch.Generator().manual_seed(0)
    for layer in layers:
        cap = layer.eta_cap  # η_max per token (eta_form per_token) or η_max/C (chunk_capped)
        share = torch.cat([e.flatten() for e in layer.eta_log]) / cap
        layer.eta_log = None
        shape = (layer.cfg.n_heads, 64, layer.dh)
        keys, targets = (F.normalize(torch.randn(shape, generator=g), dim=-1) for _ in range(2))
        eta = float(share.mean()) * cap  # the step the model takes on average on the task's tokens

        def readback(at: float, after: int, layer=layer, keys=keys, targets=targets) -> float:
            return float(planted_write_readback(layer, keys, targets, gap=after, eta=at).mean())

        out.append({"readback_at_cap_gap0": readback(cap, 0), "readback_gap0": readback(eta, 0),
                    f"readback_gap{gap}": readback(eta, gap), "eta_mean": eta,
                    "eta_over_cap_mean": float(share.mean()),
                    "eta_near_cap_share": float((share > 0.9).double().mean()),
                    "sigmoid_b_alpha": float(torch.sigmoid(layer.b_alpha.detach()).mean())})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="a `deepopt hope mqar|niah --save-models` output folder")
    p.add_argument("--samples", type=int, default=64, help="held-out sequences (default 64)")
    p.add_argument("--all", action="store_true", help="every kept model, not only those of the best lrs")
    args = p.parse_args()
    torch.set_num_threads(1)
    options = json.loads((args.out / RUNS_FILE).read_text().splitlines()[0])["value"]  # the run's identity
    report = args.out / "report.json"
    best = json.loads(report.read_text())["best_lr"] if report.is_file() else None
    if best is None and not args.all:
        raise SystemExit(f"{args.out}: no report.json yet (the run has not finished): pass --all")
    results = {}
    for folder in sorted((args.out / "models").iterdir()):
        name, seed = folder.name.rsplit("-s", 1)
        model_key, lr = name.rsplit("-lr", 1)
        mqar_run = "mqar_vocab" in options
        variant = model_key.rsplit("-d", 1)[0] if mqar_run else model_key
        best_key = f"{variant} d{model_key.rsplit('-d', 1)[1]}" if mqar_run else variant
        if not args.all and float(lr) != best[best_key]:
            continue
        model = load_model(folder)
        batches, gap = task_batches(options, args.samples, 16, int(seed))
        shares, fraction = stored_gradient_shares(model, batches)
        row = {"stored_gradient_share_by_depth": shares, "stored_token_fraction": fraction}
        if model.cfg.model == "hope":
            row["titans_by_block"] = titans_diagnostics(model, batches, gap)
        if mqar_run:
            settings = [tuple(s) for s in options["eval_settings"]]
            row["pairs"] = {f"{n}x{p}": pair_accuracy(model, options, n, p, args.samples, int(seed))
                            for n, p in settings}
            length, pairs = settings[0]
            row["accuracy_by_pairs"] = {f"{length}x{p}": round(mqar.mqar_accuracy(
                model, length, p, args.samples, 16, int(seed), options["mqar_vocab"]), 4)
                for p in range(pairs, min(2 * pairs, length // 4) + 1)}
        results[folder.name] = row
        print(folder.name, json.dumps(row), flush=True)
    (args.out / "diagnostics.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
