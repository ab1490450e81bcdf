"""The detector's commands of the ``dski`` console script: train, evaluate, detect, bank.

``app`` is mounted by ``listener.cli``; ``main()`` runs it on its own. Typed
errors (``DetectorError`` and its subclasses, bad option values) end in a one-line
message on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import numpy as np
import typer

from detector.errors import DetectorError

if TYPE_CHECKING:
    from detector.calibration import CalibrationSet

app = typer.Typer(help="DSKI detector: train, evaluate, detect, and manage the retrieval bank.",
                  no_args_is_help=True, add_completion=False)
bank_app = typer.Typer(help="The few-shot retrieval bank (MFRM) of a bundle.", no_args_is_help=True)
app.add_typer(bank_app, name="bank")

EXIT_FAILED_FILES = 1
EXIT_ERROR = 2

F = TypeVar("F", bound=Callable[..., Any])
logger = logging.getLogger(__name__)

BundleOpt = Annotated[Path, typer.Option("--bundle", help="bundle folder")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N (the retrieval bank stays on the CPU)")]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(EXIT_ERROR)


def handle_errors(fn: F) -> F:
    """Typed errors become a message and exit status 2."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DetectorError as exc:
            raise _fail(str(exc)) from None
        except (ValueError, OSError) as exc:
            raise _fail(f"{type(exc).__name__}: {exc}") from None
    return wrapper  # type: ignore[return-value]


def _fmt(x: object) -> str:
    return f"{x:.4f}" if isinstance(x, float) else ("-" if x is None else str(x))


@app.command()
@handle_errors
def train(
    data: Annotated[Path, typer.Option("--data", help="data set folder DIR/<modality>/<real|generator>/ or CSV")],
    out: Annotated[Path, typer.Option("--out", help="bundle folder to write")],
    method: Annotated[str, typer.Option("--method", help="dski | univfd | npr | cnnspot")] = "dski",
    backbone: Annotated[str, typer.Option("--backbone", help="open_clip architecture name")] = "dski-tiny",
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="local open_clip checkpoint")] = None,
    epochs: Annotated[int, typer.Option("--epochs", min=0)] = 5,
    holdout_generators: Annotated[str, typer.Option("--holdout-generators",
                                                    help="comma-separated generators kept out of training")] = "",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="continue from OUT/.train_state.pt")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing bundle in OUT")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 16,
    lr: Annotated[float, typer.Option("--lr", min=0.0)] = 1e-3,
    name: Annotated[str | None, typer.Option("--name", help="bundle name (default: METHOD-BACKBONE)")] = None,
    version: Annotated[str, typer.Option("--version", help="bundle semantic version")] = "0.1.0",
    lam: Annotated[float, typer.Option("--lambda", min=0.0, max=1.0, help="retrieval fusion weight")] = 0.3,
    k: Annotated[int, typer.Option("--k", min=1, help="retrieval neighbours")] = 8,
    temperature: Annotated[float, typer.Option("--temperature", min=1e-6)] = 0.05,
    cdfa_blocks: Annotated[str | None, typer.Option(
        "--cdfa-blocks", help="dski: comma-separated ViT block indices for CDFA, e.g. 2,5,8")] = None,
    cdfa_num_blocks: Annotated[int | None, typer.Option(
        "--cdfa-num-blocks", min=1, help="dski: number of evenly spaced CDFA blocks [default: 3]")] = None,
    bottleneck: Annotated[int | None, typer.Option(
        "--bottleneck", min=1, help="dski: adapter bottleneck width [default: 16]")] = None,
    context_tokens: Annotated[int | None, typer.Option(
        "--context-tokens", min=0, help="dski: learnable prompt context tokens [default: 4]")] = None,
    noise_stem: Annotated[str | None, typer.Option(
        "--noise-stem", help="dski: conv | patch, how residuals become tokens [default: conv]")] = None,
    noise_crop: Annotated[int, typer.Option(
        "--noise-crop", min=8, help="side of the native-resolution crop of the noise branch")] = 64,
    max_frames: Annotated[int, typer.Option("--max-frames", min=1, help="frames sampled per object")] = 4,
    device: DeviceOpt = "cpu",
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Train a detector and write its bundle (the image size comes from the backbone's open_clip config)."""
    from detector.bundle import RetrievalSettings
    from detector.train import parse_blocks
    from detector.train import train as run_train

    result = run_train(data, out, method=method, backbone=backbone, checkpoint=checkpoint, epochs=epochs,
                       holdout_generators=holdout_generators, seed=seed, batch_size=batch_size, lr=lr,
                       resume=resume, overwrite=overwrite, name=name, version=version,
                       retrieval=RetrievalSettings(k=k, lam=lam, temperature=temperature),
                       cdfa_blocks=parse_blocks(cdfa_blocks), cdfa_num_blocks=cdfa_num_blocks,
                       bottleneck=bottleneck, context_tokens=context_tokens, noise_stem=noise_stem,
                       noise_crop=noise_crop,
                       max_frames=max_frames, device=device, progress=progress)
    val = result.validation["with_mfrm"]["overall"]
    typer.echo(f"bundle {result.bundle} ({result.manifest.name}@{result.manifest.version}), "
               f"epochs {result.epochs}, threshold {result.threshold:.4f}, "
               f"validation AUC {_fmt(val['auc'])}, balanced accuracy {_fmt(val['balanced_acc'])}")


def _print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report['bundle']['model_version']} at threshold {report['threshold']:.4f} "
                        f"(without MFRM: {report['classifier_threshold']:.4f})")
    for col in ("group", "MFRM", "n real", "n fake", "real acc", "fake acc", "acc", "AP", "AUC"):
        table.add_column(col)
    for tag, key in (("yes", "with_mfrm"), ("no", "without_mfrm")):
        m = report[key]
        rows = [("overall", m["overall"])] + list(m["per_modality"].items()) + list(m["per_generator"].items())
        for group, r in rows:
            table.add_row(group, tag, str(r["n_real"]), str(r["n_fake"]), _fmt(r["real_acc"]), _fmt(r["fake_acc"]),
                          _fmt(r["acc"]), _fmt(r["ap"]), _fmt(r["auc"]))
    Console(file=sys.stdout, width=120).print(table)


