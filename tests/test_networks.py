"""DMAFNet and the DMAF fusion module: masking, de-serialisation, 2D/3D, mixed precision, export."""

from __future__ import annotations

import warnings

import pytest
import torch

from dmaf_components.networks import DMAFFusion, DMAFNet, DMAFNetOutput, grid_to_tokens, masked_softmax, tokens_to_grid


def test_tokens_keep_spatial_positions():
    """Each modality's tokens go back to their own grid positions (the mmFormer reshape scrambles them)."""
    b, m, c, grid = 2, 3, 5, (2, 3, 4)
    grids = torch.arange(b * m * c * 24, dtype=torch.float32).reshape(b * m, c, *grid)
    tokens = grid_to_tokens(grids, m)
    assert tokens.shape == (b, m * 24, c)
    # token m * N + i is voxel i (row-major) of modality m
    n = 24
    for mod in range(m):
        for i in (0, 5, 23):
            z, y, x = i // 12, (i // 4) % 3, i % 4
            assert torch.equal(tokens[1, mod * n + i], grids[1 * m + mod, :, z, y, x])
    back = tokens_to_grid(tokens, m, grid)
    assert torch.equal(back, grids.reshape(b, m, c, *grid))
    # a voxel-major reading of the same tokens (the bug) would not give the grids back
    scrambled = tokens.reshape(b, n, m, c).permute(0, 2, 3, 1).reshape(b, m, c, *grid)
    assert not torch.equal(scrambled, back)


def test_dmaf_weights_follow_the_token_positions():
    """With no transformer layer, the weight map is the per-voxel score of each modality: a bright voxel in one
    modality must raise that modality's weight at that voxel only."""
    fusion = DMAFFusion(3, channels=2, num_modalities=2, token_grid=(4, 4, 4), num_layers=0)
    with torch.no_grad():
        fusion.down.weight.zero_()
        fusion.down.bias.zero_()
        centre = tuple(s // 2 for s in fusion.down.weight.shape[2:])
        for c in range(2):
            fusion.down.weight[(c, c) + centre] = 1.0  # identity convolution
        fusion.pos_embed.zero_()
        fusion.modality_embed.zero_()
        fusion.norm = torch.nn.Identity()
        fusion.score.weight.fill_(1.0)
        fusion.score.bias.zero_()
    feats = torch.zeros(1, 2, 2, 4, 4, 4)
    feats[0, 1, :, 1, 2, 3] = 5.0
    w = fusion.spatial_weights(feats, torch.ones(1, 2, dtype=torch.bool))
    assert w[0, 1, 1, 2, 3] > 0.99
    others = torch.ones_like(w[0, 1], dtype=torch.bool)
    others[1, 2, 3] = False
    assert torch.allclose(w[0, 1][others], torch.full_like(w[0, 1][others], 0.5))


def test_masked_softmax_zero_for_missing_and_no_nan():
    logits = torch.randn(3, 4, 5, 5)
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    w = masked_softmax(logits, mask)
    assert torch.isfinite(w).all()
    assert torch.equal(w[0, 1], torch.zeros(5, 5)) and torch.equal(w[0, 3], torch.zeros(5, 5))
    assert torch.allclose(w[0].sum(0), torch.ones(5, 5))
    assert torch.equal(w[1], torch.zeros(4, 5, 5))  # nothing present: all zero, not NaN
    expected = torch.softmax(logits[0, [0, 2]], dim=0)
    assert torch.allclose(w[0, [0, 2]], expected, atol=1e-6)


@pytest.mark.parametrize("fusion", ["dmaf", "mean", "concat"])
def test_missing_modality_noise_is_ignored_and_gets_no_gradient(fusion, tiny_net_kwargs):
    net = DMAFNet(3, 4, 3, fusion=fusion, **tiny_net_kwargs)
    x = torch.randn(1, 4, 32, 32, 32)
    mask = torch.tensor([[True, False, True, True]])
    noisy = x.clone()
    noisy[:, 1] = torch.randn_like(noisy[:, 1]) * 10
    x[:, 1] = 0
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x, mask), net(noisy, mask))
    net.train()
    out = net(noisy, mask)
    assert isinstance(out, DMAFNetOutput)
    (out.logits.sum() + out.modality_logits.sum()).backward()
    for p in net.encoders[1].parameters():
        assert p.grad is None or not p.grad.any()
    assert net.encoders[0].stages[0].entry.conv.weight.grad.abs().sum() > 0
    assert not out.modality_logits[0, 1].any() and not out.modality_features[0, 1].any()


