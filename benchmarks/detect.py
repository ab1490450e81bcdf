"""Scoring throughput: the full DSKI forward against the bare frozen open_clip backbone, and
reduced-precision inference paths against fp32.

    python -m benchmarks.detect [--models vit-b-16,default] [--batches 1,8] [--reps 5]
        [--candidates bf16,int8-dynamic,bf16-autocast,threads-1,compile]
        [--accuracy-data DIR] [--no-throughput] [--no-precision] [--parts] [--ladder]
        [--device cpu|cuda|cuda:N] [--out benchmarks/out/detect.json]

Models:

- ``vit-b-16``: open_clip ``ViT-B-16`` with random weights (``create_model(pretrained=None)``),
  224 px, injected into ``DSKIModel`` (CDFA on blocks 2, 5, 8; noise crop ``--noise-crop``,
  224 by default) with a support bank of ``--bank-size`` random entries (1000). Random
  weights suffice for speed: the adapters' zero-initialised outputs are still computed.
- ``default``: the shipped bundle ``bundles/default`` (dski-tiny, 64 px), with its own bank.

Throughput (part 1): per model and batch size, ``--reps`` repetitions; each runs the bare
backbone (``clip.encode_image`` of a copy of the same weights without CDFA) and the full
DSKI scoring step, alternating which goes first. The DSKI step is what
``Detector.frame_scores`` does per batch: noise branch, adapted ViT, head (cached text
embeddings), softmax, faiss top-k query of the bank, retrieval probability and λ fusion.
Printed: images/s of each and the ratio DSKI/backbone (median of per-repetition ratios).

Precision (part 2): per model, batch 8, the full DSKI step of each candidate against fp32,
alternating in each repetition:

- ``bf16``: ``detector.precision`` (ViT weights in bfloat16, noise branch and head fp32);
- ``int8-dynamic``: ``detector.precision`` (dynamic int8 Linear layers in the frozen blocks);
- ``bf16-autocast``: the fp32 model under ``torch.autocast(<device type>, torch.bfloat16)``;
- ``tf32`` (a GPU's): fp32 with TensorFloat-32 matrix products and convolutions allowed
  (``torch.backends.cuda.matmul.allow_tf32``, ``torch.backends.cudnn.allow_tf32``);
- ``threads-1``: fp32 with ``torch.set_num_threads(1)`` (the default is one per core);
- ``compile``: ``torch.compile`` of the fp32 model (inductor, C++ on CPU), compile time printed;
- ``bf16-compile``: ``torch.compile`` of the bf16 model;
- ``compile-graphs`` (a GPU's): ``torch.compile(mode="reduce-overhead")`` of the fp32 model,
  which replays the step as CUDA graphs (fewer kernel launches).

For each: speed ratio candidate/fp32, and the largest difference of the fused score (and of
the embedding) against fp32 on the same random batch. On the default bundle, also on real
images (``--accuracy-data``: a folder of ``benchmarks.generate`` output, plus pydicom's test
files): max |score difference|, label agreement, and AUC with and without MFRM for fp32 and
the candidate.

Parts (part 3, ``--parts``): where the DSKI step's time goes, per model at batch
``--parts-batch`` (8): the bare backbone, the adapted ViT given precomputed noise tokens
(``DSKIModel.adapted_embedding``), the noise encoder and, inside it, its residual filters,
the head with softmax, and the retrieval query, each timed alternately as in part 1
(milliseconds per batch), with the floating-point operations per image that
``torch.utils.flop_counter`` counts for the backbone, the adapted ViT and the noise encoder.

Ladder (``--ladder``): the DSKI step built up stage by stage at batch ``--parts-batch``, each
stage's throughput paired with the bare backbone's in every repetition: the adapted ViT
given precomputed noise tokens, then with the noise branch, then with the head, then the
whole step (softmax, retrieval, fusion). A stage costs more inside the step than alone,
where it shares the caches with the ViT; the ladder measures it there.

``--device`` (``cpu`` by default) runs the models and their inputs on that device, as
``detector.device`` does in the node; every timed call ends with its result on the host
(the node needs the scores there), so GPU work is waited for. ``int8-dynamic`` is CPU-only.

Every measurement records the load average (``os.getloadavg``) before and after; the machine
facts go into the JSON result.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.common import machine_facts, write_json
from detector.cdfa import CDFABlock
from detector.model import DSKIModel
from detector.precision import apply_precision
from detector.retrieval import SupportBank, SupportEntry, fuse
from detector.spec import BackboneSpec, ModelSpec

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BUNDLE = REPO / "bundles" / "default"
ALL_CANDIDATES = ("bf16", "int8-dynamic", "bf16-autocast", "threads-1", "tf32", "compile", "bf16-compile",
                  "compile-graphs")


# --------------------------------------------------------------------------- models
@dataclass
class Setup:
    """One model under test: the DSKI model, its bank and retrieval settings, and input sizes."""

    name: str
    model: DSKIModel
    bank: SupportBank
    k: int
    temperature: float
    lam: float
    semantic_size: int
    noise_crop: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def to(self, device: torch.device) -> Setup:
        """The model (parameters and cached text embeddings) on ``device``; the faiss bank stays on the CPU."""
        self.model.to(device)
        self.device = device
        return self


def bare_backbone(model: DSKIModel) -> nn.Module:
    """A copy of the model's open_clip backbone with the CDFA wrappers removed: the same frozen weights."""
    clip = copy.deepcopy(model.backbone)
    blocks = clip.visual.transformer.resblocks
    for i, b in enumerate(blocks):
        if isinstance(b, CDFABlock):
            blocks[i] = b.block
    return clip.eval()