@app.command()
@handle_errors
def evaluate(
    bundle: BundleOpt,
    data: Annotated[Path, typer.Option("--data", help="labelled data set folder or CSV")],
    json_out: Annotated[Path | None, typer.Option("--json", help="write the full report as JSON")] = None,
    plots: Annotated[Path | None, typer.Option("--plots", help="folder for ROC and histogram PNGs")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 16,
    device: DeviceOpt = "cpu",
) -> None:
    """Per modality and per generator metrics, with and without retrieval."""
    from detector.evaluate import evaluate as run_evaluate

    report = run_evaluate(bundle, data, json_out=json_out, plots_dir=plots, batch_size=batch_size, device=device)
    _print_report(report)
    for err in report["errors"]:
        typer.echo(f"skipped {err['path']}: {err['error']}", err=True)


@app.command()
@handle_errors
def detect(
    bundle: BundleOpt,
    paths: Annotated[list[Path], typer.Argument(help="DICOM or image files")],
    modality: Annotated[str | None, typer.Option("--modality", help="override the modality")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="files per forward pass")] = 16,
    device: DeviceOpt = "cpu",
) -> None:
    """Score files: one JSON line per file (a score or an error with its reason); exit status 1 if any failed."""
    from detector.detector import Detector, FileVerdict

    detector = Detector.load(bundle, device=device, batch_size=batch_size)

    def score(chunk: list[Path]) -> list[FileVerdict | tuple[Path, Exception]]:
        try:
            return list(detector.score_files(chunk, modality=modality))
        except Exception as exc:  # not a PreprocessError (those come back per file): an unexpected failure
            if len(chunk) == 1:  # one line with the reason, never a traceback; the log has the stack
                logger.exception("cannot score file", extra={"source": str(chunk[0])})
                return [(chunk[0], exc)]
        # Retry file by file, so that the other files of the chunk still get their verdicts.
        return [r for p in chunk for r in score([p])]

    failed = 0
    for start in range(0, len(paths), batch_size):
        for r in score(paths[start:start + batch_size]):
            if isinstance(r, tuple):
                failed += 1
                line: dict[str, Any] = {"path": str(r[0]), "error": f"{type(r[1]).__name__}: {r[1]}",
                                        "error_type": type(r[1]).__name__}
            elif r.verdict is None:
                failed += 1
                assert r.error is not None
                line = {"path": r.path, "error": r.error.reason, "error_type": type(r.error).__name__}
            else:
                v = r.verdict
                line = {"path": r.path, "sop_instance_uid": r.sop_instance_uid, "modality": r.modality,
                        "score": round(v.score, 6), "label": v.label,
                        "classifier_score": round(v.classifier_score, 6),
                        "retrieval_score": None if v.retrieval_score is None else round(v.retrieval_score, 6),
                        "frames": v.frames_scored, "bundle_version": v.bundle_version,
                        "model_version": v.model_version, "ms": round(v.elapsed_ms, 2)}
            typer.echo(json.dumps(line))
    if failed:
        typer.echo(f"error: {failed} of {len(paths)} file(s) could not be scored", err=True)
        raise typer.Exit(EXIT_FAILED_FILES)


