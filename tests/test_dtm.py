"""Dynamic Training Monitoring: Eq. 12-18 by hand, a toy two-modality run, Ignite wiring and state round trip."""

from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents
from torch import nn

from dmaf_components.handlers import DynamicTrainingMonitor
from dmaf_components.losses import DMAFLoss


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_eq12_to_16_by_hand():
    loss = DMAFLoss(3, 2, 4)
    dtm = DynamicTrainingMonitor(loss, nn.Module())
    # first observation initialises the EMA
    dtm.update(torch.tensor([0.4, 0.2]), torch.tensor([0.1, 0.3]), torch.tensor([1.0, 1.0]))
    assert dtm.ema_relation.tolist() == pytest.approx([0.4, 0.2])
    # second: adaptive decay from the previous ratio (Eq. 13); counts average the sums
    dtm.update(torch.tensor([1.0, 0.5]), torch.tensor([0.4, 0.1]), torch.tensor([2.0, 1.0]))
    eps = 1e-8
    want_r, want_p = [], []
    for prev_r, prev_p, g_r, g_p in [(0.4, 0.1, 0.5, 0.2), (0.2, 0.3, 0.5, 0.1)]:
        a = 0.9 * (1 - _sig((prev_r + eps) / (prev_p + eps)))
        want_r.append(a * prev_r + (1 - a) * g_r)
        want_p.append(a * prev_p + (1 - a) * g_p)
    assert dtm.ema_relation.tolist() == pytest.approx(want_r)
    assert dtm.ema_prototype.tolist() == pytest.approx(want_p)
    a2 = (sum(want_r) / 2) / (sum(want_r) / 2 + sum(want_p) / 2)  # Eq. 15
    assert dtm.alpha2 == pytest.approx(a2)
    total = [a2 * r + (1 - a2) * p for r, p in zip(want_r, want_p)]  # Eq. 14
    inv = [1 / t for t in total]
    w = [i / sum(inv) for i in inv]  # Eq. 16
    assert dtm.weights().tolist() == pytest.approx(w)
    assert dtm.gammas().tolist() == pytest.approx([min(max(1 / x, 0.1), 10.0) for x in w])
    # a modality absent from the batch keeps its EMA
    before = dtm.ema_relation.clone()
    dtm.update(torch.tensor([9.0, 0.0]), torch.tensor([9.0, 0.0]), torch.tensor([1.0, 0.0]))
    assert dtm.ema_relation[1] == before[1] and dtm.ema_relation[0] != before[0]


