"""MFRM: planted neighbours, fusion math, temperature, empty bank, persistence, HNSW above the size limit."""

from __future__ import annotations

import numpy as np
import pytest

from detector.retrieval import (
    EMPTY_BANK_DIGEST,
    BankFormatError,
    SupportBank,
    SupportEntry,
    fuse,
    l2_normalise,
    retrieval_probability,
)

DIM = 32


def _entries(n: int, label: str = "real", generator: str = "real", modality: str = "CT") -> list[SupportEntry]:
    return [SupportEntry(label, modality, generator, f"img{i}.png") for i in range(n)]  # type: ignore[arg-type]


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _bank_with_planted(rng: np.random.Generator, n: int = 200, exact_max_size: int = 50_000):
    bank = SupportBank(DIM, exact_max_size=exact_max_size)
    base = rng.standard_normal((n, DIM)).astype(np.float32)
    labels = ["fake" if i % 2 else "real" for i in range(n)]
    entries = [SupportEntry(lab, "CT", "gan" if lab == "fake" else "real", f"s{i}")  # type: ignore[arg-type]
               for i, lab in enumerate(labels)]
    bank.add(base, entries)
    return bank, base


def test_planted_neighbours_are_returned(rng):
    bank, base = _bank_with_planted(rng)
    planted = [3, 50, 177]
    queries = base[planted] + 0.01 * rng.standard_normal((3, DIM)).astype(np.float32)
    sims, idx = bank.query(queries, k=5)
    assert sims.shape == idx.shape == (3, 5)
    assert idx[:, 0].tolist() == planted
    assert np.all(sims[:, 0] > 0.99)
    assert np.all(np.diff(sims, axis=1) <= 1e-6), "similarities come sorted, best first"
    assert bank.index_kind == "flat"


def test_embeddings_are_normalised_on_add(rng):
    bank = SupportBank(DIM)
    bank.add(5 * rng.standard_normal((4, DIM)), _entries(4))
    np.testing.assert_allclose(np.linalg.norm(bank.embeddings, axis=1), 1.0, rtol=1e-5)
    assert bank.embeddings.dtype == np.float32


def test_retrieval_probability_and_temperature():
    sims = np.array([[0.9, 0.5, 0.1]])
    labels = np.array([[1, 0, 0]])
    # Hand-computed softmax weights.
    for t in (0.05, 0.3, 2.0):
        w = np.exp(sims[0] / t) / np.exp(sims[0] / t).sum()
        assert retrieval_probability(sims, labels, t)[0] == pytest.approx(w[0])
    # Small temperature: the nearest neighbour decides; large: the plain fraction of fakes.
    assert retrieval_probability(sims, labels, 1e-3)[0] == pytest.approx(1.0, abs=1e-6)
    assert retrieval_probability(sims, labels, 1e4)[0] == pytest.approx(1 / 3, abs=1e-3)
    p = [retrieval_probability(sims, labels, t)[0] for t in (0.01, 0.1, 1.0, 10.0)]
    assert all(a > b for a, b in zip(p, p[1:])), "higher temperature spreads weight away from the nearest fake"
    with pytest.raises(ValueError):
        retrieval_probability(sims, labels, 0.0)


def test_fusion_math():
    assert fuse(0.2, 0.8, 0.25) == pytest.approx(0.75 * 0.2 + 0.25 * 0.8)
    assert fuse(0.2, 0.8, 0.0) == 0.2
    assert fuse(0.2, 0.8, 1.0) == pytest.approx(0.8)
    assert fuse(0.2, None, 0.5) == 0.2
    np.testing.assert_allclose(fuse(np.array([0.0, 1.0]), np.array([1.0, 0.0]), 0.5), [0.5, 0.5])
    with pytest.raises(ValueError):
        fuse(0.2, 0.8, 1.5)


def test_empty_bank_gives_classifier_score(rng):
    bank = SupportBank(DIM)
    q = rng.standard_normal((2, DIM))
    sims, idx = bank.query(q, k=8)
    assert sims.shape == idx.shape == (2, 0)
    p_ret = bank.fake_probability(q, k=8, temperature=0.1)
    assert p_ret is None
    assert fuse(0.3, p_ret, 0.4) == 0.3


def test_fake_probability_from_planted_fakes(rng):
    bank = SupportBank(DIM)
    fake_dir = l2_normalise(rng.standard_normal((1, DIM)))
    real_dir = l2_normalise(rng.standard_normal((1, DIM)))
    bank.add(fake_dir + 0.05 * rng.standard_normal((10, DIM)), _entries(10, "fake", "gan"))
    bank.add(real_dir + 0.05 * rng.standard_normal((10, DIM)), _entries(10, "real"))
    p = bank.fake_probability(np.concatenate([fake_dir, real_dir]), k=5, temperature=0.1)
    assert p[0] > 0.99 and p[1] < 0.01
    # k larger than the bank is capped.
    assert bank.query(fake_dir, k=100)[0].shape == (1, 20)


