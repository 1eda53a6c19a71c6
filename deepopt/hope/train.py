"""Training, evaluation and checkpointing of HOPE / Transformer++ language models.

Everything that decides a step is a pure function of ``(seed, step)``: the batch (``data.train_batch``)
and the learning rate (``lr_at``), so a run resumed from its checkpoint (model, optimizer state, step and
the metrics so far, one atomic ``weights_only`` file) continues bit for bit.  Under ``torchrun`` each
process takes rows ``rank::world`` of the same global batch and DDP averages the gradients, so the update
equals the single-process one on that global batch.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

import deepopt
from deepopt.checkpoint import (
    atomic_save_json,
    atomic_save_tensors,
    atomic_write,
    load_json,
    load_tensors,
    torch_load,
)
from deepopt.cuda_graph import GraphedStep, training_step
from deepopt.runs import progress_bar
from deepopt.schedules import warmup_cosine_factor

from . import data
from .model import (
    CMS_ERRORS,
    ETA_FORMS,
    MEMORY_CARRY,
    TITANS_INPUTS,
    VARIANTS,
    W2_INITS,
    HopeConfig,
    LanguageModel,
    apply_variant,
)

# Model sizes: (d_model, n_layers, n_heads, mem_hidden, cms_hidden, chunk_size, cms_periods)
SIZES: dict[str, dict[str, Any]] = {
    "smoke": {"d_model": 32, "n_layers": 1, "n_heads": 2, "mem_hidden": 8, "cms_hidden": 32, "chunk_size": 8,
              "cms_periods": (8, 16, None)},
    "tiny": {"d_model": 64, "n_layers": 2, "n_heads": 4, "mem_hidden": 16, "cms_hidden": 64, "chunk_size": 16,
             "cms_periods": (16, 64, None)},
    "small": {"d_model": 128, "n_layers": 4, "n_heads": 4, "mem_hidden": 32, "cms_hidden": 128, "chunk_size": 64,
              "cms_periods": (64, 256, None)},
    "base": {"d_model": 512, "n_layers": 4, "n_heads": 8, "mem_hidden": 32, "cms_hidden": 512, "chunk_size": 64,
             "cms_periods": (64, 256, None)},
    # the paper's scale (≈125M / ≈340M parameters with a 32K vocabulary, e.g. --tokenizer bpe --vocab-size 32000);
    # CMS periods from the paper's range (512 and up): they need contexts of 2048+ tokens to update; CMS widths
    # chosen so that the per-memory Titans inputs (5·d² per layer) keep the totals
    "125m": {"d_model": 768, "n_layers": 12, "n_heads": 12, "mem_hidden": 64, "cms_hidden": 896, "chunk_size": 64,
             "cms_periods": (512, 2048, None)},
    "340m": {"d_model": 1024, "n_layers": 24, "n_heads": 16, "mem_hidden": 64, "cms_hidden": 1024, "chunk_size": 64,
             "cms_periods": (512, 2048, None)},
}
OPTIMIZERS = (*deepopt.OPTIMIZERS, "torch_adamw")
SCHEDULES = ("constant", "cosine")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
AMP = {"none": None, "bf16": torch.bfloat16}  # autocast dtype of the forward pass (parameters stay in --dtype)
CHECKPOINT = "checkpoint.pt"
MODEL_FILE, CONFIG_FILE = "model.safetensors", "model_config.json"


def model_config(variant: str, size: str, **overrides: Any) -> HopeConfig:
    """The ``HopeConfig`` of a named variant (``VARIANTS``) at a named size (``SIZES``); ``overrides``
    (``None`` values ignored) change the size's settings before the variant is applied."""
    if variant not in VARIANTS:
        raise ValueError(f"model must be one of {sorted(VARIANTS)}, got {variant!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    base = HopeConfig(**{**SIZES[size], **{k: v for k, v in overrides.items() if v is not None}})
    return apply_variant(base, variant)


def _floats(text: str) -> float | tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def add_titans_init_args(p: argparse.ArgumentParser) -> None:
    """The HOPE memories' options (``HopeConfig`` fields of the same names; unset = the config's default): the
    Titans memories' initial state (``--titans-w1-std``, ``--titans-w2-gain``, ``--titans-w2-init``,
    ``--conv-tap-std``, ``--eta-bias``) and inputs (``--titans-inputs``),
    their step form (``--eta-form``, ``--eta-max``), the CMS levels' error signals (``--cms-error``) and what
    persists across sequences (``--memory-carry``)."""
    p.add_argument("--titans-w1-std", type=_floats, metavar="S[,S,S,S,S]",
                   help="std of the Titans memories' initial W₁, one for all or one per memory k,v,eta,alpha,mem "
                        "(default: HopeConfig's)")
    p.add_argument("--titans-w2-gain", type=_floats, metavar="G[,G,G,G,G]",
                   help="gain of their initial W₂ (std gain/√d_head, or every singular value with --titans-w2-init "
                        "orthogonal), one or five (default: HopeConfig's)")
    p.add_argument("--titans-w2-init", choices=W2_INITS,
                   help="draw of the Titans memories' initial W₂: gaussian or orthogonal (default: HopeConfig's)")
    p.add_argument("--titans-inputs", choices=TITANS_INPUTS,
                   help="what M_k, M_v, M_eta, M_alpha read: per_memory (each its own projection of the token) or "
                        "shared (one input for all four) (default: HopeConfig's)")
    p.add_argument("--conv-tap-std", type=float, help="std of the Titans input conv's taps on earlier tokens")
    p.add_argument("--eta-bias", type=float, help="initial b_η of the Titans step size")
    p.add_argument("--eta-form", choices=ETA_FORMS,
                   help="Titans step sizes: per_token (η_t ≤ η_max for every token, delta-rule terms read at each "
                        "token's own state) or chunk_capped (η_t ≤ η_max/C, all steps at the chunk's start; the "
                        "former form) (default: HopeConfig's)")
    p.add_argument("--eta-max", type=float, help="bound on η_t (per_token) or on a chunk's summed step, in [0, 2]")
    p.add_argument("--cms-error", choices=CMS_ERRORS,
                   help="CMS error signals: per_level (each level's own δ at its output) or shared (one δ at the "
                        "final residual stream for every level) (default: HopeConfig's)")
    p.add_argument("--memory-carry", choices=MEMORY_CARRY,
                   help="cms: each CMS level keeps its in-context change from sequence to sequence (training "
                        "passes update it); none: every memory resets per sequence (default: HopeConfig's)")


def titans_init_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``model_config`` overrides of ``add_titans_init_args``' options (``None`` = unset)."""
    return {name: getattr(args, name, None) for name in ("titans_w1_std", "titans_w2_gain", "titans_w2_init",
                                                         "titans_inputs", "conv_tap_std", "eta_bias", "eta_form",
                                                         "eta_max", "cms_error", "memory_carry")}


def make_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float,
                   options: Mapping[str, Any] | None = None) -> torch.optim.Optimizer:
    """Any deepopt optimizer by name, or ``torch_adamw``, with keyword ``options`` (e.g. DeepMomentum's
    ``preconditioner``); weight decay on matrices only.  A bad option raises ``ValueError``."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    cls = torch.optim.AdamW if name == "torch_adamw" else deepopt.OPTIMIZERS[name]
    try:
        return cls(groups, lr=lr, **(options or {}))
    except TypeError as err:  # an unknown or ill-typed option
        raise ValueError(f"optimizer option for {name}: {err}") from err


def lr_at(step: int, base: float, steps: int, warmup: int, schedule: str) -> float:
    """Linear warm-up over ``warmup`` steps, then constant or cosine decay to 10% of ``base``
    (``deepopt.schedules.warmup_cosine_factor``)."""
    return base * warmup_cosine_factor(step, steps, warmup, floor=0.1, cosine=schedule != "constant")


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """Join the ``torchrun`` process group when ``WORLD_SIZE > 1`` (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(device: str, d: Dist) -> torch.device:
    """The torch device of ``--device`` for this process.  On CUDA float32 matmuls may use TF32 tensor cores
    (``torch.set_float32_matmul_precision("high")``, as training scripts such as nanoGPT's set): cuBLAS's and
    HOPE's Triton kernels' (``titans_kernels.dot_precision``; exact-fp32 products spill registers at C = 64)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for but torch.cuda.is_available() is False")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")
    return torch.device(f"cuda:{d.local_rank}" if device == "cuda" and d.world > 1 else device)


@dataclass
class Trainer:
    """A model, its optimizer and the training hyper-parameters; ``step`` is one global-batch update."""

    model: LanguageModel
    optimizer: torch.optim.Optimizer
    lr: float
    steps: int
    warmup: int = 0
    schedule: str = "cosine"
    grad_clip: float = 1.0
    amp: str = "none"
    dist: Dist = field(default_factory=Dist)
    step_count: int = 0
    cuda_graph: bool = False  # capture the whole step in one CUDA graph (``deepopt.cuda_graph.GraphedStep``)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.amp not in AMP:
            raise ValueError(f"amp must be one of {tuple(AMP)}, got {self.amp!r}")
        self.net: nn.Module = self.model
        if self.dist.world > 1:
            if self.cuda_graph:
                raise ValueError("cuda_graph runs on one process; it is not supported with a world size > 1")
            self.net = nn.parallel.DistributedDataParallel(self.model)
        self.graphed = GraphedStep(self._loss, self.optimizer, self.model.parameters(), self.grad_clip) \
            if self.cuda_graph else None

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    def step(self, x: Tensor, y: Tensor) -> float:
        """One update on the global batch ``(x, y)``: this process uses rows ``rank::world``."""
        if x.shape[0] % self.dist.world:
            raise ValueError(f"batch size {x.shape[0]} must be divisible by the world size {self.dist.world}")
        x, y = (t[self.dist.rank::self.dist.world].to(self.device) for t in (x, y))
        lr = lr_at(self.step_count, self.lr, self.steps, self.warmup, self.schedule)
        self.model.train()
        if self.graphed is not None:
            loss = self.graphed(x, y, lr=lr)
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.zero_grad(set_to_none=True)
            loss = training_step(self._loss, self.optimizer, self.model.parameters(), self.grad_clip, x, y)
        self.step_count += 1
        if self.dist.world > 1:
            dist.all_reduce(loss)
            loss /= self.dist.world
        return float(loss)

    def _loss(self, x: Tensor, y: Tensor) -> Tensor:
        with self.autocast():
            return self.net(x, y)[1]

    @torch.no_grad()
    def evaluate(self, batches: Iterable[tuple[Tensor, Tensor]]) -> float:
        """Mean next-token negative log-likelihood (nats) over ``batches``."""
        self.model.eval()
        total, n = 0.0, 0
        for x, y in batches:
            with self.autocast():
                _, loss = self.model(x.to(self.device), y.to(self.device))
            total, n = total + float(loss) * y.numel(), n + y.numel()
        return total / n

    def autocast(self) -> torch.autocast:
        """``torch.autocast`` to ``amp``'s dtype on the model's device (a no-op context for ``"none"``)."""
        # autocast's weight cast cache outlives a graph capture: off when graphing, as the CUDA graph docs ask
        return torch.autocast(self.device.type, dtype=AMP[self.amp] or torch.float32,
                              enabled=AMP[self.amp] is not None, cache_enabled=not self.cuda_graph)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.step_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step"])


def save_model(model: LanguageModel, out: Path) -> None:
    """``model.safetensors`` + ``model_config.json`` (what ``load_model`` and ``deepopt hope eval`` read)."""
    atomic_save_tensors(model.state_dict(), out / MODEL_FILE)
    atomic_save_json(model.cfg.to_dict(), out / CONFIG_FILE)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> LanguageModel:
    """The model of a ``deepopt hope train`` run folder: ``model.safetensors`` + ``model_config.json``, or, for
    a run killed before it finished, its last ``checkpoint.pt``.  A missing, truncated or corrupt file
    raises ``FileNotFoundError`` / ``ValueError`` naming it."""
    path = Path(path)
    saved = [(path / f).exists() for f in (MODEL_FILE, CONFIG_FILE)]
    if all(saved) or (any(saved) and not (path / CHECKPOINT).exists()):  # a missing one is named
        source, config, tensors = path / MODEL_FILE, load_json(path / CONFIG_FILE), load_tensors(path / MODEL_FILE)
    elif (path / CHECKPOINT).exists():
        source, state = path / CHECKPOINT, torch_load(path / CHECKPOINT)
        if not isinstance(state, dict) or "model_config" not in state or "model" not in state:
            raise ValueError(f"{source} holds no model and its config (written before checkpoints recorded the "
                             "config?); finish the run with `deepopt hope train --resume` first")
        config, tensors = state["model_config"], state["model"]
    else:
        raise FileNotFoundError(2, f"holds no saved model ({MODEL_FILE} + {CONFIG_FILE}) nor a {CHECKPOINT}; "
                                   "expected a `deepopt hope train` output folder", str(path))
    try:
        cfg = HopeConfig.from_dict(config)
        model = LanguageModel(cfg).to(device=device, dtype=next(iter(tensors.values())).dtype)
        model.load_state_dict(tensors)
    except (TypeError, KeyError, AttributeError, StopIteration, RuntimeError, ValueError) as err:
        raise ValueError(f"{source} does not hold a model its config describes: {str(err).splitlines()[0]}") from err
    return model


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rows (dicts with the same keys) as CSV, written atomically."""
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else [])
    w.writeheader()
    w.writerows(rows)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text.getvalue()))