class _TwoEncoders(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoders = nn.ModuleList([nn.Linear(3, 1, bias=False), nn.Linear(3, 1, bias=False)])


def test_eq18_gradient_scaling_and_conflict_factor():
    net = _TwoEncoders()
    loss = DMAFLoss(3, 2, 4)
    dtm = DynamicTrainingMonitor(loss, net)
    dtm.update(torch.tensor([0.3, 0.1]), torch.tensor([0.3, 0.1]), torch.ones(2))
    # by hand: alpha2 = 0.2 / (0.2 + 0.2) = 0.5, g_total = (0.3, 0.1) (Eq. 14-15); 1 / g = (10/3, 10), so
    # w = (0.25, 0.75) (Eq. 16) and gamma = 1 / w = (4, 4/3), inside the clip [0.1, 10] (Eq. 18)
    gamma = torch.tensor([4.0, 4.0 / 3.0])
    assert torch.allclose(dtm.gammas().float(), gamma)
    g0 = torch.tensor([[1.0, 2.0, 3.0]])
    net.encoders[0].weight.grad = g0.clone()
    net.encoders[1].weight.grad = g0.clone()
    dtm.scale_gradients(net.encoders)
    assert torch.allclose(net.encoders[0].weight.grad, g0 * gamma[0].float())
    # next iteration: encoder 0's gradient reverses (cos = -1 < -0.5) -> 0.7 gamma; encoder 1 keeps direction
    net.encoders[0].weight.grad = -g0.clone()
    net.encoders[1].weight.grad = 2 * g0.clone()
    dtm.scale_gradients(net.encoders)
    assert torch.allclose(net.encoders[0].weight.grad, -g0 * 0.7 * gamma[0].float())
    assert torch.allclose(net.encoders[1].weight.grad, 2 * g0 * gamma[1].float())
    assert dtm.similarity[0] == pytest.approx(-1.0) and dtm.similarity[1] == pytest.approx(1.0)
    # a non-finite gradient (AMP overflow) is left alone and does not become the "previous" one
    prev = dtm.prev_grads[0].clone()
    net.encoders[0].weight.grad = torch.tensor([[float("inf"), 1.0, 1.0]])
    dtm.scale_gradients(net.encoders)
    assert torch.equal(dtm.prev_grads[0], prev)
    # Eq. 18's clip: g_total = (1, 0.01) gives w = (1/101, 100/101), 1 / w = (101, 1.01) -> gamma = (10, 1.01)
    lagging = DynamicTrainingMonitor(loss, net)
    lagging.update(torch.tensor([1.0, 0.01]), torch.tensor([1.0, 0.01]), torch.ones(2))
    assert lagging.gammas().tolist() == pytest.approx([10.0, 1.01])
    net.encoders[0].weight.grad = g0.clone()
    lagging.scale_gradients(net.encoders)
    assert torch.allclose(net.encoders[0].weight.grad, 10.0 * g0)


def _toy_engine(net, loss, dtm, gaps):
    """An engine whose iterations feed fixed gaps: modality 0 lags (larger gap) behind modality 1."""

    def step(engine, _):
        g_r, g_p = gaps
        from dmaf_components.losses import DMAFLossTerms

        z = torch.zeros(())
        loss.last_terms = DMAFLossTerms(z, z, z, z, z, g_r, g_p, torch.ones(2), torch.tensor(0.6))
        for enc in net.encoders:
            enc.weight.grad = torch.ones_like(enc.weight)
        engine.state.output = {"loss": 0.0}  # as MONAI's SupervisedTrainer: set before BACKWARD_COMPLETED fires
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        return engine.state.output

    engine = Engine(step)
    engine.register_events(*IterationEvents)
    dtm.attach(engine)
    return engine


def test_toy_two_modalities_rebalance_and_state_round_trip():
    net = _TwoEncoders()
    loss = DMAFLoss(3, 2, 4)
    dtm = DynamicTrainingMonitor(loss, net, modality_names=["flair", "t1"])
    assert loss.modality_weights.tolist() == pytest.approx([0.5, 0.5])
    engine = _toy_engine(net, loss, dtm, (torch.tensor([0.8, 0.2]), torch.tensor([0.6, 0.1])))
    engine.run(range(5), max_epochs=1)
    w = loss.modality_weights
    # Eq. 16: the lagging modality (larger gap) gets the smaller L_sep weight and the larger gradient scale
    assert w[0] < 0.5 < w[1] and w.sum() == pytest.approx(1.0)
    assert dtm.gammas()[0] > dtm.gammas()[1]
    assert net.encoders[0].weight.grad[0, 0] == pytest.approx(float(dtm.gammas()[0]))
    assert engine.state.dtm["dtm/w/flair"] == pytest.approx(float(w[0]))
    assert engine.state.dtm["dtm/gamma/t1"] == pytest.approx(float(dtm.gammas()[1]))

    state = dtm.state_dict()
    loss2 = DMAFLoss(3, 2, 4)
    restored = DynamicTrainingMonitor(loss2, net, modality_names=["flair", "t1"])
    restored.load_state_dict(state)
    assert torch.equal(restored.ema_relation, dtm.ema_relation) and torch.equal(restored.seen, dtm.seen)
    assert torch.equal(restored.prev_grads[0], dtm.prev_grads[0])
    assert torch.allclose(loss2.modality_weights, loss.modality_weights)


def test_reweight_off_keeps_unit_weights_and_update_mode_scales_the_step():
    net = _TwoEncoders()
    loss = DMAFLoss(3, 2, 4)
    dtm = DynamicTrainingMonitor(loss, net, reweight=False, scaling_mode="update")
    opt = torch.optim.AdamW(net.parameters(), lr=0.1, weight_decay=0.0)

    def step(engine, _):
        from dmaf_components.losses import DMAFLossTerms

        z = torch.zeros(())
        loss.last_terms = DMAFLossTerms(
            z, z, z, z, z, torch.tensor([0.8, 0.2]), torch.tensor([0.6, 0.1]), torch.ones(2), torch.tensor(0.6)
        )
        opt.zero_grad()
        for enc in net.encoders:
            enc.weight.grad = torch.ones_like(enc.weight)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        opt.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)

    engine = Engine(step)
    engine.register_events(*IterationEvents)
    dtm.attach(engine)
    before = [enc.weight.detach().clone() for enc in net.encoders]
    engine.run(range(1), max_epochs=1)
    assert loss.modality_weights.tolist() == [1.0, 1.0]
    # AdamW's first step is lr * sign(grad) whatever the gradient scale; "update" mode scales the step itself.
    # gamma by hand: alpha2 = 0.5 / (0.5 + 0.35) = 10/17, g_total = (12.2/17, 2.7/17) (Eq. 14-15); with two
    # modalities 1 / w(m) = 1 + g_total(m) / g_total(other) (Eq. 16), so gamma = (14.9/2.7, 14.9/12.2)
    for m, (enc, gamma) in enumerate(zip(net.encoders, (14.9 / 2.7, 14.9 / 12.2))):
        step_size = (before[m] - enc.weight.detach()).abs().mean()
        assert float(step_size) == pytest.approx(0.1 * gamma, rel=1e-4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="scaling_mode"):
        DynamicTrainingMonitor(DMAFLoss(3, 2, 4), scaling_mode="x")
    with pytest.raises(ValueError, match="modality_names"):
        DynamicTrainingMonitor(DMAFLoss(3, 2, 4), modality_names=["a"])