def test_batched_masked_path_matches_per_sample(tiny_net_kwargs):
    """Batch > 1 with different masks gives what each sample gives alone (batch 1 skips encoders entirely)."""
    net = DMAFNet(3, 4, 3, **tiny_net_kwargs).eval()
    x = torch.randn(3, 4, 32, 32, 32)
    mask = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        batched = net(x, mask)
        single = torch.cat([net(x[i : i + 1], mask[i : i + 1]) for i in range(3)])
    # oneDNN picks other convolution algorithms for other batch sizes: float noise ~1e-5 on logits of ~5; a masking
    # error would differ by O(0.1)
    assert torch.allclose(batched, single, atol=1e-4)


def test_mask_is_derived_from_nonzero_channels(tiny_net_kwargs):
    net = DMAFNet(3, 4, 3, **tiny_net_kwargs).train()
    x = torch.randn(2, 4, 32, 32, 32)
    x[0, 2] = 0
    x[1, :3] = 0
    out = net(x)
    assert out.modality_mask.tolist() == [[True, True, False, True], [False, False, False, True]]


def test_2d_and_3d_shapes(tiny_net_kwargs):
    net3 = DMAFNet(3, 4, 4, **tiny_net_kwargs).train()
    out = net3(torch.randn(1, 4, 32, 32, 32))
    assert [tuple(z.shape[2:]) for z in out.deep_supervision] == [(32,) * 3, (16,) * 3, (8,) * 3, (4,) * 3]
    assert out.modality_logits.shape == (1, 4, 4, 32, 32, 32)
    assert out.modality_features.shape == (1, 4, 32, 4, 4, 4) and out.fused_features.shape == (1, 32, 4, 4, 4)
    net2 = DMAFNet(2, 3, 4, **tiny_net_kwargs).eval()
    with torch.no_grad():
        y = net2(torch.randn(2, 3, 48, 40))
    assert isinstance(y, torch.Tensor) and y.shape == (2, 4, 48, 40)


