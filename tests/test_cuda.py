"""GPU behaviour: mixed precision with cuDNN/SDPA kernels, CPU/GPU agreement, the AMP training step with DTM.

Skipped where no CUDA device is present (CI); run on a GPU machine with ``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch

from dmaf_components.networks import DMAFNet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_no_nan_with_fully_masked_tokens(dtype, tiny_net_kwargs):
    """CUDA's SDPA kernels and fp16 overflow: a window with no modality, an all-False mask, and single-modality
    training samples stay finite, gradients included."""
    from dmaf_components.losses import DMAFLoss

    net = DMAFNet(3, 4, 3, **tiny_net_kwargs).cuda().eval()
    x = torch.randn(2, 4, 32, 32, 32, device="cuda")
    x[0] = 0
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        assert torch.isfinite(net(x)).all()
        assert torch.isfinite(net(x, torch.zeros(2, 4, dtype=torch.bool, device="cuda"))).all()
        assert torch.isfinite(net(x[:1], torch.tensor([[True, False, False, True]], device="cuda"))).all()
    net.train()
    loss_fn = DMAFLoss(3, 4, tiny_net_kwargs["channels"][-1]).cuda()
    x = torch.randn(2, 4, 32, 32, 32, device="cuda") * 100  # large activations: fp16 overflow would show
    x[:, 1:] = 0
    with torch.autocast("cuda", dtype=dtype):
        out = net(x)
        loss = loss_fn(out, torch.randint(0, 3, (2, 1, 32, 32, 32), device="cuda"))
    assert torch.isfinite(out.logits).all() and torch.isfinite(loss)
    loss.backward()
    for name, p in net.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name


def test_cpu_and_cuda_give_the_same_logits(tiny_net_kwargs):
    """The CPU path (channels-last oneDNN convolutions) and the CUDA path (cuDNN, channels-first) compute the same
    network: fp32, TF32 off."""
    net = DMAFNet(3, 4, 3, **tiny_net_kwargs).eval()
    x = torch.randn(2, 4, 32, 32, 32)
    x[1, :2] = 0
    prev = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            cpu = net(x)
            gpu = net.cuda()(x.cuda()).cpu()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = prev
    assert torch.allclose(cpu, gpu, atol=1e-3), (cpu - gpu).abs().max()


def test_amp_training_step_with_dtm_gradient_scaling(tiny_net_kwargs):
    """fp16 autocast + GradScaler + DTM: DTM scales each encoder's (loss-scaled) gradients by gamma(m) between
    backward and the optimizer step, so after unscaling they are gamma(m) times the plain gradients."""
    from dmaf_components.handlers import DynamicTrainingMonitor
    from dmaf_components.losses import DMAFLoss

    torch.manual_seed(0)
    net = DMAFNet(3, 4, 3, **tiny_net_kwargs).cuda().train()
    loss_fn = DMAFLoss(3, 4, tiny_net_kwargs["channels"][-1]).cuda()
    dtm = DynamicTrainingMonitor(loss_fn, net)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    x = torch.randn(1, 4, 32, 32, 32, device="cuda")
    y = torch.randint(0, 3, (1, 1, 32, 32, 32), device="cuda")
    mask = torch.tensor([[True, True, False, True]], device="cuda")
    for _ in range(3):  # a few updates so that the gaps (and gammas) differ between modalities
        net.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = loss_fn(net(x, mask), y)
        scaler.scale(loss).backward()
        t = loss_fn.last_terms
        dtm.update(t.relation_gap_sum, t.prototype_gap_sum, t.modality_count)
        loss_fn.modality_weights.copy_(dtm.weights().to(loss_fn.modality_weights))
    before = {n: p.grad.clone() for n, p in net.encoders.named_parameters() if p.grad is not None}
    dtm.scale_gradients(net.encoders)
    applied = dtm.applied_scale.tolist()  # gamma(m), times 0.7 where the gradient turned against its last direction
    assert len({round(applied[m], 4) for m in (0, 1, 3)}) > 1  # the modalities are really weighted differently
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    scaler.unscale_(optimizer)
    scale = scaler.get_scale()
    checked = set()
    for n, p in net.encoders.named_parameters():
        if n not in before:
            continue
        m = int(n.split(".")[0])
        factor = p.grad.float().norm() / (before[n].float().norm() / scale)
        assert abs(float(factor) / applied[m] - 1.0) < 1e-3, n
        checked.add(m)
    assert checked == {0, 1, 3}
    assert all(p.grad is None for p in net.encoders[2].parameters())
    scaler.step(optimizer)
    scaler.update()


def test_dtm_state_loaded_onto_the_gpu_keeps_working():
    """A checkpoint loaded with map_location="cuda" (the bundle's CheckpointLoader on a GPU) puts DTM's state on the
    GPU; the monitor must keep its CPU state and go on updating."""
    from dmaf_components.handlers import DynamicTrainingMonitor
    from dmaf_components.losses import DMAFLoss

    dtm = DynamicTrainingMonitor(DMAFLoss(3, 2, 8))
    dtm.update(torch.tensor([0.5, 0.2]), torch.tensor([0.1, 0.3]), torch.tensor([1.0, 1.0]))
    state = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in dtm.state_dict().items()}
    resumed = DynamicTrainingMonitor(DMAFLoss(3, 2, 8))
    resumed.load_state_dict(state)
    assert torch.equal(resumed.weights(), dtm.weights())
    resumed.update(torch.tensor([0.4, 0.2]), torch.tensor([0.2, 0.3]), torch.tensor([1.0, 1.0]))
    dtm.update(torch.tensor([0.4, 0.2]), torch.tensor([0.2, 0.3]), torch.tensor([1.0, 1.0]))
    assert torch.allclose(resumed.weights(), dtm.weights())
