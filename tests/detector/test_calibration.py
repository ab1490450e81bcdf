"""Re-choosing λ and the threshold after a bank edit (``detector.calibration``)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from detector.bundle import read_manifest
from detector.calibration import (
    CALIBRATION_FILE,
    CalibrationSet,
    choose_fusion,
    leave_one_out_retrieval,
    load_calibration,
    mean_modality_auc,
    save_calibration,
)
from detector.cli import app
from detector.errors import BundleError
from detector.retrieval import SupportBank, SupportEntry, fuse

DIM = 16


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def _cluster(rng: np.random.Generator, centre: np.ndarray, n: int, spread: float = 0.15) -> np.ndarray:
    return centre[None, :] + spread * rng.standard_normal((n, DIM))


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(DIM)
    return v / np.linalg.norm(v)


def _scenario(rng: np.random.Generator, *, support_cls: float, new_cls_informative: bool):
    """A bank of reals and seen fakes; a new generator whose images form their own cluster.

    The classifier knows reals (low scores) and the seen generator (high); on the new
    generator it says ``support_cls`` (around a real's score unless ``new_cls_informative``).
    """
    real_c, seen_c, new_c = _unit(rng), _unit(rng), _unit(rng)
    bank = SupportBank(DIM)
    bank.add(_cluster(rng, real_c, 40), [SupportEntry("real", "CT", "real", f"r{i}") for i in range(40)])
    bank.add(_cluster(rng, seen_c, 40), [SupportEntry("fake", "CT", "seen", f"s{i}") for i in range(40)])
    support_emb = _cluster(rng, new_c, 10)
    support_ids = bank.add(support_emb, [SupportEntry("fake", "CT", "new", f"n{i}") for i in range(10)])

    n_val = 30
    val_real = _cluster(rng, real_c, n_val)
    val_seen = _cluster(rng, seen_c, n_val)
    # Validation reals overlap the new generator in classifier score: only retrieval separates them.
    cls_real = np.clip(rng.normal(0.35, 0.12, n_val), 0, 1)
    cls_seen = np.clip(rng.normal(0.9, 0.05, n_val), 0, 1)
    cls_new = np.clip(rng.normal(0.9 if new_cls_informative else support_cls, 0.12, 10), 0, 1)
    cal = CalibrationSet.build(
        classifier=np.concatenate([cls_real, cls_seen, cls_new]),
        embeddings=np.concatenate([val_real, val_seen, support_emb]),
        labels=np.array([0] * n_val + [1] * n_val + [1] * 10),
        modalities=["CT"] * (2 * n_val + 10),
        generators=["real"] * n_val + ["seen"] * n_val + ["new"] * 10,
        bank_ids=np.array([-1] * (2 * n_val) + support_ids),
    )
    return bank, cal


def test_lambda_rises_when_only_retrieval_knows_the_new_generator(rng):
    bank, cal = _scenario(rng, support_cls=0.3, new_cls_informative=False)
    choice = choose_fusion(bank, cal, k=4, temperature=0.05, lam=0.3, threshold=0.6)
    assert choice.lam > 0.3 and choice.changed
    p_ret = leave_one_out_retrieval(bank, cal, 4, 0.05)
    at = {lam: mean_modality_auc(cal.labels, np.asarray(fuse(cal.classifier, p_ret, lam)), cal.modalities)
          for lam in (0.3, choice.lam)}
    assert at[choice.lam] > at[0.3] and choice.auc == pytest.approx(at[choice.lam])
    assert choice.n_support == 10 and choice.n_real == 30 and choice.n_fake == 40
    assert 0.0 < choice.threshold < 1.0 and choice.threshold != 0.6
    assert set(choice.auc_by_lambda) >= {"0.00", "0.30", "1.00"}


def test_nothing_to_learn_keeps_lambda_and_threshold(rng):
    """The classifier already separates everything: every λ ties, the current one stays."""
    bank, cal = _scenario(rng, support_cls=0.9, new_cls_informative=True)
    cal = CalibrationSet.build(np.where(cal.labels == 1, 0.95, 0.05), cal.embeddings, cal.labels,
                               list(cal.modalities), list(cal.generators), cal.bank_ids)
    choice = choose_fusion(bank, cal, k=4, temperature=0.05, lam=0.3, threshold=0.6)
    assert (choice.lam, choice.threshold) == (0.3, 0.6) and not choice.changed and choice.auc == 1.0


def test_support_images_do_not_vote_for_themselves(rng):
    """One fake in a bank of reals: retrieved with itself left out, it looks real."""
    real_c = _unit(rng)
    bank = SupportBank(DIM)
    bank.add(_cluster(rng, real_c, 20), [SupportEntry("real", "CT", "real", f"r{i}") for i in range(20)])
    lone = _cluster(rng, _unit(rng), 1)
    [lone_id] = bank.add(lone, [SupportEntry("fake", "CT", "new", "n0")])
    as_support = CalibrationSet.build(np.array([0.5]), lone, np.array([1]), ["CT"], ["new"], np.array([lone_id]))
    as_stranger = CalibrationSet.build(np.array([0.5]), lone, np.array([1]), ["CT"], ["new"], np.array([-1]))
    assert leave_one_out_retrieval(bank, as_support, 3, 0.05)[0] < 0.01
    assert leave_one_out_retrieval(bank, as_stranger, 3, 0.05)[0] > 0.99


def test_degenerate_sets_keep_the_current_fusion(rng):
    bank, cal = _scenario(rng, support_cls=0.3, new_cls_informative=False)
    only_fakes = CalibrationSet.build(cal.classifier[30:], cal.embeddings[30:], cal.labels[30:],
                                      list(cal.modalities[30:]), list(cal.generators[30:]), cal.bank_ids[30:])
    c = choose_fusion(bank, only_fakes, k=4, temperature=0.05, lam=0.3, threshold=0.6)
    assert (c.lam, c.threshold, c.changed) == (0.3, 0.6, False) and "lacks" in c.reason
    c = choose_fusion(SupportBank(DIM), cal, k=4, temperature=0.05, lam=0.3, threshold=0.6)
    assert (c.lam, c.changed, c.reason) == (0.3, False, "empty bank")


def test_calibration_set_round_trip_and_edits(rng, tmp_path):
    _, cal = _scenario(rng, support_cls=0.3, new_cls_informative=False)
    assert load_calibration(tmp_path) is None  # an older bundle has none
    old_mask = os.umask(0o022)
    try:
        save_calibration(tmp_path, cal)
    finally:
        os.umask(old_mask)
    # readable like the bundle's other files, not private as the temporary file it was written to
    assert (tmp_path / CALIBRATION_FILE).stat().st_mode & 0o777 == 0o644
    back = load_calibration(tmp_path)
    assert back is not None and len(back) == len(cal) == 70
    np.testing.assert_allclose(back.classifier, cal.classifier)
    np.testing.assert_allclose(back.embeddings, cal.embeddings)
    assert back.modalities == cal.modalities and back.generators == cal.generators
    assert (back.bank_ids == cal.bank_ids).all() and (back.labels == cal.labels).all()

    support_ids = {int(b) for b in cal.bank_ids if b >= 0}
    fewer = back.without_bank_ids(set(sorted(support_ids)[:4]))
    assert len(fewer) == 66 and (fewer.bank_ids == -1).sum() == 60  # validation images always stay
    assert len(fewer.extend(back)) == 136

    (tmp_path / CALIBRATION_FILE).write_bytes(b"not a numpy archive")
    with pytest.raises(BundleError, match="calibration"):
        load_calibration(tmp_path)
    with pytest.raises(ValueError, match="labels"):
        CalibrationSet.build(np.zeros(2), np.zeros((2, DIM)) + 1, np.zeros(3), ["CT"] * 2, ["real"] * 2)


def test_bank_cli_rechooses_fusion_and_records_it(tiny_bundle_factory, trace_dataset, tmp_path):
    """``dski bank add`` on a bundle with a calibration set: λ/threshold re-chosen, in the history."""
    from detector.detector import Detector
    from detector.preprocess import prepare_file

    path = tiny_bundle_factory()
    data = trace_dataset(tmp_path / "d", n_real=6, n_fake=6, size=80, generators=("g1",))
    files = sorted(data.rglob("*.png"))
    reals = [f for f in files if f.parent.name == "real"]
    fakes = [f for f in files if f.parent.name != "real"]
    det = Detector.load(path)
    frames = det.frame_scores([prepare_file(f, det.preprocess_config) for f in reals])
    save_calibration(path, CalibrationSet.from_frame_scores(
        [(f.classifier, f.embeddings) for f in frames], [0] * len(reals), ["CT"] * len(reals),
        ["real"] * len(reals)))
    keep = tmp_path / "keep"
    shutil.copytree(path, keep)

    runner = CliRunner()
    r = runner.invoke(app, ["bank", "add", "--bundle", str(path), "--generator", "g1", "--modality", "CT",
                            *map(str, fakes)])
    assert r.exit_code == 0, r.output
    assert "fusion: λ 0.30 ->" in r.stdout
    m = read_manifest(path)
    fusion = m.bank_history[-1].fusion
    assert fusion is not None and fusion["n_support"] == len(fakes) and fusion["n_real"] == len(reals)
    assert m.retrieval.lam == fusion["lam"] and m.threshold == fusion["threshold"]
    cal = load_calibration(path)
    assert cal is not None and len(cal) == len(reals) + len(fakes)
    assert sorted(int(b) for b in cal.bank_ids if b >= 0) == [e.id for e in Detector.load(path).bank.list()]

    r = runner.invoke(app, ["bank", "remove", "--bundle", str(path), "--generator", "g1"])
    assert r.exit_code == 0, r.output
    cal = load_calibration(path)
    assert cal is not None and len(cal) == len(reals) and (cal.bank_ids == -1).all()
    assert read_manifest(path).bank_history[-1].fusion is not None

    r = runner.invoke(app, ["bank", "add", "--bundle", str(keep), "--generator", "g1", "--modality", "CT",
                            "--keep-fusion", *map(str, fakes)])
    assert r.exit_code == 0, r.output
    m = read_manifest(keep)
    assert m.bank_history[-1].fusion is None and m.retrieval.lam == 0.3 and m.threshold == 0.5
    assert json.loads((keep / "manifest.json").read_text())["retrieval"]["lam"] == 0.3
