"""Text that ships with Python, as token streams with deterministic train/validation splits.

Domains (no download):
    ``code``   the standard library's ``*.py`` source files;
    ``prose``  English prose shipped with Python: the stdlib's docstrings (read with ``ast``, nothing is
               imported) and the ``pydoc_data.topics`` help texts;
    files      a user's own text files (``--data PATH...``).

A document goes to validation when ``crc32(name) % 10 == 0`` (≈10%), so the split depends on nothing
but the document's name.  Tokens are bytes (vocabulary 256); the tokenized corpus is cached as
safetensors under ``$DEEPOPT_CACHE`` (default ``~/.cache/deepopt``).
"""

from __future__ import annotations

import ast
import hashlib
import os
import sysconfig
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from deepopt.checkpoint import atomic_save_tensors, load_tensors

DOMAINS = ("code", "prose")
VOCAB_SIZE = 256
SEPARATOR = b"\n\n"


def cache_dir() -> Path:
    return Path(os.environ.get("DEEPOPT_CACHE", Path.home() / ".cache" / "deepopt"))


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def _code_docs() -> Iterator[tuple[str, bytes]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_files():
        yield str(path.relative_to(root)), path.read_bytes()


def _docstrings(source: bytes) -> Iterator[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 80:
                yield doc


def _prose_docs() -> Iterator[tuple[str, bytes]]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"pydoc_data:{name}", topics[name].encode()
    for name, source in _code_docs():
        docs = list(_docstrings(source))
        if docs:
            yield f"docstrings:{name}", "\n\n".join(docs).encode()


def _file_docs(paths: Iterable[str | os.PathLike]) -> Iterator[tuple[str, bytes]]:
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise ValueError(f"data: {path} is not a readable file")
        yield path.name, path.read_bytes()  # the split depends on the file name, not on its folder


def is_validation(name: str) -> bool:
    return zlib.crc32(name.encode()) % 10 == 0


@dataclass(frozen=True)
class Corpus:
    """A domain's train and validation token streams (1-D ``int64``)."""

    name: str
    train: Tensor
    val: Tensor


def _build(docs: Iterable[tuple[str, bytes]], max_bytes: int | None) -> tuple[Tensor, Tensor]:
    parts: dict[bool, list[bytes]] = {True: [], False: []}
    sizes = {True: 0, False: 0}
    for name, text in docs:
        split = is_validation(name)
        limit = None if max_bytes is None else (max_bytes // 10 if split else max_bytes)
        if limit is not None and sizes[split] >= limit:
            if sizes[not split] >= (max_bytes // 10 if not split else max_bytes):
                break
            continue
        parts[split].append(text)
        sizes[split] += len(text) + len(SEPARATOR)
    train, val = (torch.frombuffer(bytearray(SEPARATOR.join(parts[s])), dtype=torch.uint8) for s in (False, True))
    if max_bytes is not None:
        train, val = train[:max_bytes], val[: max(max_bytes // 10, 1)]
    return train.to(torch.int64), val.to(torch.int64)


def load_corpus(domain: str = "code", paths: Iterable[str | os.PathLike] | None = None,
                max_bytes: int | None = 4_000_000, cache: bool = True) -> Corpus:
    """The byte-token corpus of ``domain`` (``"code"``/``"prose"``) or of the text files ``paths``.

    ``max_bytes`` caps the training stream (validation gets a tenth), taking documents in sorted order.
    """
    if paths:
        paths = [str(p) for p in paths]
        docs: Iterable[tuple[str, bytes]] = _file_docs(paths)
        key = "files-" + hashlib.sha256("\n".join(paths).encode()).hexdigest()[:16]
        name = "files"
    else:
        if domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
        docs = _code_docs() if domain == "code" else _prose_docs()
        key, name = domain, domain
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"max_bytes must be None or >= 1, got {max_bytes}")
    file = cache_dir() / "hope" / f"{key}-{max_bytes}.safetensors"
    if cache and not paths and file.is_file():
        t = load_tensors(file)
        return Corpus(name, t["train"], t["val"])
    train, val = _build(docs, max_bytes)
    if train.numel() < 2 or val.numel() < 2:
        raise ValueError(f"corpus {name!r} is too small to split: {train.numel()} train, {val.numel()} val tokens "
                         f"(validation takes documents with crc32(name) % 10 == 0; pass more files)")
    if cache and not paths:
        atomic_save_tensors({"train": train, "val": val}, file)
    return Corpus(name, train, val)


def encode(text: str) -> Tensor:
    return torch.tensor(list(text.encode()), dtype=torch.int64)


def decode(tokens: Tensor) -> str:
    return bytes(tokens.to(torch.uint8).tolist()).decode(errors="replace")


def train_batch(stream: Tensor, batch_size: int, context: int, seed: int, step: int) -> tuple[Tensor, Tensor]:
    """Random windows ``(x, y)`` of ``context`` tokens, a pure function of ``(seed, step)`` (exact resume)."""
    if stream.numel() <= context + 1:
        raise ValueError(f"context {context} needs a stream longer than {context + 1} tokens, got {stream.numel()}")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, stream.numel() - context - 1, (batch_size,), generator=gen)
    idx = starts[:, None] + torch.arange(context + 1)
    w = stream[idx]
    return w[:, :-1], w[:, 1:]


def val_batches(stream: Tensor, batch_size: int, context: int, n_batches: int) -> Iterator[tuple[Tensor, Tensor]]:
    """``n_batches`` fixed, evenly spaced validation batches (the same for every model and run)."""
    n = n_batches * batch_size
    if stream.numel() <= context + 1:
        raise ValueError(f"context {context} needs a stream longer than {context + 1} tokens, got {stream.numel()}")
    starts = torch.linspace(0, stream.numel() - context - 1, n).long()
    idx = starts[:, None] + torch.arange(context + 1)
    w = stream[idx]
    for i in range(n_batches):
        b = w[i * batch_size:(i + 1) * batch_size]
        yield b[:, :-1], b[:, 1:]


PASSKEY_DIGITS = 5


def passkey_batch(filler: Tensor, batch_size: int, length: int, seed: int, step: int) -> tuple[Tensor, Tensor]:
    """Passkey retrieval: filler text with ``"The pass key is K. Remember it. K is the pass key."`` at a
    random depth, ending in ``"What is the pass key? The pass key is K"`` (K: 5 random digits).

    Returns ``(x, y)`` of ``length`` tokens; ``y`` is −100 (ignored by ``cross_entropy``) except on the
    answer's digits, so loss and accuracy score retrieval only.  A pure function of ``(seed, step)``.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step + 7)
    xs, ys = [], []
    for _ in range(batch_size):
        key = "".join(str(int(d)) for d in torch.randint(0, 10, (PASSKEY_DIGITS,), generator=gen))
        needle = encode(f" The pass key is {key}. Remember it. {key} is the pass key. ")
        question = encode(f" What is the pass key? The pass key is {key}")
        n_fill = length + 1 - needle.numel() - question.numel()
        if n_fill < 0:
            raise ValueError(f"passkey length must be >= {needle.numel() + question.numel() - 1}, got {length}")
        start = int(torch.randint(0, filler.numel() - n_fill, (1,), generator=gen))
        depth = int(torch.randint(0, n_fill + 1, (1,), generator=gen))
        fill = filler[start:start + n_fill]
        seq = torch.cat([fill[:depth], needle, fill[depth:], question])
        y = torch.full((length,), -100, dtype=torch.int64)
        y[-PASSKEY_DIGITS:] = seq[-PASSKEY_DIGITS:]
        xs.append(seq[:-1])
        ys.append(y)
    return torch.stack(xs), torch.stack(ys)
