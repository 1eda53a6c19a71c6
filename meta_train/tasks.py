"""Inner problems for meta-training, built from data that ships offline.

A ``Task`` is a model (architecture + initial weights), a criterion and a deterministic minibatch
stream, so the same step index always gives the same batch (unrolls can be recomputed, resumed and
compared across backends)::

    loss(θ, batch) = criterion(functional_call(model, θ, x), y)

Families (sampled by seed, used for meta-training):
    ``digits``: MLPs on scikit-learn digits, width ∈ {16, 32, 64}, depth ∈ {1, 2},
        activation ∈ {relu, tanh}, batch size ∈ {32, 64, 128}.
    ``tabular``: MLPs on small problems cut from digits (8–32 of its features, 2–5 of its classes) or
        iris, width ∈ {16, 32, 64}, depth ∈ {1, 2}, relu/tanh, batch ∈ {16, 32, 64}.
    ``mixed``: half ``digits``, half ``tabular`` (VeLO's lesson: breadth of tasks generalises).
    ``small``: 64–400 training rows of a teacher-labelled Gaussian problem or a ``tabular`` cut, small enough
        for the MLP to memorise within the horizon (the loss falls towards 0, as on wine and breast cancer).
    ``broad``: a third each of ``digits``, ``tabular`` and ``small``.
    ``lm``: byte-level causal Transformer LMs on the standard library's *source code* (``deepopt.hope.data``'s
        ``code`` domain, training split), width ∈ {32, 48, 64}, depth ∈ {1, 2}, 2/4 heads, context ∈ {32, 64},
        batch ∈ {8, 16}; the outer loss reads training windows only.
    ``cnn``: small CNNs (two 3×3 convolutions of 4–16 channels, relu/tanh, a linear head) on *synthetic* 8×8
        images: 3–10 classes of smoothed random prototypes, shifted by up to one pixel and noised.
    ``general``: the shipped optimizer's family — 35% ``lm``, 20% ``cnn``, 25% ``digits``, 20% ``broad``'s
        tabular/small problems.
    ``quadratic``: ``½‖S(w − c − ξ)‖²`` with ``SᵀS`` of eigenvalues log-uniform in [0.01, 1] and
        minibatch noise ξ ~ 0.1·N(0, I).
Held-out tasks (never sampled by a family; evaluation only): digits MLPs of depth 3 / width 128 with
activations outside the family (gelu, elu), and MLPs on the wine and breast-cancer data sets.  ``deepopt evaluate``'s
suite (``deepopt.evaluate``) is held out from every family too: no family has a CNN on digits, a language model on
English prose, a HOPE model, a 4-layer/128-wide Transformer, or a breast-cancer MLP.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from deepopt.data import load_classification

Batch = tuple[Tensor, Tensor]
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "silu": nn.SiLU,
}


@dataclass(frozen=True)
class Sampler:
    """Minibatch ``step``: ``batch_size`` rows of ``(x, y)`` with replacement, seeded by ``(seed, step)``."""

    x: Tensor
    y: Tensor
    batch_size: int
    seed: int

    def __call__(self, step: int) -> Batch:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        idx = torch.randint(self.x.shape[0], (self.batch_size,), generator=gen)
        return self.x[idx], self.y[idx]


@dataclass(frozen=True)
class Task:
    """One inner problem; ``train_batch(t)``/``heldout_batch(t)`` are deterministic in ``t``."""

    name: str
    model: nn.Module
    criterion: Callable[[Tensor, Tensor], Tensor]
    train_batch: Callable[[int], Batch]
    heldout_batch: Callable[[int], Batch]
    full_batch: Batch  # the whole training split, for evaluation curves

    def to(self, device: str | torch.device) -> Task:
        """This task with its model, data and batch streams on ``device`` (the same batches: indices are
        still drawn by CPU generators)."""
        def moved(stream):
            if not dataclasses.is_dataclass(stream):
                return stream
            fields = {f.name: getattr(stream, f.name) for f in dataclasses.fields(stream)}
            return dataclasses.replace(stream, **{k: v.to(device) for k, v in fields.items() if isinstance(v, Tensor)})

        return dataclasses.replace(self, model=copy.deepcopy(self.model).to(device),
                                   train_batch=moved(self.train_batch), heldout_batch=moved(self.heldout_batch),
                                   full_batch=tuple(t.to(device) for t in self.full_batch))

    def init_params(self) -> dict[str, Tensor]:
        """Fresh copies of the model's initial weights."""
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def loss(self, params: dict[str, Tensor], batch: Batch, buffers: dict[str, Tensor] | None = None) -> Tensor:
        """``criterion(functional_call(model, params, x), y)`` (``buffers`` replace the model's own)."""
        return self.criterion(functional_call(self.model, {**params, **(buffers or {})}, (batch[0],)), batch[1])

    def buffers(self) -> dict[str, Tensor]:
        return dict(self.model.named_buffers())

    def signature(self) -> tuple:
        """What tasks must share to run side by side under ``vmap``: module structure, tensor shapes and
        dtypes, criterion and batch shapes."""
        def shapes(tensors):
            return tuple((n, tuple(t.shape), t.dtype) for n, t in tensors)

        batch = self.train_batch(0)
        return (repr(self.model), shapes(self.model.named_parameters()), shapes(self.model.named_buffers()),
                self.criterion, shapes(zip("xy", batch)))