@bank_app.command("add")
@handle_errors
def bank_add(
    bundle: BundleOpt,
    files: Annotated[list[Path], typer.Argument(help="support images")],
    label: Annotated[str, typer.Option("--label", help="real | fake")] = "fake",
    generator: Annotated[str | None, typer.Option("--generator", help="generator name (fakes)")] = None,
    modality: Annotated[str | None, typer.Option("--modality", help="modality (default: from the file)")] = None,
    keep_fusion: Annotated[bool, typer.Option("--keep-fusion", help="keep λ and the threshold as they are "
                                              "(default: re-choose them on the calibration set)")] = False,
) -> None:
    """Add support images to the bank, without retraining. All files must prepare, or nothing is added.

    λ and the threshold are then re-chosen on the bundle's calibration set and the support
    images (``detector.calibration``) and recorded in the bank history.
    """
    from detector.calibration import CalibrationSet
    from detector.detector import Detector
    from detector.preprocess import prepare_file
    from detector.retrieval import SupportEntry

    if label not in ("real", "fake"):
        raise _fail(f"--label must be real or fake, got {label!r}")
    if label == "fake" and not generator:
        raise _fail("--generator is required for fake support images")
    generator = generator if label == "fake" else "real"
    detector = Detector.load(bundle)
    images = [prepare_file(f, detector.preprocess_config, modality=modality) for f in files]
    frames = detector.frame_scores(images)
    emb = np.stack([f.embeddings.mean(axis=0) for f in frames]).astype(np.float32)
    entries = [SupportEntry(label, img.modality, generator, str(f))  # type: ignore[arg-type]
               for img, f in zip(images, files)]
    ids = detector.bank.add(emb, entries)
    added = CalibrationSet.from_frame_scores(
        [(f.classifier, f.embeddings) for f in frames], [int(label == "fake")] * len(ids),
        [img.modality for img in images], [generator] * len(ids), ids)
    _record_bank_edit(bundle, detector.bank, detector.bundle.manifest, "add", keep_fusion, added=added,
                      count=len(ids), label=label, generator=generator, modality=modality, ids=ids)
    typer.echo(f"added {len(ids)} {label} image(s) (ids {ids[0]}..{ids[-1]}); bank size {len(detector.bank)}")


