"""Train the generator families on simulated reals and store their weights.

Weights go to ``<weights>/<family>.safetensors`` with a JSON sidecar
``<family>.json`` (architecture config, training seed, data size, epochs/steps,
measured time, losses, sha256 of the weights), so a data set regenerates from the
committed files without retraining::

    nice -n 19 python -m benchmarks.medsynth.train_generators --families gan,vae,ddpm,flow \\
        --images-per-modality 500 --epochs 20 --out benchmarks/weights

Training images come from the simulators with their own seed stream (``source
"train"``, seed ``--data-seed``), independent of any benchmark seed, quantised to
8 bits like the PNGs of the data set. Training is deterministic for a seed and
thread count (one thread by default: the machines are shared).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .common import MODALITIES
from .generators import FAMILIES, GenerativeModel, build
from .simulate import simulate

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"


@dataclass
class TrainConfig:
    images_per_modality: int = 64
    epochs: int = 1
    max_steps: int | None = None          # stop after this many optimiser steps (overrides epochs when reached)
    batch_size: int = 16
    seed: int = 0                         # model init and batch order
    data_seed: int = 20250917             # simulator stream of the training images
    size: int = 128
    tiny: bool = False                    # test-sized architectures
    overrides: dict[str, Any] = field(default_factory=dict)


def training_set(images_per_modality: int, size: int, data_seed: int,
                 progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y): simulated reals in [-1, 1] quantised to 8 bits, (N, 1, S, S); modality indices (N,)."""
    xs, ys = [], []
    for m_index, modality in enumerate(MODALITIES):
        for i in range(images_per_modality):
            img = simulate(modality, data_seed, i, size, source="train").image
            xs.append(np.round(img * 255.0) / 255.0)
            ys.append(m_index)
            if progress:
                progress(1)
    x = torch.from_numpy(np.stack(xs).astype(np.float32))[:, None] * 2.0 - 1.0
    return x, torch.tensor(ys, dtype=torch.long)


def train(family: str, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
          progress: Callable[[int, dict[str, float]], None] | None = None) -> tuple[GenerativeModel, dict[str, Any]]:
    """Train one family; returns the model (eval mode) and the record for its sidecar."""
    torch.manual_seed(cfg.seed)
    model = build(family, tiny=cfg.tiny, size=cfg.size, n_classes=len(MODALITIES), **cfg.overrides)
    model.train()
    opts = model.configure_optimizers()
    gen = torch.Generator().manual_seed(cfg.seed)
    n = x.shape[0]
    steps, last, history = 0, {}, []
    start = time.perf_counter()
    done = False
    epoch = 0
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        for b in range(0, n - cfg.batch_size + 1 if n >= cfg.batch_size else 1, cfg.batch_size):
            idx = order[b:b + cfg.batch_size]
            last = model.training_step(x[idx], y[idx], opts, gen)
            if not all(np.isfinite(v) for v in last.values()):
                raise FloatingPointError(f"{family}: non-finite loss {last} at step {steps}")
            steps += 1
            if progress:
                progress(1, last)
            if cfg.max_steps is not None and steps >= cfg.max_steps:
                done = True
                break
        history.append({"epoch": epoch + 1, "steps": steps, **last})
        if done:
            break
    elapsed = time.perf_counter() - start
    model.eval()
    record = {
        "family": family,
        "config": model.config,
        "n_parameters": model.n_parameters(),
        "train": {**asdict(cfg), "epochs_run": epoch + 1, "steps": steps, "train_images": n,
                  "modalities": list(MODALITIES)},
        "train_seconds": round(elapsed, 2),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "final_losses": last,
        "history": history,
    }
    return model, record


def weights_path(weights_dir: Path | str, family: str) -> Path:
    return Path(weights_dir) / f"{family}.safetensors"


def save(model: GenerativeModel, record: dict[str, Any], weights_dir: Path | str) -> Path:
    path = weights_path(weights_dir, model.family)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"family": model.family})
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    sidecar = {**record, "weights_file": path.name, "weights_sha256": digest,
               "weights_bytes": path.stat().st_size}
    path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2, sort_keys=True, default=list) + "\n")
    return path


class WeightsError(ValueError):
    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def load_sidecar(weights_dir: Path | str, family: str) -> dict[str, Any]:
    path = weights_path(weights_dir, family).with_suffix(".json")
    if not path.is_file():
        raise WeightsError(path, "no sidecar; train with `python -m benchmarks.medsynth.train_generators` "
                                 "or pass --train-missing")
    return json.loads(path.read_text())


def load(family: str, weights_dir: Path | str) -> GenerativeModel:
    """The trained model of ``family`` in eval mode; checks the sidecar's sha256."""
    if family not in FAMILIES:
        raise WeightsError(weights_dir, f"unknown generator family {family!r}")
    sidecar = load_sidecar(weights_dir, family)
    path = weights_path(weights_dir, family)
    if not path.is_file():
        raise WeightsError(path, "weights file missing")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sidecar.get("weights_sha256"):
        raise WeightsError(path, f"sha256 {digest[:12]} does not match the sidecar's "
                                 f"{str(sidecar.get('weights_sha256'))[:12]}")
    model = FAMILIES[family].from_config(**sidecar["config"])
    model.load_state_dict(load_file(str(path)))
    model.eval()
    return model


def main(argv: Sequence[str] | None = None) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    p = argparse.ArgumentParser(prog="python -m benchmarks.medsynth.train_generators", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated: " + ",".join(FAMILIES))
    p.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="weights folder (default benchmarks/weights)")
    p.add_argument("--images-per-modality", type=int, default=TrainConfig.images_per_modality)
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--data-seed", type=int, default=TrainConfig.data_seed)
    p.add_argument("--size", type=int, default=TrainConfig.size)
    p.add_argument("--tiny", action="store_true", help="test-sized architectures (smoke runs)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: shared machines)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    for f in families:
        if f not in FAMILIES:
            p.error(f"unknown family {f!r}; expected some of {', '.join(FAMILIES)}")
    cfg = TrainConfig(images_per_modality=args.images_per_modality, epochs=args.epochs, max_steps=args.max_steps,
                      batch_size=args.batch_size, seed=args.seed, data_seed=args.data_seed, size=args.size,
                      tiny=args.tiny)
    train_families(families, cfg, args.out, Progress(TextColumn("{task.description}"), BarColumn(),
                                                     MofNCompleteColumn(), TimeElapsedColumn()))
    return 0


def train_families(families: Sequence[str], cfg: TrainConfig, out: Path | str, progress: Any = None) -> list[Path]:
    """Simulate the training set once, train and save every family in ``families``."""
    from contextlib import nullcontext

    paths = []
    with progress if progress is not None else nullcontext():
        task = progress.add_task("simulate training set", total=cfg.images_per_modality * len(MODALITIES)) \
            if progress is not None else None
        x, y = training_set(cfg.images_per_modality, cfg.size, cfg.data_seed,
                            (lambda k: progress.advance(task, k)) if progress is not None else None)
        for family in families:
            n_batches = max(1, x.shape[0] // cfg.batch_size) * cfg.epochs
            total = min(n_batches, cfg.max_steps) if cfg.max_steps else n_batches
            t = progress.add_task(f"train {family}", total=total) if progress is not None else None
            model, record = train(family, x, y, cfg,
                                  (lambda k, _l, t=t: progress.advance(t, k)) if progress is not None else None)
            paths.append(save(model, record, out))
    return paths


if __name__ == "__main__":
    raise SystemExit(main())