@dataclass(frozen=True)
class TaskStack:
    """Tasks of one ``signature`` (e.g. one architecture with different weights, data draws or, for the
    quadratic family, curvatures) whose unrolls run side by side under ``torch.func.vmap``.

    An ``Unroll`` of a stack carries weights and rule state stacked along a leading task dimension
    (``stack_inner``) and its outer loss is the mean of the tasks' outer losses."""

    tasks: tuple[Task, ...]

    def __post_init__(self) -> None:
        if not self.tasks or not all(isinstance(t, Task) for t in self.tasks):
            raise ValueError("tasks must be a non-empty sequence of Task")
        first = self.tasks[0].signature()
        for t in self.tasks[1:]:
            if t.signature() != first:
                raise ValueError(f"task {t.name!r} differs in structure from {self.tasks[0].name!r}; a TaskStack "
                                 f"needs one model structure, criterion and batch shape (Task.signature())")

    @property
    def name(self) -> str:
        return "+".join(t.name for t in self.tasks)

    def batches(self, heldout: bool, start: int, n: int) -> Batch:
        """Batches ``start … start + n − 1`` of every task, shaped ``(tasks, n, …)``."""
        per_task = [[(t.heldout_batch if heldout else t.train_batch)(s) for s in range(start, start + n)]
                    for t in self.tasks]
        return tuple(torch.stack([torch.stack([b[i] for b in bs]) for bs in per_task]) for i in range(2))

    def buffers(self) -> dict[str, Tensor]:
        bufs = [t.buffers() for t in self.tasks]
        return {k: torch.stack([b[k] for b in bufs]) for k in bufs[0]}

    def init_params(self) -> dict[str, Tensor]:
        params = [t.init_params() for t in self.tasks]
        return {k: torch.stack([p[k] for p in params]) for k in params[0]}


