"""`slattn.patch_sdpa`: run SLA inside unmodified models by wrapping
`torch.nn.functional.scaled_dot_product_attention`.

Models that call `F.scaled_dot_product_attention(...)` (diffusers' attention
processors, most DiT code) get SLA wherever it can serve, and the original
SDPA elsewhere, for a reason logged once and counted in `statistics()`.
Code that imported the function by name before patching keeps the original.

Each attention layer gets its own SLA state (the projection of the linear
branch). With `attach(model)` a layer is the module that called SDPA, and
its state becomes a submodule of it (`sla_attention`, then `sla_attention_1`
for a second call from the same module), so optimizers, DDP and FSDP see it
and `model.state_dict()` holds it. Without a model, layers are numbered in
call order within a step (`new_step()` restarts the count) and their states
live in `controller.layers`. `share="head_dim"` keeps one state per
(head_dim, dtype) instead, as some trainers do.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from typing import Callable

import torch
from torch import nn

from .. import _C
from ..checkpoint import load_state, save_state
from ..module import SparseLinearAttention
from .config import SLAConfig

logger = logging.getLogger("slattn")

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
CUDA_HEAD_DIMS = (64, 128)
# Cross-attention to fewer key blocks than this stays dense: routing among a
# handful of blocks saves nothing (text conditioning is the usual case).
MIN_CROSS_KEY_BLOCKS = 4


class SLAController:
    """Holds the patch, the per-layer SLA states and the statistics.

    Use as a context manager (`with slattn.patch_sdpa(cfg): ...`) or keep it
    and call `unpatch()`."""

    def __init__(self, config=None, checkpoint=None, *, activate: bool = True):
        """activate=False builds the controller without patching SDPA (for
        `pinned()` use by attention processors)."""
        self.config = SLAConfig.parse(config)
        self.layers = nn.ModuleDict()  # states not owned by an attached model
        self._owners: dict[str, nn.Module] = {}
        self._stack: list[str] = []
        self._calls_in_owner: Counter = Counter()
        self._call_index = 0
        self._hooks: list = []
        self._original: Callable | None = None
        self._logged: set[str] = set()
        self._stats = Counter()
        self._fallbacks: Counter = Counter()
        self._loaded: dict | None = (load_state(checkpoint, self.config.state_settings()) if checkpoint is not None
                                     else None)
        self._pinned: SparseLinearAttention | None = None
        if activate:
            self.patch()

    # ------------------------------------------------------------ patching
    def patch(self) -> "SLAController":
        if self._original is not None:
            return self
        self._original = torch.nn.functional.scaled_dot_product_attention
        torch.nn.functional.scaled_dot_product_attention = self._attention
        return self

    def unpatch(self) -> None:
        """Restores the original SDPA and removes the hooks of attach()."""
        if self._original is not None:
            self._restore_sdpa()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _restore_sdpa(self) -> None:
        """Restores the SDPA this controller replaced, keeping attach()'s hooks."""
        if torch.nn.functional.scaled_dot_product_attention != self._attention:
            raise RuntimeError("scaled_dot_product_attention was patched again after this controller; "
                               "unpatch the later patch first")
        torch.nn.functional.scaled_dot_product_attention = self._original
        self._original = None

    def __enter__(self) -> "SLAController":
        return self.patch()

    @contextlib.contextmanager
    def pinned(self, state: SparseLinearAttention):
        """SDPA calls inside run SLA with `state` (where SLA can serve), SDPA
        being patched for the duration if it was not already. Yields a
        one-element list that holds, on exit, how many calls SLA served."""
        was_patched = self._original is not None
        previous, self._pinned = self._pinned, state
        before = self._stats["sla"]
        served = [0]
        self.patch()
        try:
            yield served
        finally:
            self._pinned = previous
            served[0] = self._stats["sla"] - before
            if not was_patched:
                self._restore_sdpa()

    def __exit__(self, *exc) -> None:
        self.unpatch()

    # ------------------------------------------------------------ layers
    def attach(self, model: nn.Module) -> "SLAController":
        """Identifies layers by module path in `model` and keeps their SLA
        states as submodules of the modules that call SDPA."""
        for name, module in model.named_modules():
            path = name or "<root>"
            self._owners[path] = module
            self._hooks.append(module.register_forward_pre_hook(self._enter(path)))
            self._hooks.append(module.register_forward_hook(self._leave(path)))
        return self

    def _enter(self, path: str):
        def hook(module, args):
            self._stack.append(path)
            self._calls_in_owner[path] = 0

        return hook

    def _leave(self, path: str):
        def hook(module, args, output):
            # Pop through frames an exception may have left behind.
            while path in self._stack:
                if self._stack.pop() == path:
                    break

        return hook

    def new_step(self) -> None:
        """Restarts the call-order numbering of layers (models not attached)."""
        self._call_index = 0
        self._stack.clear()

    def states(self) -> dict[str, SparseLinearAttention]:
        """Every SLA state by its layer key (the key of its checkpoint entry)."""
        return dict(self._state_items())

    def parameters(self) -> list[nn.Parameter]:
        """The SLA parameters, for an optimizer param group (after a first forward created them)."""
        return [p for state in self.states().values() for p in state.parameters()]

    def statistics(self) -> dict:
        return {"calls": self._stats["calls"], "sla_calls": self._stats["sla"],
                "fallbacks": sum(self._fallbacks.values()), "fallback_reasons": dict(self._fallbacks),
                "layers": len(self.states())}

    def _state_items(self):
        for key, state in self.layers.items():
            yield self._public_key(key), state
        for path, owner in self._owners.items():
            for name, child in owner.named_children():
                if name.startswith("sla_attention") and isinstance(child, SparseLinearAttention):
                    yield f"{path}.{name}" if path != "<root>" else name, child

    @staticmethod
    def _public_key(name: str) -> str:
        # ModuleDict names cannot hold ':' or '.'; checkpoints use "<head_dim>:<dtype>" in shared mode.
        return name.replace("__", ":")

    def new_state(self, head_dim: int) -> SparseLinearAttention:
        """A fresh SLA state (zero projection) with this controller's settings."""
        c = self.config
        return SparseLinearAttention(head_dim, c.topk, c.feature_map, c.blkq, c.blkk, c.use_bf16, c.tie_feature_map_qk,
                                     negligible=c.negligible, linear_scope=c.linear_scope, quantized=c.quantized)

    def _state_for(self, q: torch.Tensor) -> SparseLinearAttention:
        if self._pinned is not None:
            return self._pinned
        head_dim = q.shape[-1]
        if self.config.share == "head_dim":
            name = f"{head_dim}__{_DTYPE_NAMES[q.dtype]}"
            holder, key = self.layers, self._public_key(name)
        elif self._stack:
            owner_path = self._stack[-1]
            index = self._calls_in_owner[owner_path]
            self._calls_in_owner[owner_path] += 1
            name = "sla_attention" if index == 0 else f"sla_attention_{index}"
            holder = self._owners[owner_path]
            key = name if owner_path == "<root>" else f"{owner_path}.{name}"
        else:
            name = f"call{self._call_index}"
            self._call_index += 1
            holder, key = self.layers, name
        state = getattr(holder, name, None)
        if state is None:
            state = self.new_state(head_dim).to(q.device)
            if self._loaded is not None and key in self._loaded:
                state.load_state_dict(self._loaded[key])
            holder.add_module(name, state)
        return state

    # ------------------------------------------------------------ checkpoints
    def save_state(self, directory) -> None:
        """Writes sla_attention.pt and sla_attention.safetensors (atomically)."""
        state = {key: {k: v.detach().cpu() for k, v in module.state_dict().items()}
                 for key, module in self.states().items()}
        save_state(directory, self.config.state_settings(), state)

    def load_state(self, directory) -> None:
        """Restores saved states: existing layers now, the others when first called."""
        loaded = load_state(directory, self.config.state_settings())
        if loaded is None:
            return
        self._loaded = loaded
        for key, module in self.states().items():
            if key in loaded:
                module.load_state_dict(loaded[key])

    # ------------------------------------------------------------ the wrapper
    def _fallback_reason(self, query, key, value, attn_mask, dropout_p, is_causal, enable_gqa) -> str | None:
        c = self.config
        if attn_mask is not None:
            return "an attention mask"
        if dropout_p > 0.0:
            return "dropout_p > 0"
        if is_causal:
            return "causal attention"
        if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (query, key, value)):
            return "inputs that are not 4-D (B, H, L, D)"
        if not (query.dtype == key.dtype == value.dtype) or query.dtype not in _DTYPE_NAMES:
            return f"dtype {query.dtype} (SLA takes bfloat16, float16, float32)"
        if query.device.type not in ("cpu", "cuda"):
            return f"device {query.device.type}"
        if query.device.type == "cuda" and not _C.built_with_cuda():
            return "a CUDA tensor in a build without CUDA kernels"
        head_dim = query.shape[-1]
        if key.shape[-1] != head_dim or value.shape[-1] != head_dim:
            return "head dims of q, k and v that differ"
        if query.device.type == "cuda" and head_dim not in CUDA_HEAD_DIMS:
            return f"head_dim {head_dim} on CUDA (kernels for {CUDA_HEAD_DIMS})"
        if head_dim % 8 or head_dim > 256:
            return f"head_dim {head_dim}"
        q_len, k_len = query.shape[-2], key.shape[-2]
        if q_len < c.blkq or k_len < c.blkk:
            return "fewer tokens than one block"
        if key.shape[1] != query.shape[1] and not (enable_gqa and query.shape[1] % key.shape[1] == 0):
            return "q and k/v head counts that SDPA would not pair"
        if k_len != q_len and k_len < MIN_CROSS_KEY_BLOCKS * c.blkk:
            return "cross-attention with a short key sequence"
        return None

    def _attention(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False):
        self._stats["calls"] += 1
        reason = self._fallback_reason(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
        if reason is not None:
            self._fallbacks[reason] += 1
            if reason not in self._logged:
                self._logged.add(reason)
                logger.warning("slattn: dense SDPA for %s (logged once; see statistics())", reason)
            options = {"enable_gqa": enable_gqa} if enable_gqa else {}
            return self._original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                  scale=scale, **options)
        self._stats["sla"] += 1
        return self._state_for(query)(query, key, value, scale=scale)


def patch_sdpa(config=None, checkpoint=None) -> SLAController:
    """Patches SDPA with SLA; returns the controller (a context manager).

    `config`: an SLAConfig, a dict, a JSON string or a Python-literal string,
    with keys topk, feature_map, blkq, blkk, tie_feature_map_qk (defaults 0.2,
    "softmax", 64, 64, True) and slattn's own (negligible, linear_scope,
    use_bf16, share, quantized). `checkpoint`: a folder whose sla_attention.pt (if
    present) seeds the layer states."""
    return SLAController(config, checkpoint)
