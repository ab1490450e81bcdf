"""Memory of a `dski serve` process over a 3000-instance study: RSS after 1000 and after 3000 analysed.

    python -m benchmarks.memory [--bundle vit-b-16 | default | PATH] [--count 3000] [--chunk 200]
        [--backlog 400] [--at 1000] [--idle 5] [--torch-threads 1] [--workers N]
        [--decode-processes N] [--no-pacs] [--keep DIR]
        [--out benchmarks/out/memory-<bundle>.json]

Set-up: ``dski serve`` as a subprocess (``tests.nodeproc.NodeProcess``: SQLite database,
spool, the shipped ``workers`` and ``decode_processes`` unless ``--workers`` and
``--decode-processes`` are given, batch 8, the shipped ``batch_wait_ms``), dispatching every SR to a real
Orthanc (``tests.peers.OrthancServer``; ``--no-pacs``: no destination), with one of

- ``vit-b-16``: an open_clip ViT-B-16 with random weights (``create_model("ViT-B-16",
  pretrained=None)``, seed 0) made into a regular DSKI bundle: the backbone's state dict is
  written to a local checkpoint file (``torch.save``, 572 MiB) whose sha256 goes into the
  spec, exactly as a real ViT-B-16 checkpoint would, so the node loads it through the normal
  ``detector.backbone`` path (no download, no code change); CDFA on 3 evenly spaced blocks,
  224 px, noise crop 224, a support bank of ``--bank-size`` (1000) random unit vectors;
- ``default``: the shipped bundle ``bundles/default`` (dski-tiny);
- a path: any bundle folder.

The study: ``--count`` CT instances (``benchmarks.common.make_ct_instances``: pydicom's
CT_small.dcm, 128x128, new UIDs), 200 per series, one study. They are sent by dcmtk
``storescu`` in chunks of ``--chunk`` (one association each); the next chunk goes out once
fewer than ``--backlog`` instances wait to be scored, so receiving, scoring and report
building run side by side as they do with a steady modality, and the backlog stays in the
database rather than in the test's timing.

Sampled every ``--sample-every`` seconds from ``/proc/PID/status`` of the node process and
its child processes (receivers, decoding processes, multiprocessing's resource tracker),
summed: ``VmRSS`` (resident set now) and ``VmHWM`` (peak so far, an upper bound when
summed), with the number of instances
done (analysed + failed, from the node's database). Reported:

- **RSS at 1000** (``--at``) and **at 3000**: the first sample at which that many instances
  are done;
- **growth** = (RSS at 3000 - RSS at 1000) / RSS at 1000;
- **peak** = ``VmHWM`` at the end (after the last SR is delivered; includes loading the model);
- RSS right after start-up (model loaded, nothing received) and after the last SR.

Targets (issue 6, item 4): peak <= 2.5 GB (2.5e9 bytes) with ViT-B-16; growth < 5 %.
The load average is recorded at each sample; JSON result at ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sqlite3
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from benchmarks.common import (
    add_scoring_arguments,
    machine_facts,
    make_ct_instances,
    scoring_overrides,
    tree_memory,
    write_json,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BUNDLE = REPO / "bundles" / "default"
PEAK_BOUND_BYTES = 2.5e9
GROWTH_BOUND = 0.05


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --------------------------------------------------------------------------- the ViT-B-16 bundle


def build_vit_b16_bundle(root: Path, *, seed: int = 0, bank_size: int = 1000) -> Path:
    """A DSKI bundle on an open_clip ViT-B-16 with random weights, loadable by ``Detector.load``.

    The random backbone is saved as a local open_clip checkpoint (a plain state dict) before
    the CDFA adapters wrap its blocks; the spec names that file and its sha256, so loading
    goes through ``detector.backbone.build_backbone`` like any real checkpoint.
    """
    import open_clip
    import torch

    from benchmarks.detect import _quiet_root_logger, random_bank
    from detector.bundle import save_bundle
    from detector.model import DSKIModel
    from detector.preprocess import PreprocessConfig
    from detector.spec import BackboneSpec, ModelSpec

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    with warnings.catch_warnings(), _quiet_root_logger():
        warnings.simplefilter("ignore")
        clip = open_clip.create_model("ViT-B-16", pretrained=None, pretrained_image=False, pretrained_text=False)
    checkpoint = root / "vit-b-16-random.pt"
    torch.save(clip.state_dict(), checkpoint)  # before inject_cdfa changes the block structure
    digest = hashlib.sha256()
    with open(checkpoint, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    spec = ModelSpec(
        backbone=BackboneSpec(name="ViT-B-16", checkpoint=checkpoint, checkpoint_sha256=digest.hexdigest(), image_size=224),
        noise_crop=224,
    )
    model = DSKIModel(spec, backbone=(clip, open_clip.get_tokenizer("ViT-B-16"))).prepare_inference()
    out = root / "bundle-vit-b-16"
    save_bundle(
        out, model, spec, PreprocessConfig(semantic_size=224, noise_crop=224),
        name="vit-b-16-random", version="0.0.0", threshold=0.5, classifier_threshold=0.5,
        bank=random_bank(model.embed_dim, bank_size, seed),
        training={"note": "random weights: for memory and speed measurements only, no detector"},
    )
    return out


# --------------------------------------------------------------------------- sampling


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM in bytes of the node process and its child processes, summed."""
    return tree_memory(pid)