def test_bad_mask_shape_is_one_clear_error(tiny_net_kwargs):
    net = DMAFNet(3, 4, 3, **tiny_net_kwargs).eval()
    with pytest.raises(ValueError, match="modality_mask must have shape"):
        net(torch.randn(1, 4, 16, 16, 16), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="4 modalities"):
        net(torch.randn(1, 3, 16, 16, 16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_no_nan_with_fully_masked_tokens(dtype, tiny_net_kwargs):
    """Inference on a patch outside the head (every channel zero -> every modality's tokens masked) and training on
    single-modality samples stay finite under fp16/bf16 autocast."""
    from dmaf_components.losses import DMAFLoss

    net = DMAFNet(3, 4, 3, **tiny_net_kwargs).eval()
    x = torch.randn(2, 4, 32, 32, 32)
    x[0] = 0  # no modality at all
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        assert torch.isfinite(net(x)).all()
        assert torch.isfinite(net(x, torch.zeros(2, 4, dtype=torch.bool))).all()
    net.train()
    x = torch.randn(2, 4, 32, 32, 32)
    x[:, 1:] = 0  # a single modality per sample
    with torch.autocast("cpu", dtype=dtype):
        out = net(x)
        loss = DMAFLoss(3, 4, tiny_net_kwargs["channels"][-1])(out, torch.randint(0, 3, (2, 1, 32, 32, 32)))
    assert torch.isfinite(out.logits).all() and torch.isfinite(loss)
    loss.backward()
    for p in net.parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all()


def test_traced_export_matches_eager_for_any_mask(tmp_path, tiny_net_kwargs):
    """The exported (traced TorchScript) model honours masks it never saw during export."""
    from monai.networks.utils import convert_to_torchscript

    net = DMAFNet(3, 4, 3, **tiny_net_kwargs).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_to_torchscript(net, str(tmp_path / "net.ts"), use_trace=True, inputs=[torch.randn(1, 4, 32, 32, 32)])
        loaded = torch.jit.load(str(tmp_path / "net.ts"))
    x = torch.randn(2, 4, 32, 32, 32)
    x[0, 1] = 0
    x[1, :2] = 0
    with torch.no_grad():  # float noise only (the traced graph runs every encoder on the full batch, then zeroes)
        assert torch.allclose(loaded(x), net(x), atol=1e-4)


def test_dropping_missing_tokens_equals_masking_them(monkeypatch):
    """The batch-uniform fast path (missing modalities' tokens left out) gives the masked path's weights."""
    fusion = DMAFFusion(3, channels=8, num_modalities=4, token_grid=(4, 4, 4), num_layers=2, num_heads=2).eval()
    feats = torch.randn(2, 4, 8, 8, 8, 8)
    feats[:, 1] = 0
    mask = torch.tensor([[True, False, True, True]] * 2)
    with torch.no_grad():
        fast = fusion.spatial_weights(feats, mask)
        monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)  # forces the attention-mask path
        masked = fusion.spatial_weights(feats, mask)
    assert torch.allclose(fast, masked, atol=1e-5)
    assert torch.equal(fast[:, 1], torch.zeros_like(fast[:, 1]))


def test_sliding_window_inferer_hands_the_study_mask_to_background_windows(tiny_net_kwargs):
    """A window where a present modality happens to be all zero must be segmented with the study's modalities, not
    as if that modality were missing. (A window where every modality is zero gives the same output under any mask:
    instance norm maps every constant map to its bias, so only a partly empty window tells the two apart.)"""
    from dmaf_components.inferers import ModalitySlidingWindowInferer

    net = DMAFNet(3, 4, 3, **tiny_net_kwargs).eval()
    x = torch.zeros(1, 4, 64, 32, 32)
    x[:, [0, 2], :32] = torch.randn(1, 2, 32, 32, 32)  # brain in the first half, FLAIR and T1ce only
    x[:, 0, 32:] = 0.1 * torch.randn(32, 32, 32)  # second half: FLAIR signal only, T1ce zero
    inferer = ModalitySlidingWindowInferer(roi_size=(32, 32, 32), sw_batch_size=2, overlap=0.0)
    with torch.no_grad():
        out = inferer(x, net)
        with_study_mask = net(x[:, :, 32:], torch.tensor([[True, False, True, False]]))
        as_if_missing = net(x[:, :, 32:])  # per-window derivation: T1ce "missing"
    assert torch.allclose(out[:, :, 32:], with_study_mask, atol=1e-4)
    assert not torch.allclose(with_study_mask, as_if_missing, atol=1e-3)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_net_kwargs):
    torch.manual_seed(0)
    plain = DMAFNet(3, 4, 3, **tiny_net_kwargs).train()
    ckpt = DMAFNet(3, 4, 3, gradient_checkpointing=True, **tiny_net_kwargs).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 4, 32, 32, 32)
    mask = torch.tensor([[True, False, True, True]])
    for net in (plain, ckpt):
        out = net(x, mask)
        (out.logits.square().mean() + out.modality_logits.square().mean()).backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-5), name


