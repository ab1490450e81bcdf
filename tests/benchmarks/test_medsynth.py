"""Synthetic benchmark generator: simulators, generator families, writer and the generate command."""

from __future__ import annotations

import filecmp
import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from benchmarks import generate as gen_cli
from benchmarks.medsynth.common import MODALITIES, image_rng
from benchmarks.medsynth.ct import fbp, hu_to_mu, mu_to_hu, radon, simulate_ct
from benchmarks.medsynth.generators import FAMILIES, build
from benchmarks.medsynth.mr import simulate_mr
from benchmarks.medsynth.phantoms import ellipse_mask, grid
from benchmarks.medsynth.radiography import simulate_radiograph
from benchmarks.medsynth.simulate import simulate
from benchmarks.medsynth.train_generators import (
    TrainConfig,
    WeightsError,
    load,
    save,
    train,
    training_set,
)
from benchmarks.medsynth.ultrasound import (
    RAYLEIGH_SNR_INV,
    simulate_us,
    speckle_envelope,
)

SIZE = 128


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- simulators

@pytest.mark.parametrize("modality", MODALITIES)
def test_simulator_is_deterministic_finite_and_sized(modality):
    a = simulate(modality, seed=7, index=3, size=SIZE)
    b = simulate(modality, seed=7, index=3, size=SIZE)
    c = simulate(modality, seed=7, index=4, size=SIZE)
    assert a.image.shape == (SIZE, SIZE) and a.image.dtype == np.float32
    assert np.array_equal(a.image, b.image) and np.array_equal(a.raw, b.raw)
    assert not np.array_equal(a.image, c.image)
    assert np.all(np.isfinite(a.raw)) and np.all(np.isfinite(a.image))
    assert a.image.min() >= 0.0 and a.image.max() <= 1.0
    assert a.image.std() > 0.05, "display image should not be flat"


def test_seed_streams_do_not_collide():
    # seed + modality + index would make (m=1, i=0) equal (m=0, i=1); the seed sequence must not.
    x = image_rng(0, 1, 0).standard_normal(4)
    y = image_rng(0, 0, 1).standard_normal(4)
    assert not np.allclose(x, y)


def test_fbp_reconstructs_water_and_air():
    n_fine, n = 2 * SIZE, SIZE
    yy, xx = grid(n_fine)
    hu = np.where(ellipse_mask(yy, xx, 0.0, 0.0, 0.6, 0.6), 0.0, -1000.0)
    angles = np.arange(2 * n) * np.pi / (2 * n)
    p = radon(hu_to_mu(hu), angles, 400.0 / n_fine)
    p = -np.log(np.exp(-p).reshape(len(angles), n, 2).mean(axis=2))
    rec = mu_to_hu(fbp(p, angles, n, 400.0 / n))
    assert abs(rec[54:74, 54:74].mean()) < 10.0
    assert abs(rec[4:12, 60:68].mean() + 1000.0) < 10.0


@pytest.mark.parametrize("seed", [0, 1])
def test_ct_hounsfield_units(seed):
    img = simulate_ct(np.random.default_rng(seed), SIZE, anatomy="abdomen")
    hu = img.raw
    air = hu[3:8, 56:72]                                  # inside the scan circle, above the body
    assert -1060.0 < air.mean() < -940.0
    soft = hu[(hu > -200) & (hu < 300)]
    assert soft.size > 0.1 * hu.size
    assert 0.0 <= np.median(soft) <= 100.0
    assert hu.max() > 400.0, "bone should be present"
    assert hu[0, 0] == -1024.0                           # scanner fill outside the reconstruction circle


def test_mr_magnitude_is_rician_in_background():
    img = simulate_mr(np.random.default_rng(5), SIZE, anatomy="head", partial_fourier=1.0, snr=30.0)
    mag = img.raw
    assert mag.min() >= 0.0
    corners = np.concatenate([mag[:12, :12].ravel(), mag[:12, -12:].ravel(),
                              mag[-12:, :12].ravel(), mag[-12:, -12:].ravel()])
    sigma = float(img.params["noise_sigma"])
    # Rayleigh: mean sigma*sqrt(pi/2), std/mean sqrt(4/pi - 1) = 0.523.
    assert corners.mean() == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.15)
    assert 0.42 < corners.std() / corners.mean() < 0.62
    assert corners.mean() > 0.0, "noise floor, not zeros"


def test_ultrasound_speckle_is_rayleigh():
    env = speckle_envelope(np.random.default_rng(0), np.ones((4 * SIZE, SIZE)))
    region = env[40:-40, 8:-8]
    assert region.std() / region.mean() == pytest.approx(RAYLEIGH_SNR_INV, abs=0.04)
    us = simulate_us(np.random.default_rng(1), SIZE)
    assert us.raw.min() >= 0.0 and us.raw.shape == (SIZE, SIZE)


def test_radiograph_quantum_noise_scales_with_dose():
    def hf_noise(photons: float) -> float:
        img = simulate_radiograph(np.random.default_rng(3), SIZE, anatomy="extremity", photons=photons).raw
        return float(np.std(np.diff(img, axis=1)))

    assert hf_noise(300.0) > 1.5 * hf_noise(30000.0)


# --------------------------------------------------------------------------- generators

