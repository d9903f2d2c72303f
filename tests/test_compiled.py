"""The opt-in compiled path (``networks/compiled.py``; bundle keys ``compile`` and ``fused_optimizer``): one training
step as the bundle runs it gives eager's loss, gradients, DTM factors and updated parameters; every compiled region
runs compiled at every step (never a silent fallback to eager); checkpoints are unchanged; the bundle builds it.

Inductor compiles C++ on the CPU, one compiler call per kernel: the one test that runs it (a single presence pattern,
about 7 graphs) takes a minute or two with a cold inductor cache (CI) and seconds with a warm one
(``/tmp/torchinductor_$USER``).
The mixed-mask comparisons use ``aot_eager``: the same dynamo capture and AOTAutograd forward/backward split that
inductor receives, run by eager kernels, so a capture or autograd error shows there without compiling C++.
"""

from __future__ import annotations

import copy
import os
from types import SimpleNamespace

import pytest
import torch

from dmaf_components.handlers import DynamicTrainingMonitor
from dmaf_components.losses import DMAFLoss
from dmaf_components.networks import DMAFNet, compile_network, compiled_parts
from dmaf_components.networks.cpu_kernels import cpu_kernels_applied

BUNDLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle")
TINY = {"channels": (4, 8), "num_layers": 1, "num_heads": 1}
LEVELS = len(TINY["channels"])


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


class _CountingBackend:
    """A ``torch.compile`` backend: inductor (``compile_fx``, what ``backend="inductor"`` runs) or ``aot_eager``,
    counting the graphs it compiles and the compiled forwards it runs. A region that fell back to eager would run no
    compiled forward."""

    def __init__(self, inductor: bool) -> None:
        self.inductor = inductor
        self.graphs = 0
        self.runs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        if self.inductor:
            from torch._inductor.compile_fx import compile_fx

            compiled = compile_fx(gm, example_inputs)
        else:
            from torch._dynamo.backends.debugging import aot_eager

            compiled = aot_eager(gm, example_inputs)
        self.graphs += 1

        def run(*args):
            self.runs += 1
            return compiled(*args)

        return run


def _region_calls(rows: list[list[int]], levels: int = LEVELS) -> int:
    """Calls of compiled regions in one DMAF training forward with these masks: the encoders of the modalities present
    in some sample, the shared and the fusion decoder, and per level the scoring (once, or once per number of present
    modalities with mixed masks) and the weighted sum."""
    present = [sum(r) for r in rows]
    encoders = sum(any(r[m] for r in rows) for m in range(len(rows[0])))
    uniform = all(r == rows[0] for r in rows)
    scorings = 1 if uniform else len(set(present))
    return encoders + 2 + levels * (scorings + 1)


def _tiny(fusion: str = "dmaf", **kwargs) -> DMAFNet:
    return DMAFNet(3, 4, 4, fusion=fusion, **TINY, **kwargs).train()


