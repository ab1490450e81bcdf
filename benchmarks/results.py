"""The benchmark results, end to end, in one command: data, training, evaluation, robustness, report.

    python -m benchmarks.results --out DIR [--per-modality N] [--fakes-per-generator N]
        [--test-per-modality N] [--test-fakes-per-generator N] [--seen gan,vae,ddpm] [--unseen flow]
        [--modalities CT,MR,DX,US] [--epochs E] [--lr LR] [--methods dski,univfd,npr,cnnspot]
        [--shots 5,10] [--perturbations jpeg90,jpeg75,down50,noise] [--reuse-data] [--smoke]
        [--markdown PATH]
    python -m benchmarks.results --render OUT/results.json [--markdown PATH]   # markdown only

Stages (each prints a progress line; every child command's output goes to ``OUT/logs/``):

1. data: ``python -m benchmarks.generate`` three times with three seeds: the training split
   (reals + the SEEN generators, plus pydicom's test images as extra reals), the test split
   (reals + seen and unseen generators, no pydicom images: they are the same files in every
   split), and the support split (fakes of the unseen generators only, for MFRM few-shot).
   The sha256 of every file is recorded; any file shared between training and test/support
   is an error.
2. train: ``dski train --method M --holdout-generators UNSEEN`` for every method.
3. evaluate: ``dski evaluate --json --plots`` of every bundle on the test split. The report
   has the bundle's fused score ("with_mfrm", the bank built from training images) and the
   classifier alone (λ = 0, "without_mfrm").
4. few-shot: for each K in ``--shots`` a COPY of the DSKI bundle gets K fake images per
   modality of each unseen generator from the support split (``dski bank add``), then is
   evaluated on the test split.
5. robustness: ``python -m benchmarks.perturb`` writes perturbed copies of the test split;
   every bundle (without support images) is evaluated on each.
6. report: ``OUT/results.json`` (machine-readable: config, machine, commands with wall
   times, split hashes, every report, summaries, targets) and a markdown file
   (``docs/results.md`` by default in full mode, ``OUT/results.md`` with ``--smoke``).

Targets (issue 4): DSKI mean AUC on the unseen generator(s) >= 0.95 and above every baseline;
MFRM with 10 support images adds >= 0.03 AUC or reaches >= 0.99. The mean is over modalities
of the per-generator AUC (that generator's fakes against the same modality's reals).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
METHODS = ("dski", "univfd", "npr", "cnnspot")
BASELINES = ("univfd", "npr", "cnnspot")
PERTURBATIONS = ("jpeg90", "jpeg75", "down50", "noise")
TARGET_UNSEEN_AUC = 0.95
TARGET_MFRM_GAIN = 0.03
TARGET_MFRM_AUC = 0.99
SEEDS = {"train": 11, "test": 23, "support": 37}
# appended to docs/results.md when it is (re)generated: analysis and earlier runs, written by hand
ANALYSIS_FILE = "docs/results-analysis.md"


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.results", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/out/results")
    p.add_argument("--per-modality", type=int, default=None, help="training reals per modality [500; smoke 12]")
    p.add_argument("--fakes-per-generator", type=int, default=None,
                   help="training fakes per modality and generator [250; smoke 12]")
    p.add_argument("--test-per-modality", type=int, default=None, help="test reals per modality [half of training]")
    p.add_argument("--test-fakes-per-generator", type=int, default=None,
                   help="test fakes per modality and generator [half of training]")
    p.add_argument("--seen", default="gan,vae,ddpm", help="generators used in training")
    p.add_argument("--unseen", default="flow", help="generators kept out of training (tested only)")
    p.add_argument("--modalities", default=None, help="[CT,MR,DX,US; smoke CT,MR]")
    p.add_argument("--epochs", type=int, default=None, help="[6; smoke 1]")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--train-seed", type=int, default=0, help="seed of dski train")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--shots", default="5,10", help="support fakes per modality of each unseen generator")
    p.add_argument("--perturbations", default=",".join(PERTURBATIONS))
    p.add_argument("--noise-sigma", type=float, default=0.02)
    p.add_argument("--data-seeds", default=f"{SEEDS['train']},{SEEDS['test']},{SEEDS['support']}",
                   help="benchmark seeds of the train, test and support splits (all different)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of benchmarks.generate")
    p.add_argument("--reuse-data", action="store_true",
                   help="reuse OUT/data/<split> when its benchmark.json matches the requested generation")
    p.add_argument("--smoke", action="store_true", help="tiny sizes for tests (overridable)")
    p.add_argument("--subprocess", action="store_true",
                   help="run every dski command as its own process (default: in this process, same app)")
    p.add_argument("--no-plots", action="store_true", help="evaluate without --plots")
    p.add_argument("--markdown", type=Path, default=None,
                   help="markdown output [docs/results.md; with --smoke OUT/results.md]")
    a = p.parse_args(argv)
    small = a.smoke
    a.per_modality = a.per_modality if a.per_modality is not None else (12 if small else 500)
    a.fakes_per_generator = (a.fakes_per_generator if a.fakes_per_generator is not None
                             else (12 if small else 250))
    a.test_per_modality = a.test_per_modality if a.test_per_modality is not None else max(1, a.per_modality // 2)
    a.test_fakes_per_generator = (a.test_fakes_per_generator if a.test_fakes_per_generator is not None
                                  else max(1, a.fakes_per_generator // 2))
    a.modalities = a.modalities or ("CT,MR" if small else "CT,MR,DX,US")
    a.epochs = a.epochs if a.epochs is not None else (1 if small else 6)
    a.markdown = a.markdown or (a.out / "results.md" if small else REPO / "docs/results.md")
    seeds = [int(s) for s in _csv(a.data_seeds)]
    if len(seeds) != 3 or len(set(seeds)) != 3:
        p.error("--data-seeds needs three different seeds: train,test,support")
    a.seeds = dict(zip(("train", "test", "support"), seeds))
    a.seen_l, a.unseen_l = _csv(a.seen), _csv(a.unseen)
    if not a.seen_l or not a.unseen_l or set(a.seen_l) & set(a.unseen_l):
        p.error("--seen and --unseen must be non-empty and disjoint")
    a.methods_l = _csv(a.methods)
    for m in a.methods_l:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; known: {', '.join(METHODS)}")
    a.shots_l = [int(s) for s in _csv(a.shots)]
    a.perturbations_l = _csv(a.perturbations)
    for k in a.perturbations_l:
        if k not in PERTURBATIONS:
            p.error(f"unknown perturbation {k!r}; known: {', '.join(PERTURBATIONS)}")
    return a


# --------------------------------------------------------------------------- running commands

_DSKI = [""]  # the dski executable's path, shown as "dski" in recorded commands


class Runner:
    """Runs child commands, logs their output, records the command line and the wall time."""

    def __init__(self, out: Path, subprocess: bool = False) -> None:
        self.subprocess = subprocess
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.commands: list[dict[str, Any]] = []
        self.dski = shutil.which("dski") or str(Path(sys.executable).with_name("dski"))
        _DSKI[0] = self.dski

    def record(self, stage: str, name: str, display: str, wall: float) -> None:
        self.commands.append({"stage": stage, "name": name, "command": display, "wall_s": round(wall, 2),
                              "returncode": 0, "log": None})

    def run(self, stage: str, name: str, argv: list[str], display: str | None = None) -> float:
        """Run ``argv``. ``dski`` commands run in this process (the same typer app the console
        script runs, without ~10 s of interpreter start-up per command) unless ``subprocess``
        is set; everything else in a child process. Output goes to ``OUT/logs/<name>.log``."""
        display = display or " ".join(shlex.quote(_display(a)) for a in argv)
        log = self.logs / f"{name}.log"
        t0 = time.monotonic()
        with open(log, "w") as fh:
            fh.write(f"$ {display}\n")
            fh.flush()
            if argv[0] == self.dski and not self.subprocess:
                rc = _run_dski_in_process(argv[1:], fh)
            else:
                rc = subprocess.run(argv, check=False, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
        wall = time.monotonic() - t0
        self.commands.append({"stage": stage, "name": name, "command": display, "wall_s": round(wall, 2),
                              "returncode": rc, "log": str(log)})
        if rc != 0:
            tail = log.read_text()[-3000:]
            raise SystemExit(f"{stage}/{name} failed (exit {rc}); log {log}:\n{tail}")
        return wall

    def python(self, module: str, *args: str) -> list[str]:
        return [sys.executable, "-m", module, *args]

    def dski_cmd(self, *args: str) -> list[str]:
        return [self.dski, *args]


def _run_dski_in_process(args: list[str], fh: Any) -> int:
    """``dski ARGS`` through the console script's typer app, stdout and stderr into ``fh``."""
    import contextlib
    import logging

    import click

    from listener.cli import app

    handler = logging.StreamHandler(fh)
    root = logging.getLogger()
    root.addHandler(handler)
    cwd = os.getcwd()
    try:
        os.chdir(REPO)
        with contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
            try:
                rc = app(args=args, prog_name="dski", standalone_mode=False)
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except click.exceptions.Exit as exc:
                rc = exc.exit_code
            except click.ClickException as exc:
                exc.show(file=fh)
                rc = exc.exit_code
            except click.exceptions.Abort:
                rc = 1
    finally:
        os.chdir(cwd)
        root.removeHandler(handler)
        fh.flush()
    return rc if isinstance(rc, int) else 0


