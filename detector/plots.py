"""ROC curves and score histograms as PNG files (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from detector.metrics import ScoredSample  # noqa: E402


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def roc_plot(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str, path: Path,
             styles: Mapping[str, Mapping[str, object]] | None = None) -> Path:
    """One ROC curve per entry ``name -> (labels, scores)``; entries with one class are skipped.
    ``styles`` gives matplotlib line properties per name."""
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    for name, (y, s) in curves.items():
        y = np.asarray(y)
        if y.min(initial=0) == y.max(initial=0) or len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(y, s):.3f})", **dict((styles or {}).get(name, {})))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false positive rate (reals called fake)", ylabel="true positive rate (fakes found)",
           title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def histogram_plot(groups: Mapping[str, np.ndarray], threshold: float, title: str, path: Path) -> Path:
    """Overlaid score histograms, one per group, with the decision threshold marked."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    bins = np.linspace(0.0, 1.0, 41)
    for name, scores in groups.items():
        if len(scores):
            ax.hist(np.asarray(scores), bins=bins, alpha=0.5, label=f"{name} (n={len(scores)})")
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:.3f}")
    ax.set(xlabel="fake score", ylabel="images", title=title, xlim=(0, 1))
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def evaluation_plots(with_mfrm: Sequence[ScoredSample], without_mfrm: Sequence[ScoredSample],
                     threshold: float, out_dir: Path) -> list[Path]:
    """Per modality: ``roc_<modality>.png`` (each generator vs that modality's reals, with and
    without MFRM) and ``hist_<modality>.png`` (scores of reals and of each generator, with MFRM)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for modality in sorted({s.modality for s in with_mfrm}):
        curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        styles: dict[str, dict[str, object]] = {}
        hist: dict[str, np.ndarray] = {}
        for tag, samples, line in (("MFRM", with_mfrm, "-"), ("no MFRM", without_mfrm, "--")):
            mod = [s for s in samples if s.modality == modality]
            reals = [s for s in mod if s.label == 0]
            for i, gen in enumerate(sorted({s.generator for s in mod if s.label == 1})):
                group = reals + [s for s in mod if s.label == 1 and s.generator == gen]
                curves[f"{gen}, {tag}"] = (np.array([s.label for s in group]), np.array([s.score for s in group]))
                styles[f"{gen}, {tag}"] = {"color": f"C{i % 10}", "linestyle": line}
            if tag == "MFRM":
                hist["real"] = np.array([s.score for s in reals])
                for gen in sorted({s.generator for s in mod if s.label == 1}):
                    hist[gen] = np.array([s.score for s in mod if s.label == 1 and s.generator == gen])
        written.append(roc_plot(curves, f"ROC, {modality}", out_dir / f"roc_{_safe(modality)}.png", styles))
        written.append(histogram_plot(hist, threshold, f"Scores, {modality} (with MFRM)",
                                      out_dir / f"hist_{_safe(modality)}.png"))
    return written
