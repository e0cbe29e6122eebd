"""`DiTConfig`: the options of the reference DiT, from code, JSON or YAML, with
SLA2 presets. Every field is checked on construction; an error names the field."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .._checks import check_fractions, check_known_keys
from ..sla2 import ALPHA_MODES

ATTENTIONS = ("full", "sla", "sla2")
# (topk, compression): the fraction of key blocks computed exactly and d / d_r of the router.
SLA2_PRESETS = {
    "max-speed": {"sla2_topk_ratio": 0.05, "sla2_compression_ratio": 16},
    "balanced": {"sla2_topk_ratio": 0.15, "sla2_compression_ratio": 8},
    "quality": {"sla2_topk_ratio": 0.25, "sla2_compression_ratio": 4},
}


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"DiT config: {name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class DiTConfig:
    """A small image (input_size (H, W)) or video ((T, H, W)) diffusion transformer on
    latents (in_channels 4..16) or pixels (3), JiT-style: patches in, patches out."""

    input_size: tuple[int, ...] = (32, 32)   # (H, W) or (T, H, W)
    in_channels: int = 4
    patch_size: int = 2
    temporal_patch_size: int = 1            # video only
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 0                    # 0: unconditional; else class labels with a null class for CFG
    attention: str = "full"                 # "full" | "sla" | "sla2"
    use_sla2: bool = False                  # same as attention="sla2"
    sla_topk: float = 0.1                   # attention="sla"
    sla2_topk_ratio: float = 0.15
    sla2_compression_ratio: int = 8
    sla2_alpha: str = "head"                # "head" | "block"
    sla2_enable_qat: bool = False
    sla2_start_layer: int = 0               # layers before it keep full attention
    block_q: int = 128                      # SLA/SLA2 blocks
    block_k: int = 64

    def __post_init__(self):
        size = tuple(self.input_size) if isinstance(self.input_size, (list, tuple)) else self.input_size
        object.__setattr__(self, "input_size", size)
        if not isinstance(size, tuple) or len(size) not in (2, 3):
            raise ValueError(f"DiT config: input_size must be (H, W) or (T, H, W), got {self.input_size!r}")
        for name in ("in_channels", "patch_size", "temporal_patch_size", "hidden_size", "depth", "num_heads",
                     "sla2_compression_ratio", "block_q", "block_k"):
            _positive_int(name, getattr(self, name))
        for i, n in enumerate(size):
            _positive_int(f"input_size[{i}]", n)
        patches = (self.temporal_patch_size,) * (len(size) == 3) + (self.patch_size, self.patch_size)
        if any(n % p for n, p in zip(size, patches)):
            raise ValueError(f"DiT config: input_size {size} must be divisible by the patch sizes {patches} "
                             f"(patch_size, temporal_patch_size)")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"DiT config: num_heads={self.num_heads} must divide hidden_size={self.hidden_size}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"DiT config: num_classes must be a non-negative integer, got {self.num_classes!r}")
        if not isinstance(self.mlp_ratio, (int, float)) or isinstance(self.mlp_ratio, bool) or self.mlp_ratio <= 0:
            raise ValueError(f"DiT config: mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"DiT config: attention must be one of {ATTENTIONS}, got {self.attention!r}")
        for name in ("use_sla2", "sla2_enable_qat"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"DiT config: {name} must be a bool, got {getattr(self, name)!r}")
        if self.use_sla2 and self.attention == "sla":
            raise ValueError("DiT config: use_sla2=True contradicts attention='sla'")
        for name in ("sla_topk", "sla2_topk_ratio"):
            try:
                check_fractions(getattr(self, name), 0.0)
            except ValueError:
                raise ValueError(f"DiT config: {name} must be a number in (0, 1], "
                                 f"got {getattr(self, name)!r}") from None
        if self.head_dim % self.sla2_compression_ratio:
            raise ValueError(f"DiT config: sla2_compression_ratio={self.sla2_compression_ratio} must divide the head "
                             f"dim {self.head_dim} (hidden_size / num_heads)")
        if self.sla2_alpha not in ALPHA_MODES:
            raise ValueError(f"DiT config: sla2_alpha must be one of {ALPHA_MODES}, got {self.sla2_alpha!r}")
        if isinstance(self.sla2_start_layer, bool) or not isinstance(self.sla2_start_layer, int) \
                or not 0 <= self.sla2_start_layer < self.depth:
            raise ValueError(f"DiT config: sla2_start_layer must be an integer in [0, depth={self.depth}), "
                             f"got {self.sla2_start_layer!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def attention_kind(self) -> str:
        return "sla2" if self.use_sla2 else self.attention

    @property
    def tokens(self) -> int:
        patches = (self.temporal_patch_size,) * (len(self.input_size) == 3) + (self.patch_size, self.patch_size)
        count = 1
        for n, p in zip(self.input_size, patches):
            count *= n // p
        return count

    # ------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, options: Mapping) -> "DiTConfig":
        """Options by field name; `preset` ("max-speed", "balanced", "quality")
        sets sla2_topk_ratio and sla2_compression_ratio, which options given
        beside it override."""
        if not isinstance(options, Mapping):
            raise ValueError(f"DiT config must be a mapping of options, got {type(options).__name__}")
        options = dict(options)
        preset = options.pop("preset", None)
        if preset is not None:
            if preset not in SLA2_PRESETS:
                raise ValueError(f"DiT config: preset must be one of {tuple(SLA2_PRESETS)}, got {preset!r}")
            options = {**SLA2_PRESETS[preset], **options}
        check_known_keys("DiT config", options, cls)
        return cls(**options)

    @classmethod
    def from_file(cls, path) -> "DiTConfig":
        """A .json, .yaml or .yml file holding the options (YAML needs PyYAML)."""
        path = Path(path)
        text = path.read_text()
        if path.suffix == ".json":
            return cls.from_dict(json.loads(text))
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ImportError("YAML configs need PyYAML: pip install pyyaml") from None
            return cls.from_dict(yaml.safe_load(text) or {})
        raise ValueError(f"DiT config file must end in .json, .yaml or .yml, got {path.name!r}")

    @classmethod
    def parse(cls, config) -> "DiTConfig":
        """A DiTConfig from a DiTConfig, a mapping, a preset name or a config file path."""
        if isinstance(config, cls):
            return config
        if isinstance(config, Mapping):
            return cls.from_dict(config)
        if isinstance(config, str) and config in SLA2_PRESETS:
            return cls.from_dict({"preset": config, "attention": "sla2"})
        if isinstance(config, (str, Path)):
            return cls.from_file(config)
        raise ValueError(f"DiT config must be a DiTConfig, a dict, a preset name or a file path, "
                         f"got {type(config).__name__}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
