"""Text that ships with Python, as token streams with deterministic train/validation splits.

Domains (no download):
    ``code``   the standard library's ``*.py`` source files;
    ``prose``  English prose shipped with Python: the stdlib's docstrings (read with ``ast``, nothing is
               imported) and the ``pydoc_data.topics`` help texts;
    files      a user's own text files (``--data PATH...``), or a corpus too large for memory:
               a folder of text files (streamed once into a token file in the cache, then memory-mapped),
               a nanoGPT-style token file ``NAME.bin`` (flat uint16 tokens; uint32 when the name ends in
               ``.u32.bin``; its last tenth is validation) or a folder holding ``train.bin`` and ``val.bin``.
               Token files are read through ``numpy.memmap``: a batch reads only its windows.

A document goes to validation when ``crc32(name) % 10 == 0`` (≈10%), so the split depends on nothing
but the document's name.  Tokens are bytes (vocabulary 256) by default, or a byte-level BPE trained on
the training split only (needs the optional ``tokenizers`` package).  Tokenized corpora and trained
tokenizers (JSON) are cached under ``$DEEPOPT_CACHE`` (default ``~/.cache/deepopt``).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sysconfig
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from deepopt.checkpoint import atomic_save_tensors, atomic_write, load_tensors

DOMAINS = ("code", "prose")
VOCAB_SIZE = 256
SEPARATOR = b"\n\n"
TOKENIZERS = ("bytes", "bpe")
BPE_VOCAB_RANGE = (VOCAB_SIZE + 1, 65536)  # the 256 byte tokens + at least one merge
DEFAULT_BPE_VOCAB = 4096
TOKENIZER_FILE = "tokenizer.json"
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".json", ".html", ".tex", ".csv", ".c", ".h", ".js", ".java", "")


def cache_dir() -> Path:
    return Path(os.environ.get("DEEPOPT_CACHE", Path.home() / ".cache" / "deepopt"))


def require_tokenizers() -> ModuleType:
    """The ``tokenizers`` package, or an ``ImportError`` saying how to install it."""
    try:
        import tokenizers
    except ImportError as err:
        raise ImportError('the BPE tokenizer needs the `tokenizers` package: pip install "deepopt[bpe]"') from err
    return tokenizers


class Tokenizer(ABC):
    """Text ↔ 1-D ``int64`` token ids in ``[0, vocab_size)``."""

    kind: str
    vocab_size: int
    cache_tag: str  # names the tokenized streams in the cache ("" for bytes: the historical file names)

    @abstractmethod
    def encode_bytes(self, raw: bytes) -> Tensor:
        """The tokens of UTF-8 text given as bytes."""

    @abstractmethod
    def decode(self, tokens: Tensor) -> str:
        """The text of ``tokens`` (invalid UTF-8, e.g. a window cut inside a character, becomes U+FFFD)."""

    @abstractmethod
    def token_bytes(self) -> Tensor:
        """The length in bytes of every token, indexed by id (``int64``, ``vocab_size`` entries)."""

    def encode(self, text: str) -> Tensor:
        """The tokens of ``text``."""
        return self.encode_bytes(text.encode())

    def n_bytes(self, tokens: Tensor) -> int:
        """How many bytes of text ``tokens`` stand for."""
        return int(self.token_bytes()[tokens].sum())


class ByteTokenizer(Tokenizer):
    """One token per byte (vocabulary 256)."""

    kind, vocab_size, cache_tag = "bytes", VOCAB_SIZE, ""

    def encode_bytes(self, raw: bytes) -> Tensor:
        if not raw:
            return torch.zeros(0, dtype=torch.int64)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.int64)

    def decode(self, tokens: Tensor) -> str:
        return bytes(tokens.to(torch.uint8).tolist()).decode(errors="replace")

    def token_bytes(self) -> Tensor:
        return torch.ones(VOCAB_SIZE, dtype=torch.int64)


class BPETokenizer(Tokenizer):
    """A byte-level BPE (``tokenizers``): ByteLevel pre-tokenizer and decoder, so any text round-trips.

    Input bytes that are not UTF-8 are read as U+FFFD.
    """

    kind = "bpe"

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self._json = tokenizer.to_str()
        self.cache_tag = f"-bpe{self.vocab_size}-{hashlib.sha256(self._json.encode()).hexdigest()[:16]}"
        # ByteLevel spells every byte as one character, so a token's length is its number of bytes.
        self._token_bytes = torch.tensor([len(tokenizer.id_to_token(i)) for i in range(self.vocab_size)])

    @classmethod
    def train(cls, text: bytes, vocab_size: int = DEFAULT_BPE_VOCAB) -> BPETokenizer:
        """Train on ``text`` (deterministic: the same text gives the same JSON, whatever the thread count)."""
        check_vocab_size(vocab_size)
        tk = require_tokenizers()
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                         initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator([text.decode(errors="replace")], trainer=trainer)
        return cls(tok)

    @classmethod
    def from_json(cls, text: str) -> BPETokenizer:
        """A tokenizer saved by ``to_json`` (``tokenizers``' JSON format; nothing is unpickled)."""
        spec = json.loads(text)
        kinds = ((spec.get("model") or {}).get("type"), (spec.get("pre_tokenizer") or {}).get("type"))
        if kinds != ("BPE", "ByteLevel"):
            raise ValueError(f"tokenizer JSON must hold a BPE model with a ByteLevel pre-tokenizer, got {kinds}")
        return cls(require_tokenizers().Tokenizer.from_str(text))

    def to_json(self) -> str:
        return self._json

    def encode_bytes(self, raw: bytes) -> Tensor:
        return torch.tensor(self._tok.encode(raw.decode(errors="replace")).ids, dtype=torch.int64)

    def decode(self, tokens: Tensor) -> str:
        return self._tok.decode(tokens.tolist())

    def token_bytes(self) -> Tensor:
        return self._token_bytes


BYTES = ByteTokenizer()


class TokenIds(Tokenizer):
    """The ids of a pre-tokenized token file: no text, so no encoding and no per-byte figures."""

    kind, cache_tag = "ids", "-ids"

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode_bytes(self, raw: bytes) -> Tensor:
        raise ValueError("a token file's ids have no tokenizer: text cannot be encoded (train on text instead)")

    def decode(self, tokens: Tensor) -> str:
        return " ".join(map(str, tokens.tolist()))

    def token_bytes(self) -> Tensor:
        raise ValueError("a token file's ids have no tokenizer: per-byte figures are unknown")


class TokenFile:
    """Tokens ``[start, stop)`` of a flat binary token file, memory-mapped: indexing (by a tensor of positions or
    a slice) reads only those tokens and returns ``int64``; stands in for a 1-D token tensor in the batchers."""

    def __init__(self, path: str | os.PathLike, dtype: Any = None, start: int = 0, stop: int | None = None) -> None:
        import numpy as np

        self.path = Path(path)
        self.dtype = np.dtype(dtype or (np.uint32 if self.path.name.endswith(".u32.bin") else np.uint16))
        size = self.path.stat().st_size
        if size % self.dtype.itemsize:
            raise ValueError(f"data: {self.path} has {size} bytes, not a whole number of {self.dtype} tokens")
        self._map = np.memmap(self.path, dtype=self.dtype, mode="r") if size else np.zeros(0, self.dtype)
        self.start, self.stop = start, len(self._map) if stop is None else stop

    def numel(self) -> int:
        return self.stop - self.start

    def __getitem__(self, idx: Tensor | slice) -> Tensor:
        import numpy as np

        if isinstance(idx, slice):
            lo, hi, _ = idx.indices(self.numel())
            return torch.from_numpy(self._map[self.start + lo:self.start + hi].astype(np.int64))
        return torch.from_numpy(self._map[idx.numpy() + self.start].astype(np.int64))

    def max(self, block: int = 1 << 24) -> int:
        """The largest token id (one pass over the file in blocks of ``block`` tokens)."""
        return max((int(self._map[i:min(i + block, self.stop)].max())
                    for i in range(self.start, self.stop, block)), default=0)


def check_vocab_size(vocab_size: int) -> None:
    """A ``ValueError`` unless ``vocab_size`` is an int in ``BPE_VOCAB_RANGE``."""
    lo, hi = BPE_VOCAB_RANGE
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not lo <= vocab_size <= hi:
        raise ValueError(f"vocab_size must be an int in [{lo}, {hi}] (256 byte tokens + merges), got {vocab_size!r}")


def save_tokenizer(tokenizer: Tokenizer, folder: str | os.PathLike) -> None:
    """Write a BPE tokenizer as ``folder/tokenizer.json`` (atomically); for bytes, make sure there is none."""
    file = Path(folder) / TOKENIZER_FILE
    if isinstance(tokenizer, BPETokenizer):
        _write_text(file, tokenizer.to_json())
    elif isinstance(tokenizer, TokenIds):
        _write_text(file, json.dumps({"kind": "ids", "vocab_size": tokenizer.vocab_size}))
    else:
        file.unlink(missing_ok=True)


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def load_tokenizer(folder: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a run folder: its ``tokenizer.json``, or bytes when it has none."""
    file = Path(folder) / TOKENIZER_FILE
    if not file.is_file():
        return BYTES
    text = file.read_text()
    spec = json.loads(text)
    if spec.get("kind") == "ids":
        return TokenIds(int(spec["vocab_size"]))
    return BPETokenizer.from_json(text)


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
    """A domain's train and validation token streams (1-D ``int64``) and the tokenizer that made them."""

    name: str
    train: Tensor
    val: Tensor
    tokenizer: Tokenizer = BYTES

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary size for this corpus."""
        return self.tokenizer.vocab_size


def _build(docs: Iterable[tuple[str, bytes]], max_bytes: int | None) -> tuple[bytes, bytes]:
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
    train, val = SEPARATOR.join(parts[False]), SEPARATOR.join(parts[True])
    if max_bytes is not None:
        train, val = train[:max_bytes], val[: max(max_bytes // 10, 1)]
    return train, val


def load_corpus(domain: str = "code", paths: Iterable[str | os.PathLike] | None = None,
                max_bytes: int | None = 4_000_000, cache: bool = True, tokenizer: str | Tokenizer = "bytes",
                vocab_size: int = DEFAULT_BPE_VOCAB) -> Corpus:
    """The token corpus of ``domain`` (``"code"``/``"prose"``) or of the text files ``paths``.

    ``max_bytes`` caps the training stream (validation gets a tenth), taking documents in sorted order.
    ``tokenizer``: ``"bytes"``; ``"bpe"``, a byte-level BPE of ``vocab_size`` tokens trained on this
    corpus's training split only; or a ``Tokenizer`` to encode with (e.g. ``load_tokenizer(run)``).
    Domains are cached (streams as safetensors, BPE as JSON); files too with BPE, keyed by their content.
    """
    if isinstance(tokenizer, str):
        if tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer must be one of {TOKENIZERS} or a Tokenizer, got {tokenizer!r}")
        if tokenizer == "bpe":
            check_vocab_size(vocab_size)
            require_tokenizers()
    elif not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"tokenizer must be one of {TOKENIZERS} or a Tokenizer, got {type(tokenizer).__name__}")
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"max_bytes must be None or >= 1, got {max_bytes}")
    paths = list(paths or [])
    if any(Path(p).is_dir() or str(p).endswith(".bin") for p in paths):
        if len(paths) != 1:
            raise ValueError(f"data: a token file or folder must be the only --data path, got {len(paths)} paths")
        return _large_corpus(Path(paths[0]), tokenizer, vocab_size, max_bytes, cache)
    if paths:
        docs: Iterable[tuple[str, bytes]] = list(_file_docs(paths))
        digest = hashlib.sha256()
        for doc_name, text in docs:
            digest.update(hashlib.sha256(doc_name.encode()).digest() + hashlib.sha256(text).digest())
        key, name = "files-" + digest.hexdigest()[:16], "files"
    else:
        if domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
        docs = _code_docs() if domain == "code" else _prose_docs()
        key, name = domain, domain
    kind = tokenizer if isinstance(tokenizer, str) else tokenizer.kind
    cached = cache and not (paths and kind == "bytes")  # byte tokens of files are cheap to rebuild
    folder, stem = cache_dir() / "hope", f"{key}-{max_bytes}"
    bpe_file = folder / f"{stem}-bpe{vocab_size}.tokenizer.json"
    streams = lambda t: folder / f"{stem}{t.cache_tag}.safetensors"
    if isinstance(tokenizer, Tokenizer):
        tok: Tokenizer | None = tokenizer
    elif tokenizer == "bytes":
        tok = BYTES
    else:  # "bpe": the cached one, or None: trained below
        tok = BPETokenizer.from_json(bpe_file.read_text()) if cached and bpe_file.is_file() else None
    if tok is not None and cached and streams(tok).is_file():
        t = load_tensors(streams(tok))
        return Corpus(name, t["train"], t["val"], tok)
    train_bytes, val_bytes = _build(docs, max_bytes)
    if len(train_bytes) < 2 or len(val_bytes) < 2:
        raise ValueError(f"corpus {name!r} is too small to split: {len(train_bytes)} train, {len(val_bytes)} val "
                         f"bytes (validation takes documents with crc32(name) % 10 == 0; pass more files)")
    if tok is None:
        tok = BPETokenizer.train(train_bytes, vocab_size)  # the training split only, never validation
        if cached:
            _write_text(bpe_file, tok.to_json())
    train, val = tok.encode_bytes(train_bytes), tok.encode_bytes(val_bytes)
    if cached:
        atomic_save_tensors({"train": train, "val": val}, streams(tok))
    return Corpus(name, train, val, tok)


def encode(text: str, tokenizer: Tokenizer = BYTES) -> Tensor:
    return tokenizer.encode(text)


def decode(tokens: Tensor, tokenizer: Tokenizer = BYTES) -> str:
    return tokenizer.decode(tokens)


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


def passkey_batch(filler: Tensor, batch_size: int, length: int, seed: int, step: int,
                  tokenizer: Tokenizer = BYTES) -> tuple[Tensor, Tensor]:
    """Passkey retrieval: filler text with ``"The pass key is K. Remember it. K is the pass key."`` at a
    random depth, ending in ``"What is the pass key? The pass key is K"`` (K: 5 random digits).

    Returns ``(x, y)`` of ``length`` tokens; ``y`` is −100 (ignored by ``cross_entropy``) except on the
    answer's tokens, so loss and accuracy score retrieval only.  The answer is the question's tokens after
    those it shares with ``"... The pass key is "``: the 5 digits with bytes, with BPE the tokens that
    spell ``" K"`` (their number varies with K).  A pure function of ``(seed, step)``.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step + 7)
    stem = " What is the pass key? The pass key is "
    stem_tokens = tokenizer.encode(stem)
    xs, ys = [], []
    for _ in range(batch_size):
        key = "".join(str(int(d)) for d in torch.randint(0, 10, (PASSKEY_DIGITS,), generator=gen))
        needle = tokenizer.encode(f" The pass key is {key}. Remember it. {key} is the pass key. ")
        question = tokenizer.encode(stem + key)
        shared = min(question.numel(), stem_tokens.numel())
        shared = int((question[:shared] == stem_tokens[:shared]).long().cumprod(0).sum())
        n_fill = length + 1 - needle.numel() - question.numel()
        if n_fill < 0:
            raise ValueError(f"passkey length must be >= {needle.numel() + question.numel() - 1}, got {length}")
        start = int(torch.randint(0, filler.numel() - n_fill, (1,), generator=gen))
        depth = int(torch.randint(0, n_fill + 1, (1,), generator=gen))
        fill = filler[start:start + n_fill]
        seq = torch.cat([fill[:depth], needle, fill[depth:], question])
        y = torch.full((length,), -100, dtype=torch.int64)
        n_answer = question.numel() - shared
        y[-n_answer:] = seq[-n_answer:]
        xs.append(seq[:-1])
        ys.append(y)
    return torch.stack(xs), torch.stack(ys)


def _large_corpus(path: Path, tokenizer: str | Tokenizer, vocab_size: int, max_bytes: int | None,
                  cache: bool) -> Corpus:
    """A corpus kept on disk (module doc): a ``.bin`` token file, a folder with ``train.bin``/``val.bin``, or a
    folder of text streamed file by file into token files under the cache (reused while no file changes)."""
    if path.is_file():  # one token file: its last tenth is validation
        whole = TokenFile(path)
        if whole.numel() < 20:
            raise ValueError(f"data: {path} holds {whole.numel()} tokens; too few to split")
        cut = whole.numel() - whole.numel() // 10
        train, val = TokenFile(path, stop=cut), TokenFile(path, start=cut)
        return _ids_corpus(path.name, train, val, tokenizer, max(whole.max(), 0) + 1)
    if (path / "train.bin").is_file() and (path / "val.bin").is_file():
        train, val = TokenFile(path / "train.bin"), TokenFile(path / "val.bin")
        return _ids_corpus(path.name, train, val, tokenizer, max(train.max(), val.max()) + 1)
    if not path.is_dir():
        raise ValueError(f"data: {path} is neither a token file (.bin) nor a folder")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise ValueError(f"data: the folder {path} holds no text files ({', '.join(s for s in TEXT_SUFFIXES if s)})")
    names = [str(p.relative_to(path)) for p in files]
    digest = hashlib.sha256()
    for name, p in zip(names, files):
        st = p.stat()
        digest.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    if isinstance(tokenizer, str) and tokenizer == "bpe":  # trained on the first max_bytes of training text
        sample = b"".join(p.read_bytes() for n, p in zip(names, files) if not is_validation(n))[:max_bytes]
        tokenizer = BPETokenizer.train(sample, vocab_size)
    tok = BYTES if isinstance(tokenizer, str) else tokenizer
    folder = cache_dir() / "hope" / f"folder-{digest.hexdigest()[:16]}{tok.cache_tag}"
    if not (cache and (folder / "val.bin").is_file()):
        _stream_tokens(zip(names, files), tok, folder)
    return Corpus(path.name, TokenFile(folder / "train.bin"), TokenFile(folder / "val.bin"), tok)


def _stream_tokens(docs: Iterable[tuple[str, Path]], tokenizer: Tokenizer, folder: Path) -> None:
    """Encode the documents one at a time into ``folder/train.bin`` and ``val.bin`` (uint16; split by name)."""
    import numpy as np

    if tokenizer.vocab_size > 65536:
        raise ValueError(f"vocab_size {tokenizer.vocab_size} does not fit the uint16 token files")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = {split: folder / f".{split}.bin.tmp" for split in ("train", "val")}
    outs = {split: open(f, "wb") for split, f in tmp.items()}
    try:
        for name, p in docs:
            tokens = tokenizer.encode_bytes(p.read_bytes() + SEPARATOR).numpy().astype(np.uint16)
            outs["val" if is_validation(name) else "train"].write(tokens.tobytes())
    finally:
        for f in outs.values():
            f.close()
    for split, f in tmp.items():
        if f.stat().st_size < 4:
            raise ValueError(f"data: the folder's {split} split is empty (validation takes files with "
                             f"crc32(name) % 10 == 0; add files)")
    for split, f in tmp.items():
        os.replace(f, folder / f"{split}.bin")


def _ids_corpus(name: str, train: TokenFile, val: TokenFile, tokenizer: str | Tokenizer, vocab: int) -> Corpus:
    """A corpus of pre-tokenized ids; a run's own ``TokenIds`` (at evaluation) must cover them."""
    if isinstance(tokenizer, str):
        if tokenizer != "bytes":
            raise ValueError("--tokenizer bpe does not apply to a token file: its tokens are already ids")
        return Corpus(name, train, val, TokenIds(vocab))
    if not isinstance(tokenizer, TokenIds) or tokenizer.vocab_size < vocab:
        raise ValueError(f"data: token ids up to {vocab - 1} need a model trained on token files with a vocabulary "
                         f"of at least {vocab}; this model's tokenizer is {tokenizer.kind} ({tokenizer.vocab_size})")
    return Corpus(name, train, val, tokenizer)