@pytest.mark.parametrize("fusion", ["dmaf", "mean", "concat"])
@pytest.mark.parametrize("present", [[True, True, True, True], [True, False, True, False]])
def test_present_only_path_matches_the_zero_filled_path(fusion, present, tiny_net_kwargs, monkeypatch):
    """Batch 1 (or a mask shared by the batch) runs only the present modalities, packed; it must give the outputs and
    gradients of the general zero-filled path."""
    net = DMAFNet(3, 4, 3, fusion=fusion, **tiny_net_kwargs).train()
    x = torch.randn(2, 4, 32, 32, 32)
    mask = torch.tensor([present] * 2)
    results = []
    for force_dense in (False, True):
        if force_dense:
            monkeypatch.setattr("dmaf_components.networks.dmafnet.shared_present", lambda mask: None)
        net.zero_grad()
        out = net(x, mask)
        (
            out.logits.square().mean() + out.modality_logits.square().mean() + out.modality_features.square().mean()
        ).backward()
        grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (packed, g_packed), (dense, g_dense) = results
    for a, b in zip(packed.deep_supervision, dense.deep_supervision):
        assert torch.allclose(a, b, atol=1e-4)
    for field in ("modality_logits", "modality_features", "fused_features"):
        assert torch.allclose(getattr(packed, field), getattr(dense, field), atol=1e-4), field
    assert g_packed.keys() == g_dense.keys()
    for name in g_packed:
        assert torch.allclose(g_packed[name], g_dense[name], atol=1e-4, rtol=1e-3), name
    missing = [m for m, p in enumerate(present) if not p]
    assert not any(n.startswith(f"encoders.{m}.") for m in missing for n in g_packed)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_grouping_by_present_count_matches_one_masked_sequence(spatial_dims):
    """Mixed masks in a batch: the transformer run on the present tokens only, samples grouped by how many
    modalities they have, gives the masked sequence's weights and gradients (incl. a sample with nothing present,
    whose weights are all zero)."""
    size = (8,) * spatial_dims
    fusion = DMAFFusion(
        spatial_dims, channels=16, num_modalities=3, token_grid=(4,) * spatial_dims, num_layers=2, num_heads=2
    ).train()
    mask = torch.tensor([[1, 1, 0], [0, 1, 0], [1, 0, 1], [0, 0, 0], [0, 1, 1], [1, 1, 1], [0, 0, 1]], dtype=torch.bool)
    feats = torch.randn(7, 3, 16, *size) * mask.reshape(7, 3, *(1,) * (spatial_dims + 1))
    results = []
    for grouped in (True, False):
        fusion.group_by_mask = grouped
        fusion.zero_grad()
        x = feats.clone().requires_grad_()
        weights = fusion.spatial_weights(x, mask)
        (weights * torch.linspace(0, 1, weights.numel()).reshape(weights.shape)).sum().backward()
        results.append(
            (
                weights.detach(),
                x.grad,
                fusion.modality_embed.grad.clone(),
                fusion.layers[0].attn.qkv.weight.grad.clone(),
            )
        )
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
    assert not results[0][0][3].any() and torch.allclose(results[0][0][5].sum(0), torch.ones(size))


def test_command_line_false_is_an_error_not_true():
    """`--distillation false` reaches the components as the string "false", which is truthy: a Table-3 ablation
    would silently keep the component on. Every on/off switch refuses anything but a bool."""
    from dmaf_components.handlers import DynamicTrainingMonitor
    from dmaf_components.losses import DMAFLoss

    with pytest.raises(TypeError, match="distillation must be True or False"):
        DMAFLoss(4, 4, 32, distillation="false")
    with pytest.raises(TypeError, match="reweight"):
        DynamicTrainingMonitor(DMAFLoss(4, 4, 32), reweight="false")
    for flag in ("channels_last", "gradient_checkpointing"):
        with pytest.raises(TypeError, match=flag):
            DMAFNet(3, 4, 4, channels=(4, 8), num_layers=1, **{flag: "false"})


def test_every_weight_path_gives_the_reference(monkeypatch):
    """docs/method.md's reference for Eq. 2-3 is ``DMAFFusion.reference_weights`` (one masked sequence of all
    modalities' tokens); each faster path of ``spatial_weights`` must give it: one shared mask (tokens left out),
    packed present features (``present``), mixed masks grouped by present count, and a traced graph."""
    fusion = DMAFFusion(3, channels=8, num_modalities=4, token_grid=(4, 4, 4), num_layers=2, num_heads=2).eval()
    mixed = torch.tensor([[1, 0, 1, 1], [0, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    shared = torch.tensor([[1, 0, 1, 1]] * 2, dtype=torch.bool)
    with torch.no_grad():
        for mask in (mixed, shared):
            feats = torch.randn(mask.shape[0], 4, 8, 8, 8, 8) * mask.reshape(*mask.shape, 1, 1, 1, 1)
            reference = fusion.reference_weights(feats, mask)
            assert torch.allclose(reference.sum(1)[mask.any(1)], torch.ones(1), atol=1e-5)
            assert not reference[~mask].any()  # missing modalities and the empty sample weigh 0
            torch.testing.assert_close(fusion.spatial_weights(feats, mask), reference, atol=1e-5, rtol=1e-4)
            fusion.group_by_mask = False
            torch.testing.assert_close(fusion.spatial_weights(feats, mask), reference, atol=0, rtol=0)
            fusion.group_by_mask = True
        present = torch.tensor([0, 2, 3])
        packed = fusion.spatial_weights(feats.index_select(1, present), shared, present)
        torch.testing.assert_close(packed, reference.index_select(1, present), atol=1e-5, rtol=1e-4)
        monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)
        torch.testing.assert_close(fusion.spatial_weights(feats, shared), reference, atol=0, rtol=0)