@pytest.mark.parametrize("family", list(FAMILIES))
def test_generator_family_trains_and_samples(family):
    torch.manual_seed(0)
    model = build(family, tiny=True)
    opts = model.configure_optimizers()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, SIZE, SIZE, generator=g) * 2 - 1
    y = torch.tensor([0, 1, 2, 3])
    model.train()
    losses = model.training_step(x, y, opts, g)
    assert losses and all(np.isfinite(v) for v in losses.values())
    model.eval()
    noise = torch.randn(2, *model.noise_shape(), generator=g)
    out = model.decode(noise, torch.tensor([0, 3]))
    assert out.shape == (2, 1, SIZE, SIZE)
    assert torch.isfinite(out).all() and out.min() >= -1.0 and out.max() <= 1.0
    # eval mode: an image does not depend on the rest of its batch (up to float rounding, which differs
    # between batch sizes on CPU; the generate command samples in fixed index chunks for bit-identity).
    assert torch.allclose(model.decode(noise[:1], torch.tensor([0])), out[:1], atol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_size_generator_fits_the_weight_budget(family):
    model = build(family)
    assert model.n_parameters() * 4 < 5 * 1024 * 1024


def test_flow_is_invertible():
    from benchmarks.medsynth.generators.flow import squeeze, unsqueeze

    torch.manual_seed(0)
    model = build("flow", tiny=True).eval()
    x = torch.rand(2, 1, SIZE, SIZE)
    assert torch.equal(unsqueeze(squeeze(x)), x)
    step = model.levels[0][0]
    emb = model.embed(torch.tensor([1, 2]))
    h = squeeze(x)
    yv, _ = step(h, emb)
    assert torch.allclose(step.reverse(yv, emb), h, atol=1e-5)


def test_weights_round_trip_and_tamper_check(tmp_path):
    x, y = training_set(1, SIZE, data_seed=1)
    model, record = train("gan", x, y, TrainConfig(images_per_modality=1, max_steps=1, batch_size=4, tiny=True))
    path = save(model, record, tmp_path)
    assert path.with_suffix(".json").is_file()
    loaded = load("gan", tmp_path)
    noise = torch.randn(2, *model.noise_shape(), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1])
    assert torch.equal(loaded.decode(noise, labels), model.decode(noise, labels))
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    with pytest.raises(WeightsError, match="sha256"):
        load("gan", tmp_path)


# --------------------------------------------------------------------------- generate command

@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    """Every family trained for one step at test size; the generate command loads these."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("weights")
    from benchmarks.medsynth.train_generators import train_families

    train_families(list(FAMILIES), TrainConfig(images_per_modality=1, max_steps=1, batch_size=4, tiny=True), out)
    return out


def _run(out: Path, weights: Path, *extra: str) -> dict:
    args = gen_cli.parse_args(["--out", str(out), "--seed", "11", "--weights", str(weights),
                               "--batch-size", "2", "--quiet", *extra])
    return gen_cli.generate(args)


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_generate_writes_layout_and_regenerates_identically(tmp_path, tiny_weights):
    from detector.dataset import discover, summarise

    manifest = _run(tmp_path / "a", tiny_weights, "--per-modality", "3")
    _run(tmp_path / "b", tiny_weights, "--per-modality", "3")
    tree_a = _tree(tmp_path / "a")
    assert tree_a == _tree(tmp_path / "b"), "same seed must give bit-identical files"
    for m in MODALITIES:
        for source in ["real", *FAMILIES]:
            files = sorted((tmp_path / "a" / m / source).glob("*.png"))
            assert len(files) == 3, (m, source)
    assert manifest["holdout_generators"] == ["flow"]
    assert manifest["pydicom_reals"], "pydicom's test images are an extra real source"
    samples = discover(tmp_path / "a")
    pyd = [s for s in samples if "pydicom" in s.path.parts]
    assert pyd and all(s.label == 0 and s.generator == "real" for s in pyd)
    counts = summarise(samples)["counts"]
    assert counts["CT"]["gan"] == 3 and counts["US"]["real"] >= 3
    from PIL import Image

    with Image.open(tmp_path / "a" / "CT" / "ddpm" / "ddpm_CT_00000.png") as im:
        assert im.mode == "L" and im.size == (SIZE, SIZE)

    # A subset (fewer images) regenerates the same files.
    _run(tmp_path / "c", tiny_weights, "--per-modality", "1", "--no-pydicom")
    for rel, digest in _tree(tmp_path / "c").items():
        if rel.endswith(".png"):
            assert tree_a[rel] == digest, rel


def test_generate_dicom_and_missing_weights(tmp_path, tiny_weights):
    _run(tmp_path / "d", tiny_weights, "--per-modality", "1", "--format", "dcm", "--no-pydicom",
         "--generators", "vae")
    ct = pydicom.dcmread(tmp_path / "d" / "CT" / "real" / "CT_00000.dcm")
    assert ct.Modality == "CT" and ct.SOPClassUID == pydicom.uid.CTImageStorage
    hu = pydicom.pixels.apply_modality_lut(ct.pixel_array, ct)
    assert hu.min() >= -1100 and hu.max() <= 500
    us = pydicom.dcmread(tmp_path / "d" / "US" / "vae" / "vae_US_00000.dcm")
    assert us.Modality == "US" and us.pixel_array.shape == (SIZE, SIZE)
    _run(tmp_path / "e", tiny_weights, "--per-modality", "1", "--format", "dcm", "--no-pydicom",
         "--generators", "vae")
    assert filecmp.cmp(tmp_path / "d" / "US" / "vae" / "vae_US_00000.dcm",
                       tmp_path / "e" / "US" / "vae" / "vae_US_00000.dcm", shallow=False)
    with pytest.raises(SystemExit, match="no weights"):
        _run(tmp_path / "f", tmp_path / "empty", "--per-modality", "1", "--no-pydicom")
