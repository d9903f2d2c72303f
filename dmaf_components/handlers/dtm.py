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
"""Dynamic Training Monitoring (paper Sec. 3.4, Eq. 11-18) as an Ignite handler for MONAI trainers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import ignite.distributed as idist
import torch
from monai.engines.utils import IterationEvents
from torch import nn

from ..losses import DMAFLoss

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["DynamicTrainingMonitor", "SCALING_MODES"]

SCALING_MODES = ("gradient", "update", "none")
REWEIGHT_NORMS = ("sum", "mean")


class DynamicTrainingMonitor:
    """Track per-modality distillation gaps with an adaptive EMA, reweight L_sep and scale encoder gradients.

    At every ``IterationEvents.BACKWARD_COMPLETED`` (after backward, before the optimizer step) it

    1. reads the iteration's gaps g_r(m), g_p(m) (Eq. 11) from ``loss.last_terms``, summed across DDP ranks so that
       every rank holds identical state;
    2. updates the EMAs of the modalities present in the batch (Eq. 12) with the adaptive decay
       alpha_decay = 0.9 * (1 - sigmoid(ratio_m)), ratio_m = (g_r^{t-1}(m) + eps) / (g_p^{t-1}(m) + eps) (Eq. 13);
       a modality's first observation initialises its EMA;
    3. computes alpha2 = mean(g_r) / (mean(g_r) + mean(g_p)) (Eq. 15), g_total = alpha2 g_r + (1 - alpha2) g_p
       (Eq. 14) and w(m) = (1 / g_total(m)) / sum_m' (1 / g_total(m')) (Eq. 16); modalities not yet observed take
       the mean g_total of the observed ones;
    4. scales encoder m by gamma(m) = clip(1 / w(m), 0.1, 10), times 0.7 when the cosine similarity between this and
       the previous (unscaled) gradient of encoder m is below -0.5 (Eq. 18);
    5. writes w into ``loss.modality_weights``, used by L_sep at the next iteration (Eq. 17).

    ``reweight_norm``: Eq. 16's w sums to 1 (``"sum"``, paper, default), so turning DTM on also divides L_sep by
    about M compared with w = 1 per modality without DTM (an effective lambda2 of lambda2 / M). ``"mean"`` gives L_sep
    M * w instead (mean 1), so DTM only redistributes L_sep's weight between the modalities; gamma (Eq. 18) is
    computed from Eq. 16's w either way. docs/accuracy.md measures both.

    ``scaling_mode``: ``"gradient"`` (paper, default) multiplies encoder m's gradients; under Adam/AdamW the
    per-parameter normalisation cancels a constant factor, so only its change over time acts. ``"update"`` applies
    the factor to the optimizer's step instead (parameters are moved to p_old + gamma * (p_new - p_old) after the
    step, at ``IterationEvents.MODEL_COMPLETED``), so gamma acts under any optimizer. ``"none"`` leaves gradients
    alone. With AMP the gradients are still multiplied by the GradScaler's scale at this point: scaling is linear
    and the cosine is scale-free, and an iteration with non-finite gradients (skipped by the scaler) neither
    scales nor becomes the "previous" gradient.

    Args:
        loss: the :class:`~dmaf_components.losses.DMAFLoss` whose gaps are tracked and whose w is set.
        network: the DMAF-Net (or a DDP wrapper); default the engine's network.
        modality_names: names used in logs, default ``m0, m1, ...``.
        reweight: apply w to L_sep (Eq. 17); when False the loss keeps w = 1.
        reweight_norm: ``"sum"`` (Eq. 16) or ``"mean"``, see above.
        scaling_mode: see above.
        gamma_range: clip range of gamma.
        conflict_threshold: cosine below which the conflict factor applies (-0.5).
        conflict_factor: 0.7.
        decay_scale: the 0.9 of Eq. 13.
        eps: epsilon of Eq. 13 and of the inverse gaps.
    """

    def __init__(
        self,
        loss: DMAFLoss,
        network: nn.Module | None = None,
        modality_names: Sequence[str] | None = None,
        reweight: bool = True,
        reweight_norm: str = "sum",
        scaling_mode: str = "gradient",
        gamma_range: Sequence[float] = (0.1, 10.0),
        conflict_threshold: float = -0.5,
        conflict_factor: float = 0.7,
        decay_scale: float = 0.9,
        eps: float = 1e-8,
    ) -> None:
        if scaling_mode not in SCALING_MODES:
            raise ValueError(f"scaling_mode must be one of {SCALING_MODES}, got {scaling_mode!r}.")
        if reweight_norm not in REWEIGHT_NORMS:
            raise ValueError(
                f"reweight_norm (dtm_reweight_norm) must be one of {REWEIGHT_NORMS}, got {reweight_norm!r}."
            )
        m = getattr(loss, "module", loss).num_modalities
        self.loss = getattr(loss, "module", loss)  # a DDP-wrapped loss (multi-GPU config)
        self.network = network
        self.names = list(modality_names) if modality_names is not None else [f"m{i}" for i in range(m)]
        if len(self.names) != m:
            raise ValueError(f"modality_names has {len(self.names)} names but the loss has {m} modalities.")
        if not isinstance(reweight, bool):  # "false" from a command line would silently mean True
            raise TypeError(
                f"reweight (dtm_reweight) must be True or False, got {reweight!r} (on the command line: False)."
            )
        self.reweight = reweight
        self.reweight_norm = reweight_norm
        self.scaling_mode = scaling_mode
        self.gamma_range = (float(gamma_range[0]), float(gamma_range[1]))
        self.conflict_threshold = conflict_threshold
        self.conflict_factor = conflict_factor
        self.decay_scale = decay_scale
        self.eps = eps
        self.ema_relation = torch.zeros(m, dtype=torch.float64)
        self.ema_prototype = torch.zeros(m, dtype=torch.float64)
        self.seen = torch.zeros(m, dtype=torch.bool)
        self.prev_grads: list[torch.Tensor | None] = [None] * m
        self.similarity = torch.full((m,), float("nan"), dtype=torch.float64)
        self.applied_scale = torch.ones(m, dtype=torch.float64)
        self._snapshots: dict[int, tuple[list[torch.Tensor], float]] = {}
        self._apply_weights()

    # ----------------------------------------------------------------- Eq. 12-16
    def update(self, relation_sum: torch.Tensor, prototype_sum: torch.Tensor, count: torch.Tensor) -> None:
        """EMA update (Eq. 12-13) from per-modality gap sums and sample counts of one iteration."""
        count = count.detach().double().cpu()
        present = count > 0
        g_r = relation_sum.detach().double().cpu() / count.clamp_min(1.0)
        g_p = prototype_sum.detach().double().cpu() / count.clamp_min(1.0)
        ratio = (self.ema_relation + self.eps) / (self.ema_prototype + self.eps)
        decay = self.decay_scale * (1.0 - torch.sigmoid(ratio))
        decay = torch.where(self.seen, decay, torch.zeros_like(decay))  # first observation initialises the EMA
        new_r = decay * self.ema_relation + (1.0 - decay) * g_r
        new_p = decay * self.ema_prototype + (1.0 - decay) * g_p
        self.ema_relation = torch.where(present, new_r, self.ema_relation)
        self.ema_prototype = torch.where(present, new_p, self.ema_prototype)
        self.seen = self.seen | present

    @property
    def alpha2(self) -> float:
        """Eq. 15 over the observed modalities (0.5 before any observation)."""
        if not bool(self.seen.any()):
            return 0.5
        r = float(self.ema_relation[self.seen].mean())
        p = float(self.ema_prototype[self.seen].mean())
        return r / (r + p + self.eps)

    def total_gap(self) -> torch.Tensor:
        """g_total(m) of Eq. 14; unobserved modalities get the mean of the observed ones (1 before any)."""
        a2 = self.alpha2
        g = a2 * self.ema_relation + (1.0 - a2) * self.ema_prototype
        fill = g[self.seen].mean() if bool(self.seen.any()) else torch.tensor(1.0, dtype=torch.float64)
        return torch.where(self.seen, g, fill)

    def weights(self) -> torch.Tensor:
        """w(m) of Eq. 16 (sums to 1 over the modalities)."""
        inv = 1.0 / (self.total_gap() + self.eps)
        return inv / inv.sum()

    def gammas(self) -> torch.Tensor:
        """gamma(m) = clip(1 / w(m), 0.1, 10) of Eq. 18."""
        return (1.0 / self.weights()).clamp(*self.gamma_range)

    def _apply_weights(self) -> None:
        m = len(self.names)
        if not self.reweight:
            w = torch.ones(m, dtype=torch.float64)
        else:
            w = self.weights() * (m if self.reweight_norm == "mean" else 1.0)
        self.loss.modality_weights.copy_(w.to(self.loss.modality_weights))

    # ----------------------------------------------------------------- Eq. 18
    def _encoders(self, engine: Engine | None) -> Sequence[nn.Module]:
        net = self.network if self.network is not None else getattr(engine, "network", None)
        net = getattr(net, "module", net)  # DDP / DataParallel
        if net is None or not hasattr(net, "encoders"):
            raise AttributeError("DynamicTrainingMonitor needs a DMAF-Net (a network with `encoders`).")
        return net.encoders

    def scale_gradients(self, encoders: Sequence[nn.Module]) -> None:
        """Apply Eq. 18 to every encoder that received a gradient in this iteration.

        The finiteness test and the cosine of every encoder are read back in one host-device synchronisation, and
        the gradients are multiplied by one ``torch._foreach_mul_`` (one multiplication per tensor, by the same
        Python float as ``p.grad.mul_(factor)``: bit-identical results, ``tests/test_dtm.py``).
        """
        gammas = self.gammas().tolist()
        self.similarity.fill_(float("nan"))
        self.applied_scale.fill_(1.0)
        self._snapshots = {}
        grads: dict[int, list[torch.Tensor]] = {}
        flats: dict[int, torch.Tensor] = {}
        for m, encoder in enumerate(encoders):
            params = [p for p in encoder.parameters() if p.grad is not None]
            if params:  # (a modality absent from the whole batch has nothing to scale)
                grads[m] = [p.grad for p in params]
                flats[m] = torch.cat([g.detach().flatten().float() for g in grads[m]])  # a new tensor, not a view
        if not flats:
            return
        compared: dict[int, bool] = {}
        stats = []
        for m, flat in flats.items():
            prev = self.prev_grads[m]
            compared[m] = prev is not None and prev.numel() == flat.numel()
            cosine = (
                torch.nn.functional.cosine_similarity(flat, prev.to(flat.device), dim=0)
                if compared[m]
                else flat.new_full((), float("nan"))
            )
            stats.append(torch.stack([torch.isfinite(flat).all().to(flat.dtype), cosine]))
        host = torch.stack(stats).tolist()  # the one synchronisation: [finite, cosine] per encoder, float32 values
        scaled: list[torch.Tensor] = []
        factors: list[float] = []
        for (m, flat), (finite, cosine) in zip(flats.items(), host):
            if not finite:  # AMP overflow: the scaler skips this step
                continue
            factor = gammas[m]
            if compared[m]:
                self.similarity[m] = cosine
                if cosine < self.conflict_threshold:
                    factor *= self.conflict_factor
            self.prev_grads[m] = flat
            self.applied_scale[m] = factor
            if self.scaling_mode == "gradient":
                scaled += grads[m]
                factors += [factor] * len(grads[m])
            elif self.scaling_mode == "update":
                self._snapshots[m] = ([p.detach().clone() for p in encoders[m].parameters()], factor)
        if scaled:
            torch._foreach_mul_(scaled, factors)

    def _rescale_updates(self, engine: Engine) -> None:
        for m, encoder in enumerate(self._encoders(engine)):
            if m not in self._snapshots:
                continue
            before, factor = self._snapshots[m]
            with torch.no_grad():
                for p, p0 in zip(encoder.parameters(), before):
                    p.copy_(p0 + factor * (p - p0))
        self._snapshots = {}

    # ----------------------------------------------------------------- Ignite
    def attach(self, engine: Engine) -> None:
        """Register on a MONAI trainer (which fires ``IterationEvents``)."""
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)
        if self.scaling_mode == "update":
            engine.add_event_handler(IterationEvents.MODEL_COMPLETED, self._rescale_updates)

    def __call__(self, engine: Engine) -> None:
        self.step(self._encoders(engine))
        engine.state.dtm = self.scalars()

    def step(self, encoders: Sequence[nn.Module]) -> None:
        """One iteration of DTM between backward and the optimizer step, for a hand-written training loop (the
        Ignite handler calls it at ``BACKWARD_COMPLETED``): gaps from ``loss.last_terms`` (reduced across DDP ranks)
        -> EMA update -> gradient scaling of ``encoders`` (Eq. 18) -> w(m) written to the loss for the next
        iteration (Eq. 16-17)."""
        terms = self.loss.last_terms
        if terms is None:
            raise RuntimeError("DynamicTrainingMonitor: the loss has not been called in this iteration.")
        stats = torch.stack([terms.relation_gap_sum, terms.prototype_gap_sum, terms.modality_count]).float()
        if idist.get_world_size() > 1:
            stats = idist.all_reduce(stats)
        self.update(stats[0], stats[1], stats[2])
        if self.scaling_mode != "none":
            self.scale_gradients(encoders)
        self._apply_weights()

    def scalars(self) -> dict[str, float]:
        """Current DTM state as named floats (for TensorBoard / MLflow)."""
        out: dict[str, float] = {"dtm/alpha2": self.alpha2}
        w, gamma = self.weights(), self.gammas()
        for m, name in enumerate(self.names):
            out[f"dtm/w/{name}"] = float(w[m])
            out[f"dtm/gamma/{name}"] = float(gamma[m])
            out[f"dtm/gap_relation/{name}"] = float(self.ema_relation[m])
            out[f"dtm/gap_prototype/{name}"] = float(self.ema_prototype[m])
            out[f"dtm/applied_scale/{name}"] = float(self.applied_scale[m])
        return out

    # ----------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "ema_relation": self.ema_relation.clone(),
            "ema_prototype": self.ema_prototype.clone(),
            "seen": self.seen.clone(),
            "prev_grads": [None if g is None else g.detach().cpu().clone() for g in self.prev_grads],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # the monitor keeps its state on the CPU; a checkpoint loaded with map_location="cuda" brings it elsewhere
        self.ema_relation = torch.as_tensor(state["ema_relation"]).to("cpu", torch.float64).clone()
        self.ema_prototype = torch.as_tensor(state["ema_prototype"]).to("cpu", torch.float64).clone()
        self.seen = torch.as_tensor(state["seen"]).to("cpu", torch.bool).clone()
        self.prev_grads = [
            None if g is None else torch.as_tensor(g).detach().cpu().clone() for g in state["prev_grads"]
        ]
        if len(self.prev_grads) != len(self.names) or self.seen.numel() != len(self.names):
            raise ValueError(f"DTM state is for {self.seen.numel()} modalities, this monitor has {len(self.names)}.")
        self._apply_weights()
