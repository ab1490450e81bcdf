"""Bundles: bit-identical round trip, validation errors, Detector scoring, and the bank/detect/evaluate CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from detector.bundle import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    load_bundle,
    read_manifest,
    save_bundle,
)
from detector.cli import app
from detector.detector import Detector, Verdict
from detector.errors import BundleError, PreprocessError
from detector.methods import build_model
from detector.preprocess import PreparedImage, PreprocessConfig, prepare_file
from detector.retrieval import SupportEntry
from detector.spec import BackboneSpec, ModelSpec




@pytest.fixture()
def images(tmp_path, trace_dataset) -> list[Path]:
    root = trace_dataset(tmp_path / "data", n_real=3, n_fake=3, n_dicom=1, size=80)
    return sorted(root.rglob("*.*"))


def _prepare(paths, spec: ModelSpec) -> list[PreparedImage]:
    cfg = PreprocessConfig(semantic_size=spec.backbone.image_size, noise_crop=spec.noise_crop)
    return [prepare_file(p, cfg) for p in paths]


def _model_probs(model, prepared: list[PreparedImage]) -> torch.Tensor:
    model.prepare_inference()
    with torch.inference_mode():
        sem = torch.cat([p.semantic for p in prepared])
        noise = torch.cat([p.noise for p in prepared])
        mod = torch.tensor([model.modality_index(p.modality) for p in prepared])
        _, logits = model.embed_and_logits(sem, noise, mod)
    return torch.softmax(logits.float(), dim=-1)[:, 1].double()


def _open_gates(model) -> None:
    """Make the untrained model use every CDFA parameter, so the round trip covers them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "gate" in name:
                p.fill_(0.5)


def test_round_trip_gives_bit_identical_scores(tmp_path, images):
    spec = ModelSpec()
    torch.manual_seed(1)
    model = build_model(spec)
    _open_gates(model)
    prepared = _prepare(images, spec)
    before = _model_probs(model, prepared)
    cfg = PreprocessConfig(semantic_size=spec.backbone.image_size, noise_crop=spec.noise_crop)
    manifest = save_bundle(tmp_path / "b", model, spec, cfg, name="rt", version="1.2.3", threshold=0.4)
    assert manifest.backbone_weights_included  # tiny random backbone: no checkpoint to supply it

    torch.manual_seed(999)  # a different random init must not matter after loading
    det = Detector.load(tmp_path / "b", batch_size=2)
    after = np.concatenate([f.classifier for f in det.frame_scores(prepared)])
    assert np.array_equal(before.numpy(), after), "scores must be bit-identical after the round trip"

    verdicts = det.score_prepared(prepared)
    assert all(isinstance(v, Verdict) for v in verdicts)
    v = verdicts[0]
    assert v.bundle_name == "rt" and v.bundle_version == "1.2.3"
    from detector.retrieval import EMPTY_BANK_DIGEST

    assert v.model_version == f"rt@1.2.3+w{manifest.weights_sha256[:12]}.b{EMPTY_BANK_DIGEST[:8]}"
    assert v.retrieval_score is None and v.score == v.classifier_score  # empty bank: classifier only
    assert v.label == ("fake" if v.score >= 0.4 else "real") and v.threshold == 0.4
    assert det.version == "1.2.3" and det.name == "rt" and det.threshold == 0.4

    # Saving the loaded model again reproduces the weights file exactly.
    m2 = save_bundle(tmp_path / "b2", det.model, spec, cfg, name="rt", version="1.2.3", threshold=0.4)
    assert m2.weights_sha256 == manifest.weights_sha256


