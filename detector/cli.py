"""The detector's commands of the ``dski`` console script: train, evaluate, detect, bank.

``app`` is mounted by ``listener.cli``; ``main()`` runs it on its own. Typed
errors (``DetectorError`` and its subclasses, bad option values) end in a one-line
message on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from detector.errors import DetectorError, PreprocessError

app = typer.Typer(help="DSKI detector: train, evaluate, detect, and manage the retrieval bank.",
                  no_args_is_help=True, add_completion=False)
bank_app = typer.Typer(help="The few-shot retrieval bank (MFRM) of a bundle.", no_args_is_help=True)
app.add_typer(bank_app, name="bank")

EXIT_FAILED_FILES = 1
EXIT_ERROR = 2

F = TypeVar("F", bound=Callable[..., Any])

BundleOpt = Annotated[Path, typer.Option("--bundle", help="bundle folder")]


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
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Train a detector and write its bundle."""
    from detector.bundle import RetrievalSettings
    from detector.train import train as run_train

    result = run_train(data, out, method=method, backbone=backbone, checkpoint=checkpoint, epochs=epochs,
                       holdout_generators=holdout_generators, seed=seed, batch_size=batch_size, lr=lr,
                       resume=resume, overwrite=overwrite, name=name, version=version,
                       retrieval=RetrievalSettings(k=k, lam=lam, temperature=temperature), progress=progress)
    val = result.validation["with_mfrm"]["overall"]
    typer.echo(f"bundle {result.bundle} ({result.manifest.name}@{result.manifest.version}), "
               f"epochs {result.epochs}, threshold {result.threshold:.4f}, "
               f"validation AUC {_fmt(val['auc'])}, balanced accuracy {_fmt(val['balanced_acc'])}")


def _print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report['bundle']['model_version']} at threshold {report['threshold']:.4f}")
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
) -> None:
    """Per modality and per generator metrics, with and without retrieval."""
    from detector.evaluate import evaluate as run_evaluate

    report = run_evaluate(bundle, data, json_out=json_out, plots_dir=plots, batch_size=batch_size)
    _print_report(report)
    for err in report["errors"]:
        typer.echo(f"skipped {err['path']}: {err['error']}", err=True)


@app.command()
@handle_errors
def detect(
    bundle: BundleOpt,
    paths: Annotated[list[Path], typer.Argument(help="DICOM or image files")],
    modality: Annotated[str | None, typer.Option("--modality", help="override the modality")] = None,
) -> None:
    """Score files: one JSON line per file; exit status 1 if any file failed."""
    from detector.detector import Detector
    from detector.preprocess import prepare_file

    detector = Detector.load(bundle)
    failed = 0
    for path in paths:
        try:
            t0 = time.perf_counter()
            image = prepare_file(path, detector.preprocess_config, modality=modality)
            verdict = detector.score_prepared([image])[0]
            ms = (time.perf_counter() - t0) * 1000.0
            line = {"path": str(path), "sop_instance_uid": image.sop_instance_uid, "modality": image.modality,
                    "score": round(verdict.score, 6), "label": verdict.label,
                    "classifier_score": round(verdict.classifier_score, 6),
                    "retrieval_score": None if verdict.retrieval_score is None else round(verdict.retrieval_score, 6),
                    "frames": verdict.frames_scored, "bundle_version": verdict.bundle_version,
                    "model_version": verdict.model_version, "ms": round(ms, 2)}
        except PreprocessError as exc:
            failed += 1
            line = {"path": str(path), "error": exc.reason}
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
) -> None:
    """Add support images to the bank, without retraining. All files must prepare, or nothing is added."""
    from detector.bundle import save_bank
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
    emb = detector.embed_prepared(images)
    entries = [SupportEntry(label, img.modality, generator, str(f))  # type: ignore[arg-type]
               for img, f in zip(images, files)]
    ids = detector.bank.add(emb, entries)
    save_bank(bundle, detector.bank)
    typer.echo(f"added {len(ids)} {label} image(s) (ids {ids[0]}..{ids[-1]}); bank size {len(detector.bank)}")


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
) -> None:
    """Remove entries by generator or by id."""
    from detector.bundle import load_bank, save_bank

    if not generator and not ids:
        raise _fail("give --generator NAME or --id N")
    bank = load_bank(bundle)
    if ids:
        unknown = sorted(set(ids) - {e.id for e in bank.list()})
        if unknown:
            raise _fail(f"no bank entry with id {', '.join(map(str, unknown))}")
    removed = bank.remove(ids=ids or None, generator=generator or None)
    if removed == 0:
        raise _fail(f"no bank entry of generator {generator!r}")
    save_bank(bundle, bank)
    typer.echo(f"removed {removed} entr{'y' if removed == 1 else 'ies'}; bank size {len(bank)}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