def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from dmaf_components.losses import DMAFLossTerms

    net = _TwoEncoders()
    loss = DMAFLoss(3, 2, 4)
    dtm = DynamicTrainingMonitor(loss, net)
    z = torch.zeros(())
    # each rank sees different samples: rank 0 only modality 0, rank 1 both with other gaps
    local = [
        (torch.tensor([0.8, 0.0]), torch.tensor([0.4, 0.0]), torch.tensor([1.0, 0.0])),
        (torch.tensor([0.2, 0.3]), torch.tensor([0.2, 0.1]), torch.tensor([1.0, 1.0])),
    ][rank]
    loss.last_terms = DMAFLossTerms(z, z, z, z, z, local[0], local[1], local[2], torch.tensor(0.6))
    engine = Engine(lambda e, b: None)
    engine.state.output = {}
    dtm(engine)
    torch.save(loss.modality_weights.clone(), f"{out_dir}/w{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_compute_identical_weights(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    w0, w1 = torch.load(tmp_path / "w0.pt"), torch.load(tmp_path / "w1.pt")
    assert torch.equal(w0, w1)
    # the reduced gaps: modality 0 mean of (0.8, 0.2) / (0.4, 0.2); modality 1 only from rank 1
    single = DynamicTrainingMonitor(DMAFLoss(3, 2, 4), _TwoEncoders())
    single.update(torch.tensor([1.0, 0.3]), torch.tensor([0.6, 0.1]), torch.tensor([2.0, 1.0]))
    assert torch.allclose(w0.double(), single.weights(), atol=1e-6)


def test_mean_reweight_norm_keeps_lsep_scale_and_gamma():
    """Eq. 16's w sums to 1, so DTM on divides L_sep by about M; ``reweight_norm="mean"`` writes M * w instead (the
    same proportions, L_sep on DTM-off's scale) and leaves gamma (Eq. 18) as Eq. 16 gives it."""
    from dmaf_components.losses import DMAFLossTerms

    m = 3
    losses, monitors = {}, {}
    for norm in ("sum", "mean"):
        losses[norm] = DMAFLoss(2, m, 4)
        monitors[norm] = DynamicTrainingMonitor(losses[norm], reweight_norm=norm, scaling_mode="none")
        z = torch.zeros(())
        losses[norm].last_terms = DMAFLossTerms(
            z,
            z,
            z,
            z,
            z,
            torch.tensor([0.8, 0.2, 0.5]),
            torch.tensor([0.6, 0.1, 0.3]),
            torch.ones(m),
            torch.tensor(0.6),
        )
        monitors[norm].step([])
    w_sum, w_mean = losses["sum"].modality_weights, losses["mean"].modality_weights
    assert abs(float(w_sum.sum()) - 1.0) < 1e-6 and not torch.allclose(w_sum, w_sum.mean().expand(m))
    assert torch.allclose(w_mean, m * w_sum)
    assert torch.equal(monitors["sum"].gammas(), monitors["mean"].gammas())
    logits, target = torch.randn(2, m, 2, 8, 8), torch.randint(0, 2, (2, 1, 8, 8))
    mask = torch.ones(2, m, dtype=torch.bool)
    plain = DMAFLoss(2, m, 4)  # DTM off: w = 1 per modality
    sep = {k: float(v.sep_loss(logits, target, mask)) for k, v in {**losses, "off": plain}.items()}
    assert abs(sep["mean"] - m * sep["sum"]) < 1e-5
    # with w near uniform, "mean" is on DTM-off's scale and "sum" about M times below it
    assert 0.5 < sep["mean"] / sep["off"] < 2.0 and sep["sum"] / sep["off"] < 2.0 / m
    with pytest.raises(ValueError, match="dtm_reweight_norm"):
        DynamicTrainingMonitor(DMAFLoss(2, m, 4), reweight_norm="none")


def _reference_scale_gradients(dtm, encoders):
    """Eq. 18 as release 0.1.10 wrote it: one encoder at a time, a host sync per test, ``mul_`` per gradient."""
    gammas = dtm.gammas()
    dtm.similarity.fill_(float("nan"))
    dtm.applied_scale.fill_(1.0)
    for m, encoder in enumerate(encoders):
        params = [p for p in encoder.parameters() if p.grad is not None]
        if not params:
            continue
        flat = torch.cat([p.grad.detach().flatten().float() for p in params])
        if not bool(torch.isfinite(flat).all()):
            continue
        factor = float(gammas[m])
        prev = dtm.prev_grads[m]
        if prev is not None and prev.numel() == flat.numel():
            sim = float(torch.nn.functional.cosine_similarity(flat, prev.to(flat.device), dim=0))
            dtm.similarity[m] = sim
            if sim < dtm.conflict_threshold:
                factor *= dtm.conflict_factor
        dtm.prev_grads[m] = flat.clone()
        dtm.applied_scale[m] = factor
        for p in params:
            p.grad.mul_(factor)


class _ThreeConvEncoders(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoders = nn.ModuleList(
            [nn.Sequential(nn.Conv3d(1, 4, 3), nn.Conv3d(4, 2, 1, bias=False)) for _ in range(3)]
        )


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
)
def test_batched_gradient_scaling_is_the_per_encoder_reference_bit_for_bit(device):
    """Eq. 18 with one host sync and one ``_foreach_mul_`` gives the gradients, the logged scalars and the stored
    previous gradients of the per-encoder loop, bit for bit: a finite step, a conflict (cosine < -0.5) with an absent
    modality, and an AMP overflow in one encoder."""
    gen = torch.Generator().manual_seed(3)
    nets = [_ThreeConvEncoders().to(device) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    monitors = [DynamicTrainingMonitor(DMAFLoss(3, 3, 4), n) for n in nets]
    for dtm in monitors:
        dtm.update(torch.tensor([0.3, 0.1, 0.2]), torch.tensor([0.2, 0.1, 0.4]), torch.ones(3))
    first = [[torch.randn(p.shape, generator=gen) for p in e.parameters()] for e in nets[0].encoders]
    steps = [
        ("finite", first),
        # encoder 0 reverses (cosine -1: conflict), encoder 1 absent from the batch, encoder 2 keeps its direction
        (
            "conflict",
            [[-g for g in first[0]], None, [2 * g + 0.1 * torch.randn(g.shape, generator=gen) for g in first[2]]],
        ),
        # encoder 1 overflows (left alone, not stored as previous), the others scale
        (
            "overflow",
            [
                [0.5 * g for g in first[0]],
                [g.masked_fill(g > 1.0, float("inf")) for g in first[1]],
                [-g for g in first[2]],
            ],
        ),
    ]
    for name, grads in steps:
        for net in nets:
            for encoder, gs in zip(net.encoders, grads):
                for i, p in enumerate(encoder.parameters()):
                    g = None if gs is None else gs[i]
                    p.grad = None if g is None else g.to(device).clone()
        monitors[0].scale_gradients(nets[0].encoders)
        _reference_scale_gradients(monitors[1], nets[1].encoders)
        for p, q in zip(nets[0].parameters(), nets[1].parameters()):
            assert (p.grad is None) == (q.grad is None), name
            assert p.grad is None or torch.equal(p.grad, q.grad), name
        assert torch.equal(monitors[0].applied_scale, monitors[1].applied_scale), name
        assert torch.equal(monitors[0].similarity.isnan(), monitors[1].similarity.isnan()), name
        assert torch.equal(monitors[0].similarity.nan_to_num(), monitors[1].similarity.nan_to_num()), name
        for a, b in zip(monitors[0].prev_grads, monitors[1].prev_grads):
            assert (a is None and b is None) or torch.equal(a, b), name
        assert monitors[0].scalars() == monitors[1].scalars(), name
        if name == "conflict":
            assert monitors[0].similarity[0] < -0.5 and monitors[0].applied_scale[0] != monitors[0].gammas()[0]
            assert monitors[0].applied_scale[1] == 1.0
        if name == "overflow":
            assert monitors[0].applied_scale[1] == 1.0 and monitors[0].applied_scale[0] != 1.0
