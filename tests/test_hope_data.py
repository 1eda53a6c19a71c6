"""HOPE data: offline domains, deterministic splits and batches, user files, passkeys, BPE tokenizer."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepopt.hope import data

ROOT = Path(__file__).resolve().parents[1]
TRAIN_TEXT = ("def add(a, b):\n    return a + b  # the sum of 12 and 345\n\n" * 40).encode()


@pytest.mark.parametrize("domain", data.DOMAINS)
def test_domains_load_deterministically_and_split_by_document_name(domain):
    a = data.load_corpus(domain, max_bytes=50_000, cache=False)
    b = data.load_corpus(domain, max_bytes=50_000)  # builds the cache
    c = data.load_corpus(domain, max_bytes=50_000)  # reads it
    for x in (b, c):
        assert torch.equal(a.train, x.train) and torch.equal(a.val, x.val)
    assert a.train.numel() == 50_000 and 0 < a.val.numel() <= 5_000
    assert a.train.dtype == torch.int64 and int(a.train.max()) < data.VOCAB_SIZE
    text = data.decode(a.train[:20_000])
    assert ("def " in text and "import " in text) if domain == "code" else text.count(" the ") > 50
    assert not torch.equal(a.train[:1000], a.val[:1000])


def test_user_files_and_bad_paths(tmp_path):
    files = []
    for i in range(30):  # crc32 puts about a tenth of the names in validation
        f = tmp_path / f"doc{i}.txt"
        f.write_text(f"document {i}: " + "lorem ipsum " * 20)
        files.append(f)
    corpus = data.load_corpus(paths=files, max_bytes=None)
    assert corpus.name == "files"
    n_val = sum(data.is_validation(f.name) for f in files)
    assert 0 < n_val < 30
    assert corpus.train.numel() + corpus.val.numel() == sum(f.stat().st_size for f in files) + 2 * (30 - 2)
    with pytest.raises(ValueError, match="not a readable file"):
        data.load_corpus(paths=[tmp_path / "missing.txt"])
    with pytest.raises(ValueError, match="domain"):
        data.load_corpus("poetry")


def test_batches_are_pure_functions_of_seed_and_step():
    stream = torch.arange(1000)
    x1, y1 = data.train_batch(stream, 4, 16, seed=3, step=5)
    x2, y2 = data.train_batch(stream, 4, 16, seed=3, step=5)
    x3, _ = data.train_batch(stream, 4, 16, seed=3, step=6)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert torch.equal(y1[:, :-1], x1[:, 1:])
    val = list(data.val_batches(stream, 2, 16, 3))
    assert len(val) == 3 and all(x.shape == (2, 16) for x, _ in val)
    with pytest.raises(ValueError, match="context"):
        data.train_batch(stream[:10], 1, 16, 0, 0)


def test_passkey_batch_hides_the_key_and_scores_only_the_answer():
    filler = data.encode("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 40)
    x, y = data.passkey_batch(filler, 3, 160, seed=0, step=0)
    assert x.shape == y.shape == (3, 160)
    for xi, yi in zip(x, y):
        key = data.decode(yi[-5:])
        assert key.isdigit() and len(key) == 5
        text = data.decode(xi)
        assert f"The pass key is {key}." in text and text.endswith(f"The pass key is {key[:4]}")
        assert (yi[:-5] == -100).all()
    with pytest.raises(ValueError, match="passkey length"):
        data.passkey_batch(filler, 1, 50, 0, 0)


def test_bytes_stay_the_default_tokenizer_with_the_same_streams_and_cache_file():
    default = data.load_corpus("code", max_bytes=20_000)
    explicit = data.load_corpus("code", max_bytes=20_000, tokenizer="bytes", cache=False)
    assert default.tokenizer is data.BYTES and default.vocab_size == data.VOCAB_SIZE == 256
    assert torch.equal(default.train, explicit.train) and torch.equal(default.val, explicit.val)
    assert (data.cache_dir() / "hope" / "code-20000.safetensors").is_file()
    assert data.encode("héllo").tolist() == list("héllo".encode())
    assert data.load_tokenizer(Path("/nonexistent")) is data.BYTES  # a run folder without tokenizer.json


@functools.lru_cache(maxsize=1)
def small_bpe() -> data.BPETokenizer:
    return data.BPETokenizer.train(TRAIN_TEXT, vocab_size=300)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_bpe_round_trips_any_unicode_text(text):
    tok = small_bpe()
    tokens = tok.encode(text)
    assert tok.decode(tokens) == text and tok.n_bytes(tokens) == len(text.encode())
    assert tokens.dtype == torch.int64 and (tokens.numel() == 0 or int(tokens.max()) < tok.vocab_size)


def test_bpe_round_trips_unseen_scripts_and_compresses_what_it_saw():
    tok = small_bpe()
    for text in ("héllo wörld — 日本語テキスト 🎉🧪\r\n\t\x00 e\u0301 ∑ 한국어", "", " ", "\n\n"):
        assert tok.decode(tok.encode(text)) == text
    assert 256 < tok.vocab_size <= 300  # fewer when the text has no more pairs to merge
    assert tok.encode_bytes(TRAIN_TEXT).numel() < len(TRAIN_TEXT) / 2


def test_bpe_training_is_deterministic_across_runs_and_processes():
    a, b = data.BPETokenizer.train(TRAIN_TEXT, 300), data.BPETokenizer.train(TRAIN_TEXT, 300)
    assert a.to_json() == b.to_json()
    code = ("import sys; from deepopt.hope import data; "
            "sys.stdout.write(data.BPETokenizer.train(sys.stdin.buffer.read(), 300).to_json())")
    for threads in ("1", "2"):  # another process (other hash seeds), other thread counts
        env = {**os.environ, "RAYON_NUM_THREADS": threads, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        res = subprocess.run([sys.executable, "-c", code], input=TRAIN_TEXT, env=env, capture_output=True,
                             timeout=120, check=True)
        assert res.stdout.decode() == a.to_json()
    assert data.BPETokenizer.from_json(a.to_json()).to_json() == a.to_json()


def write_docs(folder: Path, n: int = 30) -> tuple[list[Path], Path, Path]:
    """``n`` small documents; returns them and one training and one validation document among them."""
    files = []
    for i in range(n):
        f = folder / f"doc{i}.txt"
        f.write_text(f"document {i}: " + "lorem ipsum dolor " * 20)
        files.append(f)
    train = next(f for f in files if not data.is_validation(f.name))
    val = next(f for f in files if data.is_validation(f.name))
    return files, train, val


def test_bpe_is_trained_on_the_training_documents_only(tmp_path):
    files, train_doc, val_doc = write_docs(tmp_path)
    train_doc.write_text(" quetzalcoatl" * 200)  # learned: a training document
    val_doc.write_text(" xyzzy" * 500)  # never learned: only in a validation document
    corpus = data.load_corpus(paths=files, max_bytes=None, tokenizer="bpe", vocab_size=300)
    vocab = [corpus.tokenizer.decode(torch.tensor([i])) for i in range(corpus.vocab_size)]
    assert " quetzalcoatl" in vocab
    assert not any("xy" in t or "zz" in t for t in vocab)
    assert corpus.tokenizer.decode(corpus.val).count(" xyzzy") == 500  # still encoded and decoded exactly


def test_bpe_cache_hit_returns_the_same_tensors_without_retraining(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPOPT_CACHE", str(tmp_path / "cache"))
    files, train_doc, _ = write_docs(tmp_path)
    first = data.load_corpus(paths=files, max_bytes=None, tokenizer="bpe", vocab_size=280)
    trained = []
    real_train = data.BPETokenizer.train
    monkeypatch.setattr(data.BPETokenizer, "train", lambda *a: trained.append(a) or real_train(*a))
    again = data.load_corpus(paths=files, max_bytes=None, tokenizer="bpe", vocab_size=280)
    assert not trained and again.tokenizer.to_json() == first.tokenizer.to_json()
    assert torch.equal(first.train, again.train) and torch.equal(first.val, again.val)
    data.load_corpus(paths=files, max_bytes=None, tokenizer="bpe", vocab_size=290)  # another vocabulary size
    assert len(trained) == 1
    train_doc.write_text("new content " * 50)  # the cache is keyed by the files' content
    data.load_corpus(paths=files, max_bytes=None, tokenizer="bpe", vocab_size=280)
    assert len(trained) == 2
    names = sorted(f.name for f in (tmp_path / "cache" / "hope").iterdir())
    assert sum(n.endswith(".tokenizer.json") for n in names) == sum(n.endswith(".safetensors") for n in names) == 3


def test_a_given_tokenizer_encodes_other_domains():
    code = data.load_corpus("code", max_bytes=20_000, tokenizer="bpe", vocab_size=300)
    prose = data.load_corpus("prose", max_bytes=20_000, tokenizer=code.tokenizer)
    assert prose.tokenizer is code.tokenizer and prose.vocab_size == 300
    assert prose.tokenizer.decode(prose.train) == data.decode(data.load_corpus("prose", max_bytes=20_000).train)


@pytest.mark.parametrize("vocab_size", [256, 65537, 4096.0, True, None])
def test_bpe_vocab_size_must_be_in_range(vocab_size):
    with pytest.raises(ValueError, match=r"vocab_size must be an int in \[257, 65536\]"):
        data.load_corpus("code", max_bytes=20_000, tokenizer="bpe", vocab_size=vocab_size)


def test_bad_tokenizer_arguments_are_rejected():
    with pytest.raises(ValueError, match="tokenizer must be one of"):
        data.load_corpus("code", tokenizer="wordpiece")
    with pytest.raises(TypeError, match="tokenizer must be one of"):
        data.load_corpus("code", tokenizer=3)
    spec = json.loads(small_bpe().to_json())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    with pytest.raises(ValueError, match="ByteLevel"):
        data.BPETokenizer.from_json(json.dumps(spec))


def test_bpe_without_the_tokenizers_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "deepopt\[bpe\]"'):
        data.load_corpus("code", max_bytes=20_000, tokenizer="bpe")
    assert data.load_corpus("code", max_bytes=20_000).vocab_size == 256  # bytes need nothing
    code = ("import sys; sys.modules['tokenizers'] = None; import deepopt.hope; from deepopt.hope import data; "
            "print(data.load_corpus('code', max_bytes=1000, cache=False).vocab_size)")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert res.returncode == 0 and res.stdout.strip() == "256", res.stderr[-2000:]


def test_passkey_batch_with_bpe_scores_exactly_the_tokens_of_the_key():
    numbers = " ".join(f"{i * 7919 % 100_000:05d}" for i in range(1000)).encode()
    tok = data.BPETokenizer.train(numbers + b" The pass key is. What" * 20, vocab_size=400)  # merges digits
    filler = tok.encode("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 40)
    x, y = data.passkey_batch(filler, 8, 160, seed=0, step=0, tokenizer=tok)
    lengths = set()
    for xi, yi in zip(x, y):
        answer = yi != -100
        n = int(answer.sum())
        assert answer[-n:].all() and not answer[:-n].any()  # the last n targets only
        key = tok.decode(yi[-n:])
        assert key.startswith(" ") and key[1:].isdigit() and len(key) == 6  # the space is merged into a digit
        key = key[1:]
        assert tok.decode(torch.cat([xi, yi[-1:]])).endswith(f"What is the pass key? The pass key is {key}")
        assert f"The pass key is {key}." in tok.decode(xi)
        lengths.add(n)
    assert max(lengths) < 5 and len(lengths) > 1  # fewer tokens than digits, how many depends on the key