def _steps_match_eager(backend: _CountingBackend, patterns: tuple[list[list[int]], ...]) -> None:
    """forward, DMAF loss, backward, DTM (Eq. 18 scaling), fused AdamW, one step per pattern: the compiled network
    gives eager's numbers (eager: the default network with its CPU kernels, plain AdamW), and every region runs
    compiled at every step."""
    eager, net = _tiny(), _tiny()
    net.load_state_dict(eager.state_dict())
    keys = list(net.state_dict())
    compile_network(net, backend=backend)
    assert list(net.state_dict()) == keys and cpu_kernels_applied(net)["convolutions"] == 0
    assert cpu_kernels_applied(eager)["convolutions"] > 0
    losses = [DMAFLoss(4, 4, TINY["channels"][-1]) for _ in range(2)]
    losses[1].load_state_dict(losses[0].state_dict())
    nets = (eager, net)
    opts = [
        torch.optim.AdamW(list(n.parameters()) + list(lf.parameters()), lr=2e-4, weight_decay=1e-4, fused=fused)
        for n, lf, fused in zip(nets, losses, (None, True))
    ]
    monitors = [DynamicTrainingMonitor(lf, n) for n, lf in zip(nets, losses)]
    x = torch.randn(2, 4, 16, 16, 16)
    y = torch.randint(0, 4, (2, 1, 16, 16, 16))
    meaningful = [torch.ones_like(p, dtype=torch.bool) for p in net.parameters()]
    steps = 0
    for rows in patterns:
        mask, b = torch.tensor(rows, dtype=torch.bool), len(rows)
        runs = backend.runs
        results = []
        for n, lf, opt, dtm in zip(nets, losses, opts, monitors):
            opt.zero_grad(set_to_none=True)
            loss = lf(n(x[:b], mask), y[:b])
            loss.backward()
            dtm.step(n.encoders)
            grads = [None if p.grad is None else p.grad.clone() for p in n.parameters()]
            opt.step()
            params = [p.detach().clone() for p in n.parameters()]
            results.append((float(loss.detach()), grads, dtm.applied_scale.clone(), params))
        assert backend.runs - runs == _region_calls(rows), rows  # no region ran eagerly
        (l0, g0, s0, p0), (l1, g1, s1, p1) = results
        assert l1 == pytest.approx(l0, rel=1e-5), rows
        for (name, _), a, c in zip(net.named_parameters(), g0, g1):
            assert (a is None) == (c is None), (rows, name)
            if a is not None:
                torch.testing.assert_close(c, a, rtol=1e-3, atol=1e-6, msg=lambda m: f"{rows} {name}: {m}")
        torch.testing.assert_close(s1, s0, rtol=1e-6, atol=0)
        # AdamW moves a weight by about lr whatever its gradient's size, so where the gradient is rounding noise (a
        # bias before an instance norm: its exact gradient is 0) the two runs move it by up to lr in either
        # direction; everywhere else they agree to rounding
        steps += 1
        for i, (a, c, g) in enumerate(zip(p0, p1, g0)):
            meaningful[i] = meaningful[i] & (g.abs() > 1e-5) if g is not None else meaningful[i]
            torch.testing.assert_close(c[meaningful[i]], a[meaningful[i]], rtol=0, atol=1e-6)
            torch.testing.assert_close(c, a, rtol=0, atol=2 * 2e-4 * steps)
    print(f"{backend.graphs} graphs compiled")
    assert backend.graphs <= 10 * len(patterns)  # a handful per region, not one per presence pattern


@pytest.mark.slow
def test_inductor_training_step_matches_eager():
    """Inductor's C++ kernels, forward and backward, on the full model with all four modalities (batch 1)."""
    _steps_match_eager(_CountingBackend(inductor=True), ([[1, 1, 1, 1]],))


@pytest.mark.slow
def test_compiled_training_steps_match_eager_on_mixed_masks():
    """All modalities, mixed masks in a batch of 2 (one scoring graph per number of present modalities) and a partial
    batch-1 pattern, one after the other on the same compiled network."""
    _steps_match_eager(_CountingBackend(inductor=False), ([[1, 1, 1, 1]], [[1, 1, 1, 1], [0, 1, 0, 1]], [[1, 0, 1, 0]]))


@pytest.mark.slow
def test_compiled_inference_matches_eager_and_copies_are_eager():
    """Eval mode (no grad, a sliding-window batch and mixed masks) through the compiled regions gives eager's logits;
    the state dict keys are unchanged and a deep copy is the eager network, as with ``nn.Module.compile``."""
    for fusion in ("dmaf", "concat"):
        eager = _tiny(fusion).eval()
        net = copy.deepcopy(eager)
        compile_network(net, backend="aot_eager")
        parts = compiled_parts(net)
        assert "encoders.3" in parts and "shared_decoder" in parts and "fusion_decoder" in parts
        assert ("fusions.1._present_weights" in parts) == (fusion == "dmaf")
        assert ("fusions.1._present" in parts) == (fusion == "concat")
        x = torch.randn(3, 4, 16, 16, 16)
        with torch.no_grad():
            for rows in ([[1, 0, 1, 1]], [[1, 1, 1, 1], [0, 1, 0, 0], [1, 0, 0, 1]]):
                mask = torch.tensor(rows, dtype=torch.bool)
                torch.testing.assert_close(net(x, mask), eager(x, mask), rtol=1e-4, atol=1e-5)
        assert compiled_parts(copy.deepcopy(net)) == []
        assert list(net.state_dict()) == list(eager.state_dict())
        net.load_state_dict(eager.state_dict())  # checkpoints load strictly


def test_recompile_limit_raises_instead_of_falling_back_to_eager():
    """Past a region's ``recompile_limit`` dynamo would run it eagerly from then on; the compiled path raises."""
    net = compile_network(_tiny(), backend="eager", recompile_limit=1)
    x = torch.randn(1, 4, 16, 16, 16)
    net(x, torch.tensor([[1, 1, 1, 1]], dtype=torch.bool)).logits.sum().backward()
    with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
        # two present modalities: the shared decoder's batch 4 -> 2 needs a second graph
        net(x, torch.tensor([[1, 0, 1, 0]], dtype=torch.bool))


