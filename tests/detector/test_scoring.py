"""Scoring on the node: shared between threads, inference mode, batched files, and `dski detect` on every pydicom file."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from test_preprocess import KNOWN_FAILURES, PIXEL_FILES  # the same file list and expectations as preprocessing
from typer.testing import CliRunner

from detector.cli import app
from detector.detector import Detector
from detector.errors import PreprocessError
from detector.preprocess import prepare_file
from detector.retrieval import SupportEntry




@pytest.fixture()
def images(tmp_path, trace_dataset) -> list[Path]:
    root = trace_dataset(tmp_path / "data", n_real=4, n_fake=4, n_dicom=1, size=80)
    return sorted(root.rglob("*.*"))


@pytest.fixture()
def detector(tiny_bundle_factory, images) -> Detector:
    """A tiny bundle with open noise gates (the CDFA noise path matters) and a non-empty bank."""
    from detector.bundle import save_bank

    path = tiny_bundle_factory()
    det = Detector.load(path, batch_size=3)  # several forward batches per call
    with torch.no_grad():
        for name, p in det.model.named_parameters():
            if "gate" in name:
                p.fill_(0.5)
    prepared = [prepare_file(p, det.preprocess_config) for p in images[:4]]
    det.bank.add(det.embed_prepared(prepared),
                 [SupportEntry("fake" if i % 2 else "real", "CT", "g" if i % 2 else "real", f"s{i}")
                  for i in range(4)])
    save_bank(path, det.bank)
    return det


def test_concurrent_scoring_matches_sequential(detector, images):
    prepared = [prepare_file(p, detector.preprocess_config) for p in images]
    # Each thread scores its own order, so a noise slot shared between threads would mix images.
    orders = [prepared, prepared[::-1]]
    expected = [[(v.score, v.classifier_score, v.retrieval_score) for v in detector.score_prepared(o)]
                for o in orders]
    assert expected[0] != expected[1]
    rounds = 5
    got: list[list[list[tuple]]] = [[], []]
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def work(i: int) -> None:
        try:
            start.wait()
            for _ in range(rounds):
                got[i].append([(v.score, v.classifier_score, v.retrieval_score)
                               for v in detector.score_prepared(orders[i])])
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for i in range(2):
        assert got[i] == [expected[i]] * rounds  # bit-identical to the sequential run


def test_scoring_runs_in_inference_mode(detector, images, monkeypatch):
    seen: list[bool] = []
    inner = detector.model.embed_and_logits

    def spy(*args, **kwargs):
        seen.append(torch.is_inference_mode_enabled())
        return inner(*args, **kwargs)

    monkeypatch.setattr(detector.model, "embed_and_logits", spy)
    detector.score_file(images[0])
    detector.score_files(images[:2])
    assert seen and all(seen)


def test_score_files_batches_and_reports_failures_in_order(detector, images, tmp_path, monkeypatch):
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    paths = [images[0], bad, *images[1:5]]
    calls: list[int] = []
    inner = detector.frame_scores

    def counting(imgs):
        calls.append(len(imgs))
        return inner(imgs)

    monkeypatch.setattr(detector, "frame_scores", counting)
    detector.batch_size = 16
    results = detector.score_files(paths)
    assert calls == [5]  # one batched call for the five good files
    assert [r.path for r in results] == [str(p) for p in paths]
    assert results[1].verdict is None and isinstance(results[1].error, PreprocessError)
    assert str(bad) in str(results[1].error)
    for r, p in zip([results[0], *results[2:]], [images[0], *images[1:5]]):
        assert r.error is None and r.verdict is not None and r.verdict.elapsed_ms > 0
        # Batch composition moves float32 results in the last bits only.
        assert r.verdict.score == pytest.approx(detector.score_file(p).score, abs=1e-5)
        assert r.modality
    assert results[0].sop_instance_uid  # images[0] is the DICOM file of its folder
    # Chunks of batch_size files bound memory; results stay the same.
    detector.batch_size = 2
    calls.clear()
    again = detector.score_files(paths)
    assert calls == [1, 2, 2]
    assert [r.error is None for r in again] == [r.error is None for r in results]
    assert [r.verdict.score for r in again if r.verdict] == \
           pytest.approx([r.verdict.score for r in results if r.verdict], abs=1e-5)
    assert detector.score_files([]) == []


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's warnings about its deliberately odd files
def test_detect_every_pydicom_file_prints_a_score_or_a_reason(tiny_bundle_factory):
    path = tiny_bundle_factory()
    r = CliRunner().invoke(app, ["detect", "--bundle", str(path), *PIXEL_FILES])
    assert "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [line["path"] for line in lines] == PIXEL_FILES
    failed = []
    for line in lines:
        if "error" in line:
            assert line["error"].strip() and line["error_type"]
            failed.append(os.path.basename(line["path"]))
        else:
            assert 0.0 <= line["score"] <= 1.0 and line["label"] in ("real", "fake")
            assert line["model_version"] and line["frames"] >= 1
    assert set(failed) <= set(KNOWN_FAILURES), failed
    assert r.exit_code == (1 if failed else 0)
    if failed:
        assert f"{len(failed)} of {len(PIXEL_FILES)} file(s) could not be scored" in r.stderr


def test_detect_survives_an_unexpected_model_error(tiny_bundle_factory, images, monkeypatch):
    """A failure that is no PreprocessError costs only its own file a line, never a traceback."""
    real = Detector.frame_scores

    def flaky(self, imgs):
        if any("f0001" in img.source for img in imgs):
            raise RuntimeError("simulated kernel failure")
        return real(self, imgs)

    monkeypatch.setattr(Detector, "frame_scores", flaky)
    path = tiny_bundle_factory()
    paths = [str(p) for p in images]
    r = CliRunner().invoke(app, ["detect", "--bundle", str(path), *paths])
    assert r.exit_code == 1 and "Traceback" not in r.output
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [line["path"] for line in lines] == paths
    bad = [line for line in lines if "error" in line]
    assert len(bad) == 1 and "f0001" in bad[0]["path"] and "simulated kernel failure" in bad[0]["error"]
    assert all(np.isfinite(line["score"]) for line in lines if "score" in line)
