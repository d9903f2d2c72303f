"""The CPU kernels (networks/cpu_kernels.py): the plain network and the accelerated one compute the same function with
the same parameter names; each kernel matches the PyTorch/MONAI module it replaces; and the PyTorch behaviour the
private-op tricks rely on is still there (these tests fail when a PyTorch upgrade changes it)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dmaf_components.networks import DMAFNet, apply_cpu_kernels, cpu_kernels_applied
from dmaf_components.networks import cpu_kernels as ck
from dmaf_components.networks.blocks import conv_block

PRIVATE = [True, False] if ck.private_ops_supported() else [False]


def _twin_nets(fusion: str, spatial_dims: int = 3, **kwargs):
    """The same network twice: plain (channels_last=False) and with the CPU kernels, equal weights."""
    torch.manual_seed(0)
    plain = DMAFNet(
        spatial_dims,
        3,
        4,
        channels=(8, 16, 16),
        fusion=fusion,
        num_layers=1,
        num_heads=2,
        channels_last=False,
        **kwargs,
    )
    fast = DMAFNet(spatial_dims, 3, 4, channels=(8, 16, 16), fusion=fusion, num_layers=1, num_heads=2, **kwargs)
    fast.load_state_dict(plain.state_dict(), strict=True)
    return plain, fast


@pytest.mark.parametrize("fusion", ["dmaf", "concat"])
def test_accelerated_network_is_the_plain_network(fusion):
    """Same state-dict keys (checkpoints load either way), and in training with mixed masks the same logits, losses'
    inputs and parameter gradients; the plain network holds no CPU-kernel module at all."""
    plain, fast = _twin_nets(fusion)
    assert list(plain.state_dict()) == list(fast.state_dict())
    assert not any(cpu_kernels_applied(plain).values())
    counts = cpu_kernels_applied(fast)
    assert counts["convolutions"] > 0 and counts["norm"] > 0 and counts["split_concat"] >= 2
    assert (counts["padded_heads"] > 0) == (fusion == "dmaf")
    x = torch.randn(3, 3, 16, 16, 16)
    mask = torch.tensor([[1, 1, 0], [0, 1, 0], [1, 1, 1]], dtype=torch.bool)
    results = []
    for net in (plain, fast):
        net.train().zero_grad()
        out = net(x, mask)
        (out.logits.square().mean() + out.modality_logits.square().mean() + out.fused_features.mean()).backward()
        grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        results.append((out.logits.detach(), out.modality_logits.detach(), out.fused_features.detach(), grads))
    for a, b in zip(results[0][:3], results[1][:3]):
        assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())
    assert results[0][3].keys() == results[1][3].keys()
    for name, g in results[0][3].items():
        other = results[1][3][name]
        assert torch.allclose(g, other, atol=1e-4 + 2e-3 * float(g.abs().max())), name
    # eval: the logits of a study with one modality missing (batch 1, present-only path)
    plain.eval(), fast.eval()
    with torch.no_grad():
        one = torch.tensor([[1, 0, 1]], dtype=torch.bool)
        assert torch.allclose(plain(x[:1], one), fast(x[:1], one), atol=1e-4)


@pytest.mark.parametrize("channels_last", [None, False])
def test_a_release_0_1_3_checkpoint_loads_and_gives_its_logits(channels_last):
    """Parameter names and computation are those of release 0.1.3 (whose model kept the CPU kernels inside its
    modules): its saved tiny network loads strictly into today's, plain or accelerated, and gives the logits it gave
    then, with both modalities and with one missing."""
    import os

    saved = torch.load(os.path.join(os.path.dirname(__file__), "data", "dmafnet_tiny_0.1.3.pt"), weights_only=True)
    net = DMAFNet(**saved["config"], channels_last=channels_last).eval()
    net.load_state_dict(saved["state_dict"], strict=True)
    with torch.no_grad():
        full = net(saved["input"], torch.tensor([[True, True]]))
        one = net(saved["input"], torch.tensor([[False, True]]))
    assert torch.allclose(full, saved["logits_all"], atol=1e-4), float((full - saved["logits_all"]).abs().max())
    assert torch.allclose(one, saved["logits_second_only"], atol=1e-4)


def test_apply_reconfigures_and_remove_restores_the_plain_network():
    """A second apply_cpu_kernels call with a piece off gives that piece's modules their plain classes back (not a
    silent no-op), and remove_cpu_kernels leaves no CPU-kernel module; the state dict never changes."""
    from dmaf_components.networks.cpu_kernels import remove_cpu_kernels

    net = DMAFNet(3, 3, 4, channels=(8, 16), num_layers=1, num_heads=2)
    keys = list(net.state_dict())
    assert cpu_kernels_applied(net)["padded_heads"] > 0
    apply_cpu_kernels(net, padded_heads=False, private_ops=False)
    counts = cpu_kernels_applied(net)
    assert counts["padded_heads"] == 0 and counts["convolutions"] > 0
    assert not any(getattr(m, "use_private_ops", False) for m in net.modules())
    remove_cpu_kernels(net)
    assert not any(cpu_kernels_applied(net).values()) and list(net.state_dict()) == keys


def test_plain_network_scripts_like_the_accelerated_one():
    """torch.jit.script compiles the plain network (channels_last=False) as it does the accelerated one, and both
    exports give the eager logits."""
    plain, fast = _twin_nets("dmaf")
    x = torch.randn(1, 3, 16, 16, 16)
    mask = torch.tensor([[True, False, True]])
    with torch.no_grad():
        ref = plain.eval()(x, mask)
        for net in (plain, fast.eval()):
            assert torch.allclose(torch.jit.script(net)(x, mask), ref, atol=1e-4)


@pytest.mark.parametrize("private_ops", PRIVATE)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_cpu_convolution_matches_the_plain_one(spatial_dims, batch, private_ops):
    """The re-classed convolution gives nn.ConvNd's values and gradients and hands back a channels-last tensor (the
    rest of the network keeps that layout, so no copy is made between convolutions); batch 1 takes the backward that
    pads a zero sample; under CPU bf16 autocast it runs in bf16 like the reference; FLOP counters see the direct
    oneDNN call; a convolution of cat([a, b]) computed as two partial convolutions is the same."""
    ref = conv_block(spatial_dims, 6, 8, strides=2).conv
    conv = apply_cpu_kernels(conv_block(spatial_dims, 6, 8, strides=2), private_ops=private_ops).conv
    conv.load_state_dict(ref.state_dict())
    assert isinstance(conv, ck.CPUConv3d if spatial_dims == 3 else ck.CPUConv2d)
    x = torch.randn((batch, 6) + (9, 8, 7)[:spatial_dims], requires_grad=True)
    grads = []
    for module in (ref, conv):
        y = module(x)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        grads.append((y, *torch.autograd.grad(y, (x, module.weight, module.bias), g)))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-4)
    assert ck.is_channels_last(grads[1][0])
    grads = []
    for module in (ref, conv):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = module(x)
        grads.append((y.float(), *torch.autograd.grad(y.float().square().sum(), (x, module.weight, module.bias))))
    for a, b in zip(*grads):
        assert a.dtype == b.dtype
        assert torch.allclose(a, b, rtol=0.05, atol=0.05 * float(a.detach().abs().max()))
    from torch.utils.flop_counter import FlopCounterMode

    counts = []
    for module in (ref, conv):
        with FlopCounterMode(display=False) as counter:
            module(x)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0
    parts = [torch.randn((2, 2) + (9, 8, 7)[:spatial_dims]), torch.randn((2, 4) + (9, 8, 7)[:spatial_dims])]
    assert torch.allclose(conv.forward_split(parts), ref(torch.cat(parts, 1)), atol=1e-5)


@pytest.mark.parametrize("private_ops", PRIVATE)
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_fused_norm_act_matches_monai_and_is_exact_on_constant_windows(spatial_dims, private_ops):
    """On channels-last fp32 CPU input the re-classed ADN runs norm + activation as one fused function: MONAI's
    instance norm + LeakyReLU values and gradients, the layout kept, a constant window exactly the norm's bias
    (PyTorch's channels-last batch norm is ~0.2 off there), and a sample's result independent of the rest of its batch
    (what sliding-window inference relies on)."""
    ref = conv_block(spatial_dims, 3, 5).adn
    block = apply_cpu_kernels(conv_block(spatial_dims, 3, 5), private_ops=private_ops)
    assert isinstance(block.adn, ck.CPUNormAct)
    shape = (3, 5) + (6, 7, 8)[:spatial_dims]
    x = ck.to_channels_last(torch.randn(shape) * 3 + 1).requires_grad_()
    g = torch.randn(shape)
    # weights away from 0: backward recovers x_hat from the output; one weight near 0: from the saved input
    for small_weight in (False, True):
        with torch.no_grad():
            block.adn.N.weight.uniform_(0.5, 1.5)
            block.adn.N.weight[2] = 1e-3 if small_weight else 0.7
            block.adn.N.bias.normal_()
        ref.load_state_dict(block.adn.state_dict())
        outs = []
        for adn in (ref, block.adn):
            y = adn(x)
            outs.append((y, *torch.autograd.grad(y, (x, adn.N.weight, adn.N.bias), g)))
        assert ck.is_channels_last(outs[1][0]) and ck.is_channels_last(outs[1][1])
        for a, b in zip(*outs):
            assert torch.allclose(a, b, atol=1e-5), (small_weight, (a - b).abs().max())
    const = torch.full(shape, 0.3712)
    const[1] = torch.randn(shape[1:])
    with torch.no_grad():
        y = block.adn(ck.to_channels_last(const))
        alone = block.adn(ck.to_channels_last(const[:1].clone()))
        bias = F.leaky_relu(block.adn.N.bias, 0.2).reshape((1, 5) + (1,) * spatial_dims)
    assert torch.equal(y[:1], alone)
    assert torch.allclose(y[0:1], bias.expand_as(alone), atol=1e-5)


def test_fused_norm_act_is_float_exact_on_large_volumes():
    """The per-channel sums over a 64^3 volume (262k voxels): one BLAS matmul over all of them accumulated a 1e-3
    relative error on this CPU (0.08 logits at a 128^3 network's output); the blocked float64-summed version matches
    a float64 reference to float precision."""
    x = (torch.randn(1, 8, 64, 64, 64) * 3 + 5).contiguous(memory_format=torch.channels_last_3d)
    y = ck._InstanceNormActFunction.apply(x, torch.ones(8), torch.zeros(8), 1e-5, 0.2, ck.private_ops_supported())
    ref = F.leaky_relu(F.instance_norm(x.double(), eps=1e-5), 0.2)
    assert float((y.double() - ref).abs().max()) < 1e-5


def test_training_forward_stays_channels_last_on_cpu():
    """Every encoder/decoder convolution and norm output of a CPU training forward is channels-last: a layer that
    handed back channels-first would make every following convolution copy its input (what this layout saves)."""
    net = DMAFNet(3, 4, 3, channels=(8, 16, 16)).train()
    wrong = []

    def check(module, _inp, out):
        if not ck.is_channels_last(out):
            wrong.append(type(module).__name__ + str(tuple(out.shape)))

    for module in net.modules():
        if isinstance(module, (ck._CPUConv, ck.CPUNormAct)):
            module.register_forward_hook(check)
    for mask in ([[1, 1, 0, 1]], [[1, 0, 0, 0]]):
        out = net(torch.randn(1, 4, 16, 16, 16), torch.tensor(mask, dtype=torch.bool))
    assert not wrong, wrong
    assert all(ck.is_channels_last(z) for z in out.deep_supervision)


def test_padded_head_attention_is_monai_transformer_block():
    """DMAF's transformer layer is MONAI's TransformerBlock; re-classed, its 8-wide heads are padded to 16 channels
    on the CPU (the fast flash-attention path) and it computes the same thing, masked, with the same gradients."""
    from monai.networks.blocks import TransformerBlock

    ref = TransformerBlock(32, 128, 4, qkv_bias=True, use_flash_attention=True)
    layer = apply_cpu_kernels(TransformerBlock(32, 128, 4, qkv_bias=True, use_flash_attention=True))
    layer.load_state_dict(ref.state_dict(), strict=True)
    assert isinstance(layer.attn, ck.CPUPaddedHeadAttention) and layer.attn.dim_head == 8
    x = torch.randn(3, 50, 32)
    attn_mask = torch.ones(3, 1, 1, 50, dtype=torch.bool)
    attn_mask[0, ..., 25:] = False
    outs = []
    for module in (ref, layer):
        xi = x.clone().requires_grad_()
        y = module(xi, attn_mask=attn_mask)
        y.square().sum().backward()
        outs.append((y.detach(), xi.grad, module.attn.qkv.weight.grad))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
    # a configuration the padded kernel does not reproduce (no output projection) is left as MONAI's
    other = TransformerBlock(32, 128, 4, qkv_bias=True, use_flash_attention=True, include_fc=False)
    assert type(apply_cpu_kernels(other).attn) is not ck.CPUPaddedHeadAttention


def test_private_ops_follow_the_torch_version(monkeypatch):
    """The private-op tricks are used only on the tested PyTorch versions; on any other the kernels use public ops
    and give the same values and gradients."""
    monkeypatch.setattr(torch, "__version__", "99.1.0")
    assert not ck.private_ops_supported()
    net = DMAFNet(3, 2, 3, channels=(8, 16), num_layers=1, num_heads=2)
    convs = [m for m in net.modules() if isinstance(m, ck._CPUConv)]
    norms = [m for m in net.modules() if isinstance(m, ck.CPUNormAct)]
    assert convs and norms and not any(m.use_private_ops for m in convs + norms)
    monkeypatch.undo()
    plain = DMAFNet(3, 2, 3, channels=(8, 16), num_layers=1, num_heads=2, channels_last=False)
    plain.load_state_dict(net.state_dict())
    x = torch.randn(1, 2, 12, 12, 12)
    outs = []
    for model in (plain, net):
        model.train().zero_grad()
        out = model(x, torch.tensor([[True, True]]))
        out.logits.square().mean().backward()
        outs.append((out.logits.detach(), model.encoders[0].stages[0].entry.conv.weight.grad))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-4 + 1e-3 * float(a.abs().max()))
    with pytest.warns(UserWarning, match="not tested"):
        monkeypatch.setattr(torch, "__version__", "99.1.0")
        apply_cpu_kernels(conv_block(3, 1, 2), private_ops=True)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this PyTorch build")
def test_pytorch_still_routes_small_batch1_3d_convolutions_off_onednn():
    """What the direct oneDNN call and the padded backward exist for: PyTorch's CPU convolution of a channels-last
    batch-1 3-D input with N*C*D*H <= ONEDNN_BATCH1_THRESHOLD leaves oneDNN (its output comes back channels-first, and
    so does the input gradient of its backward), while one sample more stays on oneDNN; channels-last 2-D ones stay on
    oneDNN at any size (so the padded backward is 3-D only). If this fails after a PyTorch upgrade, PyTorch's dispatch
    changed: re-measure (benchmarks/cpu_kernels_ab.py), drop the trick or move the threshold, then add the version to
    PRIVATE_OPS_TESTED."""

    def layouts(shape):
        dims = len(shape) - 2
        x = ck.to_channels_last(torch.randn(shape))
        w = torch.randn(shape[1], shape[1], *(3,) * dims)
        y = (F.conv3d if dims == 3 else F.conv2d)(x, w, None, 1, 1)
        gx = torch.ops.aten.convolution_backward(
            ck.to_channels_last(torch.randn_like(y)),
            x,
            w,
            None,
            [1] * dims,
            [1] * dims,
            [1] * dims,
            False,
            [0] * dims,
            1,
            [True, False, False],
        )[0]
        return ck.is_channels_last(y), ck.is_channels_last(gx)

    small = (1, 20, 32, 32, 16)  # N*C*D*H at the threshold
    assert small[0] * small[1] * small[2] * small[3] == ck.ONEDNN_BATCH1_THRESHOLD
    assert layouts(small) == (False, False)
    assert layouts((1, 128, 3, 3, 3)) == (False, False)  # the coarsest level of a 48^3 patch
    assert layouts((2,) + small[1:]) == (True, True)
    assert layouts((1, 20, 32, 33, 16)) == (True, True)  # batch 1 just above the threshold: oneDNN
    assert layouts((1, 20, 32, 32)) == (True, True) and layouts((1, 128, 6, 6)) == (True, True)


def test_cpu_kernels_act_on_cpu_only(monkeypatch):
    """On a non-CPU tensor (here on the 'meta' device) each re-classed module runs its parent's computation, so a
    model moved to a GPU computes with PyTorch's own kernels."""
    from monai.networks.blocks import TransformerBlock

    def refuse(*args):
        raise AssertionError("a CPU kernel ran on a non-CPU tensor")

    monkeypatch.setattr(ck._InstanceNormActFunction, "apply", refuse)
    monkeypatch.setattr(ck._OneDNNConvFunction, "apply", refuse)
    monkeypatch.setattr(ck, "to_channels_last", refuse)
    block = apply_cpu_kernels(conv_block(3, 2, 8)).to("meta")
    assert block(torch.empty(1, 2, 6, 6, 6, device="meta")).shape == (1, 8, 6, 6, 6)
    layer = apply_cpu_kernels(TransformerBlock(32, 64, 4, use_flash_attention=True)).to("meta")
    padded = []
    monkeypatch.setattr(F, "pad", lambda *a, **k: padded.append(1) or refuse())
    assert layer(torch.empty(2, 10, 32, device="meta")).shape == (2, 10, 32) and not padded
