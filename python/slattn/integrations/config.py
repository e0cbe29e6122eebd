"""`SLAConfig`: the options of the SDPA patch, parsed from what trainers pass on
the command line (``--sla_config '...'``) or in code, and checked once, so a bad
option fails at start-up with its name rather than deep inside a training step."""

from __future__ import annotations

import ast
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass

from .._checks import FEATURE_MAPS, LINEAR_SCOPES, check_known_keys

BLOCK_SIZES = (64, 128)  # what the CUDA kernels take
SHARE_MODES = ("layer", "head_dim")
RUNTIME_OPTIONS = ("quantized",)  # left out of checkpoint settings (SLAConfig.state_settings)

# Shell users write JSON spellings inside Python-literal strings and the other
# way round; these bare names are read as the constants they mean.
_JSON_NAMES = {"true": True, "false": False, "null": None}


def _choices(allowed) -> str:
    return ", ".join(repr(a) for a in allowed)


def _check_fraction(name: str, value, low_open: bool, high_open: bool) -> float:
    # bool is an int subclass, but `topk: true` is a mistake, not 1.0.
    in_range = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        (0.0 < value if low_open else 0.0 <= value) and (value < 1.0 if high_open else value <= 1.0))
    if not in_range:
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ValueError(f"SLA config: {name} must be a number in {interval}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SLAConfig:
    """Options of the SDPA patch; every field is checked on construction."""

    topk: float = 0.2                 # fraction of key blocks computed exactly, (0, 1]
    feature_map: str = "softmax"      # "softmax" | "elu" | "relu" | "hedgehog" (learnable; tied by tie_feature_map_qk)
    blkq: int = 64                    # query block; 64 or 128
    blkk: int = 64                    # key block; 64 or 128
    tie_feature_map_qk: bool = True
    negligible: float = 0.0           # [0, 1), topk + negligible <= 1
    linear_scope: str = "marginal"    # "marginal" | "all"
    use_bf16: bool = True             # compute dtype bf16 (else fp16) for fp32 inputs
    share: str = "layer"              # "layer": one SLA state per attention layer;
                                      # "head_dim": one per (head_dim, dtype)
    quantized: bool = False           # the sparse branch in low bits (INT8/FP8, SPEC section 6)

    def __post_init__(self):
        # Stored as floats so that configs built from 1 and 1.0 compare and serialise alike.
        object.__setattr__(self, "topk", _check_fraction("topk", self.topk, low_open=True, high_open=False))
        object.__setattr__(self, "negligible",
                           _check_fraction("negligible", self.negligible, low_open=False, high_open=True))
        if self.topk + self.negligible > 1.0:
            raise ValueError(f"SLA config: topk + negligible must be <= 1, got topk={self.topk} + "
                             f"negligible={self.negligible}")
        for name in ("blkq", "blkk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value not in BLOCK_SIZES:
                raise ValueError(f"SLA config: {name} must be one of {_choices(BLOCK_SIZES)}, got {value!r}")
        for name, allowed in (("feature_map", FEATURE_MAPS), ("linear_scope", LINEAR_SCOPES),
                              ("share", SHARE_MODES)):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in allowed:
                raise ValueError(f"SLA config: {name} must be one of {_choices(allowed)}, got {value!r}")
        for name in ("tie_feature_map_qk", "use_bf16", "quantized"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"SLA config: {name} must be a bool (true or false), got {value!r}")

    @classmethod
    def parse(cls, config) -> "SLAConfig":
        """An SLAConfig from an SLAConfig, a mapping, None (the defaults), a JSON
        string or a Python-literal string (true/false/null and True/False/None
        both accepted). An empty string, as trainers pass for an unset
        --sla_config, means the defaults. Raises ValueError naming the offending key."""
        if config is None or (isinstance(config, str) and not config.strip()):
            return cls()
        if isinstance(config, cls):
            return config
        if isinstance(config, str):
            config = _parse_string(config)
        if not isinstance(config, Mapping):
            raise ValueError(f"SLA config must be an SLAConfig, a dict, a JSON or Python-literal string, or None, "
                             f"got {type(config).__name__}")
        check_known_keys("SLA config", config, cls)
        return cls(**config)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def state_settings(self) -> dict:
        """The options a checkpoint's states depend on, saved beside them and
        compared on load: all but `quantized`, which changes how a trained
        state is run, not what it holds."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_OPTIONS}


class _JsonNames(ast.NodeTransformer):
    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id in _JSON_NAMES:
            return ast.copy_location(ast.Constant(_JSON_NAMES[node.id]), node)
        return node


def _parse_string(text: str) -> Mapping:
    try:
        value = json.loads(text)
    except ValueError:
        # Working on the syntax tree keeps a quoted 'true' a string; only bare names are rewritten.
        try:
            tree = _JsonNames().visit(ast.parse(text.strip(), mode="eval"))
            value = ast.literal_eval(tree)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as e:
            raise ValueError(f"SLA config string is neither JSON nor a Python literal ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"SLA config string must hold a dict of options, got {type(value).__name__}: {text!r}")
    return value