def _display(arg: str) -> str:
    """Command lines as a user types them: ``python``/``dski`` and repo-relative paths."""
    if arg == sys.executable:
        return "python"
    if arg == _DSKI[0]:
        return "dski"
    try:
        return str(Path(arg).relative_to(REPO)) if arg.startswith(str(REPO)) else arg
    except ValueError:
        return arg


def say(msg: str, t0: float) -> None:
    print(f"[results {time.monotonic() - t0:7.1f}s] {msg}", flush=True)


# --------------------------------------------------------------------------- data

def _gen_args(out: Path, seed: int, per_modality: int, fakes: int, generators: list[str], modalities: str,
              holdout: list[str], threads: int, pydicom: bool) -> list[str]:
    args = ["--out", str(out), "--seed", str(seed), "--per-modality", str(per_modality),
            "--fakes-per-generator", str(fakes), "--generators", ",".join(generators),
            "--holdout", ",".join(holdout) if holdout else "none", "--modalities", modalities,
            "--threads", str(threads), "--quiet"]
    return args + ([] if pydicom else ["--no-pydicom"])


def _matches(folder: Path, seed: int, per_modality: int, fakes: int, generators: list[str],
             modalities: str, pydicom: bool) -> bool:
    try:
        m = json.loads((folder / "benchmark.json").read_text())
    except (OSError, ValueError):
        return False
    return (m.get("seed") == seed and m.get("per_modality") == per_modality
            and m.get("fakes_per_generator") == fakes and m.get("generators") == generators
            and m.get("modalities") == _csv(modalities) and bool(m.get("pydicom_reals")) == pydicom)


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every image file below ``folder`` -> its path relative to ``folder``."""
    out: dict[str, str] = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.suffix.lower() in (".png", ".jpg", ".jpeg", ".dcm", ".tif", ".tiff"):
            out[hashlib.sha256(f.read_bytes()).hexdigest()] = f.relative_to(folder).as_posix()
    return out


def make_data(a: argparse.Namespace, runner: Runner, t0: float) -> dict[str, Any]:
    data = a.out / "data"
    splits = {
        # split: (seed, reals, fakes, generators, pydicom). The training split holds the unseen
        # generators' fakes too: `dski train --holdout-generators` keeps them out of training and
        # validation and reports them separately (it refuses a holdout absent from the data).
        "train": (a.seeds["train"], a.per_modality, a.fakes_per_generator, a.seen_l + a.unseen_l, True),
        "test": (a.seeds["test"], a.test_per_modality, a.test_fakes_per_generator, a.seen_l + a.unseen_l, False),
        "support": (a.seeds["support"], 0, max(a.shots_l, default=0), a.unseen_l, False),
    }
    info: dict[str, Any] = {}
    for split, (seed, reals, fakes, gens, pyd) in splits.items():
        folder = data / split
        if split == "support" and fakes == 0:
            continue
        if a.reuse_data and _matches(folder, seed, reals, fakes, gens, a.modalities, pyd):
            say(f"data: reusing {split} split {folder}", t0)
            wall = None
        else:
            if folder.exists():
                shutil.rmtree(folder)
            say(f"data: generating {split} split (seed {seed}, {reals} reals/modality, {fakes} fakes/modality "
                f"of {','.join(gens)})", t0)
            wall = runner.run("data", f"generate-{split}", runner.python(
                "benchmarks.generate",
                *_gen_args(folder, seed, reals, fakes, gens, a.modalities, a.unseen_l, a.threads, pyd)))
        hashes = file_hashes(folder)
        info[split] = {"path": str(folder), "seed": seed, "reals_per_modality": reals,
                       "fakes_per_generator": fakes, "generators": gens, "pydicom_reals": pyd,
                       "n_files": len(hashes), "wall_s": wall, "sha256": hashes}
        say(f"data: {split} split has {len(hashes)} files", t0)
    train = set(info["train"]["sha256"])
    for split in ("test", "support"):
        if split in info:
            overlap = train & set(info[split]["sha256"])
            info[split]["overlap_with_train"] = len(overlap)
            if overlap:
                raise SystemExit(f"{split} split shares {len(overlap)} file(s) with the training split, e.g. "
                                 f"{info[split]['sha256'][next(iter(overlap))]}")
    if "support" in info:
        overlap = set(info["test"]["sha256"]) & set(info["support"]["sha256"])
        info["support"]["overlap_with_test"] = len(overlap)
        if overlap:
            raise SystemExit(f"support split shares {len(overlap)} file(s) with the test split")
    return info


# --------------------------------------------------------------------------- summaries

def _mean(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(vals) / len(vals) if vals else None


def generator_mean_auc(block: dict[str, Any], generator: str) -> float | None:
    """Mean over modalities of the AUC of ``generator``'s fakes against that modality's reals."""
    return _mean([r["auc"] for key, r in block["per_generator"].items() if key.split("/", 1)[1] == generator])


def summarise_report(report: dict[str, Any], seen: list[str], unseen: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in ("with_mfrm", "without_mfrm"):
        block = report[mode]
        out[mode] = {
            "overall_auc": block["overall"]["auc"], "overall_ap": block["overall"]["ap"],
            "overall_acc": block["overall"]["acc"],
            "generator_mean_auc": {g: generator_mean_auc(block, g) for g in seen + unseen},
            "seen_mean_auc": _mean([generator_mean_auc(block, g) for g in seen]),
            "unseen_mean_auc": _mean([generator_mean_auc(block, g) for g in unseen]),
        }
    return out


def _fmt(x: Any, nd: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def targets(summary: dict[str, Any], methods: list[str], shots: list[int]) -> dict[str, Any]:
    t: dict[str, Any] = {}
    if "dski" in summary:
        d = summary["dski"]["with_mfrm"]["unseen_mean_auc"]
        d0 = summary["dski"]["without_mfrm"]["unseen_mean_auc"]
        base = {m: max((x for x in (summary[m]["with_mfrm"]["unseen_mean_auc"],
                                     summary[m]["without_mfrm"]["unseen_mean_auc"]) if x is not None),
                       default=None) for m in methods if m in BASELINES}
        best_base = max((v for v in base.values() if v is not None), default=None)
        met = d is not None and d >= TARGET_UNSEEN_AUC and (best_base is None or d > best_base)
        t["unseen_auc"] = {
            "target": f"DSKI mean AUC on the unseen generator >= {TARGET_UNSEEN_AUC} and above every baseline",
            "dski_with_mfrm": d, "dski_without_mfrm": d0,
            "baselines_best_of_both_modes": base, "met": bool(met),
            "above_every_baseline": None if best_base is None or d is None else bool(d > best_base),
        }
        key = "dski+support10" if "dski+support10" in summary else (
            f"dski+support{max(shots)}" if shots and f"dski+support{max(shots)}" in summary else None)
        if key is not None:
            s = summary[key]["with_mfrm"]["unseen_mean_auc"]
            gain0 = None if s is None or d0 is None else s - d0
            gain_bank = None if s is None or d is None else s - d
            met2 = s is not None and ((gain0 is not None and gain0 >= TARGET_MFRM_GAIN) or s >= TARGET_MFRM_AUC)
            t["mfrm_support"] = {
                "target": f"MFRM with 10 support images adds >= {TARGET_MFRM_GAIN} AUC (over the classifier "
                          f"alone, λ = 0) or reaches >= {TARGET_MFRM_AUC}",
                "variant": key, "auc": s, "gain_over_classifier": gain0,
                "gain_over_training_bank": gain_bank, "met": bool(met2),
            }
    return t


# --------------------------------------------------------------------------- markdown

def _gen_table(lines: list[str], reports: dict[str, Any], variants: list[str], unseen: list[str]) -> None:
    lines.append("| method | score | modality/generator | seen? | n real | n fake | ACC real | ACC fake | ACC | AP | AUC |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for v in variants:
        for mode in (("with_mfrm", "without_mfrm") if "+support" not in v else ("with_mfrm",)):
            block = reports[v][mode]
            tag = "MFRM" if mode == "with_mfrm" else "λ=0"
            rows = [("overall", block["overall"], "")]
            rows += [(k, r, "") for k, r in block["per_modality"].items()]
            rows += [(k, r, "unseen" if k.split("/", 1)[1] in unseen else "seen")
                     for k, r in block["per_generator"].items()]
            for key, r, seen in rows:
                lines.append(f"| {v} | {tag} | {key} | {seen} | {r['n_real']} | {r['n_fake']} | "
                             f"{_fmt(r['real_acc'])} | {_fmt(r['fake_acc'])} | {_fmt(r['acc'])} | "
                             f"{_fmt(r['ap'])} | {_fmt(r['auc'])} |")


def _condense(command: str) -> str:
    """``dski bank add ... F1 .. FK`` (the first K support files of one folder) as ``$(ls DIR/*.png | head -n K)``."""
    if not command.startswith("dski bank add "):
        return command
    words = shlex.split(command)
    files = [w for w in words if w.endswith(".png")]
    if len(files) < 2 or len({str(Path(f).parent) for f in files}) != 1:
        return command
    head = " ".join(shlex.quote(w) for w in words if not w.endswith(".png"))
    return f"{head} $(ls {Path(files[0]).parent}/*.png | head -n {len(files)})"


def write_markdown(path: Path, res: dict[str, Any]) -> None:
    cfg, mach = res["config"], res["machine"]
    seen, unseen = cfg["seen"], cfg["unseen"]
    summ = res["summary"]
    lines: list[str] = []
    prelim = res["preliminary"]
    title = "# Benchmark results" + (" — PRELIMINARY" if prelim["is_preliminary"] else "")
    lines += [title, ""]
    if prelim["is_preliminary"]:
        lines += ["> **Preliminary run.** " + " ".join(prelim["reasons"]) + " The numbers below are real "
                  "measurements of this run, but they are not the issue-4 result.", ""]
    lines += [
        ("Produced by `python -m benchmarks.results` (machine-readable output: "
        f"`{_display(str(Path(cfg['out']) / 'results.json'))}`). Detectors use the registered tiny "
        "open_clip backbone `dski-tiny` with random frozen weights (no pretrained CLIP weights can be "
        "downloaded here), so these numbers say nothing about DSKI with real CLIP weights on MedForensics; "
        "see `docs/retraining.md`. No bundle is clinically validated."), "",
        "## Setup", "",
        (f"- generated {res['finished']} on {mach['nproc']} CPU cores ({mach['cpu']}), load average "
        f"{mach['loadavg_start']} at start, {mach['loadavg_end']} at the end; torch {mach['torch']}, "
        f"python {mach['python']}; total wall time {res['wall_s'] / 60:.1f} min"),
        (f"- seen generators (training): {', '.join(seen)}; unseen (test only): {', '.join(unseen)}; "
        f"modalities {', '.join(cfg['modalities'])}; image size 128"),
        (f"- training split seed {cfg['seeds']['train']}: {cfg['per_modality']} simulated reals per modality "
        f"+ pydicom's real test images, {cfg['fakes_per_generator']} fakes per modality and generator (the unseen "
        "generator's are held out of training and validation by `--holdout-generators`); "
        f"20 % of it is the validation split (thresholds are chosen there, never on test data)"),
        (f"- test split seed {cfg['seeds']['test']}: {cfg['test_per_modality']} reals per modality, "
        f"{cfg['test_fakes_per_generator']} fakes per modality and generator (seen and unseen); no pydicom images "
        f"(they would be the same files as in training)"),
        (f"- support split seed {cfg['seeds']['support']}: fakes of the unseen generator(s) only, "
        f"{max(cfg['shots'], default=0)} per modality; K-shot = the first K per modality "
        f"(so {', '.join(str(k * len(cfg['modalities'])) for k in cfg['shots'])} images in all)"),
        f"- split disjointness by file sha256: test ∩ train = {res['splits']['test']['overlap_with_train']}"
        + (f", support ∩ train = {res['splits']['support']['overlap_with_train']}, support ∩ test = "
           f"{res['splits']['support']['overlap_with_test']}" if "support" in res["splits"] else ""),
        (f"- training: {cfg['epochs']} epochs, lr {cfg['lr']}, batch {cfg['batch_size']}, seed {cfg['train_seed']}, "
        "backbone `dski-tiny` (univfd, dski); `--holdout-generators` = the unseen generator(s)"),
        ("- AUC/AP: fake is positive. Per generator = that generator's fakes against the same modality's reals. "
        "\"mean AUC\" = mean over modalities of the per-generator AUC. ACC at the bundle's threshold chosen on "
        "the validation split (fused score: `threshold`; λ = 0: `classifier_threshold`)."),
        _mfrm_line(res["reports"]), "",
        "## Targets", "",
    ]
    t = res["targets"]
    if "unseen_auc" in t:
        u = t["unseen_auc"]
        lines.append(f"- **{'MET' if u['met'] else 'MISSED'}**: {u['target']}. DSKI (MFRM) "
                     f"{_fmt(u['dski_with_mfrm'])}, DSKI (λ=0) {_fmt(u['dski_without_mfrm'])}; baselines "
                     + ", ".join(f"{m} {_fmt(v)}" for m, v in u["baselines_best_of_both_modes"].items()) + ".")
    if "mfrm_support" in t:
        s = t["mfrm_support"]
        lines.append(f"- **{'MET' if s['met'] else 'MISSED'}**: {s['target']}. {s['variant']}: AUC {_fmt(s['auc'])}, "
                     f"gain {_fmt(s['gain_over_classifier'], 4)} over λ=0, {_fmt(s['gain_over_training_bank'], 4)} "
                     "over the bundle's own bank without support images.")
    lines += ["", "## Summary: mean AUC per generator (test split)", "",
              "| method | score | " + " | ".join(f"{g} ({'seen' if g in seen else 'unseen'})" for g in seen + unseen)
              + " | overall AUC | overall ACC |",
              "| --- | --- | " + " | ".join("---" for _ in seen + unseen) + " | --- | --- |"]
    for v, s in summ.items():
        # A support copy's classifier (λ = 0) is the DSKI bundle's: only its fused score differs.
        for mode, tag in (("with_mfrm", "MFRM"),) + ((("without_mfrm", "λ=0"),) if "+support" not in v else ()):
            b = s[mode]
            lines.append(f"| {v} | {tag} | " + " | ".join(_fmt(b["generator_mean_auc"][g]) for g in seen + unseen)
                         + f" | {_fmt(b['overall_auc'])} | {_fmt(b['overall_acc'])} |")
    if res["robustness"]:
        lines += ["", "## Robustness: mean AUC per generator after perturbation (test split)", "",
                  ("Perturbations (`benchmarks/perturb.py`): JPEG re-compression at quality 90 and 75, 0.5× bicubic "
                  f"downscaling, additive Gaussian noise σ = {cfg['noise_sigma']} of the full range. Bundles without "
                  "support images."), "",
                  "| perturbation | method | score | " + " | ".join(seen + unseen) + " |",
                  "| --- | --- | --- | " + " | ".join("---" for _ in seen + unseen) + " |"]
        for v, s in summ.items():
            if "+support" in v:
                continue
            for mode, tag in (("with_mfrm", "MFRM"), ("without_mfrm", "λ=0")):
                lines.append(f"| none | {v} | {tag} | "
                             + " | ".join(_fmt(s[mode]["generator_mean_auc"][g]) for g in seen + unseen) + " |")
        for kind, per in res["robustness"].items():
            for v, s in per.items():
                for mode, tag in (("with_mfrm", "MFRM"), ("without_mfrm", "λ=0")):
                    lines.append(f"| {kind} | {v} | {tag} | "
                                 + " | ".join(_fmt(s[mode]["generator_mean_auc"][g]) for g in seen + unseen) + " |")
    lines += ["", "## Per modality and per generator (test split)", ""]
    _gen_table(lines, res["reports"], list(res["reports"]), unseen)
    plots = {v: r.get("plots", []) for v, r in res["reports"].items() if r.get("plots")}
    if plots:
        lines += ["", ("Plots (ROC per generator with and without MFRM, score histograms), per bundle, under "
                  f"`{_display(str(Path(cfg['out']) / 'plots'))}/<method>/` (not committed)."), ""]
    lines += ["", "## Commands and wall times", "",
              ("Run from the repository root with the virtual environment active. One command reproduces "
              "everything below:"), "", "```sh", res["command"], "```", "",
              ("Each `dski+supportK` bundle is a copy of the trained DSKI bundle (`cp -r`), so the DSKI bundle "
               "itself is never changed; the copy's bank gets the first K support files per modality."), "",
              "| stage | step | wall | command |", "| --- | --- | --- | --- |"]
    for c in res["commands"]:
        lines.append(f"| {c['stage']} | {c['name']} | {c['wall_s']:.1f} s | `{_condense(c['command']).replace('|', chr(92) + '|')}` |")
    lines += ["", ("Other processes shared the 2 cores during the run (load average above), so wall times "
              "are upper bounds for an idle machine."), ""]
    if res.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in res["notes"]] + [""]
    path.parent.mkdir(parents=True, exist_ok=True)
    analysis = REPO / ANALYSIS_FILE
    if not cfg.get("smoke") and path.resolve() == (REPO / "docs/results.md").resolve() and analysis.is_file():
        # the hand-written reading of the numbers and earlier runs survive a regeneration
        lines += ["", analysis.read_text(encoding="utf-8").rstrip()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _mfrm_line(reports: dict[str, Any]) -> str:
    """What "MFRM" means in the tables: each bundle's own λ, k, T and bank size, as evaluated."""
    def settings(r: dict[str, Any]) -> str:
        q = r.get("retrieval", {})
        return f"λ = {q.get('lam')}, k = {q.get('k')}, T = {q.get('temperature')}, bank = {q.get('bank_size')}"

    plain = next((r for v, r in reports.items() if "+support" not in v), None)
    line = ("- \"MFRM\" = the bundle's fused score"
            + (f" ({settings(plain)} training images)" if plain else "")
            + "; \"λ=0\" = the classifier alone. The baselines get the same bank and fusion from `dski train`; "
            "both modes are listed and the target uses the better of the two.")
    support = {v: r for v, r in reports.items() if "+support" in v}
    if support:
        line += (" After `dski bank add`, λ and the threshold are re-chosen on the bundle's validation images and "
                 "the support images themselves, leave-one-out, never on test data (`detector/calibration.py`): "
                 + "; ".join(f"{v}: {settings(r)}, threshold {_fmt(r.get('threshold'), 4)}"
                             for v, r in support.items()) + ".")
    return line


# --------------------------------------------------------------------------- main

def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "loadavg_start": [round(x, 2) for x in os.getloadavg()]}


def run(a: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
    t0 = time.monotonic()
    a.out.mkdir(parents=True, exist_ok=True)
    runner = Runner(a.out, subprocess=a.subprocess)
    res: dict[str, Any] = {
        "command": "python -m benchmarks.results " + " ".join(shlex.quote(_display(x)) for x in
                                                               (argv if argv is not None else sys.argv[1:])),
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": {"out": str(a.out), "per_modality": a.per_modality, "fakes_per_generator": a.fakes_per_generator,
                   "test_per_modality": a.test_per_modality, "test_fakes_per_generator": a.test_fakes_per_generator,
                   "seen": a.seen_l, "unseen": a.unseen_l, "modalities": _csv(a.modalities), "epochs": a.epochs,
                   "lr": a.lr, "batch_size": a.batch_size, "train_seed": a.train_seed, "methods": a.methods_l,
                   "shots": a.shots_l, "shots_unit": "fake support images per modality and unseen generator",
                   "perturbations": a.perturbations_l, "noise_sigma": a.noise_sigma, "seeds": a.seeds,
                   "smoke": a.smoke},
    }
    say(f"machine: {res['machine']['nproc']} cores, load {res['machine']['loadavg_start']}", t0)

    # 1. data
    splits = make_data(a, runner, t0)
    res["splits"] = splits
    train_dir, test_dir = Path(splits["train"]["path"]), Path(splits["test"]["path"])

    # 2. train
    bundles: dict[str, Path] = {}
    for m in a.methods_l:
        b = a.out / "bundles" / m
        say(f"train: {m} ({a.epochs} epochs)", t0)
        wall = runner.run("train", f"train-{m}", runner.dski_cmd(
            "train", "--data", str(train_dir), "--out", str(b), "--method", m, "--epochs", str(a.epochs),
            "--lr", str(a.lr), "--batch-size", str(a.batch_size), "--seed", str(a.train_seed),
            "--holdout-generators", ",".join(a.unseen_l), "--overwrite", "--no-progress"))
        say(f"train: {m} done in {wall:.1f}s", t0)
        bundles[m] = b

    # 3-4. evaluate, few-shot
    reports: dict[str, Any] = {}

    def evaluate(variant: str, bundle: Path, data: Path, tag: str) -> dict[str, Any]:
        js = a.out / "reports" / tag / f"{variant}.json"
        cmd = ["evaluate", "--bundle", str(bundle), "--data", str(data), "--json", str(js)]
        if not a.no_plots and tag == "test":
            cmd += ["--plots", str(a.out / "plots" / variant)]
        wall = runner.run("evaluate" if tag == "test" else "robustness", f"evaluate-{tag}-{variant}",
                          runner.dski_cmd(*cmd))
        say(f"evaluate: {variant} on {tag} in {wall:.1f}s", t0)
        return json.loads(js.read_text())

    for m, b in bundles.items():
        reports[m] = evaluate(m, b, test_dir, "test")
    if "dski" in bundles and "support" in splits:
        support_dir = Path(splits["support"]["path"])
        for k in a.shots_l:
            variant = f"dski+support{k}"
            copy = a.out / "bundles" / variant
            if copy.exists():
                shutil.rmtree(copy)
            t1 = time.monotonic()
            shutil.copytree(bundles["dski"], copy, ignore=shutil.ignore_patterns(".train_state.pt"))
            runner.record("few-shot", f"copy-{variant}", f"cp -r {_display(str(bundles['dski']))} "
                          f"{shlex.quote(_display(str(copy)))}", time.monotonic() - t1)
            for g in a.unseen_l:
                for mod in _csv(a.modalities):
                    src = support_dir / mod / g
                    files = sorted(src.glob("*.png"))[:k]
                    if len(files) < k:
                        raise SystemExit(f"support split has {len(files)} {g} images for {mod}, need {k}")
                    # The first K files by name: the same list as `ls DIR/*.png | head -n K`.
                    shown = (f"dski bank add --bundle {shlex.quote(_display(str(copy)))} --label fake "
                             f"--generator {g} --modality {mod} $(ls {_display(str(src))}/*.png | head -n {k})")
                    runner.run("few-shot", f"bank-add-{variant}-{mod}-{g}", runner.dski_cmd(
                        "bank", "add", "--bundle", str(copy), "--label", "fake", "--generator", g,
                        "--modality", mod, *map(str, files)), display=shown)
            say(f"few-shot: {variant} bank has +{k * len(_csv(a.modalities)) * len(a.unseen_l)} support images", t0)
            reports[variant] = evaluate(variant, copy, test_dir, "test")
    res["reports"] = reports
    res["summary"] = {v: summarise_report(r, a.seen_l, a.unseen_l) for v, r in reports.items()}

    # 5. robustness
    robust: dict[str, Any] = {}
    for kind in a.perturbations_l:
        pdir = a.out / "data" / f"test-{kind}"
        if pdir.exists():
            shutil.rmtree(pdir)
        say(f"robustness: writing {kind} copy of the test split", t0)
        pargs = ["--src", str(test_dir), "--out", str(pdir), "--kind", kind]
        if kind == "noise":
            pargs += ["--sigma", str(a.noise_sigma)]
        runner.run("robustness", f"perturb-{kind}", runner.python("benchmarks.perturb", *pargs))
        robust[kind] = {}
        for m, b in bundles.items():
            rep = evaluate(m, b, pdir, kind)
            robust[kind][m] = summarise_report(rep, a.seen_l, a.unseen_l)
            robust[kind][m]["per_generator_auc"] = {
                mode: {k: r["auc"] for k, r in rep[mode]["per_generator"].items()}
                for mode in ("with_mfrm", "without_mfrm")}
    res["robustness"] = robust

    # 6. report
    res["targets"] = targets(res["summary"], a.methods_l, a.shots_l)
    reasons = []
    if a.smoke:
        reasons.append("Smoke run (--smoke): tiny sizes for the test suite.")
    if "flow" not in a.unseen_l:
        reasons.append(f"The unseen generator is {', '.join(a.unseen_l)}, not flow (the issue's unseen family).")
    if "ddpm" not in a.seen_l + a.unseen_l:
        reasons.append("The ddpm generator is not trained yet and is not part of this run.")
    if a.per_modality < 500 or (a.fakes_per_generator * len(a.seen_l) < 500):
        reasons.append(f"Training sizes ({a.per_modality} reals, {a.fakes_per_generator} fakes per generator per "
                       "modality) are below the issue's 500 real + 500 fake per modality.")
    res["preliminary"] = {"is_preliminary": bool(reasons), "reasons": reasons}
    res["commands"] = runner.commands
    res["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    res["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    res["wall_s"] = round(time.monotonic() - t0, 1)
    # The sha256 lists are large; keep them in a side file and the counts in results.json.
    hashes = {s: info.pop("sha256") for s, info in splits.items()}
    (a.out / "split_hashes.json").write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
    res["splits_hashes_file"] = str(a.out / "split_hashes.json")
    (a.out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    write_markdown(a.markdown, res)
    say(f"done: {a.out / 'results.json'}, {a.markdown}", t0)
    for name, t in res["targets"].items():
        say(f"target {name}: {'MET' if t['met'] else 'MISSED'}", t0)
    return res


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--render"]:  # re-write the markdown of an earlier run: --render RESULTS.json [--markdown PATH]
        if len(args) < 2:
            raise SystemExit("usage: python -m benchmarks.results --render OUT/results.json [--markdown PATH]")
        res = json.loads(Path(args[1]).read_text())
        md = Path(args[args.index("--markdown") + 1]) if "--markdown" in args else (
            Path(res["config"]["out"]) / "results.md" if res["config"]["smoke"] else REPO / "docs/results.md")
        write_markdown(md, res)
        print(f"wrote {md}")
        return 0
    a = parse_args(argv)
    run(a, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
