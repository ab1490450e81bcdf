"""The results pipeline (benchmarks.results) end to end at smoke size, and the perturbations."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks import perturb
from benchmarks import results as res_cli
from benchmarks.medsynth.train_generators import WEIGHTS_DIR, weights_path

SEEN, UNSEEN = "gan", "vae"
SECTIONS = ("command", "machine", "config", "splits", "reports", "summary", "robustness", "targets",
            "preliminary", "commands", "wall_s")
VARIANTS = ("dski", "univfd", "npr", "cnnspot", "dski+support5", "dski+support10")


def _hashes(folder: Path) -> set[str]:
    return {hashlib.sha256(f.read_bytes()).hexdigest() for f in folder.rglob("*")
            if f.is_file() and f.suffix.lower() in (".png", ".jpg", ".dcm")}


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# --------------------------------------------------------------------------- perturbations

def test_perturbations_keep_layout_and_are_deterministic(tmp_path):
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for rel in ("CT/real/a.png", "CT/gan/b.png"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), mode="L").save(src / rel)
    for kind in perturb.KINDS:
        out_a, out_b = tmp_path / f"{kind}-a", tmp_path / f"{kind}-b"
        info = perturb.perturb_tree(src, out_a, kind, seed=3)
        perturb.perturb_tree(src, out_b, kind, seed=3)
        assert info["files"] == 2
        files = sorted(p.relative_to(out_a).as_posix() for p in out_a.rglob("*") if p.is_file() and p.suffix != ".json")
        suffix = ".jpg" if kind.startswith("jpeg") else ".png"
        assert files == [f"CT/gan/b{suffix}", f"CT/real/a{suffix}"]
        assert _hashes(out_a) == _hashes(out_b), f"{kind} is not deterministic"
        with Image.open(out_a / f"CT/real/a{suffix}") as im:
            assert im.size == ((16, 16) if kind == "down50" else (32, 32))
            assert im.format == ("JPEG" if kind.startswith("jpeg") else "PNG")
        orig = perturb.read_grey(src / "CT/real/a.png")
        new = perturb.read_grey(out_a / f"CT/real/a{suffix}")
        if kind != "down50":
            assert 0 < np.abs(new - orig).mean() < 0.25, kind


def test_noise_has_the_requested_sigma():
    img = np.full((256, 256), 0.5)
    out, _ = perturb.perturb_image(img, "noise", sigma=0.05, rng=np.random.default_rng(1))
    a = np.asarray(out, dtype=np.float64) / 255.0
    assert abs(a.std() - 0.05) < 0.005 and abs(a.mean() - 0.5) < 0.01


# --------------------------------------------------------------------------- the pipeline

@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    if not all(weights_path(WEIGHTS_DIR, g).is_file() for g in (SEEN, UNSEEN)):
        pytest.skip("generator weights for gan and vae are not in benchmarks/weights")
    out = tmp_path_factory.mktemp("results")
    res_cli.main(["--smoke", "--out", str(out), "--seen", SEEN, "--unseen", UNSEEN])
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_results_json_has_every_method_section_and_finite_metrics(smoke_run):
    out, res = smoke_run
    for section in SECTIONS:
        assert section in res, section
    assert res["config"]["seen"] == [SEEN] and res["config"]["unseen"] == [UNSEEN]
    assert set(res["reports"]) == set(VARIANTS) and set(res["summary"]) == set(VARIANTS)
    modalities = res["config"]["modalities"]
    for variant, report in res["reports"].items():
        assert report["errors"] == [], variant
        for mode in ("with_mfrm", "without_mfrm"):
            block = report[mode]
            assert set(block["per_modality"]) == set(modalities)
            assert set(block["per_generator"]) == {f"{m}/{g}" for m in modalities for g in (SEEN, UNSEEN)}
            for key, r in [("overall", block["overall"]), *block["per_modality"].items(),
                           *block["per_generator"].items()]:
                for metric in ("real_acc", "fake_acc", "acc", "ap", "auc"):
                    assert _finite(r[metric]), (variant, mode, key, metric, r[metric])
            s = res["summary"][variant][mode]
            assert _finite(s["unseen_mean_auc"]) and _finite(s["seen_mean_auc"])
    # The support copies hold 5 / 10 unseen fakes per modality more than the DSKI bundle's bank.
    base = res["reports"]["dski"]["retrieval"]["bank_size"]
    for k in (5, 10):
        assert res["reports"][f"dski+support{k}"]["retrieval"]["bank_size"] == base + k * len(modalities)
        assert res["reports"][f"dski+support{k}"]["retrieval"]["lam"] > 0
    # The DSKI bundle itself is untouched by the few-shot stage.
    assert res["reports"]["dski"]["bundle"]["path"].endswith("bundles/dski")
    # Robustness: every perturbation, every trained method, AUC per generator.
    assert set(res["robustness"]) == set(perturb.KINDS)
    for kind, per in res["robustness"].items():
        assert set(per) == {"dski", "univfd", "npr", "cnnspot"}
        for summary in per.values():
            for g in (SEEN, UNSEEN):
                assert _finite(summary["with_mfrm"]["generator_mean_auc"][g]), (kind, g)
                assert _finite(summary["without_mfrm"]["generator_mean_auc"][g]), (kind, g)
    # Targets are stated with their numbers, met or not.
    assert set(res["targets"]) == {"unseen_auc", "mfrm_support"}
    assert isinstance(res["targets"]["unseen_auc"]["met"], bool)
    assert _finite(res["targets"]["mfrm_support"]["auc"])
    # Every command is recorded with its wall time; the markdown lists them.
    stages = {c["stage"] for c in res["commands"]}
    assert stages == {"data", "train", "evaluate", "few-shot", "robustness"}
    assert all(c["returncode"] == 0 and c["wall_s"] >= 0 for c in res["commands"])
    assert any(c["command"].startswith("dski train ") and f"--holdout-generators {UNSEEN}" in c["command"]
               for c in res["commands"])
    md = (out / "results.md").read_text()
    assert "PRELIMINARY" in md and "dski evaluate" in md and "## Robustness" in md
    assert res["machine"]["nproc"] >= 1 and len(res["machine"]["loadavg_start"]) == 3


@pytest.mark.slow
def test_test_and_support_splits_are_disjoint_from_training(smoke_run):
    out, res = smoke_run
    data = out / "data"
    train, test, support = (_hashes(data / s) for s in ("train", "test", "support"))
    assert train and test and support
    assert not train & test
    assert not train & support
    assert not test & support
    # The held-out generator's training-split fakes never reach training or validation.
    manifest = json.loads((out / "bundles" / "dski" / "manifest.json").read_text())
    training = manifest["training"]
    assert training["holdout_generators"] == [UNSEEN]
    gens = json.dumps([training["train"], training["validation"]])
    assert UNSEEN not in gens
    # The recorded hashes agree with the files.
    recorded = json.loads(Path(res["splits_hashes_file"]).read_text())
    assert set(recorded["test"]) == test and set(recorded["train"]) == train
    # Support images are fakes of the unseen generator only, none of which are test files.
    assert all(p.split("/")[1] == UNSEEN for p in recorded["support"].values())