def random_bank(dim: int, size: int, seed: int = 0) -> SupportBank:
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((size, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    entries = [SupportEntry("fake" if i % 2 else "real", "CT", "gan" if i % 2 else "real", f"random-{i}")
               for i in range(size)]
    bank = SupportBank(dim)
    bank.add(emb, entries)
    return bank


def vit_b16_setup(noise_crop: int = 224, bank_size: int = 1000, seed: int = 0) -> Setup:
    """ViT-B-16 with random weights, injected into DSKIModel (no checkpoint file needed)."""
    import open_clip

    torch.manual_seed(seed)
    with warnings.catch_warnings(), _quiet_root_logger():
        warnings.simplefilter("ignore")
        clip = open_clip.create_model("ViT-B-16", pretrained=None, pretrained_image=False, pretrained_text=False)
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    spec = ModelSpec(backbone=BackboneSpec(name="ViT-B-16", image_size=224), noise_crop=noise_crop)
    model = DSKIModel(spec, backbone=(clip, tokenizer)).prepare_inference()
    return Setup("vit-b-16", model, random_bank(model.embed_dim, bank_size, seed), 8, 0.05, 0.3, 224, noise_crop)


def bundle_setup(path: Path = DEFAULT_BUNDLE) -> Setup:
    from detector.bundle import load_bundle

    b = load_bundle(path)
    r = b.manifest.retrieval
    return Setup("default", b.model, b.bank, r.k, r.temperature, r.lam,
                 b.preprocess.semantic_size, b.preprocess.noise_crop)


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns "No pretrained weights loaded" on the root logger
    try:
        yield
    finally:
        root.setLevel(level)


def inputs(setup: Setup, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    semantic = torch.randn(batch, 3, setup.semantic_size, setup.semantic_size, generator=g)
    noise = torch.rand(batch, 3, setup.noise_crop, setup.noise_crop, generator=g)
    modality = torch.randint(0, len(setup.model.spec.head.modalities), (batch,), generator=g)
    return semantic.to(setup.device), noise.to(setup.device), modality.to(setup.device)


# --------------------------------------------------------------------------- forwards
def dski_step(model: nn.Module, setup: Setup, semantic: torch.Tensor, noise: torch.Tensor,
              modality: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """One batch of the node's scoring (``Detector.frame_scores``): (fused score (B,), embeddings (B, D))."""
    with torch.inference_mode():
        emb, logits = model.embed_and_logits(semantic, noise, modality)
        p_cls = torch.softmax(logits.float(), dim=-1)[:, 1].double().cpu().numpy()
        emb_np = emb.float().cpu().numpy().astype(np.float32)
    p_ret = setup.bank.fake_probability(emb_np, setup.k, setup.temperature)
    return np.asarray(fuse(p_cls, p_ret, setup.lam), dtype=np.float64), emb_np


def backbone_step(clip: nn.Module, semantic: torch.Tensor) -> torch.Tensor:
    """The bare backbone's embeddings, on the host as the DSKI step's results are."""
    with torch.inference_mode():
        return clip.encode_image(semantic).cpu()


# --------------------------------------------------------------------------- timing
def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def synchronize() -> None:
    """Wait for queued GPU work, so that a timed block ends when its last call has finished."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], Any], iters: int) -> float:
    """Seconds for ``iters`` calls of ``fn``, queued GPU work included."""
    synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize()
    return time.perf_counter() - t0


def calibrate(fn: Callable[[], Any], target_s: float) -> int:
    """Warm ``fn`` up (two calls) and return the iteration count that takes about ``target_s``."""
    fn()
    one = time_calls(fn, 1)
    return max(1, round(target_s / max(one, 1e-6)))


def alternate(variants: dict[str, Callable[[], Any]], batch: int, reps: int, target_s: float,
              setups: dict[str, Callable[[], None]] | None = None) -> dict[str, Any]:
    """Time every variant ``reps`` times, rotating the order each repetition; images/s per run.

    ``setups[name]`` (optional) runs untimed before each timed block of that variant (thread count).
    """
    setups = setups or {}
    names = list(variants)
    iters = {}
    for n in names:
        setups.get(n, lambda: None)()
        iters[n] = calibrate(variants[n], target_s)
    runs: dict[str, list[float]] = {n: [] for n in names}
    loads = []
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        loads.append(loadavg())
        for n in order:
            setups.get(n, lambda: None)()
            dt = time_calls(variants[n], iters[n])
            runs[n].append(batch * iters[n] / dt)
    loads.append(loadavg())
    return {"iters": iters, "images_per_s": runs, "median": {n: statistics.median(v) for n, v in runs.items()},
            "loadavg": loads}


def ratio_of(res: dict[str, Any], num: str, den: str) -> float:
    """Median of the per-repetition ratios ``num/den`` (paired runs, robust to drifting load)."""
    a, b = res["images_per_s"][num], res["images_per_s"][den]
    return statistics.median(x / y for x, y in zip(a, b))


# --------------------------------------------------------------------------- part 3
def in_inference_mode(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` wrapped to run under ``torch.inference_mode``, as the node's scoring runs."""
    def call() -> Any:
        with torch.inference_mode():
            return fn()
    return call


def flops_per_image(fn: Callable[[], Any], batch: int, modules: list[nn.Module]) -> float:
    """Floating-point operations of one call of ``fn`` per image, as ``torch.utils.flop_counter``
    counts them (matmuls, attention and convolutions; elementwise work is not counted).

    ``modules`` are switched to training mode for the count (no gradients): in eval mode
    ``nn.MultiheadAttention`` runs a fused kernel the counter has no formula for, and the
    attention would be left out. The arithmetic is the same in both modes.
    """
    from torch.utils.flop_counter import FlopCounterMode

    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.train(True)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)
    return counter.get_total_flops() / batch


def parts(setup: Setup, batch: int, reps: int, target_s: float) -> dict[str, Any]:
    """Time each part of the DSKI step against the bare backbone, same run, rotating the order."""
    model, clip = setup.model, bare_backbone(setup.model)
    semantic, noise, modality = inputs(setup, batch)
    with torch.inference_mode():
        tokens = model.noise_tokens(noise)
        emb = model.embed(semantic, noise)
    emb_np = emb.cpu().numpy().astype(np.float32)

    variants = {
        "backbone": in_inference_mode(lambda: clip.encode_image(semantic)),
        "adapted_vit": in_inference_mode(lambda: model.adapted_embedding(semantic, tokens)),
        "noise_encoder": in_inference_mode(lambda: model.noise_tokens(noise)),
        "residuals": in_inference_mode(lambda: model.noise_encoder.residuals(noise)),
        "head": in_inference_mode(lambda: torch.softmax(model.head(emb, modality).float(), dim=-1)),
        "retrieval": lambda: setup.bank.fake_probability(emb_np, setup.k, setup.temperature),
        "dski": lambda: dski_step(model, setup, semantic, noise, modality),
    }
    res = alternate(variants, batch, reps, target_s)
    ms = {n: 1000.0 * batch / v for n, v in res["median"].items()}  # images/s -> ms per batch
    flops = {
        "backbone": flops_per_image(lambda: clip.encode_image(semantic), batch, [clip]),
        # model.backbone, not model: DSKIModel.train keeps its frozen backbone in eval mode
        "adapted_vit": flops_per_image(lambda: model.adapted_embedding(semantic, tokens), batch, [model.backbone]),
        "noise_encoder": flops_per_image(lambda: model.noise_tokens(noise), batch, [model.noise_encoder]),
    }
    row = {"model": setup.name, "batch": batch, "ms_per_batch": ms, "flops_per_image": flops, **res}
    print(f"[parts] {setup.name}, batch {batch}, ms per batch (median of {reps}): "
          + ", ".join(f"{n} {v:.2f}" for n, v in ms.items())
          + f"; adapters = adapted ViT - backbone {ms['adapted_vit'] - ms['backbone']:.2f}", flush=True)
    print(f"[parts] {setup.name}: GFLOP per image: backbone {flops['backbone'] / 1e9:.4f}, adapted ViT "
          f"{flops['adapted_vit'] / 1e9:.4f}, noise encoder {flops['noise_encoder'] / 1e9:.4f} "
          f"({flops['noise_encoder'] / flops['backbone']:.2f} of the backbone)  "
          f"load {res['loadavg'][0][0]}..{res['loadavg'][-1][0]}", flush=True)
    return row


def ladder(setup: Setup, batch: int, reps: int, target_s: float) -> dict[str, Any]:
    """The DSKI step built up one stage at a time, each paired with the bare backbone.

    A stage timed alone (``parts``) costs less than it adds inside the step, beside the
    ViT; the ladder measures what each stage adds there.
    """
    model, clip = setup.model, bare_backbone(setup.model)
    semantic, noise, modality = inputs(setup, batch)
    with torch.inference_mode():
        tokens = model.noise_tokens(noise)

    variants = {
        "backbone": in_inference_mode(lambda: clip.encode_image(semantic)),
        "adapted_vit": in_inference_mode(lambda: model.adapted_embedding(semantic, tokens)),
        "plus_noise_branch": in_inference_mode(lambda: model.image_embedding(semantic, noise)),
        "plus_head": in_inference_mode(lambda: model.embed_and_logits(semantic, noise, modality)),
        "dski": lambda: dski_step(model, setup, semantic, noise, modality),  # + softmax, retrieval, fusion
    }
    res = alternate(variants, batch, reps, target_s)
    ratios = {n: ratio_of(res, n, "backbone") for n in variants}
    print(f"[ladder] {setup.name}, batch {batch}, throughput / backbone's (median of {reps} paired): "
          + ", ".join(f"{n} {r:.3f}" for n, r in ratios.items())
          + f"  load {res['loadavg'][0][0]}..{res['loadavg'][-1][0]}", flush=True)
    return {"model": setup.name, "batch": batch, "ratio_to_backbone": ratios, **res}


# --------------------------------------------------------------------------- part 1
def throughput(setup: Setup, batches: list[int], reps: int, target_s: float) -> list[dict[str, Any]]:
    clip = bare_backbone(setup.model)
    rows = []
    for batch in batches:
        semantic, noise, modality = inputs(setup, batch)
        res = alternate({
            "backbone": lambda s=semantic: backbone_step(clip, s),
            "dski": lambda s=semantic, n=noise, m=modality: dski_step(setup.model, setup, s, n, m),
        }, batch, reps, target_s)
        row = {"model": setup.name, "batch": batch, "bank_size": len(setup.bank),
               "backbone_img_s": res["median"]["backbone"], "dski_img_s": res["median"]["dski"],
               "ratio": ratio_of(res, "dski", "backbone"), **res}
        print(f"[throughput] {setup.name:8s} batch {batch}: backbone {row['backbone_img_s']:8.2f} img/s, "
              f"DSKI {row['dski_img_s']:8.2f} img/s, ratio {row['ratio']:.3f} (target >= 0.8)  "
              f"load {res['loadavg'][0][0]}..{res['loadavg'][-1][0]}", flush=True)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- part 2
def candidate(setup: Setup, name: str) -> tuple[Callable[..., tuple[np.ndarray, np.ndarray]],
                                                 Callable[[], None] | None, float]:
    """(step function, untimed setup before each block or None, seconds spent preparing)."""
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    setup_fn = None
    if name in ("bf16", "int8-dynamic"):
        model = apply_precision(copy.deepcopy(setup.model), name)
        step = _bind(model, setup)
    elif name == "bf16-autocast":
        def step(s, n, m):  # type: ignore[no-untyped-def]
            with torch.autocast(setup.device.type, dtype=torch.bfloat16):
                return dski_step(setup.model, setup, s, n, m)
    elif name == "tf32":
        step = _bind(setup.model, setup)
        setup_fn = lambda: allow_tf32(True)
    elif name == "threads-1":
        step = _bind(setup.model, setup)
        setup_fn = lambda: torch.set_num_threads(1)
    elif name in ("compile", "bf16-compile", "compile-graphs"):
        base = copy.deepcopy(setup.model)
        if name == "bf16-compile":
            apply_precision(base, "bf16")
        mode = "reduce-overhead" if name == "compile-graphs" else None
        compiled = torch.compile(base.embed_and_logits, dynamic=False, mode=mode)

        class _Compiled:
            embed_and_logits = staticmethod(compiled)
        step = _bind(_Compiled(), setup)
    else:
        raise ValueError(f"unknown candidate {name!r}; choose from {', '.join(ALL_CANDIDATES)}")
    torch.set_num_threads(threads)
    return step, setup_fn, time.perf_counter() - t0


def allow_tf32(allowed: bool) -> None:
    """TensorFloat-32 for fp32 matrix products and convolutions on a GPU (off by default in torch)."""
    torch.backends.cuda.matmul.allow_tf32 = allowed
    torch.backends.cudnn.allow_tf32 = allowed


def _bind(model: Any, setup: Setup) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    return lambda s, n, m: dski_step(model, setup, s, n, m)


def precision_candidates(setup: Setup, names: list[str], batch: int, reps: int,
                         target_s: float) -> list[dict[str, Any]]:
    threads = torch.get_num_threads()
    tf32 = torch.backends.cuda.matmul.allow_tf32

    def baseline() -> None:
        torch.set_num_threads(threads)
        allow_tf32(tf32)

    semantic, noise, modality = inputs(setup, batch, seed=1)
    ref = _bind(setup.model, setup)
    ref_score, ref_emb = ref(semantic, noise, modality)
    rows = []
    for name in names:
        try:
            step, setup_fn, prep_s = candidate(setup, name)
            t0 = time.perf_counter()
            if setup_fn:
                setup_fn()
            score, emb = step(semantic, noise, modality)  # first call: compiles where it does
            first_call_s = time.perf_counter() - t0
            baseline()
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot run here is reported, not fatal
            baseline()
            print(f"[precision] {setup.name:8s} {name}: failed: {type(exc).__name__}: {exc}", flush=True)
            rows.append({"model": setup.name, "candidate": name, "error": f"{type(exc).__name__}: {exc}"})
            continue
        res = alternate({
            "fp32": lambda: ref(semantic, noise, modality),
            name: lambda step=step: step(semantic, noise, modality),
        }, batch, reps, target_s, setups={"fp32": baseline, **({name: setup_fn} if setup_fn else {})})
        baseline()
        row = {"model": setup.name, "candidate": name, "batch": batch,
               "fp32_img_s": res["median"]["fp32"], "candidate_img_s": res["median"][name],
               "speedup": ratio_of(res, name, "fp32"), "prepare_s": prep_s, "first_call_s": first_call_s,
               "max_score_diff_random": float(np.max(np.abs(score - ref_score))),
               "max_embedding_diff_random": float(np.max(np.abs(emb - ref_emb))), **res}
        print(f"[precision] {setup.name:8s} {name:14s} batch {batch}: fp32 {row['fp32_img_s']:7.2f} img/s, "
              f"{name} {row['candidate_img_s']:7.2f} img/s, speed-up {row['speedup']:.2f}x (target >= 1.8)  "
              f"max |score diff| {row['max_score_diff_random']:.2e}  prepare {prep_s:.1f}s "
              f"first call {first_call_s:.1f}s  load {res['loadavg'][0][0]}..{res['loadavg'][-1][0]}", flush=True)
        rows.append(row)
    return rows


def accuracy_images(data: Path | None, pydicom_files: int) -> list[Any]:
    """Labelled samples of ``data`` (``detector.dataset.discover``) plus unlabelled pydicom test files."""
    from detector.dataset import discover

    samples = list(discover(data)) if data is not None else []
    extra = []
    if pydicom_files:
        import pydicom.data

        folder = Path(pydicom.data.__file__).parent / "test_files"
        extra = sorted(folder.glob("*.dcm"))[:pydicom_files]
    return samples + extra


def accuracy(bundle: Path, names: list[str], data: Path | None, pydicom_files: int,
             device: torch.device | str = "cpu") -> list[dict[str, Any]]:
    """Scores of the bundle's fp32 ``Detector`` against each precision on real images."""
    from scipy.stats import spearmanr

    from detector.detector import Detector
    from detector.errors import PreprocessError
    from detector.metrics import binary_metrics
    from detector.preprocess import prepare_file

    items = accuracy_images(data, pydicom_files)
    ref = Detector.load(bundle, device=device)
    prepared, labels = [], []
    for it in items:
        path, modality, label = (it, None, None) if isinstance(it, Path) else (it.path, it.modality, it.label)
        try:
            prepared.append(prepare_file(path, ref.preprocess_config, modality=modality))
        except PreprocessError:
            continue
        labels.append(label)

    def scores(det: Detector) -> tuple[np.ndarray, np.ndarray]:
        fs = []
        for start in range(0, len(prepared), 64):
            fs += det.frame_scores(prepared[start:start + 64])
        return (np.array([f.image_score(det.lam)[0] for f in fs]), np.array([f.image_score(0.0)[0] for f in fs]))

    ref_fused, ref_cls = scores(ref)
    lab = np.array([x for x in labels if x is not None])
    has = np.array([x is not None for x in labels])
    rows = []
    for name in names:
        det = Detector.load(bundle, device=device, precision=name)
        fused, cls = scores(det)
        thr = det.threshold
        row = {"candidate": name, "n_images": len(prepared), "n_labelled": int(has.sum()),
               "max_abs_score_diff": float(np.max(np.abs(fused - ref_fused))),
               "max_abs_classifier_diff": float(np.max(np.abs(cls - ref_cls))),
               "label_agreement": float(np.mean((fused >= thr) == (ref_fused >= thr))),
               "spearman_fused": float(spearmanr(fused, ref_fused).statistic)}
        if has.any():
            for key, (a, b) in {"with_mfrm": (ref_fused, fused), "without_mfrm": (ref_cls, cls)}.items():
                row[f"auc_fp32_{key}"] = binary_metrics(lab, a[has], thr)["auc"]
                row[f"auc_{key}"] = binary_metrics(lab, b[has], thr)["auc"]
                row[f"auc_diff_{key}"] = row[f"auc_{key}"] - row[f"auc_fp32_{key}"]
        print(f"[accuracy] default  {name:14s} {len(prepared)} images: max |score diff| "
              f"{row['max_abs_score_diff']:.2e}, label agreement {row['label_agreement']:.4f}, "
              f"Spearman {row['spearman_fused']:.5f}"
              + (f", AUC fp32 {row['auc_fp32_with_mfrm']:.4f} -> {row['auc_with_mfrm']:.4f} "
                 f"(diff {row['auc_diff_with_mfrm']:+.4f}; target |diff| <= 0.005); without MFRM "
                 f"{row['auc_fp32_without_mfrm']:.4f} -> {row['auc_without_mfrm']:.4f}" if has.any() else ""),
              flush=True)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="vit-b-16,default")
    ap.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--target-s", type=float, default=2.0, help="seconds per timed block (at least one call)")
    ap.add_argument("--noise-crop", type=int, default=224, help="noise crop of the ViT-B-16 model")
    ap.add_argument("--bank-size", type=int, default=1000, help="random bank entries of the ViT-B-16 model")
    ap.add_argument("--candidates", default="bf16,int8-dynamic,bf16-autocast,threads-1")
    ap.add_argument("--precision-batch", type=int, default=8)
    ap.add_argument("--precision-reps", type=int, default=3)
    ap.add_argument("--accuracy-data", type=Path, default=None,
                    help="benchmarks.generate output to compare precisions on (AUC)")
    ap.add_argument("--pydicom-files", type=int, default=40)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--no-throughput", action="store_true")
    ap.add_argument("--no-precision", action="store_true")
    ap.add_argument("--parts", action="store_true", help="also time the parts of the DSKI step (part 3)")
    ap.add_argument("--parts-batch", type=int, default=8)
    ap.add_argument("--ladder", action="store_true",
                    help="also time the DSKI step built up stage by stage, paired with the backbone")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (as detector.device)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "detect.json")
    args = ap.parse_args(argv)
    from detector.detector import resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        ap.error(str(exc))

    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m for m in args.models.split(",") if m]
    batches = [int(b) for b in args.batches.split(",") if b]
    names = [c for c in args.candidates.split(",") if c]
    result: dict[str, Any] = {"machine": machine_facts(), "torch": torch.__version__, "device": str(device),
                              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                              "threads": torch.get_num_threads(), "args": {k: str(v) for k, v in vars(args).items()},
                              "throughput": [], "precision": [], "accuracy": [], "parts": [], "ladder": []}
    print(f"machine: {result['machine'].get('cpu_model')}, {result['machine']['cpus']} CPUs, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, device {device}"
          + (f" ({result['gpu']})" if result["gpu"] else "") + f", load {result['machine']['loadavg']}", flush=True)
    for m in models:
        setup = (vit_b16_setup(args.noise_crop, args.bank_size) if m == "vit-b-16" else bundle_setup(args.bundle)).to(device)
        if not args.no_throughput:
            result["throughput"] += throughput(setup, batches, args.reps, args.target_s)
        if args.parts:
            result["parts"].append(parts(setup, args.parts_batch, args.reps, args.target_s))
        if args.ladder:
            result["ladder"].append(ladder(setup, args.parts_batch, args.reps, args.target_s))
        if not args.no_precision and names:
            result["precision"] += precision_candidates(setup, names, args.precision_batch,
                                                        args.precision_reps, args.target_s)
        del setup
    acc_names = [n for n in names if n in ("bf16", "int8-dynamic")]
    if not args.no_precision and acc_names and "default" in models:
        result["accuracy"] = accuracy(args.bundle, acc_names, args.accuracy_data, args.pydicom_files, device)
    result["machine"]["loadavg_end"] = loadavg()
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
