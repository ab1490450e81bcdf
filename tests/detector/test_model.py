"""Model core: backbone loading, noise residuals, CDFA, head, DSKI and baselines (tiny, CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from detector.backbone import build_backbone, sha256_file
from detector.cdfa import CDFABlock, NoiseContext, evenly_spaced_blocks
from detector.errors import CheckpointError
from detector.methods import build_model
from detector.model import DSKIModel
from detector.noise import BayarConv2d, SRMResidual, npr_residual, srm_kernels
from detector.spec import BackboneSpec, CDFASpec, ModelSpec

B = 4


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def _batch(spec: ModelSpec, b: int = B):
    g = torch.Generator().manual_seed(1)
    s = spec.backbone.image_size
    semantic = torch.randn(b, 3, s, s, generator=g)
    noise = torch.rand(b, 3, spec.noise_crop, spec.noise_crop, generator=g)
    modality = torch.tensor([0, 1, 9, 0][:b] + [0] * max(0, b - 4), dtype=torch.long)
    return semantic, noise, modality


def _train_step(model, semantic, noise, modality, lr=1e-2):
    model.train()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=lr)
    labels = torch.tensor([0, 1] * (semantic.shape[0] // 2))
    loss = F.cross_entropy(model(semantic, noise, modality), labels)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


# ----------------------------------------------------------------------------- backbone


def test_missing_checkpoint_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "open_clip.bin"
    with pytest.raises(CheckpointError) as err:
        build_backbone(BackboneSpec(checkpoint=missing))
    assert str(missing) in str(err.value)
    assert err.value.path == str(missing)


def test_checkpoint_sha_mismatch_reports_both_hashes_and_good_sha_loads(tmp_path):
    torch.manual_seed(3)
    source, _ = build_backbone(BackboneSpec())
    ckpt = tmp_path / "tiny.pt"
    torch.save(source.state_dict(), ckpt)
    actual = sha256_file(ckpt)
    wrong = "0" * 64
    with pytest.raises(CheckpointError) as err:
        build_backbone(BackboneSpec(checkpoint=ckpt, checkpoint_sha256=wrong))
    assert wrong in str(err.value) and actual in str(err.value)
    assert (err.value.expected_sha256, err.value.actual_sha256) == (wrong, actual)

    torch.manual_seed(4)  # a different random init, overwritten by the checkpoint
    loaded, tokenizer = build_backbone(BackboneSpec(checkpoint=ckpt, checkpoint_sha256=actual))
    for (k, v), (k2, v2) in zip(source.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert all(not p.requires_grad for p in loaded.parameters())
    assert not loaded.training
    assert tokenizer(["a real CT image"]).shape == (1, 32)


def test_real_backbone_without_checkpoint_is_refused():
    with pytest.raises(CheckpointError, match="local open_clip checkpoint"):
        build_backbone(BackboneSpec(name="ViT-L-14", image_size=224))


# ----------------------------------------------------------------------------- noise


def test_constant_image_gives_zero_residuals():
    sums = srm_kernels().double().sum(dim=(1, 2))
    assert torch.allclose(sums, torch.zeros(3, dtype=torch.float64), atol=1e-7)
    x = torch.full((2, 3, 16, 16), 0.37)
    assert torch.allclose(SRMResidual()(x), torch.zeros(2, 9, 16, 16), atol=1e-6)
    assert torch.allclose(SRMResidual(per_channel=False)(x), torch.zeros(2, 3, 16, 16), atol=1e-6)
    bayar = BayarConv2d(3, 4, 5)
    assert torch.allclose(bayar.constrained_weight().sum(dim=(1, 2, 3)), torch.zeros(4), atol=1e-5)
    assert torch.allclose(bayar(x), torch.zeros(2, 4, 16, 16), atol=1e-5)
    assert torch.equal(npr_residual(x), torch.zeros_like(x))
    assert torch.equal(npr_residual(torch.full((1, 1, 5, 7), 0.2)), torch.zeros(1, 1, 5, 7))


def test_srm_responds_to_texture():
    x = torch.rand(1, 3, 16, 16)
    assert SRMResidual()(x).abs().mean() > 1e-3


def test_bayar_constraint_holds_after_large_sgd_step():
    torch.manual_seed(0)
    bayar = BayarConv2d(3, 3, 5)
    opt = torch.optim.SGD(bayar.parameters(), lr=100.0)
    x = torch.rand(2, 3, 12, 12)
    for _ in range(2):
        opt.zero_grad()
        (bayar(x) ** 2).mean().backward()
        opt.step()
    w = bayar.constrained_weight()
    assert torch.equal(w[:, :, 2, 2], torch.full((3, 3), -1.0))
    off = w.sum(dim=(2, 3)) - w[:, :, 2, 2]
    assert torch.allclose(off, torch.ones(3, 3), atol=1e-5)
    assert torch.allclose(bayar(torch.full((1, 3, 12, 12), 0.8)), torch.zeros(1, 3, 12, 12), atol=1e-5)
    bayar.project_()
    assert torch.allclose(bayar.weight, w.detach(), atol=1e-6)


def test_fused_residuals_equal_the_three_extractors_and_carry_gradients():
    """NoiseEncoder filters SRM and Bayar in one convolution; it must match each extractor run alone."""
    from detector.cdfa import NoiseEncoder

    enc = NoiseEncoder(width=32, grid=4)
    x = torch.rand(3, 3, 23, 17)  # odd sizes: reflection borders and NPR's last row and column
    separate = torch.cat([enc.srm(x), enc.bayar(x), npr_residual(x)], dim=1)
    fused = enc.residuals(x)
    assert fused.shape == separate.shape == (3, 9 + 3 + 3, 23, 17)
    assert torch.allclose(fused, separate, atol=1e-6)
    fused.square().mean().backward()
    assert enc.bayar.weight.grad is not None and enc.bayar.weight.grad.abs().sum() > 0
    # A Bayar kernel of another size than SRM's takes the separate path, with the same result layout.
    other = NoiseEncoder(width=32, grid=4, bayar_size=3)
    assert torch.allclose(other.residuals(x), torch.cat([other.srm(x), other.bayar(x), npr_residual(x)], 1))
    with pytest.raises(ValueError, match="per_channel"):
        SRMResidual(per_channel=False).dense_kernels()


@pytest.mark.parametrize(("patch", "size"), [(8, 64), (8, 72), (4, 37), (6, 50), (2, 13)])
def test_patch_stem_folds_into_one_convolution(patch, size):
    """Residual filters then the patch convolution equal the folded kernel, borders and odd sizes included."""
    from detector.cdfa import NoiseEncoder

    enc = NoiseEncoder(width=32, grid=4, stem="patch", patch=patch)
    with torch.no_grad():
        enc.bayar.weight.normal_()  # a trained-looking Bayar bank, not the feasible start
        enc.bayar.project_()
        enc.stem[0].weight.normal_()
    folded = enc.fold()
    assert folded is not None and folded.stride == patch
    assert folded.weight.shape == (16, 3, patch + 4, patch + 4)
    x = torch.rand(3, 3, size, size)
    with torch.no_grad():
        plain = enc.stem(enc.residuals(x))
        p = folded.pad
        one = F.conv2d(F.pad(x, (p, p, p, p), mode="reflect"), folded.weight, folded.bias, stride=patch)
        reference = enc.stem[0](enc.residuals(x))
        assert (one - reference).abs().max() <= 1e-5 * reference.abs().max()
        assert torch.allclose(enc(x, folded), enc(x), atol=1e-5)
    assert plain.shape[-1] == size // patch


def test_only_a_patch_stem_with_an_even_patch_folds():
    from detector.cdfa import NoiseEncoder

    assert NoiseEncoder(width=32, grid=4).fold() is None  # "conv": a GELU between its convolutions
    assert NoiseEncoder(width=32, grid=4, stem="patch", patch=7).fold() is None  # NPR's 2x2 cells
    assert NoiseEncoder(width=32, grid=4, stem="patch", patch=8, bayar_size=3).fold() is None
    with pytest.raises(ValueError, match="unknown noise stem 'pixel'"):
        NoiseEncoder(width=32, grid=4, stem="pixel")


def test_inference_takes_the_folded_stem_and_training_does_not():
    spec = ModelSpec(cdfa=CDFASpec(noise_stem="patch"))
    model = DSKIModel(spec)
    assert model.noise_encoder.stem[0].kernel_size == (8, 8)  # 64 px crop over the 8x8 token grid
    semantic, noise, modality = _batch(spec)
    _train_step(model, semantic, noise, modality)
    model.eval()
    with torch.no_grad():
        plain = model(semantic, noise, modality)
    model.prepare_inference()
    assert model._folded_stem is not None
    with torch.no_grad():
        assert torch.allclose(model(semantic, noise, modality), plain, atol=1e-5)
    state = copy.deepcopy(model.state_dict())
    model.load_state_dict(state)  # new weights: the fold made from the old ones is dropped
    assert model._folded_stem is None
    model.prepare_inference()
    model.train()
    assert model._folded_stem is None


def test_npr_on_known_4x4_and_odd_sizes():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    expected = torch.tensor([[0, 1, 0, 1], [4, 5, 4, 5], [0, 1, 0, 1], [4, 5, 4, 5]], dtype=torch.float32)
    assert torch.equal(npr_residual(x)[0, 0], expected)
    odd = torch.arange(15.0).view(1, 1, 3, 5)
    r = npr_residual(odd)
    assert r.shape == odd.shape
    # The last row and column (even indices) keep their own sample: [[0 1 0 1 0] [5 6 5 6 5] [0 1 0 1 0]].
    assert torch.equal(r[0, 0], torch.tensor([[0.0, 1, 0, 1, 0], [5, 6, 5, 6, 5], [0, 1, 0, 1, 0]]))


# ----------------------------------------------------------------------------- CDFA


def test_evenly_spaced_blocks():
    assert evenly_spaced_blocks(24, 3) == (5, 11, 17)
    assert evenly_spaced_blocks(12, 3) == (2, 5, 8)
    assert evenly_spaced_blocks(4, 3) == (0, 1, 2)
    assert evenly_spaced_blocks(4, 9) == (0, 1, 2)


def test_cdfa_block_sequence_first_layout_and_missing_tokens():
    ctx = NoiseContext()
    blk = CDFABlock(torch.nn.Identity(), width=8, bottleneck=2, context=ctx, batch_first=False)
    x = torch.randn(5, 2, 8)  # (L, B, D): 1 class token + 4 patch tokens
    with pytest.raises(RuntimeError, match="noise tokens"):
        blk(x)
    with torch.no_grad():
        blk.gate.fill_(10.0)  # tanh -> 1
    tokens = torch.randn(2, 4, 8)
    with ctx.bind(tokens):
        out = blk(x)
    assert ctx.tokens is None
    assert torch.equal(out[0], x[0])  # class token untouched
    assert torch.allclose(out[1:], x[1:] + tokens.transpose(0, 1), atol=1e-5)


def test_noise_context_is_per_thread():
    import threading

    ctx = NoiseContext()
    seen = []
    with ctx.bind(torch.ones(1)):
        t = threading.Thread(target=lambda: seen.append(ctx.tokens))
        t.start()
        t.join()
        assert ctx.tokens is not None
    assert seen == [None]
    assert copy.deepcopy(ctx).tokens is None


# ----------------------------------------------------------------------------- DSKI


@pytest.fixture
def dski():
    spec = ModelSpec()
    clip, tok = build_backbone(spec.backbone)
    reference = copy.deepcopy(clip)
    return spec, DSKIModel(spec, (clip, tok)), reference


def test_adapted_embedding_equals_backbone_at_init(dski):
    spec, model, reference = dski
    semantic, noise, _ = _batch(spec)
    model.eval()
    with torch.no_grad():
        adapted = model.image_embedding(semantic, noise)
        frozen = reference.encode_image(semantic)
        embedded = model.embed(semantic, noise)
    assert torch.equal(adapted, frozen)
    assert torch.equal(embedded, F.normalize(frozen, dim=-1))
    # With autograd on, attention takes another kernel path than the reference under no_grad.
    model.train()
    assert torch.allclose(model.image_embedding(semantic, noise), frozen, atol=1e-5)


def test_backward_reaches_adapters_only(dski):
    spec, model, _ = dski
    semantic, noise, modality = _batch(spec)
    model.train()
    loss = F.cross_entropy(model(semantic, noise, modality), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    frozen = [(n, p) for n, p in model.named_parameters() if n.startswith("backbone.") and ".block." not in n
              and ".adapter." not in n and not n.endswith(".gate")]
    frozen += [(n, p) for n, p in model.named_parameters() if ".block." in n]
    assert len(frozen) > 50
    for n, p in frozen:
        assert not p.requires_grad and p.grad is None, n
    trainable = dict(model.named_trainable_parameters())
    assert "head.context" in trainable and "head.log_logit_scale" in trainable
    assert any(n.startswith("noise_encoder.") for n in trainable)
    for n, p in trainable.items():
        assert p.grad is not None, n
    blk = model.cdfa_blocks()[0]
    assert blk.gate.grad.abs().sum() > 0 and blk.adapter.up.weight.grad.abs().sum() > 0
    # The state dict splits into frozen open_clip weights and what training produces.
    state = model.state_dict()
    names = dict(model.named_parameters())
    for k in state:
        if k in names:
            assert model.is_frozen_key(k) == (not names[k].requires_grad), k
    assert not model.is_frozen_key("head.text_cache")


def test_one_step_changes_output(dski):
    spec, model, _ = dski
    semantic, noise, modality = _batch(spec)
    model.eval()
    with torch.no_grad():
        before_logits = model(semantic, noise, modality)
        before_emb = model.embed(semantic, noise)
    _train_step(model, semantic, noise, modality)
    model.eval()
    with torch.no_grad():
        after_logits = model(semantic, noise, modality)
        after_emb = model.embed(semantic, noise)
    assert not torch.allclose(before_logits, after_logits)
    assert not torch.allclose(before_emb, after_emb)


def test_head_logits_are_scaled_cosines_and_cache_matches_live(dski):
    spec, model, _ = dski
    semantic, noise, modality = _batch(spec)
    model.eval()
    head = model.head
    with torch.no_grad():
        emb = model.embed(semantic, noise)
        live = head.live_text_embeddings()
        assert live.shape == (len(spec.head.modalities), 2, head.embed_dim)
        assert torch.allclose(live.norm(dim=-1), torch.ones(live.shape[:2]), atol=1e-5)
        cos = [F.cosine_similarity(emb, live[modality, k], dim=-1) for k in (0, 1)]
        manual = head.logit_scale() * torch.stack(cos, dim=1)
        logits = model(semantic, noise, modality)
        assert torch.allclose(logits, manual, atol=1e-5)
        assert torch.allclose(head.logit_scale(), torch.tensor(spec.head.init_logit_scale))

        model.prepare_inference()
        assert bool(head.text_cache_valid)
        assert torch.allclose(head.text_cache, live, atol=1e-6)
        assert torch.allclose(model(semantic, noise, modality), logits, atol=1e-5)
    model.train()
    assert not bool(head.text_cache_valid)  # training changes the context: cache dropped
    # Unknown modality -> last entry; None -> last entry.
    assert model.modality_index("XYZ") == len(spec.head.modalities) - 1
    assert model.modality_index("ct") == 0
    assert model.modality_indices(["MR", None]).tolist() == [1, len(spec.head.modalities) - 1]


def test_state_dict_round_trip_reproduces_scores(dski):
    spec, model, _ = dski
    semantic, noise, modality = _batch(spec)
    _train_step(model, semantic, noise, modality)
    model.prepare_inference()
    with torch.no_grad():
        expected = model(semantic, noise, modality)
    torch.manual_seed(123)
    fresh = build_model(spec)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    assert bool(fresh.head.text_cache_valid)
    with torch.no_grad():
        assert torch.allclose(fresh(semantic, noise, modality), expected, atol=1e-6)


def test_wrong_semantic_size_is_a_clear_error(dski):
    spec, model, _ = dski
    with pytest.raises(ValueError, match="64x64"):
        model(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 64, 64))


# ----------------------------------------------------------------------------- baselines


@pytest.mark.parametrize("method", ["univfd", "npr", "cnnspot"])
def test_baselines_shapes_and_gradients(method):
    spec = ModelSpec(method=method)
    model = build_model(spec)
    semantic, noise, modality = _batch(spec)
    model.train()
    logits = model(semantic, noise, modality)
    assert logits.shape == (B, 2)
    F.cross_entropy(logits, torch.tensor([0, 1, 0, 1])).backward()
    trainable = model.trainable_parameters()
    assert trainable and all(p.grad is not None for p in trainable)
    for n, p in model.named_parameters():
        if model.is_frozen_key(n):
            assert p.grad is None and not p.requires_grad, n
    model.eval()
    with torch.no_grad():
        emb, logits2 = model.embed_and_logits(semantic, noise)
    assert emb.shape[0] == B and torch.allclose(emb.norm(dim=-1), torch.ones(B), atol=1e-5)
    assert logits2.shape == (B, 2)
    if method == "univfd":
        assert model.frozen_prefixes == ("backbone.",)
    else:
        assert model.frozen_prefixes == ()
        # Native-resolution crops of another size work too (no resizing anywhere).
        with torch.no_grad():
            assert model(semantic, torch.rand(B, 3, 40, 40)).shape == (B, 2)


def test_the_folded_stem_moves_with_the_model():
    # Detector(load_bundle(path), device="cuda") moves a model that was folded on the CPU: the
    # fold, a plain attribute, must follow the weights (the meta device stands in for a GPU here).
    model = DSKIModel(ModelSpec(cdfa=CDFASpec(noise_stem="patch"))).prepare_inference()
    model.to("meta")
    assert model._folded_stem is not None
    assert model._folded_stem.weight.device.type == "meta"
    assert model._folded_stem.bias is None or model._folded_stem.bias.device.type == "meta"
    training = DSKIModel(ModelSpec(cdfa=CDFASpec(noise_stem="patch")))
    training.to(torch.float64)  # not folded for inference: nothing to fold again
    assert training._folded_stem is None
