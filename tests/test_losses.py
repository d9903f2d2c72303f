"""Each equation of the DMAF objective against a direct hand computation on small tensors (Eq. 1, 4-10, 17, 19)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from dmaf_components.losses import (
    DMAFLoss,
    PrototypeDistillationLoss,
    RelationDistillationLoss,
    channel_covariance,
    class_prototypes,
)
from dmaf_components.networks import DMAFNetOutput


def test_eq4_covariance_matches_numpy():
    x = torch.randn(2, 3, 4, 5, 6)
    cov = channel_covariance(x)
    for n in range(2):
        expected = np.cov(x[n].reshape(3, -1).numpy(), bias=True)  # population covariance, 1 / (HWD)
        assert np.allclose(cov[n].numpy(), expected, atol=1e-5)


def _rel_inputs():
    e = torch.randn(2, 3, 8, 2, 2, 2)
    f = torch.randn(2, 8, 2, 2, 2)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    return e, f, mask


def _mha_by_hand(mha, q, kv, heads):
    """Eq. 6 written out: per head softmax(Q K^T / sqrt(d)) V, heads concatenated, then the output projection."""
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    d = q.shape[1] // heads
    out = []
    for h in range(heads):
        s = slice(h * d, (h + 1) * d)
        qh, kh, vh = q @ wq[s].T + bq[s], kv @ wk[s].T + bk[s], kv @ wv[s].T + bv[s]
        out.append(torch.softmax(qh @ kh.T / math.sqrt(d), dim=1) @ vh)
    return torch.cat(out, 1) @ mha.out_proj.weight.T + mha.out_proj.bias


def test_eq5_to_8_relation_distillation_by_hand():
    e, f, mask = _rel_inputs()
    rel = RelationDistillationLoss(8, 3, num_heads=2, alpha1=0.6)
    with torch.no_grad():
        rel.projection[2] = torch.randn(8, 8)  # a non-identity P for modality 2
    cov, attn = rel.pair_terms(e, f, mask)
    loss, gap = rel(e, f, mask)
    a = 0.6
    per_sample = []
    for n in range(2):
        gaps = []
        for m in range(3):
            if not mask[n, m]:
                assert cov[n, m] == 0 and attn[n, m] == 0 and gap[n, m] == 0
                continue
            w = rel.projection[m]
            sig_e = torch.cov(e[n, m].reshape(8, -1), correction=0)  # Eq. 4, population covariance over voxels
            sig_f = torch.cov(f[n].reshape(8, -1), correction=0)
            want_cov = ((w @ sig_e @ w.T - sig_f) ** 2).mean()  # Eq. 5 (mean squared error)
            q = e[n, m].reshape(8, -1).T[None]
            kv = f[n].reshape(8, -1).T[None]
            a_m = _mha_by_hand(rel.attention, q[0], kv[0], heads=2)[None]  # Eq. 6
            want_attn = ((a_m - kv) ** 2).mean()  # Eq. 7
            assert torch.allclose(cov[n, m], want_cov, rtol=1e-4)
            assert torch.allclose(attn[n, m], want_attn, rtol=1e-4)
            gaps.append(a * want_cov + (1 - a) * want_attn)  # Eq. 11 g_r
            assert torch.allclose(gap[n, m], gaps[-1], rtol=1e-4)
        per_sample.append(sum(gaps) / len(gaps))  # Eq. 8: 1/|M| over valid modalities
    assert torch.allclose(loss, sum(per_sample) / 2, rtol=1e-4)


def test_alpha1_learnable_and_bounded():
    rel = RelationDistillationLoss(8, 3, num_heads=2, alpha1=0.6)
    assert math.isclose(float(rel.alpha1), 0.6, rel_tol=1e-6)
    e, f, mask = _rel_inputs()
    rel(e, f, mask)[0].backward()
    assert rel.alpha1_logit.grad is not None and rel.alpha1_logit.grad != 0
    with torch.no_grad():
        rel.alpha1_logit.fill_(50.0)
    assert 0 < float(rel.alpha1) <= 1.0
    frozen = RelationDistillationLoss(8, 3, learn_alpha1=False)
    assert "alpha1_logit" not in dict(frozen.named_parameters())
    with pytest.raises(ValueError, match="alpha1"):
        RelationDistillationLoss(8, 3, alpha1=1.0)


def test_teacher_is_detached():
    e, f, mask = _rel_inputs()
    e.requires_grad_(True)
    f.requires_grad_(True)
    RelationDistillationLoss(8, 3, num_heads=2)(e, f, mask)[0].backward()
    assert f.grad is None and e.grad.abs().sum() > 0


def test_eq9_prototypes_by_hand():
    feats = torch.randn(1, 4, 3, 3, 3)
    label = torch.randint(0, 3, (1, 3, 3, 3))
    onehot = F.one_hot(label, 3).movedim(-1, 1).float()
    protos = class_prototypes(feats, onehot, eps=1e-6)
    for c in range(3):
        sel = label[0] == c
        want = feats[0][:, sel].sum(1) / (sel.sum() + 1e-6)
        assert torch.allclose(protos[0, c], want, atol=1e-5)


def test_eq10_prototype_loss_by_hand_with_tau_and_absent_class():
    e = torch.randn(1, 2, 4, 4, 4, 4)
    f = torch.randn(1, 4, 4, 4, 4)
    label = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    label[..., :3, :, :] = 2  # fine rows 0-2: class 2; the boundary cuts coarse row 1 in half
    label[0, 0, 7, 7, 7] = 1  # one voxel of class 1: nearest-neighbour downsampling (even indices) would erase it
    mask = torch.tensor([[True, True]])
    proto = PrototypeDistillationLoss(3, 2, tau=[1.0, 2.0])
    loss, gap = proto(e, f, label, mask)
    # area-averaged memberships on the 4^3 grid, each coarse voxel = 2x2x2 fine voxels, by hand:
    w = torch.zeros(3, 4, 4, 4)
    w[2, 0], w[2, 1], w[0, 1], w[0, 2:] = 1.0, 0.5, 0.5, 1.0  # row 1: 4 of 8 fine voxels are class 2
    w[0, 3, 3, 3], w[1, 3, 3, 3] = 7 / 8, 1 / 8  # the class-1 voxel is 1 of the 8 under coarse (3, 3, 3)

    def protos(x):  # Eq. 9 with soft memberships: sum_x w_c(x) feat(x) / (sum_x w_c(x) + eps)
        return torch.stack([(w[c] * x).flatten(1).sum(1) / (w[c].sum() + 1e-6) for c in range(3)])

    p_f = protos(f[0])
    want = []
    for m, tau in enumerate([1.0, 2.0]):
        p_m = protos(e[0, m])
        g = sum(1 - F.cosine_similarity(p_f[c], p_m[c], dim=0) / tau for c in (0, 1, 2))  # all three present
        assert torch.allclose(gap[0, m], g, atol=1e-5)
        want.append(g)
    assert torch.allclose(loss, (want[0] + want[1]) / 2, atol=1e-5)


def _fake_output(b=2, m=3, k=3, size=8, c=4):
    logits = torch.randn(b, k, size, size, size)
    ds = [logits, torch.randn(b, k, size // 2, size // 2, size // 2)]
    return DMAFNetOutput(
        logits=logits,
        deep_supervision=ds,
        modality_logits=torch.randn(b, m, k, size, size, size),
        modality_features=torch.randn(b, m, c, 2, 2, 2),
        fused_features=torch.randn(b, c, 2, 2, 2),
        modality_mask=torch.tensor([[True, False, True], [True, True, False]])[:b],
    )


def test_eq1_17_19_total_loss_by_hand():
    out = _fake_output()
    y = torch.randint(0, 3, (2, 1, 8, 8, 8))
    loss_fn = DMAFLoss(3, 3, 4, lambdas=(2.0, 1.0, 0.5, 0.5))
    loss_fn.modality_weights.copy_(torch.tensor([0.2, 0.5, 0.3]))
    total = loss_fn(out, y)
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
    up = F.interpolate(out.deep_supervision[1], size=(8, 8, 8), mode="trilinear")
    l_fuse = 0.5 * dice_ce(out.deep_supervision[0], y) + 0.25 * dice_ce(up, y)  # lambda_l = 1 / 2^l
    # L_sep: modality 0 present in both samples, 1 only in sample 1, 2 only in sample 0
    l_sep = (
        0.2 * dice_ce(out.modality_logits[:, 0], y)
        + 0.5 * dice_ce(out.modality_logits[1:, 1], y[1:]) / 2
        + 0.3 * dice_ce(out.modality_logits[:1, 2], y[:1]) / 2
    )
    terms = loss_fn.last_terms
    assert torch.allclose(terms.fuse, l_fuse, rtol=1e-5)
    assert torch.allclose(terms.sep, l_sep, rtol=1e-5)
    want = 2.0 * l_fuse + 1.0 * l_sep + 0.5 * terms.rel + 0.5 * terms.proto
    assert torch.allclose(total, want, rtol=1e-5)
    assert terms.modality_count.tolist() == [2.0, 1.0, 1.0]


def test_distillation_off_still_monitors_gaps_without_gradient():
    out = _fake_output()
    feats = out.modality_features.requires_grad_(True)
    out.modality_logits.requires_grad_(True)
    y = torch.randint(0, 3, (2, 1, 8, 8, 8))
    for distillation in (True, False):
        loss_fn = DMAFLoss(3, 3, 4, distillation=distillation)
        tracked = []  # does L_rel / L_proto, as computed inside DMAFLoss, carry a graph?
        for term in (loss_fn.relation, loss_fn.prototype):
            term.register_forward_hook(lambda mod, args, result: tracked.append(result[0].requires_grad))
        total = loss_fn(out, y)
        assert tracked == [distillation, distillation]
    terms = loss_fn.last_terms
    assert torch.allclose(total, 2.0 * terms.fuse + terms.sep)
    assert terms.relation_gap_sum.sum() > 0 and terms.prototype_gap_sum.sum() > 0
    total.backward()
    assert out.modality_logits.grad.abs().sum() > 0  # L_sep does train the modality heads
    assert feats.grad is None  # no distillation gradient reaches the encoder features
    assert all(p.grad is None for p in loss_fn.parameters())  # nor P_m, the MAA attention, alpha1


def test_loss_rejects_eval_output():
    with pytest.raises(TypeError, match="training-mode"):
        DMAFLoss(3, 3, 4)(torch.randn(1, 3, 8, 8, 8), torch.zeros(1, 1, 8, 8, 8))
