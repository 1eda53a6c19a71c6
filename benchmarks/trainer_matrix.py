"""Every deepopt class in the trainers people use: the cells of issue 21's held-out matrix that need packages
deepopt does not depend on (Hugging Face ``transformers`` + ``accelerate``, ``lightning``) or too much time for CI
(inductor).  The torch-native cells are tests: ``tests/test_trainers.py``, ``tests/test_state_restore.py``,
``tests/test_distributed.py``, ``tests/test_torch_optim_renewed.py``.

Cells, per class (its ``tests/conftest.py`` configuration, a small MLP regression in float32, 9 steps):

* ``HF resume``: ``transformers.Trainer`` (the class through ``optimizer_cls_and_kwargs``, linear lr decay, weight
  decay groups, gradient clipping), checkpoint at step 4, a new Trainer ``train(resume_from_checkpoint=…)``:
  the final weights equal the uninterrupted run's.
* ``HF bf16``: the same Trainer with ``bf16=True`` (autocast on the CPU) trains (loss falls, all finite).
* ``Lightning ckpt_path``: ``configure_optimizers`` returns the class and a StepLR; ``ModelCheckpoint`` at the end
  of each (one-batch) epoch; ``trainer.fit(…, ckpt_path=…)`` resumes: final weights equal the uninterrupted run's.
* ``Lightning bf16-mixed``: ``precision="bf16-mixed"`` trains.
* ``compile (inductor)``: ``torch.compile`` (default backend) of a whole training step (``tests/test_trainers.py``'s,
  float64) equals eager to 1e-10 and compiles no new frame after the first steps.

    pip install transformers accelerate lightning      # not deepopt dependencies
    python benchmarks/trainer_matrix.py                # ~5-10 min on 2 CPU cores; exit 1 if a cell fails
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import CONFIGS, make  # noqa: E402  (the tests' per-class configurations)

import deepopt  # noqa: E402

STEPS, SAVE_AT = 9, 4
CELLS = ("HF resume", "HF bf16", "Lightning ckpt_path", "Lightning bf16-mixed", "compile (inductor)")


def data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g)
    return x, x @ torch.randn(5, 3, generator=g) + 0.1 * torch.randn(n, 3, generator=g)


def mlp(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().float().clone() for p in model.parameters()]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------ Hugging Face
def hf_cells(name: str, tmp: Path) -> dict[str, str]:
    import transformers

    class Regression(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x, labels=None):
            out = self.net(x)
            return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}

    x, y = data()
    dataset = [{"x": a, "labels": b} for a, b in zip(x, y)]

    def trainer(out: Path, **kw):
        args = transformers.TrainingArguments(
            output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=8, save_strategy="steps",
            save_steps=SAVE_AT, logging_steps=1, report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
            weight_decay=0.01, disable_tqdm=True, **kw)
        cls = deepopt.OPTIMIZERS[name]
        return transformers.Trainer(model=Regression(), args=args, train_dataset=dataset,
                                    optimizer_cls_and_kwargs=(cls, dict(CONFIGS[name])))

    cells = {}
    straight = trainer(tmp / "hf-straight")
    straight.train()
    resumed = trainer(tmp / "hf-resumed")
    resumed.train(resume_from_checkpoint=str(tmp / "hf-straight" / f"checkpoint-{SAVE_AT}"))
    diff = max_diff(weights(straight.model), weights(resumed.model))
    cells["HF resume"] = "pass" if diff == 0 else f"FAIL (max |ΔW| {diff:.1e})"
    bf16 = trainer(tmp / "hf-bf16", bf16=True)
    losses = [r["loss"] for r in (bf16.train() and bf16.state.log_history) if "loss" in r]
    ok = losses and all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    cells["HF bf16"] = "pass" if ok else f"FAIL (losses {losses[:1]} → {losses[-1:]})"
    return cells


# ------------------------------------------------------------------------------------------ Lightning
def lightning_cells(name: str, tmp: Path) -> dict[str, str]:
    import lightning as L

    x, y = data(8)  # one batch per epoch: Lightning resumes an epoch-end checkpoint by replaying one batch of a fresh
    # DataLoader (its loop state says "epoch 0, 4 batches done"), which with one batch is the batch the run would see
    loader = lambda: torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)  # noqa: E731

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp()
            self.losses = []

        def training_step(self, batch, _):
            loss = torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            opt = make(name, self.parameters())
            return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 3, 0.5),
                                                       "interval": "step"}}

    def fit(out: Path, ckpt_path=None, **kw):
        module = Module()
        checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(out), every_n_epochs=1, save_top_k=-1,
                                                          save_on_train_epoch_end=True, filename="{step}")
        trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False, callbacks=[checkpoints],
                            enable_progress_bar=False, enable_model_summary=False, **kw)
        trainer.fit(module, loader(), ckpt_path=ckpt_path)
        return module

    cells = {}
    straight = fit(tmp / "pl-straight")
    resumed = fit(tmp / "pl-resumed", ckpt_path=str(tmp / "pl-straight" / f"step={SAVE_AT}.ckpt"))
    diff = max_diff(weights(straight), weights(resumed))
    cells["Lightning ckpt_path"] = "pass" if diff == 0 else f"FAIL (max |ΔW| {diff:.1e})"
    bf16 = fit(tmp / "pl-bf16", precision="bf16-mixed")
    ok = all(map(torch.isfinite, torch.tensor(bf16.losses))) and bf16.losses[-1] < bf16.losses[0]
    cells["Lightning bf16-mixed"] = "pass" if ok else f"FAIL (losses {bf16.losses[0]:.3g} → {bf16.losses[-1]:.3g})"
    return cells


# ------------------------------------------------------------------------------------------ inductor
def compile_cell(name: str) -> dict[str, str]:
    from test_trainers import compiled_run, params_of, small_mlp, train

    eager = small_mlp()
    train(eager, make(name, eager.parameters()), STEPS)
    compiled, frames = compiled_run(name, "inductor", STEPS)
    diff = max_diff(params_of(eager), compiled)
    if frames[2] != frames[-1]:
        return {"compile (inductor)": f"FAIL (frames {frames})"}
    return {"compile (inductor)": "pass" if diff <= 1e-10 else f"FAIL (max |ΔW| {diff:.1e})"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizers", nargs="+", default=sorted(CONFIGS), choices=sorted(CONFIGS))
    parser.add_argument("--cells", nargs="+", default=list(CELLS), choices=CELLS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    rows = {}
    for name in args.optimizers:
        cells: dict[str, str] = {}
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
            for group, fn, fn_args in ((("HF resume", "HF bf16"), hf_cells, (name, Path(tmp))),
                                       (("Lightning ckpt_path", "Lightning bf16-mixed"), lightning_cells,
                                        (name, Path(tmp))),
                                       (("compile (inductor)",), compile_cell, (name,))):
                if not set(group) & set(args.cells):
                    continue
                try:
                    cells.update(fn(*fn_args))
                except Exception as err:  # a cell that crashes is a failed cell, with its error
                    cells.update({c: f"FAIL ({type(err).__name__}: {str(err)[:80]})" for c in group})
        rows[name] = cells = {c: v for c, v in cells.items() if c in args.cells}
        print(f"{name}: " + ", ".join(f"{c} {cells.get(c, '-')}" for c in args.cells), file=sys.stderr, flush=True)
    print(f"torch {torch.__version__}; " + ", ".join(f"{m} {__import__(m).__version__}"
                                                    for m in ("transformers", "lightning")))
    print("| class | " + " | ".join(args.cells) + " |")
    print("|---|" + "---|" * len(args.cells))
    for name, cells in rows.items():
        print(f"| {deepopt.OPTIMIZERS[name].__name__} ({name}) | " + " | ".join(cells.get(c, "-") for c in args.cells)
              + " |")
    failed = sum(v.startswith("FAIL") for cells in rows.values() for v in cells.values())
    total = sum(len(cells) for cells in rows.values())
    print(f"\n{total - failed} of {total} cells pass")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
