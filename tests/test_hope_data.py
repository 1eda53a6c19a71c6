"""HOPE data: offline domains, deterministic splits and batches, user files, passkeys."""

import pytest
import torch

from deepopt.hope import data


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DEEPOPT_CACHE", str(tmp_path_factory.getbasetemp() / "hope-cache"))


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
