"""Write the synthetic medical forensics benchmark: ``DIR/<modality>/<source>/<files>``.

    python -m benchmarks.generate --out DIR --seed S --per-modality N [--size 128]
        [--generators gan,vae,ddpm,flow] [--holdout flow] [--weights benchmarks/weights]
        [--train-missing] [--format png|dcm] [--bit-depth 8|16]

Reals: ``N`` physics-simulated images per modality (CT, MR, DX, US) in
``<modality>/real/``, plus every qualifying pydicom test image in
``<Modality>/real/pydicom/`` (a sub-folder of ``real``, so ``detector.dataset``
labels them real). Fakes: ``--fakes-per-generator`` (default ``N``) images per
modality and generator in ``<modality>/<generator>/``, sampled from the trained
weights. Every image is a function of (seed, modality, index, source) only, and
generator images are sampled in fixed chunks of ``--batch-size`` indices, so any
subset regenerates bit-identically. ``DIR/benchmark.json`` records the command,
the generator weights (sha256) and which generators are held out as unseen.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.medsynth.common import MODALITIES, torch_seed
from benchmarks.medsynth.ct import DISPLAY_WINDOW
from benchmarks.medsynth.generators import FAMILIES
from benchmarks.medsynth.pydicom_reals import iter_pydicom_reals
from benchmarks.medsynth.simulate import simulate
from benchmarks.medsynth.train_generators import (
    WEIGHTS_DIR,
    TrainConfig,
    load,
    load_sidecar,
    train_families,
    weights_path,
)
from benchmarks.medsynth.write import FORMATS, write_image

DEFAULT_HOLDOUT = ("flow",)   # the unseen generator: train detectors without it, test on it
MANIFEST = "benchmark.json"
# Fakes carry no physical window of their own; in DICOM they get the modality's default one
# (CT: the body window; the stored-value mapping is the same as for reals).
FAKE_WINDOWS = {"CT": DISPLAY_WINDOW}


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-modality", type=int, required=True, help="simulated real images per modality")
    p.add_argument("--fakes-per-generator", type=int, default=None,
                   help="images per modality and generator (default: --per-modality)")
    p.add_argument("--size", type=int, default=128, help="image size (must match the generator weights)")
    p.add_argument("--modalities", default=",".join(MODALITIES))
    p.add_argument("--generators", default=",".join(FAMILIES), help="comma-separated, empty for reals only")
    p.add_argument("--holdout", default=",".join(DEFAULT_HOLDOUT),
                   help="generators reserved as unseen (recorded in benchmark.json)")
    p.add_argument("--weights", type=Path, default=WEIGHTS_DIR)
    p.add_argument("--train-missing", action="store_true", help="train generators whose weights are missing")
    p.add_argument("--train-images-per-modality", type=int, default=TrainConfig.images_per_modality)
    p.add_argument("--train-epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--train-max-steps", type=int, default=None)
    p.add_argument("--train-tiny", action="store_true", help="train test-sized models (smoke runs)")
    p.add_argument("--format", choices=FORMATS, default="png")
    p.add_argument("--bit-depth", type=int, choices=(8, 16), default=8, help="PNG bit depth")
    p.add_argument("--batch-size", type=int, default=16, help="generator sampling chunk (fixed for reproducibility)")
    p.add_argument("--no-pydicom", action="store_true", help="leave out pydicom's test images")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


MAX_REDRAWS = 8
_REDRAW_STREAM = 0x5EED


def _redraw(model: Any, generator: str, m_index: int, i: int, seed: int) -> np.ndarray:
    """A replacement for a sample that came out non-finite (a flow's inverse can overflow on
    tail noise): new noise from a seed derived from the image's own, decoded alone, so the
    replacement is as deterministic as the rest. Redrawn indices are listed in the manifest."""
    for attempt in range(1, MAX_REDRAWS + 1):
        base = torch_seed(seed, m_index, i, generator)
        derived = np.random.SeedSequence([base, attempt, _REDRAW_STREAM]).generate_state(2, np.uint64)[0]
        rng = torch.Generator().manual_seed(int(derived >> np.uint64(1)))
        noise = torch.randn(model.noise_shape(), generator=rng)[None]
        labels = torch.full((1,), m_index, dtype=torch.long)
        img = ((model.decode(noise, labels) + 1.0) / 2.0)[0, 0].numpy().astype(np.float64)
        if np.all(np.isfinite(img)):
            return img
    raise ValueError(f"{generator}: sample {i} of modality {m_index} stayed non-finite after {MAX_REDRAWS} redraws")


def generate(args: argparse.Namespace) -> dict[str, object]:
    from contextlib import nullcontext

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    torch.set_num_threads(args.threads)
    modalities = _csv(args.modalities)
    for m in modalities:
        if m not in MODALITIES:
            raise SystemExit(f"unknown modality {m!r}; simulated modalities are {', '.join(MODALITIES)}")
    generators = _csv(args.generators)
    for g in generators:
        if g not in FAMILIES:
            raise SystemExit(f"unknown generator {g!r}; families are {', '.join(FAMILIES)}")
    holdout = [h for h in _csv(args.holdout) if h in generators]
    n_fake = args.per_modality if args.fakes_per_generator is None else args.fakes_per_generator
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    progress = Progress(TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), disable=args.quiet)
    missing = [g for g in generators if not weights_path(args.weights, g).is_file()]
    with progress if not args.quiet else nullcontext():
        if missing:
            if not args.train_missing:
                raise SystemExit(f"no weights for {', '.join(missing)} in {args.weights}; "
                                 f"pass --train-missing or train with python -m benchmarks.medsynth.train_generators")
            cfg = TrainConfig(images_per_modality=args.train_images_per_modality, epochs=args.train_epochs,
                              max_steps=args.train_max_steps, size=args.size, tiny=args.train_tiny)
            train_families(missing, cfg, args.weights, progress)

        counts: dict[str, dict[str, int]] = {}
        task = progress.add_task("real (simulated)", total=args.per_modality * len(modalities))
        for m in modalities:
            for i in range(args.per_modality):
                sim = simulate(m, args.seed, i, args.size)
                write_image(out, m, "real", f"{m}_{i:05d}", sim.image, fmt=args.format, bit_depth=args.bit_depth,
                            key=(args.seed, m, "real", i), window=sim.window)
                progress.advance(task)
            counts.setdefault(m, {})["real"] = args.per_modality

        pydicom_files = []
        if not args.no_pydicom:
            task = progress.add_task("real (pydicom)", total=None)
            for r in iter_pydicom_reals(min_size=args.size):
                write_image(out, r.modality, "real/pydicom", r.name, r.image, fmt=args.format,
                            bit_depth=args.bit_depth, key=("pydicom", r.name))
                pydicom_files.append({"name": r.name, "modality": r.modality, "shape": list(r.image.shape),
                                      "source": r.source_path.name})
                counts.setdefault(r.modality, {})
                counts[r.modality]["real"] = counts[r.modality].get("real", 0) + 1
                progress.advance(task)
            progress.update(task, total=len(pydicom_files))

        weights_info = {}
        redrawn: dict[str, dict[str, list[int]]] = {}
        for g in generators:
            model = load(g, args.weights)
            sidecar = load_sidecar(args.weights, g)
            if model.size != args.size:
                raise SystemExit(f"{g}: weights are for size {model.size}, not --size {args.size}")
            weights_info[g] = {"sha256": sidecar["weights_sha256"], "n_parameters": sidecar["n_parameters"],
                               "train": sidecar.get("train"), "config": sidecar["config"]}
            task = progress.add_task(f"fake ({g})", total=n_fake * len(modalities))
            for m in modalities:
                m_index = MODALITIES.index(m)
                for start in range(0, n_fake, args.batch_size):
                    # A chunk always covers the same indices, so its images never depend on --per-modality.
                    idx = list(range(start, start + args.batch_size))
                    noise = torch.stack([
                        torch.randn(model.noise_shape(),
                                    generator=torch.Generator().manual_seed(torch_seed(args.seed, m_index, i, g)))
                        for i in idx])
                    labels = torch.full((len(idx),), m_index, dtype=torch.long)
                    images = ((model.decode(noise, labels) + 1.0) / 2.0)[:, 0].numpy().astype(np.float64)
                    for i, img in zip(idx, images):
                        if i >= n_fake:
                            break
                        if not np.all(np.isfinite(img)):
                            img = _redraw(model, g, m_index, i, args.seed)
                            redrawn.setdefault(m, {}).setdefault(g, []).append(i)
                        write_image(out, m, g, f"{g}_{m}_{i:05d}", img, fmt=args.format, bit_depth=args.bit_depth,
                                    key=(args.seed, m, g, i), window=FAKE_WINDOWS.get(m))
                        progress.advance(task)
                counts[m][g] = n_fake

    manifest = {
        "layout": "DIR/<modality>/<source>/<files>; source 'real' (pydicom images under real/pydicom) "
                  "or the generator name",
        "seed": args.seed, "size": args.size, "format": args.format,
        "bit_depth": args.bit_depth if args.format == "png" else None,
        "per_modality": args.per_modality, "fakes_per_generator": n_fake, "batch_size": args.batch_size,
        "modalities": modalities, "generators": generators,
        "holdout_generators": holdout, "seen_generators": [g for g in generators if g not in holdout],
        "weights": weights_info, "pydicom_reals": pydicom_files, "counts": counts,
        "redrawn_non_finite": redrawn,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    generate(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