def test_add_list_remove_keep_stable_ids(rng):
    bank = SupportBank(DIM)
    ids_a = bank.add(rng.standard_normal((3, DIM)), _entries(3, "fake", "gan-a"))
    ids_b = bank.add(rng.standard_normal((2, DIM)), _entries(2, "fake", "gan-b", modality="MR"))
    assert ids_a == [0, 1, 2] and ids_b == [3, 4]
    assert bank.summary() == {"fake/CT/gan-a": 3, "fake/MR/gan-b": 2}
    kept_emb = bank.embeddings[[0, 2, 3, 4]].copy()
    assert bank.remove(ids=[1]) == 1
    assert [e.id for e in bank.list()] == [0, 2, 3, 4]
    np.testing.assert_array_equal(bank.embeddings, kept_emb)
    assert bank.remove(generator="gan-b") == 2
    assert [e.generator for e in bank.list()] == ["gan-a", "gan-a"]
    assert bank.remove(generator="nothing") == 0
    np.testing.assert_array_equal(bank.labels, [1, 1])
    # Ids are never reused.
    assert bank.add(rng.standard_normal((1, DIM)), _entries(1)) == [5]
    # The cached labels follow every edit, and callers cannot change them.
    np.testing.assert_array_equal(bank.labels, [1, 1, 0])
    with pytest.raises(ValueError):
        bank.labels[0] = 0
    # The index follows the content.
    sims, idx = bank.query(bank.embeddings[-1:], k=1)
    assert bank.list()[idx[0, 0]].id == 5
    with pytest.raises(ValueError):
        bank.remove()
    with pytest.raises(ValueError):
        bank.add(rng.standard_normal((1, DIM + 1)), _entries(1))
    with pytest.raises(ValueError):
        SupportEntry("maybe", "CT", "x", "y")  # type: ignore[arg-type]


def test_save_load_round_trip(rng, tmp_path):
    bank, base = _bank_with_planted(rng, n=20)
    bank.remove(ids=[4])
    bank.save(tmp_path / "bank")
    loaded = SupportBank.load(tmp_path / "bank")
    assert loaded.list() == bank.list()
    np.testing.assert_array_equal(loaded.embeddings, bank.embeddings)
    q = rng.standard_normal((3, DIM))
    for a, b in zip(loaded.query(q, 4), bank.query(q, 4)):
        np.testing.assert_array_equal(a, b)
    assert loaded.add(rng.standard_normal((1, DIM)), _entries(1)) == [20]
    # Saving again replaces the folder.
    loaded.save(tmp_path / "bank")
    assert len(SupportBank.load(tmp_path / "bank")) == 20
    # Readable by other users as the umask allows (the node may not run as the trainer).
    import os
    import stat

    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "bank").stat().st_mode) == 0o777 & ~mask
    # Empty banks persist too.
    SupportBank(DIM).save(tmp_path / "empty")
    assert len(SupportBank.load(tmp_path / "empty")) == 0


def test_digest_follows_content_and_survives_save_load(rng, tmp_path):
    # Every empty bank has the same digest, whatever its dimension.
    assert SupportBank(DIM).digest() == SupportBank(7).digest() == EMPTY_BANK_DIGEST
    bank, base = _bank_with_planted(rng, n=6)
    d0 = bank.digest()
    assert len(d0) == 64 and d0 != EMPTY_BANK_DIGEST
    bank.save(tmp_path / "bank")
    assert SupportBank.load(tmp_path / "bank").digest() == d0
    # The same vectors with one label flipped score differently: another digest.
    flipped = SupportBank(DIM)
    flipped.add(base, [SupportEntry("real" if e.is_fake else "fake", e.modality, e.generator, e.source)
                       for e in bank.list()])
    assert flipped.digest() != d0
    # Any add or remove changes it; undoing the change restores it.
    new = bank.add(rng.standard_normal((1, DIM)), _entries(1))
    assert bank.digest() != d0
    bank.remove(ids=new)
    assert bank.digest() == d0
    bank.remove(generator="gan")
    assert bank.digest() not in (d0, EMPTY_BANK_DIGEST)
    bank.remove(generator="real")
    assert bank.digest() == EMPTY_BANK_DIGEST


def test_load_rejects_broken_banks(rng, tmp_path):
    bank, _ = _bank_with_planted(rng, n=4)
    bank.save(tmp_path / "bank")
    (tmp_path / "bank" / "entries.json").write_text("{not json")
    with pytest.raises(BankFormatError, match="not valid JSON"):
        SupportBank.load(tmp_path / "bank")
    bank.save(tmp_path / "bank")
    np.save(tmp_path / "bank" / "embeddings.npy", np.zeros((3, DIM), np.float32))
    with pytest.raises(BankFormatError, match="do not match"):
        SupportBank.load(tmp_path / "bank")
    with pytest.raises(BankFormatError, match="missing"):
        SupportBank.load(tmp_path / "nowhere")


def test_hnsw_above_threshold_size(rng):
    bank, base = _bank_with_planted(rng, n=300, exact_max_size=100)
    assert bank.index_kind == "hnsw"
    import faiss

    assert isinstance(bank.index, faiss.IndexHNSWFlat)
    assert bank.index.metric_type == faiss.METRIC_INNER_PRODUCT
    planted = [7, 123, 299]
    sims, idx = bank.query(base[planted] + 0.01 * rng.standard_normal((3, DIM)).astype(np.float32), k=3)
    assert idx[:, 0].tolist() == planted
    # Removing below the limit goes back to the exact index.
    bank.remove(ids=range(250))
    assert bank.index_kind == "flat" and isinstance(bank.index, faiss.IndexFlatIP)