def _record_bank_edit(bundle: Path, bank: Any, manifest: Any, action: Literal["add", "remove"], keep_fusion: bool, *,
                      added: CalibrationSet | None = None, removed_ids: set[int] | None = None,
                      **event: Any) -> None:
    """Update the calibration set, re-choose λ and the threshold, save the bank and its history."""
    from detector.bundle import record_bank_change
    from detector.calibration import choose_fusion, load_calibration, save_calibration

    cal = load_calibration(bundle)
    fusion = None
    if cal is not None:
        if added is not None:
            cal = cal.extend(added)
        if removed_ids:
            cal = cal.without_bank_ids(removed_ids)
        if not keep_fusion:
            choice = choose_fusion(bank, cal, k=manifest.retrieval.k,
                                   temperature=manifest.retrieval.temperature, lam=manifest.retrieval.lam,
                                   threshold=manifest.threshold)
            fusion = choice.summary()
            typer.echo(f"fusion: λ {choice.previous_lam:.2f} -> {choice.lam:.2f}, threshold "
                       f"{choice.previous_threshold:.4f} -> {choice.threshold:.4f} (calibration AUC "
                       f"{'n/a' if choice.auc is None else f'{choice.auc:.4f}'}; {choice.n_real} real, "
                       f"{choice.n_fake} fake of which {choice.n_support} support; {choice.reason or 'kept'})")
    elif not keep_fusion:
        typer.echo("fusion: kept (this bundle has no calibration set; retrain it to get one)", err=True)
    # the bank first (see record_bank_change), then the calibration set that names its ids
    ev = record_bank_change(bundle, bank, action, fusion=fusion, **event)
    if cal is not None:
        save_calibration(bundle, cal)
    typer.echo(f"bank digest {ev.bank_digest[:8]}")


@bank_app.command("list")
@handle_errors
def bank_list(
    bundle: BundleOpt,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON line per entry")] = False,
) -> None:
    """List the support entries (id, label, modality, generator, source)."""
    from detector.bundle import load_bank

    bank = load_bank(bundle)
    for e in bank.list():
        if as_json:
            typer.echo(json.dumps({"id": e.id, "label": e.label, "modality": e.modality,
                                   "generator": e.generator, "source": e.source}))
        else:
            typer.echo(f"{e.id}\t{e.label}\t{e.modality}\t{e.generator}\t{e.source}")
    if not as_json:
        summary = ", ".join(f"{k}: {v}" for k, v in bank.summary().items()) or "empty"
        typer.echo(f"{len(bank)} entries ({summary})", err=True)


@bank_app.command("remove")
@handle_errors
def bank_remove(
    bundle: BundleOpt,
    generator: Annotated[str | None, typer.Option("--generator", help="remove every entry of this generator")] = None,
    ids: Annotated[list[int] | None, typer.Option("--id", help="remove this entry id (repeatable)")] = None,
    keep_fusion: Annotated[bool, typer.Option("--keep-fusion", help="keep λ and the threshold as they are")] = False,
) -> None:
    """Remove entries by generator or by id; λ and the threshold are then re-chosen as after ``add``."""
    from detector.bundle import load_bank, read_manifest

    if not generator and not ids:
        raise _fail("give --generator NAME or --id N")
    bank = load_bank(bundle)
    before = {e.id for e in bank.list()}
    if ids:
        unknown = sorted(set(ids) - before)
        if unknown:
            raise _fail(f"no bank entry with id {', '.join(map(str, unknown))}")
    removed = bank.remove(ids=ids or None, generator=generator or None)
    if removed == 0:
        raise _fail(f"no bank entry of generator {generator!r}")
    _record_bank_edit(bundle, bank, read_manifest(bundle), "remove", keep_fusion, count=removed,
                      generator=generator or None, ids=sorted(ids) if ids else None,
                      removed_ids=before - {e.id for e in bank.list()})
    typer.echo(f"removed {removed} entr{'y' if removed == 1 else 'ies'}; bank size {len(bank)}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
