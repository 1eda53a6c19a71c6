"""Needle-in-a-haystack tasks in the style of RULER's S-NIAH-1/2/3 and multi-key NIAH (Hsieh et al., 2024),
built from text that ships with Python (``deepopt hope niah --task ...``).

A needle ``" One of the special magic numbers for <key> is: <value>. "`` sits at a random depth of a haystack;
the sequence ends in ``" What is the special magic number for <key>? The special magic number for <key> is:
<value>"`` and only the value's tokens are scored (teacher forced, greedy).  Tasks:

    s-niah-1   7-digit value, haystack of one repeated noise paragraph (RULER's "repeat" haystack)
    s-niah-2   7-digit value, haystack of shipped English prose (docstrings, pydoc topics)
    s-niah-3   8-hex-digit value (RULER uses UUIDs), prose haystack
    mk-niah    4 needles with different keys in prose; one of them is asked

``needle=False`` replaces the asked needle by haystack text of the same length (the distractors of
``mk-niah`` stay): the diagnostic that the answer comes from the needle, whose accuracy must fall to chance
(1/10 per digit, 1/16 per hex digit with byte tokens).  ``needle_gradient_share`` is the second diagnostic,
which also reads a model at chance: how much of the answer's input gradient falls on the needle's tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from .data import BYTES, Tokenizer
from .recall import plateau, stored_gradient_shares

TASKS = ("s-niah-1", "s-niah-2", "s-niah-3", "mk-niah")
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
MK_NEEDLES = 4
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def chance(task: str) -> float:
    """Per-token chance accuracy of a value token with byte tokens."""
    return 1 / 16 if task == "s-niah-3" else 1 / 10


def _value(task: str, gen: torch.Generator) -> str:
    if task == "s-niah-3":
        return "".join("0123456789abcdef"[int(i)] for i in torch.randint(0, 16, (8,), generator=gen))
    return "".join(str(int(i)) for i in torch.randint(0, 10, (7,), generator=gen))


def _key(gen: torch.Generator) -> str:
    return "".join(_LETTERS[int(i)] for i in torch.randint(0, 26, (6,), generator=gen))


def _needle(key: str, value: str) -> str:
    return f" One of the special magic numbers for {key} is: {value}. "


def niah_batch(task: str, haystack: Tensor, batch_size: int, length: int, seed: int, step: int,
               tokenizer: Tokenizer = BYTES, needle: bool = True) -> tuple[Tensor, Tensor]:
    """``(x, y)`` of ``length`` tokens; ``y`` is −100 except on the asked value's tokens.  ``haystack``: the
    prose stream (ignored by ``s-niah-1``).  A pure function of ``(seed, step)``; ``needle=False`` gives the
    same sequences with the asked needle replaced by haystack text."""
    return _niah_batch(task, haystack, batch_size, length, seed, step, tokenizer, needle)[:2]


def _niah_batch(task: str, haystack: Tensor, batch_size: int, length: int, seed: int, step: int,
                tokenizer: Tokenizer = BYTES, needle: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """``niah_batch``'s ``(x, y)`` and ``values`` (batch_size, needles, length): every needle's value in the
    sequence, its tokens where ``y`` holds the answer's (−1 elsewhere, and for a value whose token count differs
    from the answer's)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step + 11)
    noise = tokenizer.encode(NOISE * (length // len(NOISE) + 2))
    xs, ys, vs = [], [], []
    for _ in range(batch_size):
        n = MK_NEEDLES if task == "mk-niah" else 1
        keys, values = [_key(gen) for _ in range(n)], [_value(task, gen) for _ in range(n)]
        asked = int(torch.randint(0, n, (1,), generator=gen))
        needles = [tokenizer.encode(_needle(k, v)) for k, v in zip(keys, values)]
        stem = tokenizer.encode(f" What is the special magic number for {keys[asked]}? "
                                f"The special magic number for {keys[asked]} is: ")
        answer = tokenizer.encode(values[asked])
        n_fill = length + 1 - sum(t.numel() for t in needles) - stem.numel() - answer.numel()
        if n_fill < 0:
            raise ValueError(f"{task} length must be >= {length - n_fill}, got {length}")
        source = noise if task == "s-niah-1" else haystack
        start = int(torch.randint(0, source.numel() - n_fill - needles[asked].numel(), (1,), generator=gen))
        fill = source[start:start + n_fill]
        spare = source[start + n_fill:start + n_fill + needles[asked].numel()]  # replaces a removed needle
        depths = sorted(int(d) for d in torch.randint(0, n_fill + 1, (n,), generator=gen))
        order = torch.randperm(n, generator=gen).tolist()
        parts, prev = [], 0
        for depth, i in zip(depths, order):
            parts += [fill[prev:depth], needles[i] if (needle or i != asked) else spare]
            prev = depth
        seq = torch.cat([*parts, fill[prev:], stem, answer])
        y = torch.full((length,), -100, dtype=torch.int64)
        y[-answer.numel():] = seq[-answer.numel():]
        xs.append(seq[:-1])
        ys.append(y)
        aligned = torch.full((n, length), -1, dtype=torch.int64)
        for j, v in enumerate(values):
            tokens = tokenizer.encode(v)
            if tokens.numel() == answer.numel():
                aligned[j, -answer.numel():] = tokens
        vs.append(aligned)
    return torch.stack(xs), torch.stack(ys), torch.stack(vs)


VAL_SPLIT, TEST_SPLIT = 1, 0  # held-out draws: learning rates are chosen on VAL_SPLIT, tables report TEST_SPLIT


def held_out_batches(task: str, haystack: Tensor, length: int, samples: int, batch_size: int, seed: int,
                     tokenizer: Tokenizer = BYTES, needle: bool = True, split: int = TEST_SPLIT
                     ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """The held-out sequences that the evaluations read: ``samples`` of them, ``(x, y, values)`` (``_niah_batch``)
    in batches of at most ``batch_size``, drawn from ``seed + 7919·(1 + split)`` (never a training batch;
    ``split`` picks an independent draw)."""
    for i, n in enumerate(range(0, samples, batch_size)):
        yield _niah_batch(task, haystack, min(batch_size, samples - n), length, seed + 7919 * (1 + split), i,
                          tokenizer, needle)


@torch.no_grad()
def niah_eval(model, task: str, haystack: Tensor, length: int, samples: int, batch_size: int, seed: int,
              tokenizer: Tokenizer = BYTES, needle: bool = True, split: int = TEST_SPLIT) -> dict[str, Any]:
    """Teacher-forced greedy answers on ``samples`` held-out sequences: ``digit_accuracy`` (per value token),
    ``exact_accuracy`` (whole value) and the plateau diagnostic (``recall.plateau``: the share of answer tokens
    that equal the same token of some needle's value in the context; with one needle it is the accuracy)."""
    model.eval()
    device = model.embed.weight.device
    right, in_context, scored, exact, n = 0, 0, 0, 0, 0
    for x, y, values in held_out_batches(task, haystack, length, samples, batch_size, seed, tokenizer, needle, split):
        logits, _ = model(x.to(device))
        answer = y != -100
        pred = logits.argmax(-1).cpu()
        hit = (pred == y) & answer
        right, scored = right + int(hit.sum()), scored + int(answer.sum())
        exact, n = exact + int((hit | ~answer).all(-1).sum()), n + x.shape[0]
        in_context += int((((pred[:, None] == values) & (values >= 0)).any(1) & answer).sum())
    n_values = MK_NEEDLES if task == "mk-niah" else 1
    return {"digit_accuracy": right / scored, "exact_accuracy": exact / n,
            **plateau(right / scored, in_context / scored, n_values)}


def niah_accuracy(model, task: str, haystack: Tensor, length: int, samples: int, batch_size: int, seed: int,
                  tokenizer: Tokenizer = BYTES, needle: bool = True) -> tuple[float, float]:
    """(value-token accuracy, exact-match accuracy) on ``samples`` held-out sequences (teacher forced, greedy)."""
    r = niah_eval(model, task, haystack, length, samples, batch_size, seed, tokenizer, needle)
    return r["digit_accuracy"], r["exact_accuracy"]


def needle_gradient_share(model, task: str, haystack: Tensor, length: int, samples: int, batch_size: int, seed: int,
                          tokenizer: Tokenizer = BYTES) -> tuple[float, float]:
    """``(share, fraction)`` on the held-out sequences of ``niah_accuracy``: ``share = Σ_{t∈N} ‖g_t‖ / Σ_t ‖g_t‖``
    with ``g_t = ∂ℓ/∂e_t`` the gradient of the answer's summed NLL ``ℓ`` with respect to token t's embedding
    and ``N`` the asked needle's positions (where the ``needle=False`` sequence differs), ``fraction = |N| / T``
    (the share of a model that spreads its gradient evenly).  A model that reads the needle puts far more than
    ``fraction`` on it; one whose memory carries nothing from the needle to the answer puts about 0."""
    shares, fraction = needle_gradient_shares(model, task, haystack, length, samples, batch_size, seed, tokenizer)
    return shares[0], fraction


def needle_gradient_shares(model, task: str, haystack: Tensor, length: int, samples: int, batch_size: int,
                           seed: int, tokenizer: Tokenizer = BYTES) -> tuple[list[float], float]:
    """``needle_gradient_share`` at every depth (``recall.stored_gradient_shares``): the share of the answer's
    gradient with respect to the residual stream entering each block that falls on the needle's positions."""
    batches = (held_out_batches(task, haystack, length, samples, batch_size, seed, tokenizer, needle)
               for needle in (True, False))
    return stored_gradient_shares(model, ((x, y, x != gone) for (x, y, _), (gone, _, _) in zip(*batches)))