def test_every_presence_pattern_stays_within_the_default_limit():
    """A training step on each of the 15 presence patterns of 4 modalities: a handful of graphs per region (dynamo's
    eager backend: graph capture only), within the default limit, none falling back, no graph break."""
    from itertools import product

    from torch._dynamo.utils import counters

    net = compile_network(_tiny(), backend="eager")
    x = torch.randn(1, 4, 16, 16, 16)
    for rows in (list(p) for p in product((0, 1), repeat=4) if any(p)):
        net(x, torch.tensor([rows], dtype=torch.bool)).logits.sum().backward()
    graphs = counters["stats"]["unique_graphs"]
    print(f"{graphs} graphs for 15 patterns")
    # encoders 1, shared decoder 3 (batch 1, 2, then dynamic), fusion decoder 1; per level: scoring 3, sum 4 (P=1..4)
    assert graphs <= 1 + 3 + 1 + LEVELS * (3 + 4)
    assert not counters["graph_break"]


def test_a_graph_break_raises_instead_of_splitting_a_region():
    """The CPU kernels cannot be captured in one graph (their autograd functions read storage offsets and strides, and
    the fused norm branches on the weights' values). Put back after compiling, they make the first call raise
    (``fullgraph=True``) where a default ``torch.compile`` would split the region and run them eagerly."""
    from dmaf_components.networks import apply_cpu_kernels

    net = apply_cpu_kernels(compile_network(_tiny(), backend="eager"))
    with pytest.raises(torch._dynamo.exc.Unsupported):
        net(torch.randn(1, 4, 16, 16, 16), torch.tensor([[1, 1, 1, 1]], dtype=torch.bool))


def test_compile_network_refuses_a_wrapper():
    with pytest.raises(TypeError, match="DMAFNet"):
        compile_network(torch.nn.Sequential(_tiny()))


def _train_config(**overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(BUNDLE, "configs", "train.json"))
    parser.update({"channels": [4, 8], "num_layers": 1, "device": "$torch.device('cpu')", **overrides})
    return parser


def test_bundle_keys_compile_and_fused_optimizer():
    """``compile`` and ``fused_optimizer`` (default false: the eager network, AdamW's own default implementation) build
    the compiled network and a fused AdamW; the evaluation (merged on train.json) and inference configs take
    ``compile`` too; a value that is no switch is refused."""
    from monai.bundle import ConfigParser

    parser = _train_config()
    assert compiled_parts(parser.get_parsed_content("network")) == []
    assert parser.get_parsed_content("optimizer").defaults["fused"] is None
    parser = _train_config(compile=True, fused_optimizer="true")
    net, opt = parser.get_parsed_content("network"), parser.get_parsed_content("optimizer")
    assert "encoders.0" in compiled_parts(net) and opt.defaults["fused"] is True
    assert {id(p) for p in net.parameters()} <= {id(p) for g in opt.param_groups for p in g["params"]}
    index = next(i for i, h in enumerate(parser["train#handlers"]) if h["_target_"].endswith("DynamicTrainingMonitor"))
    dtm = parser.get_parsed_content(f"train#handlers#{index}")
    assert dtm._encoders(SimpleNamespace(network=net)) is net.encoders  # DTM scales the compiled encoders
    with pytest.raises(Exception, match="fused_optimizer"):
        _train_config(fused_optimizer="maybe").get_parsed_content("optimizer")
    with pytest.raises(SystemExit, match="compile"):
        _train_config(compile="maybe").get_parsed_content("network")
    evaluation = ConfigParser()
    evaluation.read_config([os.path.join(BUNDLE, "configs", f) for f in ("train.json", "evaluate.json")])
    evaluation.update({"channels": [4, 8], "num_layers": 1, "device": "$torch.device('cpu')", "compile": True})
    assert compiled_parts(evaluation.get_parsed_content("network"))
    for built in ("network", "network_def"):  # ckpt_export builds network_def alone: the eager network it scripts
        inference = ConfigParser()
        inference.read_config(os.path.join(BUNDLE, "configs", "inference.json"))
        inference.update(
            {
                "channels": [4, 8],
                "num_layers": 1,
                "device": "$torch.device('cpu')",
                "compile": True,
                "save_weights": True,
            }
        )
        net = inference.get_parsed_content(built)
        assert bool(compiled_parts(getattr(net, "network", net))) == (built == "network")
