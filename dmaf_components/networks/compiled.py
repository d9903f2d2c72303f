# Copyright (c) DMAF-Net bundle contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""The opt-in compiled network: the fixed-structure parts of a DMAF-Net compiled in place with ``torch.compile``.

A 128^3 AMP training step on a GPU is host-bound: about 5250 kernel launches per step, the GPU busy 52-63 % of the
time (docs/performance.md). :func:`compile_network` cuts the host's share by compiling, in place, the parts of the
network whose structure does not depend on the modality mask:

=========================================  ======================================================================
part                                       compiled as
=========================================  ======================================================================
each modality encoder E_m                  ``nn.Module.compile`` (the four encoders share their graphs)
shared decoder D_s, fusion decoder D_f     ``nn.Module.compile``, one isolated region each
DMAF fusion, per level                     ``torch.compile`` of ``DMAFFusion._present_weights`` (pooling, token
                                           convolution, embeddings, K transformer layers, score head, up-sampling,
                                           softmax) and of ``DMAFFusion._weighted_sum`` (Eq. 3)
concatenation fusion, per level            ``torch.compile`` of ``ConcatFusion._present`` (present modalities)
=========================================  ======================================================================

What stays eager: the mask-dependent routing of ``DMAFNet.forward`` and of the fusions (which modalities are present,
``nonzero``/``index_copy``/``index_put``, grouping samples by their number of present modalities), the mean fusion
(one operation) and the concatenation baseline's mixed-mask 1x1 convolution. The parameters, their names, the state
dict and checkpoints are unchanged (``nn.Module.compile`` compiles in place, unlike ``torch.compile(module)``), so
``net.encoders`` is still what the DTM handler scales, and an optimizer built before still holds the right tensors.

Never a silent fallback to eager: every region is compiled with ``fullgraph=True`` (a graph break raises), and with
its own ``recompile_limit`` (an argument of ``torch.compile`` in torch 2.13), past which ``fullgraph=True`` raises
``FailOnRecompileLimitHit`` instead of running the region eagerly from then on. The number of present modalities P
changes the shared decoder's batch (P * B) and the fusions' inputs ``(B, P, C, ...)``; with dynamo's default
``dynamic=None`` the second size seen of a dimension compiles a dynamic graph (sizes 0 and 1 keep their own), so a
region needs a handful of graphs, not one per presence pattern (15 with 4 modalities): see docs/engineering.md.

The CPU kernels (:mod:`.cpu_kernels`) are removed first, on every device: their custom autograd functions read
storage offsets and strides, and the fused norm chooses what to save for backward from a Python test of the weights,
which a full graph cannot capture (dynamo stops at the first, in ``to_channels_last``); inductor generates its own
fused normalisation kernels instead. On CUDA they are inactive anyway.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import DMAFError, BundleExit, as_bool
from .cpu_kernels import remove_cpu_kernels
from .fusion import ConcatFusion, DMAFFusion

__all__ = ["COMPILED_METHODS", "compile_network", "compiled_network", "compiled_parts"]

#: the fusion methods compiled per class: the fixed-structure parts of each fusion (the routing around them is eager)
COMPILED_METHODS: dict[type, tuple[str, ...]] = {
    DMAFFusion: ("_present_weights", "_weighted_sum"),
    ConcatFusion: ("_present",),
}

_COMPILE_ARGS = set(inspect.signature(torch.compile).parameters)


class _CompiledMethod:
    """``module.<name>`` computed by a compiled copy of the class's function, called with the module as ``self``.

    Stored in the module's ``__dict__`` (so it shadows the class's method); the module's parameters, buffers and
    state dict are untouched. A copy of the module (``copy.deepcopy``, pickling) gets the plain method back, as a copy
    of a module compiled by ``nn.Module.compile`` is eager.
    """

    def __init__(self, module: nn.Module, name: str, compiled: Callable[..., Any]) -> None:
        self.module = module
        self.name = name
        self.compiled = compiled

    def __call__(self, *args: Any) -> Any:
        return self.compiled(self.module, *args)

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        # rebuilt as getattr(copy, name) before the copy's __dict__ is filled: the class's (eager) method
        return getattr, (self.module, self.name)


def _compile_kwargs(mode: str | None, dynamic: bool | None, backend: str | Callable, recompile_limit: int) -> dict:
    kwargs: dict[str, Any] = {"fullgraph": True, "dynamic": dynamic, "backend": backend, "mode": mode}
    if "recompile_limit" in _COMPILE_ARGS:
        kwargs["recompile_limit"] = recompile_limit
    else:  # an older PyTorch: only the global limit exists; raise it (never lower it). fullgraph=True still raises
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, recompile_limit)
    return kwargs


