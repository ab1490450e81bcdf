"""Scoring throughput of the node's worker against the model alone, same run.

    python -m benchmarks.score_pipeline [--count 400] [--reps 3] [--bundle bundles/default | vit-b-16]
        [--threads 1] [--workers 1] [--decode-processes 0] [--device cpu] [--batch-size N]
        [--reference-repo DIR] [--reference-workers 1] [--reference-decode-processes N]
        [--out benchmarks/out/score-pipeline.json]

What the worker does per batch (``listener.pipeline.Pipeline.run_once``): claim up to
``detector.batch_size`` received rows, read each spool file, decode and prepare it, score
the batch, record the verdicts. Measured here, in one process (and its decoding processes):

- **pipeline**: ``--count`` CT instances of about 40 kB (pydicom's CT_small.dcm with new
  UIDs, ``benchmarks.common.make_ct_instances``) are put in a fresh spool and SQLite
  database (the node's ``Spool`` and ``Repository``, WAL, ``synchronous=FULL``) as received
  rows; one worker then runs ``run_once`` until the queue is empty (``batch_wait_ms`` 0:
  the queue is full, nothing to wait for). Images per second, and the time per image of
  each step: the claim, the verdicts' recording, the model (``score_prepared``) and, the
  rest, reading and preparing the files. With ``--workers`` above 1 or ``--decode-processes``
  (``detector.decode_processes``), the pipeline is started with its own threads instead,
  timed from its first verdict until every instance is analysed; the steps' times are then
  sums over the threads and overlap.
- **model**: ``Detector.score_prepared`` alone on the same images, prepared beforehand, in
  batches of the same size: what the hardware allows for the model.

``--bundle vit-b-16`` builds a DSKI bundle on an open_clip ViT-B-16 with random weights
(``benchmarks.memory.build_vit_b16_bundle``); ``--device`` and ``--batch-size`` set
``detector.device`` and ``detector.batch_size`` for both the pipeline and the model alone.

Printed: both rates and pipeline / model, per repetition and the median; the two
alternate in each repetition. With ``--reference-repo DIR`` the pipeline of another
checkout (e.g. ``git worktree add /tmp/ref HEAD~1``) runs as well, in a subprocess, on
the same files and in the same repetitions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _timed(fn: Callable[..., Any], spent: list[float]) -> Callable[..., Any]:
    """``fn`` adding its wall time to ``spent[0]`` on every call."""
    def call(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - started
    return call


def measure_pipeline(
    files: list[Path], bundle: Path, threads: int, root: Path, workers: int = 1, decode_processes: int = 0,
    device: str = "cpu", batch_size: int | None = None,
) -> dict[str, Any]:
    """Score ``files`` through the worker of the checkout first on ``sys.path``; seconds per step
    (summed over the worker threads when there are several)."""
    import pydicom
    import torch
    from sqlalchemy import text

    from detector.detector import Detector
    from listener.config import DetectorConfig, parse_config
    from listener.pipeline import Pipeline
    from storage.database import Database
    from storage.repository import ReceivedObject, Repository
    from storage.spool import Spool

    torch.set_num_threads(threads)
    cfg = parse_config({
        "storage": {"database_url": f"sqlite:///{root / 'dski.sqlite3'}", "spool_dir": str(root / "spool"),
                    "reports_dir": str(root / "reports"), "quarantine_dir": str(root / "quarantine"),
                    "min_free_bytes": 0},
        "detector": {"bundle": str(bundle), "batch_wait_ms": 0, "workers": workers, "torch_threads": threads,
                     # a checkout older than the setting decodes in its workers
                     **({"decode_processes": decode_processes}
                        if "decode_processes" in DetectorConfig.model_fields else {}),
                     **({"device": device} if device != "cpu" else {}),
                     **({"batch_size": batch_size} if batch_size else {})},
    })
    db = Database(cfg.storage.database_url)
    db.migrate()
    spool = Spool(cfg.storage.spool_dir, 0)
    repo = Repository(db, node_id=spool.node_id)
    received = []
    for path in files:
        entry = spool.store(path.read_bytes())
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        received.append(ReceivedObject(
            sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
            study_instance_uid=ds.StudyInstanceUID, series_instance_uid=ds.SeriesInstanceUID,
            patient_id=ds.get("PatientID"), modality=ds.get("Modality"),
            transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, calling_ae="BENCH", peer_address="127.0.0.1:0",
            status="received", reason=None, spool_path=str(entry.path), sha256=entry.sha256, size_bytes=entry.size,
        ))
    repo.record_received_batch(received)
    detector = Detector.load(cfg.detector.bundle, device=cfg.detector.device, batch_size=cfg.detector.batch_size)

    claim, record, model = [0.0], [0.0], [0.0]
    repo.claim_received = _timed(repo.claim_received, claim)  # type: ignore[method-assign]
    # the call the checkout's worker makes (record_verdict calls record_verdicts where both exist)
    name = "record_verdicts" if hasattr(repo, "record_verdicts") else "record_verdict"
    setattr(repo, name, _timed(getattr(repo, name), record))
    detector.score_prepared = _timed(detector.score_prepared, model)  # type: ignore[method-assign]
    pipeline = Pipeline(repo, detector, spool, cfg)

    def analysed() -> int:
        with db.engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM instances WHERE status = 'analysed'")).scalar() or 0)

    if workers == 1 and not decode_processes:
        pipeline.run_once("bench")  # the first batch loads kernels: not timed
        claim[0] = record[0] = model[0] = 0.0
        done, started = 0, time.perf_counter()
        while n := pipeline.run_once("bench"):
            done += n
        seconds = time.perf_counter() - started
    else:
        # the node's own threads (and decoding processes, started before this returns); the
        # clock starts after the first verdict, as the first batch loads kernels
        pipeline.start()
        while analysed() < 1:
            time.sleep(0.001)
        claim[0] = record[0] = model[0] = 0.0
        first, started = analysed(), time.perf_counter()
        while analysed() < len(files):
            time.sleep(0.01)
        seconds = time.perf_counter() - started
        pipeline.stop()
        done = len(files) - first
    count = analysed()
    db.dispose()
    if count != len(files):  # a failed image would make the rate meaningless
        raise RuntimeError(f"{count} of {len(files)} instances analysed (see {root})")
    return {"images": done, "seconds": seconds, "claim_s": claim[0], "record_s": record[0], "model_s": model[0]}


def measure_model(files: list[Path], bundle: Path, threads: int, batch: int, device: str = "cpu") -> dict[str, Any]:
    """``score_prepared`` alone on prepared images, in batches of ``batch``."""
    import torch

    from detector.detector import Detector
    from detector.preprocess import prepare_file

    torch.set_num_threads(threads)
    detector = Detector.load(bundle, device=device, batch_size=batch)
    images = [prepare_file(path, detector.preprocess_config) for path in files]
    batches = [images[i:i + batch] for i in range(0, len(images), batch)]
    detector.score_prepared(batches[0])
    started = time.perf_counter()
    for b in batches[1:]:
        detector.score_prepared(b)
    return {"images": sum(len(b) for b in batches[1:]), "seconds": time.perf_counter() - started}


def _reference_pipeline(repo: Path, files_dir: Path, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """``measure_pipeline`` with the product code of another checkout, in a subprocess."""
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--measure-in", str(repo), str(files_dir), str(root),
         "--bundle", str(args.bundle.resolve()), "--threads", str(args.threads), "--workers", str(args.reference_workers),
         "--decode-processes", str(args.decode_processes if args.reference_decode_processes is None
                                   else args.reference_decode_processes),
         "--device", args.device, *(["--batch-size", str(args.batch_size)] if args.batch_size else [])],
        capture_output=True, text=True, check=True, cwd=repo,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rate(run: dict[str, Any]) -> float:
    return run["images"] / run["seconds"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--bundle", type=Path, default=REPO / "bundles" / "default",
                        help="a bundle folder, or vit-b-16 (random weights, built here)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--workers", type=int, default=1, help="detector.workers (threads)")
    parser.add_argument("--decode-processes", type=int, default=0, help="detector.decode_processes")
    parser.add_argument("--reference-decode-processes", type=int, default=None,
                        help="detector.decode_processes of the reference (default: --decode-processes)")
    parser.add_argument("--device", default="cpu", help="detector.device: cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, default=None, help="detector.batch_size (default: the shipped one)")
    parser.add_argument("--reference-repo", type=Path, help="also run the worker of this checkout")
    parser.add_argument("--reference-workers", type=int, default=1, help="detector.workers of the reference")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "score-pipeline.json")
    parser.add_argument("--measure-in", nargs=3, metavar=("REPO", "FILES", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.measure_in:  # the subprocess of --reference-repo
        repo, files_dir, root = (Path(p) for p in args.measure_in)
        sys.path.insert(0, str(repo))
        files = sorted(files_dir.rglob("*.dcm"))
        print(json.dumps(measure_pipeline(files, args.bundle, args.threads, root, args.workers, args.decode_processes,
                                          device=args.device, batch_size=args.batch_size)), flush=True)
        return 0

    sys.path.insert(0, str(REPO))
    from benchmarks.common import machine_facts, make_ct_instances, median, write_json
    from listener.config import DetectorConfig

    batch = args.batch_size or int(DetectorConfig.model_fields["batch_size"].default)
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.score_pipeline", *(argv or sys.argv[1:])]),
        "machine_before": machine_facts(), "count": args.count, "batch_size": batch, "threads": args.threads,
        "workers": args.workers, "decode_processes": args.decode_processes, "reference_workers": args.reference_workers,
        "reference_decode_processes": args.reference_decode_processes,
        "device": args.device,
        "bundle": str(args.bundle), "runs": [],
    }
    kinds = ["pipeline", "model", *(["reference"] if args.reference_repo else [])]
    with tempfile.TemporaryDirectory(prefix="dski-bench-score-") as tmp:
        base = Path(tmp)
        if str(args.bundle) == "vit-b-16":
            from benchmarks.memory import build_vit_b16_bundle

            args.bundle = build_vit_b16_bundle(base / "model")
        print(f"generating {args.count} CT instances ...", flush=True)
        files = make_ct_instances(base / "data", args.count)
        for rep in range(args.reps):
            for kind in kinds if rep % 2 == 0 else kinds[::-1]:
                root = base / f"run-{rep}-{kind}"
                root.mkdir()
                if kind == "model":
                    run = measure_model(files, args.bundle, args.threads, batch, args.device)
                elif kind == "pipeline":
                    run = measure_pipeline(files, args.bundle, args.threads, root, args.workers, args.decode_processes,
                                           args.device, args.batch_size)
                else:
                    run = _reference_pipeline(args.reference_repo.resolve(), base / "data", args, root)
                run.update(kind=kind, rep=rep, images_per_s=_rate(run), loadavg_1m=os.getloadavg()[0])
                result["runs"].append(run)
                steps = ""
                if kind != "model":
                    per = {k: 1000 * run[f"{k}_s"] / run["images"] for k in ("claim", "record", "model")}
                    per["read and prepare"] = 1000 * run["seconds"] / run["images"] - sum(per.values())
                    run["ms_per_image"] = per
                    steps = "; ms per image: " + ", ".join(f"{k} {v:.2f}" for k, v in per.items())
                print(f"rep {rep} {kind:9s} {run['images_per_s']:7.1f} images/s (load {run['loadavg_1m']:.2f}){steps}",
                      flush=True)
    rates = {k: [r["images_per_s"] for r in result["runs"] if r["kind"] == k] for k in kinds}
    summary = {f"{k}_median_per_s": median(v) for k, v in rates.items()}
    for k in kinds:
        if k != "model":
            ratios = [a / b for a, b in zip(rates[k], rates["model"], strict=True)]
            summary[f"{k}_to_model"], summary[f"{k}_to_model_per_rep"] = median(ratios), ratios
    if args.reference_repo:
        pairs = [a / b for a, b in zip(rates["pipeline"], rates["reference"], strict=True)]
        summary["pipeline_to_reference"], summary["pipeline_to_reference_per_rep"] = median(pairs), pairs
    result["summary"] = summary
    result["machine_after"] = machine_facts()
    print()
    print(f"model alone {summary['model_median_per_s']:.1f} images/s; pipeline {summary['pipeline_median_per_s']:.1f} "
          f"images/s, {summary['pipeline_to_model']:.2f} of the model (per rep: "
          + ", ".join(f"{r:.2f}" for r in summary["pipeline_to_model_per_rep"]) + ")")
    if args.reference_repo:
        print(f"reference pipeline ({args.reference_repo}) {summary['reference_median_per_s']:.1f} images/s; "
              f"pipeline / reference {summary['pipeline_to_reference']:.2f} (per rep: "
              + ", ".join(f"{r:.2f}" for r in summary["pipeline_to_reference_per_rep"]) + ")")
    print(f"device {args.device}, batch {batch}, {args.threads} torch thread(s), {args.workers} worker(s), "
          f"{args.decode_processes} decoding process(es); load average before "
          f"{result['machine_before']['loadavg'][0]:.2f}, after {result['machine_after']['loadavg'][0]:.2f}")
    write_json(args.out, result)
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