def test_round_trip_with_bank_and_checkpoint_backbone(tmp_path, images):
    """With a checkpoint, the frozen backbone is left out of the bundle and comes from the checkpoint."""
    import open_clip

    from detector.tiny import register_tiny_models

    register_tiny_models()
    torch.manual_seed(5)
    clip = open_clip.create_model("dski-tiny", pretrained=None)
    ckpt = tmp_path / "tiny-clip.pt"
    torch.save(clip.state_dict(), ckpt)
    from detector.backbone import sha256_file

    spec = ModelSpec(backbone=BackboneSpec(checkpoint=ckpt, checkpoint_sha256=sha256_file(ckpt)))
    torch.manual_seed(6)
    model = build_model(spec)
    _open_gates(model)
    prepared = _prepare(images, spec)
    cfg = PreprocessConfig(semantic_size=spec.backbone.image_size, noise_crop=spec.noise_crop)
    from detector.retrieval import SupportBank

    model.prepare_inference()
    with torch.inference_mode():
        emb = model.embed(torch.cat([p.semantic for p in prepared]), torch.cat([p.noise for p in prepared]))
    bank = SupportBank(emb.shape[1])
    bank.add(emb.numpy()[:4], [SupportEntry("fake" if i % 2 else "real", "CT", "g" if i % 2 else "real", f"s{i}")
                               for i in range(4)])
    from detector.bundle import RetrievalSettings

    manifest = save_bundle(tmp_path / "b", model, spec, cfg, name="ck", version="0.1.0", threshold=0.5,
                           retrieval=RetrievalSettings(k=3, lam=0.5, temperature=0.1), bank=bank)
    assert not manifest.backbone_weights_included
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "b" / WEIGHTS_FILE))
    assert not any(k.startswith("backbone.visual.conv1") for k in stored)
    assert any("adapter" in k or "noise" in k for k in stored)
    assert len(stored) < len(model.state_dict())

    before = _model_probs(model, prepared).numpy()
    det = Detector.load(tmp_path / "b")
    fs = det.frame_scores(prepared)
    assert np.array_equal(before, np.concatenate([f.classifier for f in fs]))
    assert len(det.bank) == 4
    v = det.score_prepared(prepared)
    assert all(x.retrieval_score is not None for x in v)
    assert v[0].score == pytest.approx(0.5 * v[0].classifier_score + 0.5 * v[0].retrieval_score)
    from detector.retrieval import retrieval_probability

    sims, idx = det.bank.query(fs[0].embeddings, 3)
    assert idx[0, 0] == 0  # the first image is its own nearest neighbour
    assert v[0].retrieval_score == pytest.approx(retrieval_probability(sims, det.bank.labels[idx], 0.1)[0])

    # A different checkpoint file is refused by the backbone's sha256 check.
    torch.save({k: v + 1 for k, v in clip.state_dict().items()}, ckpt)
    from detector.errors import CheckpointError

    with pytest.raises(CheckpointError):
        Detector.load(tmp_path / "b")


def test_score_is_max_over_frames(tiny_bundle_factory, images):
    det = Detector.load(tiny_bundle_factory())
    a, b = _prepare(images[:2], det.bundle.spec)
    both = PreparedImage(source="two", modality="CT", sop_instance_uid=None, frame_indices=(0, 1),
                         semantic=torch.cat([a.semantic, b.semantic]), noise=torch.cat([a.noise, b.noise]))
    va, vb, vboth = det.score_prepared([a, b, both])
    # Same modality index for all three (files are read with modality from the header or "OT").
    if a.modality == b.modality == "CT":
        assert vboth.score == max(va.score, vb.score)
    assert vboth.frames_scored == 2


def test_score_file_and_dataset(tiny_bundle_factory, images):
    import pydicom

    det = Detector.load(tiny_bundle_factory())
    dcm = next(p for p in images if p.suffix == ".dcm")
    v1 = det.score_file(dcm)
    v2 = det.score_dataset(pydicom.dcmread(dcm), "test")
    assert v1.score == v2.score and v1.elapsed_ms > 0
    with pytest.raises(PreprocessError):
        det.score_file(images[0].parent / "does-not-exist.png")
    bad = images[0].parent / "broken.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    with pytest.raises(PreprocessError) as info:
        det.score_file(bad)
    assert str(bad) in str(info.value)


def test_tampered_weights_raise_bundle_error(tiny_bundle_factory):
    path = tiny_bundle_factory()
    weights = path / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256") as info:
        load_bundle(path)
    assert info.value.path == str(weights)


