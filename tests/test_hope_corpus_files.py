"""Corpora too large for memory: nanoGPT-style token files (memory-mapped) and folders of text streamed to disk."""

import json
import os
import zlib

import numpy as np
import pytest
import torch

from deepopt.cli import main
from deepopt.hope import data


@pytest.fixture(autouse=True)
def _fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPOPT_CACHE", str(tmp_path / "cache"))  # each test sees its own token-file cache


def test_token_file_is_split_by_position_and_batches_equal_the_in_memory_ones(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 3000, 5000).astype(np.uint16)
    tokens.tofile(tmp_path / "c.bin")
    corpus = data.load_corpus(paths=[tmp_path / "c.bin"])
    assert isinstance(corpus.train, data.TokenFile) and corpus.tokenizer.kind == "ids"
    assert corpus.vocab_size == int(tokens.max()) + 1
    assert corpus.train.numel() == 4500 and corpus.val.numel() == 500
    whole = torch.from_numpy(tokens.astype(np.int64))
    for got, want in zip(data.train_batch(corpus.train, 3, 17, 5, 2), data.train_batch(whole[:4500], 3, 17, 5, 2)):
        assert torch.equal(got, want) and got.dtype == torch.int64
    for got, want in zip(data.val_batches(corpus.val, 2, 9, 2), data.val_batches(whole[4500:], 2, 9, 2)):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    wide = np.arange(100, 200, dtype=np.uint32) * 1000  # ids above 65535 need uint32
    wide.tofile(tmp_path / "w.u32.bin")
    assert data.load_corpus(paths=[tmp_path / "w.u32.bin"]).vocab_size == 199_001


def test_nanogpt_folder_and_bad_token_files(tmp_path):
    (tmp_path / "owt").mkdir()
    np.arange(300, dtype=np.uint16).tofile(tmp_path / "owt" / "train.bin")
    np.arange(50, dtype=np.uint16).tofile(tmp_path / "owt" / "val.bin")
    corpus = data.load_corpus(paths=[tmp_path / "owt"])
    assert corpus.train.numel() == 300 and corpus.val.numel() == 50 and corpus.vocab_size == 300
    assert torch.equal(corpus.val[3:6], torch.tensor([3, 4, 5]))
    (tmp_path / "odd.bin").write_bytes(b"abc")
    with pytest.raises(ValueError, match="whole number"):
        data.load_corpus(paths=[tmp_path / "odd.bin"])
    with pytest.raises(ValueError, match="only --data path"):
        data.load_corpus(paths=[tmp_path / "owt", tmp_path / "odd.bin"])
    with pytest.raises(ValueError, match="already ids"):
        data.load_corpus(paths=[tmp_path / "owt"], tokenizer="bpe")


def test_text_folder_is_streamed_into_cached_token_files_split_by_file_name(tmp_path):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    texts = {f"sub/doc{i}.txt" if i % 3 else f"doc{i}.md": f"document {i} " * (i + 5) for i in range(40)}
    for name, text in texts.items():
        (folder / name).write_text(text)
    (folder / "image.png").write_bytes(b"\x89PNG")  # not text: skipped
    corpus = data.load_corpus(paths=[folder])
    assert isinstance(corpus.train, data.TokenFile) and corpus.tokenizer is data.BYTES
    want = {True: b"", False: b""}
    for name in sorted(texts, key=lambda n: str(folder / n)):
        want[zlib.crc32(name.encode()) % 10 == 0] += texts[name].encode() + data.SEPARATOR
    assert bytes(corpus.train[0:corpus.train.numel()].tolist()) == want[False]
    assert bytes(corpus.val[0:corpus.val.numel()].tolist()) == want[True]
    stamp = os.stat(corpus.train.path).st_mtime_ns
    assert os.stat(data.load_corpus(paths=[folder]).train.path).st_mtime_ns == stamp  # cached
    (folder / "doc0.md").write_text("changed")
    assert data.load_corpus(paths=[folder]).train.path != corpus.train.path  # a changed file re-streams


def test_train_and_eval_on_a_token_file_from_the_cli(tmp_path, capsys):
    np.random.default_rng(1).integers(0, 700, 4000).astype(np.uint16).tofile(tmp_path / "c.bin")
    common = ["--smoke", "--threads", "1", "--no-progress"]
    assert main(["hope", "train", "--data", str(tmp_path / "c.bin"), "--out", str(tmp_path / "run"), *common]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["vocab_size"] == 700 and report["tokenizer"] == "ids" and "val_bits_per_byte" not in report
    assert main(["hope", "eval", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "c.bin"),
                 "--out", str(tmp_path / "ev"), *common]) == 0
    assert main(["hope", "train", "--out", str(tmp_path / "bytes"), *common]) == 0
    with pytest.raises(SystemExit) as exit_info:  # a byte-level model cannot read token ids
        main(["hope", "eval", "--checkpoint", str(tmp_path / "bytes"), "--data", str(tmp_path / "c.bin"),
              "--out", str(tmp_path / "ev2"), *common])
    assert exit_info.value.code == 2 and "token ids" in capsys.readouterr().err
