"""Stage 1 of SLA2 training: distil the routers and α of every SLA2 layer
towards full attention, on (Q, K, V) captured from the model itself.

    distiller = RouterDistiller(model)
    distiller.capture(batches)                 # one batch per (sample, diffusion timestep)
    report = distiller.distill(topk=0.05, steps=500)

Capture runs the model with full attention in every SLA2 layer (so later
layers see what the full-attention model feeds them) and records each layer's
inputs and output through forward hooks. Distillation then trains each layer
alone, with SoftTop-k routing, on the MSE between its output and the recorded
full-attention output: only the router and α change. One topk at a time: a
router is trained for the sparsity it will run at.

The soft objective has a way to cheat: a router that shrinks its scores makes
Ms uniform, and a uniform Ms leaves the sparse branch equal to full
attention, so the soft MSE keeps falling while the hard routing that runs
afterwards degrades. The distiller therefore measures the hard-routing MSE
every `eval_every` steps and keeps the router and α that scored best there
(the starting point included, so a layer never leaves worse than it came)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .._checks import check_fractions
from .layers import require_sla2_layers


@dataclass(frozen=True)
class LayerReport:
    """MSE to full attention, averaged over the captured samples: with hard
    routing (what runs after stage 1), and with SoftTop-k (the objective)."""

    mse_before: float
    mse_after: float
    soft_mse_before: float
    soft_mse_after: float


@dataclass(frozen=True)
class _Sample:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    target: torch.Tensor  # the layer's full-attention output


class RouterDistiller:
    def __init__(self, model: nn.Module, *, storage_device: torch.device | str | None = None):
        """storage_device: where captured tensors are kept ("cpu" saves GPU
        memory); None keeps them where they were made."""
        self.model = model
        self.layers = require_sla2_layers(model)
        self.storage_device = None if storage_device is None else torch.device(storage_device)
        self.samples: dict[str, list[_Sample]] = {name: [] for name in self.layers}

    # ------------------------------------------------------------ capture
    def capture(self, batches: Iterable, forward: Callable[[nn.Module, object], object] | None = None, *,
                progress: bool = True) -> int:
        """Runs the model once per batch, without gradients, and records every
        SLA2 layer's (q, k, v) and full-attention output. `forward(model,
        batch)` runs one batch; by default a tuple is passed as positional
        arguments, a dict as keyword arguments, anything else as the one
        argument. Returns the number of samples now held per layer."""
        previous = {name: layer.routing for name, layer in self.layers.items()}
        hooks = [layer.register_forward_hook(self._recorder(name), with_kwargs=True)
                 for name, layer in self.layers.items()]
        try:
            for layer in self.layers.values():
                layer.set_routing("dense")
            with torch.no_grad():
                for batch in tqdm(batches, desc="capturing attention inputs", disable=not progress):
                    if forward is not None:
                        forward(self.model, batch)
                    elif isinstance(batch, tuple):
                        self.model(*batch)
                    elif isinstance(batch, dict):
                        self.model(**batch)
                    else:
                        self.model(batch)
        finally:
            for hook in hooks:
                hook.remove()
            for name, layer in self.layers.items():
                layer.set_routing(previous[name])
        counts = {len(samples) for samples in self.samples.values()}
        if counts == {0}:
            raise ValueError("capture saw no call of an SLA2 layer: did the batches run the model?")
        return min(counts)

    def _recorder(self, name: str):
        def hook(module, args, kwargs, output):
            q, k, v = [*args[:3], *(kwargs[key] for key in ("q", "k", "v")[len(args):])]
            out = output[0] if isinstance(output, tuple) else output
            self.samples[name].append(_Sample(*(self._store(t) for t in (q, k, v, out))))

        return hook

    def _store(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return t.to(self.storage_device) if self.storage_device is not None else t

    # ------------------------------------------------------------ distillation
    def distill(self, topk: float, *, steps: int = 500, lr: float = 1e-3, eval_every: int = 25,
                progress: bool = True) -> dict[str, LayerReport]:
        """Trains the router and α of each layer for `steps` steps (one captured
        sample per step, in turn) with Adam at `lr`, keeping the best state by
        hard-routing MSE measured every `eval_every` steps; leaves the layers
        routing hard at `topk`. Returns each layer's MSEs before and after."""
        check_fractions(topk, 0.0)
        for name, value in (("steps", steps), ("eval_every", eval_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        if not all(self.samples.values()):
            raise ValueError("nothing captured for some SLA2 layers: call capture() first")
        reports = {}
        with tqdm(total=steps * len(self.layers), desc=f"distilling routers (topk={topk})",
                  disable=not progress) as bar:
            for name, layer in self.layers.items():
                layer.topk = topk
                before = (self.mse(name, "hard"), self.mse(name, "soft"))  # the first call also sizes α
                self._train_layer(name, steps, lr, eval_every, before[0], bar)
                reports[name] = LayerReport(before[0], self.mse(name, "hard"), before[1], self.mse(name, "soft"))
        return reports

    def _train_layer(self, name: str, steps: int, lr: float, eval_every: int, start_mse: float, bar: tqdm) -> None:
        layer, samples = self.layers[name], self.samples[name]
        device = layer.router.proj_q.weight.device
        trained = [*layer.router.parameters(), layer.alpha_logit]
        for p in trained:  # a router frozen for stage 2 can be distilled again
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(trained, lr=lr)
        best = (start_mse, [p.detach().clone() for p in trained])
        try:
            for step in range(1, steps + 1):
                layer.set_routing("soft")
                sample = samples[(step - 1) % len(samples)]
                out = layer(sample.q.to(device), sample.k.to(device), sample.v.to(device))
                loss = F.mse_loss(out.float(), sample.target.to(device).float())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.update()
                if step % eval_every == 0 or step == steps:
                    error = self.mse(name, "hard")
                    if error < best[0]:
                        best = (error, [p.detach().clone() for p in trained])
        finally:
            with torch.no_grad():
                for p, value in zip(trained, best[1]):
                    p.copy_(value)
            layer.set_routing("hard")

    def mse(self, name: str, routing: str = "hard") -> float:
        """Mean over the captured samples of layer `name`'s MSE to full attention
        with `routing` ("hard" or "soft"); the layer is left routing hard."""
        layer = self.layers[name]
        device = layer.router.proj_q.weight.device
        layer.set_routing(routing)
        try:
            with torch.no_grad():
                errors = [F.mse_loss(layer(s.q.to(device), s.k.to(device), s.v.to(device)).float(),
                                     s.target.to(device).float()) for s in self.samples[name]]
        finally:
            layer.set_routing("hard")
        return float(torch.stack(errors).mean())