def test_missing_and_bad_manifest_raise_bundle_error(tiny_bundle_factory, tmp_path):
    path = tiny_bundle_factory()
    good = (path / MANIFEST_FILE).read_text()
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nowhere")
    (path / MANIFEST_FILE).unlink()
    with pytest.raises(BundleError, match="missing manifest") as info:
        load_bundle(path)
    assert str(path) in str(info.value)
    (path / MANIFEST_FILE).write_text("{broken")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(path)
    doc = json.loads(good)
    (path / MANIFEST_FILE).write_text(json.dumps({**doc, "format_version": 99}))
    with pytest.raises(BundleError, match="unknown bundle format version 99"):
        load_bundle(path)
    (path / MANIFEST_FILE).write_text(json.dumps({**doc, "version": "one"}))
    with pytest.raises(BundleError, match="semantic version"):
        load_bundle(path)
    # The spec no longer describes the stored weights.
    doc["spec"]["cdfa"]["bottleneck"] = 7
    (path / MANIFEST_FILE).write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="do not fit the manifest's model spec"):
        load_bundle(path)
    (path / MANIFEST_FILE).write_text(good)
    shutil.rmtree(path / "bank")
    with pytest.raises(BundleError, match="missing bank"):
        load_bundle(path)
    (path / MANIFEST_FILE).write_text(good)
    assert read_manifest(path).clinical_use.startswith("not clinically validated")


