"""Training that can fail: a planted generator trace is learnt, and training is deterministic and resumable.

The data (``conftest.make_trace_dataset``): 128 px grey images of smooth random
structures with pixel noise are "real"; "fake" ones are made at 64 px and
upsampled by a fixed random transposed convolution (kernel 4, stride 2), which
leaves a checkerboard trace in the high frequencies. The tiny backbone sees a
64 px resized semantic view, where that trace is mostly gone, so the frozen
backbone alone (the untrained model, with or without retrieval over its
embeddings) cannot separate the classes; the CDFA noise branch sees the native
128 px crop and has to learn the trace.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from typer.testing import CliRunner

from detector.bundle import read_manifest
from detector.calibration import load_calibration
from detector.cli import app

SIZE = 128




def _run(args: list[str]) -> str:
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, f"{args}: {r.output}\n{r.exception!r}"
    return r.stdout


def _auc(report: dict, key: str, group: str | None = None) -> float:
    m = report[key]
    return (m["overall"] if group is None else m["per_generator"][group])["auc"]


@pytest.mark.slow
def test_training_learns_the_planted_trace(tmp_path, trace_dataset):
    t0 = time.perf_counter()
    train_dir = trace_dataset(tmp_path / "train", n_real=48, n_fake=48, size=SIZE, n_dicom=2, seed=1,
                              generators=("tconv-a", "tconv-b"))
    test_dir = trace_dataset(tmp_path / "test", n_real=32, n_fake=32, size=SIZE, n_dicom=2, seed=2,
                             generators=("tconv-a", "tconv-b"))
    common = ["--data", str(train_dir), "--seed", "0", "--holdout-generators", "tconv-b", "--no-progress"]

    _run(["train", *common, "--out", str(tmp_path / "untrained"), "--epochs", "0"])
    _run(["train", *common, "--out", str(tmp_path / "trained"), "--epochs", "10", "--lr", "5e-3"])
    for name in ("untrained", "trained"):
        _run(["evaluate", "--bundle", str(tmp_path / name), "--data", str(test_dir),
              "--json", str(tmp_path / f"{name}.json")])
    untrained = json.loads((tmp_path / "untrained.json").read_text())
    trained = json.loads((tmp_path / "trained.json").read_text())

    seen = "CT/tconv-a"
    aucs = {f"{name} {key}": _auc(r, key, seen) for name, r in (("untrained", untrained), ("trained", trained))
            for key in ("with_mfrm", "without_mfrm")}
    aucs["trained unseen tconv-b with_mfrm"] = _auc(trained, "with_mfrm", "CT/tconv-b")
    print(f"\nAUC on held-out images of {seen}: {aucs} ({time.perf_counter() - t0:.1f} s)")

    assert aucs["trained with_mfrm"] >= 0.95
    assert aucs["trained without_mfrm"] >= 0.95
    # The untrained model is near chance, with or without retrieval over its embeddings.
    assert aucs["untrained with_mfrm"] < 0.85
    assert aucs["untrained without_mfrm"] < 0.85
    assert trained["errors"] == [] and trained["n_scored"] == 32 * 3

    manifest = read_manifest(tmp_path / "trained")
    assert manifest.training["holdout_generators"] == ["tconv-b"]
    assert manifest.training["train"]["counts"]["CT"].keys() == {"real", "tconv-a"}
    assert "held_out_generators" in manifest.metrics
    assert len(manifest.training["losses"]) == 10
    assert manifest.training["losses"][-1] < manifest.training["losses"][0]
    # The validation split is kept as the calibration set for later bank edits.
    cal = load_calibration(tmp_path / "trained")
    assert cal is not None and (cal.bank_ids == -1).all()
    val = manifest.training["validation"]["counts"]["CT"]
    assert len(cal) == sum(val.values()) and int(cal.labels.sum()) == val["tconv-a"]
    assert set(cal.generators) == {"real", "tconv-a"} and cal.embeddings.shape[1] == manifest.embedding_dim


def test_training_is_deterministic_and_resumable(tmp_path, trace_dataset):
    data = trace_dataset(tmp_path / "data", n_real=10, n_fake=10, size=64, seed=3)
    common = ["--data", str(data), "--seed", "7", "--batch-size", "8", "--no-progress"]
    _run(["train", *common, "--out", str(tmp_path / "a"), "--epochs", "2"])
    # One epoch, then resumed to two: the same weights as two epochs in one go.
    _run(["train", *common, "--out", str(tmp_path / "b"), "--epochs", "1"])
    _run(["train", *common, "--out", str(tmp_path / "b"), "--epochs", "2", "--resume"])
    a, b = read_manifest(tmp_path / "a"), read_manifest(tmp_path / "b")
    assert a.weights_sha256 == b.weights_sha256
    assert a.threshold == b.threshold
    assert a.classifier_threshold is not None and a.classifier_threshold == b.classifier_threshold
    # The bank built by training is the first audit event, and it is the bank on disk.
    assert [e.action for e in a.bank_history] == ["train"]
    from detector.detector import Detector

    det = Detector.load(tmp_path / "a")
    assert a.bank_history[0].bank_digest == det.bank.digest() and a.bank_history[0].count == len(det.bank)
    assert a.training["losses"] == b.training["losses"] and len(a.training["losses"]) == 2

    runner = CliRunner()
    # An existing bundle is not silently replaced.
    r = runner.invoke(app, ["train", *common, "--out", str(tmp_path / "a"), "--epochs", "2"])
    assert r.exit_code == 2 and "already exists" in r.stderr
    # Resuming with other settings is refused.
    r = runner.invoke(app, ["train", *common[:-1], "--lr", "0.1", "--no-progress", "--out", str(tmp_path / "b"),
                            "--epochs", "3", "--resume"])
    assert r.exit_code == 2 and "another run" in r.stderr
    # Unknown held-out generator, unknown method: clear errors.
    r = runner.invoke(app, ["train", *common, "--out", str(tmp_path / "c"), "--holdout-generators", "nope"])
    assert r.exit_code == 2 and "nope" in r.stderr
    r = runner.invoke(app, ["train", *common, "--out", str(tmp_path / "c"), "--method", "magic"])
    assert r.exit_code == 2 and "magic" in r.stderr


@pytest.mark.parametrize("method", ["univfd", "npr", "cnnspot"])
def test_baselines_train_in_the_same_harness(tmp_path, trace_dataset, method):
    data = trace_dataset(tmp_path / "data", n_real=6, n_fake=6, size=64, seed=4)
    _run(["train", "--data", str(data), "--out", str(tmp_path / method), "--method", method, "--epochs", "1",
          "--no-progress"])
    out = _run(["evaluate", "--bundle", str(tmp_path / method), "--data", str(data)])
    manifest = read_manifest(tmp_path / method)
    assert manifest.method == method
    assert "overall" in out
    # Every weight is in the bundle. The CNNs have no CLIP backbone, and the manifest says so.
    assert manifest.backbone_weights_included
    if method == "univfd":
        assert manifest.training["backbone"] == "dski-tiny" and manifest.name == "univfd-dski-tiny"
    else:
        assert manifest.training["backbone"] is None and manifest.name == method
        r = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "x"), "--method", method,
                                     "--checkpoint", str(tmp_path / method / "weights.safetensors"), "--no-progress"])
        assert r.exit_code == 2 and "no CLIP backbone" in r.stderr


def test_train_options_configure_cdfa_head_and_preprocessing(tmp_path, trace_dataset):
    from detector.detector import Detector

    data = trace_dataset(tmp_path / "data", n_real=6, n_fake=6, size=64, seed=5)
    common = ["--data", str(data), "--no-progress", "--epochs", "1", "--batch-size", "8"]
    _run(["train", *common, "--out", str(tmp_path / "a"), "--cdfa-blocks", "1,2", "--bottleneck", "8",
          "--context-tokens", "2", "--noise-crop", "32", "--max-frames", "2", "--device", "cpu"])
    m = read_manifest(tmp_path / "a")
    assert m.spec.cdfa.blocks == (1, 2) and m.spec.cdfa.bottleneck == 8
    assert m.spec.head.context_tokens == 2 and m.spec.noise_crop == 32
    assert m.preprocess.noise_crop == 32 and m.preprocess.max_frames == 2
    assert m.spec.backbone.image_size == m.preprocess.semantic_size == 64  # from the open_clip config
    assert m.training["device"] == "cpu"
    det = Detector.load(tmp_path / "a")
    assert det.model.cdfa_block_indices == (1, 2) and det.model.head.context.shape[0] == 2
    assert det.model.cdfa_blocks()[0].adapter.down.out_features == 8
    _run(["train", *common, "--out", str(tmp_path / "b"), "--cdfa-num-blocks", "2", "--epochs", "0"])
    assert Detector.load(tmp_path / "b").model.cdfa_block_indices == (0, 2)
    _run(["train", *common, "--out", str(tmp_path / "p"), "--noise-stem", "patch", "--epochs", "0"])
    patched = Detector.load(tmp_path / "p").model
    assert read_manifest(tmp_path / "p").spec.cdfa.noise_stem == "patch"
    assert patched._folded_stem is not None  # loaded for inference: the one-convolution path

    runner = CliRunner()
    for extra, word in ((["--cdfa-blocks", "1,9"], "out of range"),
                        (["--cdfa-blocks", "a,b"], "comma-separated"),
                        (["--cdfa-blocks", "1", "--cdfa-num-blocks", "2"], "not both"),
                        (["--method", "npr", "--bottleneck", "8"], "DSKI only"),
                        (["--method", "univfd", "--context-tokens", "2"], "DSKI only"),
                        (["--method", "npr", "--noise-stem", "patch"], "DSKI only"),
                        (["--noise-stem", "pixel"], "must be conv or patch"),
                        (["--device", "tpu"], "cpu, cuda or cuda:N")):
        r = runner.invoke(app, ["train", *common, "--out", str(tmp_path / "bad"), *extra])
        assert r.exit_code == 2 and word in r.stderr, (extra, r.output)
        assert "Traceback" not in r.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_on_cuda(tmp_path, trace_dataset):
    data = trace_dataset(tmp_path / "data", n_real=6, n_fake=6, size=64, seed=6)
    _run(["train", "--data", str(data), "--out", str(tmp_path / "g"), "--epochs", "1", "--device", "cuda",
          "--no-progress"])
    _run(["evaluate", "--bundle", str(tmp_path / "g"), "--data", str(data), "--device", "cuda"])
    assert read_manifest(tmp_path / "g").training["device"].startswith("cuda")
