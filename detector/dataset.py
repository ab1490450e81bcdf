"""Labelled image sets for training and evaluation.

Two ways to describe a data set:

* a folder ``DIR/<modality>/<source>/<files>``: ``source`` is ``real`` or the name of
  the generator that made the images (anything else than ``real`` is fake); files
  with the suffixes in ``IMAGE_SUFFIXES`` are taken, at any depth below ``source``;
* a CSV manifest with the header ``path,label,modality,generator``: ``label`` is
  ``real``/``fake`` (or 0/1), relative paths are relative to the CSV's folder, an
  empty generator means ``real`` for reals and ``unknown`` for fakes.
"""

from __future__ import annotations

import csv
import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from detector.errors import DetectorError

IMAGE_SUFFIXES: frozenset[str] = frozenset({".dcm", ".png", ".jpg", ".jpeg", ".tif", ".tiff"})
REAL = "real"
CSV_COLUMNS = ("path", "label", "modality", "generator")


class DatasetError(DetectorError, ValueError):
    """A data set description that cannot be used (missing folder, bad CSV row, no images)."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int          # 1 fake, 0 real
    modality: str
    generator: str      # "real" for real images

    @property
    def label_name(self) -> str:
        return "fake" if self.label else "real"


def discover(data: Path | str) -> list[Sample]:
    """Samples of a data set folder or CSV manifest, sorted by path (deterministic)."""
    data = Path(data)
    if data.is_file() and data.suffix.lower() == ".csv":
        samples = _from_csv(data)
    elif data.is_dir():
        samples = _from_folder(data)
    else:
        raise DatasetError(data, "not a data set folder or a .csv manifest")
    if not samples:
        raise DatasetError(data, f"no images found (layout DIR/<modality>/<real|generator>/<files>, "
                                 f"suffixes {', '.join(sorted(IMAGE_SUFFIXES))})")
    return sorted(samples, key=lambda s: str(s.path))


def _from_folder(root: Path) -> list[Sample]:
    samples = []
    for modality_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for source_dir in sorted(p for p in modality_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            fake = source_dir.name.lower() != REAL
            generator = source_dir.name if fake else REAL
            for f in sorted(source_dir.rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."):
                    samples.append(Sample(f, int(fake), modality_dir.name, generator))
    return samples


def _parse_label(value: str) -> int | None:
    v = value.strip().lower()
    return {"real": 0, "0": 0, "fake": 1, "1": 1}.get(v)


def _from_csv(path: Path) -> list[Sample]:
    samples = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("path", "label", "modality") if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(path, f"CSV manifest lacks column(s) {', '.join(missing)}; "
                                     f"expected header {','.join(CSV_COLUMNS)}")
        for line, row in enumerate(reader, start=2):
            label = _parse_label(row.get("label") or "")
            if label is None:
                raise DatasetError(path, f"line {line}: label must be real/fake or 0/1, got {row.get('label')!r}")
            file = Path(row["path"].strip())
            if not file.is_absolute():
                file = path.parent / file
            if not file.is_file():
                raise DatasetError(path, f"line {line}: image {file} does not exist")
            modality = (row.get("modality") or "").strip() or "unknown"
            generator = (row.get("generator") or "").strip() or ("unknown" if label else REAL)
            if not label:
                generator = REAL
            samples.append(Sample(file, label, modality, generator))
    return samples


def parse_generators(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """"a,b" or an iterable -> ("a", "b"), blanks dropped."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(sorted({i.strip() for i in items if i and i.strip()}))


def split_holdout(samples: Sequence[Sample], holdout_generators: Iterable[str]) -> tuple[list[Sample], list[Sample]]:
    """(seen, held_out): fakes of the held-out generators go to ``held_out``; reals stay seen."""
    holdout = set(holdout_generators)
    if REAL in holdout:
        raise DatasetError("holdout-generators", "'real' is not a generator")
    unknown = holdout - {s.generator for s in samples}
    if unknown:
        raise DatasetError("holdout-generators", f"not in the data set: {', '.join(sorted(unknown))}")
    seen = [s for s in samples if s.generator not in holdout]
    held = [s for s in samples if s.generator in holdout]
    return seen, held


def stratified_split(samples: Sequence[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(rest, part): ``fraction`` of each (modality, generator) group goes to ``part`` (at least one
    when the group has two or more samples), chosen by a seeded shuffle."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must lie in [0, 1), got {fraction}")
    groups: dict[tuple[str, str], list[Sample]] = defaultdict(list)
    for s in samples:
        groups[(s.modality, s.generator)].append(s)
    rng = random.Random(seed)
    rest, part = [], []
    for key in sorted(groups):
        group = sorted(groups[key], key=lambda s: str(s.path))
        rng.shuffle(group)
        n = round(len(group) * fraction)
        if fraction > 0 and n == 0 and len(group) >= 2:
            n = 1
        part.extend(group[:n])
        rest.extend(group[n:])
    return sorted(rest, key=lambda s: str(s.path)), sorted(part, key=lambda s: str(s.path))


def summarise(samples: Sequence[Sample]) -> dict[str, object]:
    """Counts per modality and generator, for manifests and reports."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for s in samples:
        counts[s.modality][s.generator] += 1
    return {
        "n": len(samples),
        "n_real": sum(1 for s in samples if not s.label),
        "n_fake": sum(1 for s in samples if s.label),
        "counts": {m: dict(sorted(g.items())) for m, g in sorted(counts.items())},
    }


class PreparedDataset(Dataset):
    """Samples turned into model input by ``detector.preprocess.prepare_file``.

    An item is ``(semantic (F,3,S,S), noise (F,3,C,C), label, modality_index)``; all
    frames of a multi-frame image come together (``collate_frames`` flattens them).
    With ``cache`` the prepared tensors stay in memory: meant for small sets that are
    read every epoch. A file that cannot be prepared raises ``PreprocessError``.
    """

    def __init__(self, samples: Sequence[Sample], cfg: object, modality_index: Callable[[str], int],
                 *, cache: bool = True) -> None:
        self.samples = list(samples)
        self.cfg = cfg
        self.modality_index = modality_index
        self.cache = cache
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def prepare(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i in self._cache:
            return self._cache[i]
        from detector.preprocess import prepare_file

        s = self.samples[i]
        img = prepare_file(s.path, self.cfg, modality=s.modality)
        out = (img.semantic, img.noise)
        if self.cache:
            self._cache[i] = out
        return out

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        semantic, noise = self.prepare(i)
        s = self.samples[i]
        return semantic, noise, s.label, self.modality_index(s.modality)


def collate_frames(batch: Sequence[tuple[torch.Tensor, torch.Tensor, int, int]]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate the frames of every item; labels and modality indices repeat per frame."""
    semantic = torch.cat([b[0] for b in batch])
    noise = torch.cat([b[1] for b in batch])
    labels = torch.cat([torch.full((b[0].shape[0],), b[2], dtype=torch.long) for b in batch])
    modality = torch.cat([torch.full((b[0].shape[0],), b[3], dtype=torch.long) for b in batch])
    return semantic, noise, labels, modality