def counts(db_path: Path) -> dict[str, int]:
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        rows = con.execute("SELECT status, count(*) FROM instances GROUP BY status").fetchall()
        reports = con.execute("SELECT status, count(*) FROM reports GROUP BY status").fetchall()
    finally:
        con.close()
    out = {str(k): int(v) for k, v in rows}
    out["done"] = out.get("analysed", 0) + out.get("failed", 0)
    out["reports_sent"] = sum(int(v) for k, v in reports if k == "sent")
    out["reports"] = sum(int(v) for _, v in reports)
    return out


class Sampler(threading.Thread):
    """Samples the node's memory and progress every ``interval`` s; keeps the first sample past each mark."""

    def __init__(self, pid: int, db_path: Path, interval: float, marks: list[int], progress_every: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.db_path, self.interval = pid, db_path, interval
        self.marks = sorted(marks)
        self.at_mark: dict[int, dict[str, Any]] = {}
        self.samples: list[dict[str, Any]] = []
        self.stop_event = threading.Event()
        self.progress_every = progress_every
        self.t0 = time.monotonic()
        self.error: str | None = None

    def sample(self) -> dict[str, Any]:
        mem = proc_status(self.pid)
        c = counts(self.db_path)
        s = {"t": round(time.monotonic() - self.t0, 2), "done": c["done"], "failed": c.get("failed", 0),
             "waiting": c.get("received", 0) + c.get("analysing", 0), "reports": c["reports"],
             "reports_sent": c["reports_sent"], "rss": mem["VmRSS"], "hwm": mem["VmHWM"], "load1": loadavg()[0]}
        self.samples.append(s)
        for m in self.marks:
            if m not in self.at_mark and s["done"] >= m:
                self.at_mark[m] = s
        return s

    def run(self) -> None:
        last_print = 0.0
        while not self.stop_event.wait(self.interval):
            try:
                s = self.sample()
            except (OSError, sqlite3.Error) as exc:  # the node gone, or the database busy for a moment
                self.error = f"{type(exc).__name__}: {exc}"
                continue
            if s["t"] - last_print >= self.progress_every:
                last_print = s["t"]
                print(f"  t={s['t']:.0f}s done {s['done']} waiting {s['waiting']} reports {s['reports_sent']}/"
                      f"{s['reports']} RSS {s['rss'] / 2**20:.0f} MiB peak {s['hwm'] / 2**20:.0f} MiB "
                      f"load {s['load1']}", flush=True)


# --------------------------------------------------------------------------- the run


def mib(b: float | None) -> float | None:
    return None if b is None else round(b / 2**20, 1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tests.nodeproc import NodeProcess, send_tracked
    from tests.peers import OrthancServer, free_port

    result: dict[str, Any] = {"benchmark": "memory", "machine": machine_facts(), "settings": {
        "bundle": str(args.bundle), "count": args.count, "chunk": args.chunk, "backlog": args.backlog,
        "at": args.at, "series_idle_seconds": args.idle, "torch_threads": args.torch_threads,
        "batch_size": args.batch_size, "pacs": not args.no_pacs, "sample_every": args.sample_every}}
    with tempfile.TemporaryDirectory(prefix="dski-mem-") as tmp:
        root = Path(tmp) if args.keep is None else args.keep
        root.mkdir(parents=True, exist_ok=True)
        if args.bundle == "vit-b-16":
            t = time.monotonic()
            bundle = build_vit_b16_bundle(root / "model", bank_size=args.bank_size)
            result["bundle_build_seconds"] = round(time.monotonic() - t, 1)
            print(f"built the random ViT-B-16 bundle in {result['bundle_build_seconds']} s: {bundle}", flush=True)
        elif args.bundle == "default":
            bundle = DEFAULT_BUNDLE
        else:
            bundle = Path(args.bundle)
        t = time.monotonic()
        files = make_ct_instances(root / "data", args.count, per_series=200)
        print(f"wrote {len(files)} instances in {time.monotonic() - t:.1f} s", flush=True)
        node_port = free_port()
        overrides = {
            "detector": {"batch_size": args.batch_size, "torch_threads": args.torch_threads,
                         **scoring_overrides(args.workers, args.decode_processes)},
            "processing": {"series_idle_seconds": args.idle, "poll_interval_seconds": 0.5},
            "dispatch": {"interval_seconds": 1, "timeout_seconds": 30},
        }
        pacs = None if args.no_pacs else OrthancServer(root, "ORTHANC", {"DSKI": ("127.0.0.1", node_port)})
        if pacs is not None:
            pacs.start()
        try:
            node = NodeProcess(root / "node", bundle, pacs=pacs, port=node_port, overrides=overrides)
            result["node_start_seconds"] = round(node.start(timeout=600), 1)
            assert node.proc is not None
            pid = node.proc.pid
            time.sleep(1.0)
            result["after_start"] = {**{k.lower(): v for k, v in proc_status(pid).items()}, "load1": loadavg()[0]}
            print(f"node ready in {result['node_start_seconds']} s, RSS {mib(result['after_start']['vmrss'])} MiB, "
                  f"peak {mib(result['after_start']['vmhwm'])} MiB", flush=True)
            sampler = Sampler(pid, node.db_path, args.sample_every, [args.at, args.count], args.progress_every)
            sampler.start()
            started = time.monotonic()
            try:
                sent = 0
                for i in range(0, len(files), args.chunk):
                    chunk = files[i:i + args.chunk]
                    while sent - counts(node.db_path)["done"] > args.backlog:
                        time.sleep(0.5)
                    outcome = send_tracked(node.port, chunk, timeout=600)
                    if outcome.returncode != 0 or len(outcome.acked) != len(chunk):
                        raise RuntimeError(f"storescu: exit {outcome.returncode}, {len(outcome.acked)}/{len(chunk)} "
                                           f"acknowledged:\n{outcome.output[-2000:]}")
                    sent += len(chunk)
                deadline = time.monotonic() + args.timeout
                while counts(node.db_path)["done"] < args.count:
                    if time.monotonic() > deadline or not node.running:
                        raise RuntimeError(f"not all instances analysed; node log:\n{node.log_tail()}")
                    time.sleep(0.5)
                result["scoring_seconds"] = round(time.monotonic() - started, 1)
                series = (args.count + 199) // 200
                want = series if pacs is not None else 0
                while counts(node.db_path)["reports_sent" if pacs is not None else "reports"] < series:
                    if time.monotonic() > deadline or not node.running:
                        raise RuntimeError(f"not all reports done; node log:\n{node.log_tail()}")
                    time.sleep(0.5)
                result["reports_sent"] = want
                time.sleep(max(args.sample_every * 2, 1.0))
                sampler.sample()  # the state after the last report
            finally:
                sampler.stop_event.set()
                sampler.join(10)
                end = proc_status(pid) if node.running else {}
                node.stop()
        finally:
            if pacs is not None:
                pacs.stop()
        result["total_seconds"] = round(time.monotonic() - started, 1)

    first, last = sampler.at_mark.get(args.at), sampler.at_mark.get(args.count)
    rss_a = first["rss"] if first else None
    rss_b = last["rss"] if last else None
    growth = None if not (rss_a and rss_b) else (rss_b - rss_a) / rss_a
    peak = end.get("VmHWM") or max(s["hwm"] for s in sampler.samples)
    result["samples"] = sampler.samples
    result["sampler_error"] = sampler.error
    result["summary"] = {
        "instances": args.count,
        f"rss_at_{args.at}_bytes": rss_a,
        f"rss_at_{args.count}_bytes": rss_b,
        f"done_at_{args.at}_sample": first["done"] if first else None,
        f"done_at_{args.count}_sample": last["done"] if last else None,
        "growth": None if growth is None else round(growth, 4),
        "peak_bytes": peak,
        "rss_after_start_bytes": result["after_start"]["vmrss"],
        "rss_end_bytes": sampler.samples[-1]["rss"] if sampler.samples else None,
        "failed": sampler.samples[-1]["failed"] if sampler.samples else None,
        "peak_within_bound": peak <= PEAK_BOUND_BYTES,
        "growth_within_bound": None if growth is None else growth < GROWTH_BOUND,
        "scoring_seconds": result.get("scoring_seconds"),
        "instances_per_second": round(args.count / result["scoring_seconds"], 2) if result.get("scoring_seconds") else None,
        "load1_range": [min(s["load1"] for s in sampler.samples), max(s["load1"] for s in sampler.samples)]
        if sampler.samples else None,
    }
    result["machine"]["loadavg_end"] = loadavg()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default="vit-b-16", help="vit-b-16 (random weights, built here), default, or a bundle path")
    ap.add_argument("--count", type=int, default=3000)
    ap.add_argument("--at", type=int, default=1000, help="the first RSS mark (instances done)")
    ap.add_argument("--chunk", type=int, default=200, help="instances per storescu association")
    ap.add_argument("--backlog", type=int, default=400, help="send the next chunk once fewer wait to be scored")
    ap.add_argument("--idle", type=float, default=5.0, help="processing.series_idle_seconds")
    ap.add_argument("--torch-threads", type=int, default=1)
    add_scoring_arguments(ap)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--bank-size", type=int, default=1000)
    ap.add_argument("--no-pacs", action="store_true", help="no Orthanc: reports are built but not sent")
    ap.add_argument("--sample-every", type=float, default=0.5)
    ap.add_argument("--progress-every", type=float, default=30.0, help="seconds between progress lines")
    ap.add_argument("--timeout", type=float, default=4 * 3600.0)
    ap.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.at >= args.count:
        ap.error("--at must be below --count")
    name = args.bundle if args.bundle in ("vit-b-16", "default") else Path(args.bundle).name
    out = args.out or REPO / "benchmarks" / "out" / f"memory-{name}.json"
    result = run(args)
    write_json(out, result)
    s = result["summary"]
    growth = "n/a" if s["growth"] is None else f"{100 * s['growth']:.2f} %"
    rss_a, rss_b = s[f"rss_at_{args.at}_bytes"], s[f"rss_at_{args.count}_bytes"]
    print(f"RSS at {args.at}: {mib(rss_a)} MiB, at {args.count}: {mib(rss_b)} MiB, growth {growth} (bound < {100 * GROWTH_BOUND:.0f} %: "
          f"{'met' if s['growth_within_bound'] else 'MISSED'}); peak {mib(s['peak_bytes'])} MiB "
          f"({s['peak_bytes'] / 1e9:.2f} GB, bound 2.5 GB: {'met' if s['peak_within_bound'] else 'MISSED'}); "
          f"after start {mib(s['rss_after_start_bytes'])} MiB; {s['instances_per_second']} instances/s; "
          f"load {s['load1_range']}; wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