def compile_network(
    net: nn.Module,
    mode: str | None = None,
    dynamic: bool | None = None,
    backend: str | Callable = "inductor",
    recompile_limit: int = 64,
) -> nn.Module:
    """Compile the fixed-structure parts of a DMAF-Net in place (see the module's docstring for what and why).

    Compilation is lazy: each region compiles at its first call with a new input signature (the first training step
    of every new number of present modalities, the first evaluation, ...). Call it before wrapping the network in
    ``DistributedDataParallel``. Calling it again recompiles with the new options.

    Args:
        net: a :class:`~dmaf_components.networks.DMAFNet` (not a DDP wrapper), on any device.
        mode: ``torch.compile``'s mode: None (the default mode), ``"max-autotune-no-cudagraphs"``, ... The CUDA-graph
            modes (``"reduce-overhead"``, ``"max-autotune"``) have not been tested with this network's training step.
        dynamic: ``torch.compile``'s ``dynamic``: None (default) compiles static graphs and makes a dimension dynamic
            when a second size of it is seen; False compiles one graph per input shape; True starts dynamic.
        backend: ``torch.compile``'s backend (``"inductor"``; tests use ``"eager"``/``"aot_eager"`` or a counting
            wrapper).
        recompile_limit: graphs allowed per compiled region before compiling one more raises
            ``torch._dynamo.exc.FailOnRecompileLimitHit`` (never a silent fallback to eager). On a PyTorch whose
            ``torch.compile`` takes no ``recompile_limit`` (older than 2.13 may not), dynamo's global
            ``recompile_limit`` is raised to at least this value instead.

    Returns:
        ``net`` itself, with its CPU kernels removed and the parts above compiled.

    Raises:
        TypeError: ``net`` is not a DMAF-Net (e.g. already wrapped in DDP).
    """
    missing = [a for a in ("encoders", "shared_decoder", "fusion_decoder", "fusions") if not hasattr(net, a)]
    if missing:
        raise TypeError(
            f"compile_network needs a DMAFNet (compile before wrapping it in DDP); {type(net).__name__} "
            f"has no {', '.join(missing)}."
        )
    if isinstance(recompile_limit, bool) or not isinstance(recompile_limit, int) or recompile_limit < 1:
        raise ValueError(f"recompile_limit must be a positive integer, got {recompile_limit!r}.")
    kwargs = _compile_kwargs(mode, dynamic, backend, recompile_limit)
    remove_cpu_kernels(net)
    # dynamo keeps its compiled graphs per code object, shared by every region that compiles the same function. The
    # four encoders (one class, the same shapes) share theirs: one compilation serves all four. The two decoders (one
    # class, different heads and batches) and the fusion levels (one class per fusion, different widths and sizes)
    # would count each other's graphs against their limit: each is an isolated region
    isolated = {"isolate_recompiles": True} if "isolate_recompiles" in _COMPILE_ARGS else {}
    for encoder in net.encoders:
        encoder.compile(**kwargs)
    for decoder in (net.shared_decoder, net.fusion_decoder):
        decoder.compile(**kwargs, **isolated)
    for fusion in net.fusions:
        for name in _compiled_method_names(fusion):
            function = getattr(type(fusion), name)
            fusion.__dict__[name] = _CompiledMethod(fusion, name, torch.compile(function, **kwargs, **isolated))
    return net


def _compiled_method_names(fusion: nn.Module) -> tuple[str, ...]:
    for cls, names in COMPILED_METHODS.items():
        if isinstance(fusion, cls):
            return names
    return ()


def compiled_parts(net: nn.Module) -> list[str]:
    """Names of the compiled parts of ``net`` (``"encoders.0"``, ``"fusions.1._present_weights"``...); empty for an
    eager network."""
    parts = [name for name, module in net.named_modules() if getattr(module, "_compiled_call_impl", None) is not None]
    for name, module in net.named_modules():
        parts += [f"{name}.{attr}" for attr, value in vars(module).items() if isinstance(value, _CompiledMethod)]
    return parts


def compiled_network(network: nn.Module, enabled: Any = False, mode: str | None = None) -> nn.Module:
    """``network`` itself, or with ``enabled`` (the bundle's ``--compile True``) :func:`compile_network` of it (for
    bundle configs: a value that is not a switch ends the run with one line,
    :class:`~dmaf_components.errors.BundleExit`)."""
    try:
        if not as_bool(enabled, "--compile"):
            return network
    except DMAFError as exc:
        raise BundleExit(str(exc)) from None
    return compile_network(network, mode=mode)