class Metrics:
    """Rows of ``metrics.csv`` (kept in the checkpoint so a resumed run rewrites the same file)."""

    FIELDS = ("step", "tokens", "lr", "train_loss", "val_loss", "val_ppl", "tok_per_s", "elapsed_s")

    def __init__(self, rows: list[dict[str, Any]] | None = None) -> None:
        self.rows = list(rows or [])

    def add(self, **row: Any) -> None:
        self.rows.append({k: row.get(k, "") for k in self.FIELDS})

    def plot(self, path: Path, title: str) -> None:
        plot_curves(path, title, {
            "train": [(r["step"], r["train_loss"]) for r in self.rows if r["train_loss"] != ""],
            "validation": [(r["step"], r["val_loss"]) for r in self.rows if r["val_loss"] != ""],
        })


def plot_curves(path: Path, title: str, curves: dict[str, list[tuple[float, float]]],
                xlabel: str = "step", ylabel: str = "loss (nats/token)", *,
                hlines: Sequence[tuple[str, float]] = (), vlines: Sequence[tuple[str, float]] = ()) -> None:
    """One line per curve, each with its own colour, line style and (for a few points) marker, so that a curve
    lying exactly on another stays visible; ``hlines``/``vlines``: labelled reference levels (chance, the
    training context)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, pts) in enumerate(curves.items()):
        if pts:
            ax.plot(*zip(*pts), label=name, ls=_LINESTYLES[i % len(_LINESTYLES)],
                    marker=_MARKERS[i % len(_MARKERS)] if len(pts) < 30 else None, mfc="none")
    for label, y in hlines:
        ax.axhline(y, color="gray", lw=0.8, ls=":", label=label)
    for label, x in vlines:
        ax.axvline(x, color="gray", lw=0.8, ls="-.", label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


_LINESTYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "x", "D", "v", "+", "*")


def fit(trainer: Trainer, stream: Tensor, *, batch_size: int, context: int, seed: int, steps: int,
        val_stream: Tensor | None = None, val_every: int = 0, val_batches: int = 4,
        metrics: Metrics | None = None, on_checkpoint: Callable[[], None] | None = None, ckpt_every: int = 0,
        progress: bool = True, desc: str = "train") -> Metrics:
    """Train from ``trainer.step_count`` up to ``steps`` on random windows of ``stream``."""
    metrics = metrics if metrics is not None else Metrics()
    start = trainer.step_count
    bar = progress_bar(total=steps, initial=start, desc=desc, enabled=progress and trainer.dist.main, unit="step")
    t0, tokens = time.perf_counter(), 0
    while trainer.step_count < steps:
        s = trainer.step_count
        x, y = data.train_batch(stream, batch_size, context, seed, s)
        loss = trainer.step(x, y)
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss} at step {s}; lower --lr")
        tokens += y.numel()
        elapsed = time.perf_counter() - t0
        row = {"step": s + 1, "tokens": (s + 1) * y.numel(), "train_loss": loss, "tok_per_s": tokens / elapsed,
               "elapsed_s": elapsed, "lr": lr_at(s, trainer.lr, trainer.steps, trainer.warmup, trainer.schedule)}
        done = trainer.step_count == steps
        if val_stream is not None and val_every and (trainer.step_count % val_every == 0 or done):
            vl = trainer.evaluate(data.val_batches(val_stream, batch_size, context, val_batches))
            row.update(val_loss=vl, val_ppl=math.exp(vl))
        metrics.add(**row)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / elapsed:.0f}")
        bar.update(1)
        if on_checkpoint is not None and ckpt_every and (trainer.step_count % ckpt_every == 0 or done):
            on_checkpoint()
    bar.close()
    return metrics
