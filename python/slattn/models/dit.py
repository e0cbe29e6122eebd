"""A small diffusion transformer (DiT with adaLN-Zero blocks, JiT-style patch
in / patch out) whose attention is full, SLA or SLA2: the reference model for
SLA2 training and its tests."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..module import SparseLinearAttention
from ..sla2 import SparseLinearAttention2
from .config import DiTConfig

FREQUENCY_EMBEDDING = 256  # sinusoidal features of the timestep before its MLP


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) timesteps (any real scale) -> (B, dim) sinusoidal features."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    """Multi-head self-attention over (B, L, hidden) with a pluggable kernel:
    `kernel` None is full attention (PyTorch SDPA), else an SLA or SLA2 module
    that reads q, k, v in the NHD layout (B, L, H, D) without copies."""

    def __init__(self, hidden: int, heads: int, kernel: nn.Module | None):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, hidden = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, hidden // self.heads).unbind(dim=2)
        if self.kernel is None:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            out = out.transpose(1, 2)
        else:
            out = self.kernel(q, k, v)
        return self.proj(out.reshape(b, length, hidden))


class DiTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float, kernel: nn.Module | None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads, kernel)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        inner = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, hidden))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """forward(x, t, y=None): x (B, C, H, W) or (B, C, T, H, W), t (B,)
    timesteps, y (B,) class labels (num_classes means "no label") -> a tensor
    shaped like x (the denoiser's prediction: noise, velocity or clean image).

    Build from a DiTConfig, a dict, a JSON/YAML file or a preset name, with
    keyword overrides: DiT("balanced", depth=4), DiT.from_config("dit.yaml")."""

    def __init__(self, config=None, **overrides):
        super().__init__()
        base = DiTConfig() if config is None else DiTConfig.parse(config)
        config = DiTConfig.from_dict({**base.to_dict(), **overrides}) if overrides else base
        self.config = config
        hidden, c = config.hidden_size, config.in_channels
        self.patch_shape = ((config.temporal_patch_size,) if len(config.input_size) == 3 else ()) \
            + (config.patch_size, config.patch_size)
        patch_numel = c * math.prod(self.patch_shape)
        self.grid = tuple(n // p for n, p in zip(config.input_size, self.patch_shape))
        self.patch_embed = nn.Linear(patch_numel, hidden)
        self.pos_embed = nn.Parameter(torch.randn(1, config.tokens, hidden) * 0.02)
        self.t_embed = nn.Sequential(nn.Linear(FREQUENCY_EMBEDDING, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.y_embed = nn.Embedding(config.num_classes + 1, hidden) if config.num_classes else None
        self.blocks = nn.ModuleList(DiTBlock(hidden, config.num_heads, config.mlp_ratio, self._kernel(i))
                                    for i in range(config.depth))
        self.final_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.final = nn.Linear(hidden, patch_numel)
        self._zero_init()

    @classmethod
    def from_config(cls, config, **overrides) -> "DiT":
        return cls(config, **overrides)

    def _kernel(self, layer: int) -> nn.Module | None:
        cfg = self.config
        kind = cfg.attention_kind
        if kind == "full" or layer < cfg.sla2_start_layer:
            return None
        if kind == "sla":
            return SparseLinearAttention(cfg.head_dim, cfg.sla_topk, "softmax", cfg.block_q, cfg.block_k,
                                         layout="NHD")
        return SparseLinearAttention2(cfg.head_dim, cfg.sla2_topk_ratio, compression_ratio=cfg.sla2_compression_ratio,
                                      alpha=cfg.sla2_alpha, block_q=cfg.block_q, block_k=cfg.block_k,
                                      num_heads=cfg.num_heads, q_len=cfg.tokens, layout="NHD",
                                      qat=cfg.sla2_enable_qat)

    def _zero_init(self) -> None:
        # adaLN-Zero: every block starts as the identity and the output as zero (DiT, Peebles & Xie).
        for module in [*(block.modulation[-1] for block in self.blocks), self.final_modulation[-1], self.final]:
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    # ------------------------------------------------------------ patches
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *size) -> (B, L, C · prod(patch)), patches in raster order."""
        b, c = x.shape[:2]
        dims = len(self.grid)
        split = [d for n, p in zip(self.grid, self.patch_shape) for d in (n, p)]
        x = x.reshape(b, c, *split)
        # (B, C, n0, p0, n1, p1, ...) -> (B, n0, n1, ..., C, p0, p1, ...)
        order = [0, *range(2, 2 + 2 * dims, 2), 1, *range(3, 3 + 2 * dims, 2)]
        return x.permute(order).reshape(b, math.prod(self.grid), -1)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        b, dims, c = tokens.shape[0], len(self.grid), self.config.in_channels
        x = tokens.reshape(b, *self.grid, c, *self.patch_shape)
        order = [0, dims + 1, *(i for d in range(dims) for i in (1 + d, dims + 2 + d))]
        return x.permute(order).reshape(b, c, *self.config.input_size)

    # ------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        expected = (self.config.in_channels, *self.config.input_size)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must be (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        tokens = self.patch_embed(self.patchify(x)) + self.pos_embed
        c = self.t_embed(timestep_embedding(t, FREQUENCY_EMBEDDING))
        if self.y_embed is not None:
            labels = torch.full_like(t, self.config.num_classes, dtype=torch.long) if y is None else y
            c = c + self.y_embed(labels)
        for block in self.blocks:
            tokens = block(tokens, c)
        shift, scale = self.final_modulation(c).chunk(2, dim=-1)
        return self.unpatchify(self.final(modulate(self.final_norm(tokens), shift, scale)))