@functools.lru_cache(maxsize=16)
def _dataset(name: str, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The data set with its constant features dropped (an always-zero input column gives exactly-zero
    gradients, where differentiating through Adam's ``sqrt(v)`` is undefined)."""
    x, y, x_test, y_test = load_classification(name, dtype=dtype)
    keep = x.std(0) > 0
    return x[:, keep], y, x_test[:, keep], y_test


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def mlp_task(
    name: str,
    dataset: str,
    widths: tuple[int, ...],
    activation: str,
    batch_size: int,
    seed: int,
    dtype: torch.dtype = torch.float32,
) -> Task:
    """A cross-entropy MLP ``in → widths… → classes`` on a scikit-learn data set."""
    return _mlp_on(name, _dataset(dataset, dtype), widths, activation, batch_size, seed, dtype)


def _mlp_on(
    name: str,
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    widths: tuple[int, ...],
    activation: str,
    batch_size: int,
    seed: int,
    dtype: torch.dtype,
) -> Task:
    x, y, x_test, y_test = data
    sizes = (x.shape[1], *widths, int(y.max()) + 1)

    def build() -> nn.Module:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(ACTIVATIONS[activation]())
        return nn.Sequential(*layers).to(dtype)

    return Task(
        name,
        _seeded(seed, build),
        nn.functional.cross_entropy,
        Sampler(x, y, batch_size, seed),
        Sampler(x_test, y_test, batch_size, seed + 1),
        (x, y),
    )


class QuadraticModel(nn.Module):
    """``f(x) = (w − x) Sᵀ``; with ``x = c + ξ`` the loss ``½‖f(x)‖²`` is a noisy quadratic in ``w``."""

    def __init__(self, scale: Tensor, w0: Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.w = nn.Parameter(w0)

    def forward(self, x: Tensor) -> Tensor:
        return (self.w - x) @ self.scale.mT


def _half_sq_norm(out: Tensor, _target: Tensor) -> Tensor:
    return 0.5 * (out * out).sum(-1).mean()


@dataclass(frozen=True)
class _NoisyTarget:
    center: Tensor
    noise: float
    seed: int

    def __call__(self, step: int) -> Batch:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        xi = torch.randn(1, self.center.shape[0], generator=gen, dtype=torch.float64).to(self.center)
        x = self.center + self.noise * xi
        return x, torch.zeros_like(x)


def quadratic_task(seed: int, dim: int = 16, noise: float = 0.1, dtype: torch.dtype = torch.float32) -> Task:
    """A random ill-conditioned quadratic ``½‖S(w − c − ξ)‖²`` (eigenvalues of SᵀS in [0.01, 1])."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    eig = 10 ** (-2 * torch.rand(dim, generator=gen, dtype=torch.float64))
    scale = (q * eig.sqrt()) @ q.mT
    center = torch.randn(dim, generator=gen, dtype=torch.float64)
    w0 = torch.randn(dim, generator=gen, dtype=torch.float64)
    model = QuadraticModel(scale.to(dtype), w0.to(dtype))
    target = _NoisyTarget(center.to(dtype), noise, seed)
    return Task(
        f"quadratic_{seed}",
        model,
        _half_sq_norm,
        target,
        _NoisyTarget(center.to(dtype), noise, seed + 1),
        (center.to(dtype)[None], torch.zeros(1, dim, dtype=dtype)),
    )


def _draw_mlp(rng: random.Random, batch_sizes: tuple[int, ...]) -> tuple[int, int, str, int]:
    """A family member's MLP, drawn in this order: width 16/32/64, depth 1/2, relu/tanh, a batch size."""
    width, depth = rng.choice((16, 32, 64)), rng.choice((1, 2))
    return width, depth, rng.choice(("relu", "tanh")), rng.choice(batch_sizes)


def digits_task(seed: int, dtype: torch.dtype = torch.float32) -> Task:
    """A member of the digits family: width, depth, activation and batch size drawn from ``seed``."""
    rng = random.Random(seed)
    width, depth, activation, batch_size = _draw_mlp(rng, (32, 64, 128))
    name = f"digits_w{width}_d{depth}_{activation}_b{batch_size}"
    return mlp_task(name, "digits", (width,) * depth, activation, batch_size, seed, dtype)


def tabular_task(seed: int, dtype: torch.dtype = torch.float32) -> Task:
    """A member of the tabular family: a small problem cut from digits (a random 8–32 of its non-constant features and
    2–5 of its 10 classes, relabelled) or iris, under an MLP of width 16/32/64, depth 1/2, relu/tanh, batch
    16/32/64 — small, low-dimensional problems like the held-out wine and breast-cancer ones, from other data."""
    rng = random.Random(seed)
    width, depth, activation, batch_size = _draw_mlp(rng, (16, 32, 64))
    name, data = _cut(rng, dtype)
    return _mlp_on(f"{name}_w{width}_d{depth}_{activation}_b{batch_size}", data, (width,) * depth, activation,
                   batch_size, seed, dtype)


def _cut(rng: random.Random, dtype: torch.dtype) -> tuple[str, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Iris (1 in 4) or a problem cut from digits: 8–32 of its features, 2–5 of its classes (relabelled 0…C−1)."""
    if rng.random() < 0.25:
        return "iris", _dataset("iris", dtype)
    x, y, x_test, y_test = _dataset("digits", dtype)
    features = sorted(rng.sample(range(x.shape[1]), rng.randint(8, 32)))
    classes = sorted(rng.sample(range(10), rng.randint(2, 5)))
    relabel = torch.full((10,), -1, dtype=torch.long)
    relabel[classes] = torch.arange(len(classes))
    keep, keep_test = relabel[y] >= 0, relabel[y_test] >= 0
    data = (x[keep][:, features], relabel[y[keep]], x_test[keep_test][:, features], relabel[y_test[keep_test]])
    return f"digits{len(features)}f{len(classes)}c", data


def _teacher_data(rng: random.Random, dtype: torch.dtype) -> tuple[str, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Synthetic classification: ``x ~ N(0, I_d)`` (d ∈ [4, 32]), labels ``argmax tanh(x A) B`` of a random
    one-hidden-layer teacher with 2–4 classes; 512 training and 256 test rows."""
    d, classes = rng.randint(4, 32), rng.randint(2, 4)
    gen = torch.Generator().manual_seed(rng.getrandbits(31))
    a = torch.randn(d, 16, generator=gen, dtype=torch.float64) / d**0.5
    b = torch.randn(16, classes, generator=gen, dtype=torch.float64)
    x = torch.randn(768, d, generator=gen, dtype=torch.float64)
    y = (torch.tanh(x @ a) @ b).argmax(-1)
    x = x.to(dtype)
    return f"teacher{d}f{classes}c", (x[:512], y[:512], x[512:], y[512:])


def small_task(seed: int, dtype: torch.dtype = torch.float32) -> Task:
    """A member of the small family: 64–400 training rows (an MLP memorises them within the horizon, so the loss
    keeps falling towards 0 — as on the held-out wine and breast-cancer problems, and unlike digits' minibatch
    noise floor) of a teacher-labelled Gaussian problem (``_teacher_data``) or a ``tabular`` cut, under an MLP
    of width 16/32/64, depth 1/2, relu/tanh, batch 16/32/64."""
    rng = random.Random(seed)
    width, depth, activation, batch_size = _draw_mlp(rng, (16, 32, 64))
    name, (x, y, x_test, y_test) = (_teacher_data if rng.random() < 0.5 else _cut)(rng, dtype)
    rows = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[: rng.randint(64, 400)]
    return _mlp_on(f"{name}{len(rows)}r_w{width}_d{depth}_{activation}_b{batch_size}",
                   (x[rows], y[rows], x_test, y_test), (width,) * depth, activation, batch_size, seed, dtype)


def mixed_task(seed: int, dtype: torch.dtype = torch.float32) -> Task:
    """Half digits-family, half tabular-family members (drawn from ``seed``)."""
    return (digits_task if random.Random(seed).random() < 0.5 else tabular_task)(seed, dtype=dtype)


def broad_task(seed: int, dtype: torch.dtype = torch.float32) -> Task:
    """One third each of digits-family, tabular-family and small-family members (drawn from ``seed``)."""
    return random.Random(seed).choice((digits_task, tabular_task, small_task))(seed, dtype=dtype)


def _lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy of ``(B, T, V)`` logits."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention written out (softmax of masked scores), so that ``torch.func`` can take
    second derivatives through it on any device."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        scores = q @ k.mT / (d // self.heads) ** 0.5
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        att = scores.masked_fill(mask, float("-inf")).softmax(-1)
        return self.out((att @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: attention, then a GELU MLP of width 4d."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """A byte-level GPT: token and learned position embeddings, ``depth`` blocks, a final norm and a linear head."""

    def __init__(self, vocab: int, d: int, depth: int, heads: int, context: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(context, d))
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        return self.head(self.norm(self.blocks(self.embed(idx) + self.pos[: idx.shape[-1]])))


@dataclass(frozen=True)
class Windows:
    """Batch ``step``: ``batch_size`` random windows of ``context + 1`` tokens of ``stream`` as ``(x, y)``,
    seeded by ``(seed, step)`` (``deepopt.hope.data.train_batch``)."""

    stream: Tensor
    batch_size: int
    context: int
    seed: int

    def __call__(self, step: int) -> Batch:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)  # as deepopt.hope.data.train_batch
        starts = torch.randint(0, self.stream.numel() - self.context - 1, (self.batch_size,), generator=gen)
        windows = self.stream[(starts[:, None] + torch.arange(self.context + 1)).to(self.stream.device)]
        return windows[:, :-1], windows[:, 1:]


LM_CORPUS_BYTES = 1_000_000  # the code domain's training split, first megabyte


@functools.lru_cache(maxsize=2)
def _code_stream() -> tuple[Tensor, Tensor]:
    """The ``code`` domain's byte streams (train, validation), from the cache once built."""
    from deepopt.hope.data import load_corpus

    corpus = load_corpus("code", max_bytes=LM_CORPUS_BYTES)
    return corpus.train, corpus.val


def lm_task(seed: int, dtype: torch.dtype = torch.float32) -> Task:
    """A member of the lm family (module docstring), drawn from ``seed``."""
    rng = random.Random(seed)
    d, depth, heads = rng.choice((32, 48, 64)), rng.choice((1, 2)), rng.choice((2, 4))
    context, batch_size = rng.choice((32, 64)), rng.choice((8, 16))
    train, val = _code_stream()
    model = _seeded(seed, lambda: TinyLM(256, d, depth, heads, context).to(dtype))
    stream = Windows(train, batch_size, context, seed)
    full = Windows(val, 32, context, seed + 7)(0)  # a fixed set of validation windows for curves
    return Task(f"lm_code_d{d}_l{depth}_h{heads}_c{context}_b{batch_size}", model, _lm_loss, stream,
                Windows(val, batch_size, context, seed + 1), full)


def synthetic_images(rng: random.Random, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """3–10 classes of 8×8 images: each class a random prototype (Gaussian noise smoothed by a 3×3 box filter and
    standardised), each image its class's prototype rolled by up to one pixel per axis plus N(0, σ²) noise,
    σ ∈ [0.5, 1.5]; 1024 training and 256 test images, flattened to 64 features like digits'."""
    classes, noise = rng.randint(3, 10), rng.uniform(0.5, 1.5)
    gen = torch.Generator().manual_seed(rng.getrandbits(31))
    protos = nn.functional.avg_pool2d(torch.randn(classes, 1, 10, 10, generator=gen, dtype=torch.float64), 3, 1)
    protos = (protos - protos.mean((2, 3), keepdim=True)) / protos.std((2, 3), keepdim=True)
    y = torch.randint(classes, (1280,), generator=gen)
    shifts = torch.randint(-1, 2, (1280, 2), generator=gen)
    images = torch.stack([protos[c, 0].roll(tuple(s.tolist()), (0, 1)) for c, s in zip(y, shifts)])
    x = (images + noise * torch.randn(images.shape, generator=gen, dtype=torch.float64)).reshape(1280, 64).to(dtype)
    return x[:1024], y[:1024], x[1024:], y[1024:]


def cnn_task(seed: int, dtype: torch.dtype = torch.float32) -> Task:
    """A member of the cnn family (module docstring), drawn from ``seed``."""
    rng = random.Random(seed)
    c1, c2 = rng.choice((4, 8)), rng.choice((8, 16))
    activation, batch_size = rng.choice(("relu", "tanh")), rng.choice((32, 64, 128))
    x, y, x_test, y_test = synthetic_images(rng, dtype)
    classes = int(y.max()) + 1
    act = ACTIVATIONS[activation]

    def build() -> nn.Module:
        return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, c1, 3), act(), nn.Conv2d(c1, c2, 3), act(),
                             nn.Flatten(), nn.Linear(16 * c2, classes)).to(dtype)

    return Task(f"cnn_synth{classes}c_{c1}x{c2}_{activation}_b{batch_size}", _seeded(seed, build),
                nn.functional.cross_entropy, Sampler(x, y, batch_size, seed), Sampler(x_test, y_test, batch_size,
                                                                                      seed + 1), (x, y))


def general_task(seed: int, dtype: torch.dtype = torch.float32) -> Task:
    """The shipped optimizer's family: 35% lm, 20% cnn, 25% digits MLPs, 20% tabular/small problems."""
    u = random.Random(seed).random()
    if u < 0.35:
        return lm_task(seed, dtype)
    if u < 0.55:
        return cnn_task(seed, dtype)
    if u < 0.80:
        return digits_task(seed, dtype)
    return (tabular_task if u < 0.90 else small_task)(seed, dtype)


FAMILIES: dict[str, Callable[..., Task]] = {
    "digits": digits_task, "quadratic": quadratic_task, "tabular": tabular_task, "mixed": mixed_task,
    "small": small_task, "broad": broad_task, "lm": lm_task, "cnn": cnn_task, "general": general_task,
}

# name -> (data set, widths, activation, batch size); none of these is a member of a family.
HELD_OUT_SPECS: dict[str, tuple[str, tuple[int, ...], str, int]] = {
    "digits_d3_gelu": ("digits", (48, 48, 48), "gelu", 64),
    "digits_w128_elu": ("digits", (128,), "elu", 64),
    "wine_mlp": ("wine", (32, 32), "silu", 32),
    "breast_cancer_mlp": ("breast_cancer", (64,), "elu", 64),
}


def held_out_task(name: str, seed: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Task:
    """Evaluation-only task ``name`` (see ``HELD_OUT_SPECS``) with weights and batches drawn from ``seed``."""
    if name not in HELD_OUT_SPECS:
        raise ValueError(f"unknown held-out task {name!r}; accepted: {sorted(HELD_OUT_SPECS)}")
    dataset, widths, activation, batch_size = HELD_OUT_SPECS[name]
    return mlp_task(name, dataset, widths, activation, batch_size, 10_000 + seed, dtype).to(device)


def sample_task(family: str, seed: int, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> Task:
    """The task of ``family`` drawn from ``seed``, on ``device``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown task family {family!r}; accepted: {sorted(FAMILIES)}")
    return FAMILIES[family](seed, dtype=dtype).to(device)