def test_bank_cli_add_list_remove(tiny_bundle_factory, images):
    path = tiny_bundle_factory()
    runner = CliRunner()
    fakes = [str(p) for p in images if p.parent.name != "real"]
    r = runner.invoke(app, ["bank", "add", "--bundle", str(path), "--label", "fake", "--generator", "tconv",
                            "--modality", "CT", *fakes])
    assert r.exit_code == 0, r.output
    reals = [str(p) for p in images if p.parent.name == "real"]
    r = runner.invoke(app, ["bank", "add", "--bundle", str(path), "--label", "real", *reals])
    assert r.exit_code == 0, r.output

    r = runner.invoke(app, ["bank", "list", "--bundle", str(path), "--json"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["id"] for row in rows] == list(range(6))
    assert {(row["label"], row["generator"]) for row in rows} == {("fake", "tconv"), ("real", "real")}
    assert all(row["modality"] == "CT" for row in rows[:3])

    # The bank is used when scoring.
    v = Detector.load(path).score_file(images[0])
    assert v.retrieval_score is not None

    r = runner.invoke(app, ["bank", "remove", "--bundle", str(path), "--id", "4"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["bank", "remove", "--bundle", str(path), "--generator", "tconv"])
    assert r.exit_code == 0 and "removed 3" in r.stdout
    r = runner.invoke(app, ["bank", "list", "--bundle", str(path), "--json"])
    assert [json.loads(line)["id"] for line in r.stdout.splitlines()] == [3, 5]

    # Typed errors: a message and a non-zero exit, no traceback.
    for args in (["bank", "remove", "--bundle", str(path), "--id", "42"],
                 ["bank", "add", "--bundle", str(path), "--label", "fake", *fakes],
                 ["bank", "list", "--bundle", str(path.parent / "missing")],
                 ["bank", "add", "--bundle", str(path), "--label", "fake", "--generator", "g",
                  str(path / MANIFEST_FILE)]):
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert r.exception is None or isinstance(r.exception, SystemExit)
        assert "error:" in r.stderr and "Traceback" not in r.output
    # A failed add leaves the bank unchanged.
    assert len(Detector.load(path).bank) == 2


def test_detect_cli_json_lines_and_failures(tiny_bundle_factory, images, tmp_path):
    path = tiny_bundle_factory()
    bad = tmp_path / "not-an-image.dcm"
    bad.write_bytes(b"hello")
    runner = CliRunner()
    dcm = next(p for p in images if p.suffix == ".dcm")
    r = runner.invoke(app, ["detect", "--bundle", str(path), str(dcm), str(bad), str(images[-1])])
    assert r.exit_code == 1, r.output
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(lines) == 3
    ok = lines[0]
    assert set(ok) >= {"path", "sop_instance_uid", "modality", "score", "label", "bundle_version", "ms"}
    assert ok["sop_instance_uid"] and ok["modality"] == "CT" and ok["bundle_version"] == "0.1.0"
    assert lines[1]["path"] == str(bad) and lines[1]["error"]
    assert "score" in lines[2]
    r = runner.invoke(app, ["detect", "--bundle", str(tmp_path / "nothing"), str(dcm)])
    assert r.exit_code == 2 and "error:" in r.stderr and "Traceback" not in r.output


def test_evaluate_cli_json_and_plots(tiny_bundle_factory, trace_dataset, tmp_path):
    path = tiny_bundle_factory()
    data = trace_dataset(tmp_path / "eval", n_real=4, n_fake=4, generators=("g1", "g2"))
    runner = CliRunner()
    r = runner.invoke(app, ["evaluate", "--bundle", str(path), "--data", str(data),
                            "--json", str(tmp_path / "r.json"), "--plots", str(tmp_path / "plots")])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n_scored"] == 12 and report["errors"] == []
    for key in ("with_mfrm", "without_mfrm"):
        assert set(report[key]["per_generator"]) == {"CT/g1", "CT/g2"}
        m = report[key]["per_generator"]["CT/g1"]
        assert m["n_real"] == 4 and m["n_fake"] == 4
        assert {"real_acc", "fake_acc", "acc", "ap", "auc"} <= set(m)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["hist_CT.png", "roc_CT.png"]


def test_bank_edits_change_model_version_and_are_recorded(tiny_bundle_factory, images):
    """SR UIDs derive from model_version: a bank edit that can change scores must change it."""
    from datetime import datetime

    from detector.bundle import update_manifest
    from detector.retrieval import EMPTY_BANK_DIGEST

    path = tiny_bundle_factory()
    manifest = read_manifest(path)
    empty = Detector.load(path).model_version
    assert empty == f"dski-test@0.1.0+w{manifest.weights_sha256[:12]}.b{EMPTY_BANK_DIGEST[:8]}"
    assert manifest.bank_history == []

    runner = CliRunner()
    fakes = [str(p) for p in images if p.parent.name != "real"]
    r = runner.invoke(app, ["bank", "add", "--bundle", str(path), "--label", "fake", "--generator", "tconv",
                            "--modality", "CT", *fakes])
    assert r.exit_code == 0, r.output
    det = Detector.load(path)
    added = det.model_version
    assert added != empty and added.startswith(f"dski-test@0.1.0+w{manifest.weights_sha256[:12]}.b")
    assert det.score_file(images[0]).model_version == added
    # Weights and version are untouched; only the bank part moved.
    assert read_manifest(path).weights_sha256 == manifest.weights_sha256

    r = runner.invoke(app, ["bank", "remove", "--bundle", str(path), "--id", "0"])
    assert r.exit_code == 0, r.output
    one_removed = Detector.load(path).model_version
    assert one_removed not in (empty, added)
    r = runner.invoke(app, ["bank", "remove", "--bundle", str(path), "--generator", "tconv"])
    assert r.exit_code == 0, r.output
    assert Detector.load(path).model_version == empty  # the same (empty) bank scores the same

    history = read_manifest(path).bank_history
    assert [(e.action, e.count, e.bank_size) for e in history] == [("add", 3, 3), ("remove", 1, 2),
                                                                  ("remove", 2, 0)]
    add = history[0]
    assert (add.label, add.generator, add.modality, add.ids) == ("fake", "tconv", "CT", [0, 1, 2])
    assert history[1].ids == [0] and history[2].generator == "tconv"
    assert added.endswith(f".b{add.bank_digest[:8]}") and history[2].bank_digest == EMPTY_BANK_DIGEST
    assert datetime.fromisoformat(add.time).utcoffset().total_seconds() == 0
    # Append-only: earlier events cannot be rewritten or dropped through update_manifest.
    with pytest.raises(ValueError, match="append-only"):
        update_manifest(path, bank_history=[])
    with pytest.raises(ValueError, match="append-only"):
        update_manifest(path, bank_history=[h.model_dump(mode="json") for h in history[1:]])


def test_without_mfrm_uses_the_classifier_threshold(tiny_bundle_factory, trace_dataset, tmp_path):
    from detector.evaluate import evaluate

    # Extreme thresholds make the two rules visible whatever the untrained scores are:
    # fused >= 0 flags everything fake, classifier >= 1 flags (almost surely) nothing.
    path = tiny_bundle_factory(threshold=0.0, classifier_threshold=1.0)
    data = trace_dataset(tmp_path / "eval", n_real=3, n_fake=3)
    report = evaluate(path, data)
    assert report["threshold"] == 0.0 and report["classifier_threshold"] == 1.0
    assert report["with_mfrm"]["overall"]["real_acc"] == 0.0
    without = report["without_mfrm"]["overall"]
    assert without["real_acc"] == 1.0 and without["fake_acc"] == 0.0
    det = Detector.load(path)
    image = prepare_file(next(data.rglob("*.png")), det.preprocess_config)
    assert det.score_prepared([image], lam=0.0)[0].threshold == 1.0
    assert det.score_prepared([image])[0].threshold == 0.0
    # A bundle without classifier_threshold (older format) falls back to the fused one.
    old = tiny_bundle_factory(tmp_path / "old", threshold=0.3)
    assert read_manifest(old).classifier_threshold is None
    assert Detector.load(old).classifier_threshold == 0.3


def test_cnn_baselines_store_every_weight_even_with_a_checkpoint(tmp_path):
    """npr and cnnspot have no CLIP backbone: a stray checkpoint must not mark weights as omitted."""
    ckpt = tmp_path / "unused.pt"
    ckpt.write_bytes(b"x")
    spec = ModelSpec(method="npr", backbone=BackboneSpec(checkpoint=ckpt, checkpoint_sha256="0" * 64))
    cfg = PreprocessConfig(semantic_size=spec.backbone.image_size, noise_crop=spec.noise_crop)
    manifest = save_bundle(tmp_path / "npr", build_model(spec), spec, cfg, name="npr", version="0.1.0",
                           threshold=0.5)
    assert manifest.backbone_weights_included
    assert Detector.load(tmp_path / "npr").bundle.manifest.method == "npr"


def test_device_option_is_validated(tiny_bundle_factory, images):
    from detector.detector import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    for bad in ("tpu", "cuda:x", "gpu", ""):
        with pytest.raises(ValueError, match="cpu, cuda or cuda:N"):
            resolve_device(bad)
    path = tiny_bundle_factory()
    det = Detector.load(path, device="cpu")
    assert {p.device.type for p in det.model.parameters()} == {"cpu"}
    runner = CliRunner()
    r = runner.invoke(app, ["detect", "--bundle", str(path), "--device", "cpu", str(images[0])])
    assert r.exit_code == 0 and "score" in r.stdout
    r = runner.invoke(app, ["detect", "--bundle", str(path), "--device", "tpu", str(images[0])])
    assert r.exit_code == 2 and "cpu, cuda or cuda:N" in r.stderr
    if not torch.cuda.is_available():
        for cmd in (["detect", "--bundle", str(path), "--device", "cuda", str(images[0])],
                    ["evaluate", "--bundle", str(path), "--data", str(images[0].parent.parent.parent),
                     "--device", "cuda:0"]):
            r = runner.invoke(app, cmd)
            assert r.exit_code == 2 and "CUDA is not available" in r.stderr, r.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_detector_on_cuda_matches_cpu(tiny_bundle_factory, images):
    path = tiny_bundle_factory()
    cpu = Detector.load(path)
    gpu = Detector.load(path, device="cuda")
    assert {t.device.type for t in [*gpu.model.parameters(), *gpu.model.buffers()]} == {"cuda"}
    prepared = _prepare(images, cpu.bundle.spec)
    a = cpu.score_prepared(prepared)
    b = gpu.score_prepared(prepared)
    assert [v.score for v in a] == pytest.approx([v.score for v in b], abs=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_bundle_loaded_on_the_cpu_scores_on_cuda(images):
    # The shipped bundle folds its noise stem when loaded; moving it afterwards must move the fold.
    default = Path(__file__).resolve().parents[2] / "bundles" / "default"
    cpu = Detector.load(default)
    gpu = Detector(load_bundle(default), device="cuda")
    assert gpu.model._folded_stem is not None and gpu.model._folded_stem.weight.device.type == "cuda"
    prepared = _prepare(images, cpu.bundle.spec)
    a = cpu.score_prepared(prepared)
    b = gpu.score_prepared(prepared)
    assert [v.score for v in a] == pytest.approx([v.score for v in b], abs=1e-4)
