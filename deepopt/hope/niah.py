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
(1/10 per digit, 1/16 per hex digit with byte tokens).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .data import BYTES, Tokenizer

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
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step + 11)
    noise = tokenizer.encode(NOISE * (length // len(NOISE) + 2))
    xs, ys = [], []
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
    return torch.stack(xs), torch.stack(ys)


@torch.no_grad()
def niah_accuracy(model, task: str, haystack: Tensor, length: int, samples: int, batch_size: int, seed: int,
                  tokenizer: Tokenizer = BYTES, needle: bool = True) -> tuple[float, float]:
    """(value-token accuracy, exact-match accuracy) on ``samples`` held-out sequences (teacher forced, greedy)."""
    model.eval()
    device = model.embed.weight.device
    right, scored, exact, n, i = 0, 0, 0, 0, 0
    while n < samples:
        x, y = niah_batch(task, haystack, min(batch_size, samples - n), length, seed + 7919, i, tokenizer, needle)
        logits, _ = model(x.to(device))
        answer = y != -100
        hit = (logits.argmax(-1).cpu() == y) & answer
        right, scored = right + int(hit.sum()), scored + int(answer.sum())
        exact, n, i = exact + int((hit | ~answer).all(-1).sum()), n + x.shape[0], i + 1
    return right / scored, exact / n
