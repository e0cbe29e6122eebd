"""slattn.integrations.config.SLAConfig: every accepted form of `--sla_config`
gives the same checked options, and every bad option is refused by name."""

from __future__ import annotations

import dataclasses
import json

import pytest

from slattn.integrations.config import SLAConfig

DEFAULTS = {"topk": 0.2, "feature_map": "softmax", "blkq": 64, "blkk": 64, "tie_feature_map_qk": True,
            "negligible": 0.0, "linear_scope": "marginal", "use_bf16": True, "share": "layer", "quantized": False}

# Every field away from its default, so a form that drops or misreads any key fails.
CUSTOM = {"topk": 0.1, "feature_map": "elu", "blkq": 128, "blkk": 128, "tie_feature_map_qk": False,
          "negligible": 0.3, "linear_scope": "all", "use_bf16": False, "share": "head_dim", "quantized": True}


def test_defaults():
    assert SLAConfig().to_dict() == DEFAULTS
    assert SLAConfig.parse(None) == SLAConfig()
    assert [f.name for f in dataclasses.fields(SLAConfig)] == list(DEFAULTS)


@pytest.mark.parametrize("form", [
    pytest.param(dict(CUSTOM), id="dict"),
    pytest.param(json.dumps(CUSTOM), id="json"),
    pytest.param(repr(CUSTOM), id="python-literal-True"),
    pytest.param(repr(CUSTOM).replace("False", "false"), id="python-literal-json-names"),
    pytest.param(json.dumps(CUSTOM).replace("false", "False"), id="json-with-python-names"),
    pytest.param(SLAConfig(**CUSTOM), id="instance"),
])
def test_accepted_forms(form):
    assert SLAConfig.parse(form).to_dict() == CUSTOM


def test_instance_is_returned_as_is():
    config = SLAConfig(topk=0.5)
    assert SLAConfig.parse(config) is config


def test_partial_dict_keeps_other_defaults():
    assert SLAConfig.parse({"topk": 0.05}).to_dict() == {**DEFAULTS, "topk": 0.05}


def test_json_names_in_python_literal():
    config = SLAConfig.parse("{'topk': 0.1, 'tie_feature_map_qk': true, 'use_bf16': false}")
    assert (config.topk, config.tie_feature_map_qk, config.use_bf16) == (0.1, True, False)


def test_quoted_json_name_stays_a_string():
    # Only bare names are read as constants: a quoted 'true' is refused as a feature map, not turned into True.
    with pytest.raises(ValueError, match=r"feature_map .*got 'true'"):
        SLAConfig.parse("{'feature_map': 'true', 'use_bf16': false}")


def test_null_is_refused_where_a_value_is_needed():
    with pytest.raises(ValueError, match=r"use_bf16 must be a bool.*got None"):
        SLAConfig.parse("{'use_bf16': null}")


def test_integer_topk_is_stored_as_float():
    config = SLAConfig.parse({"topk": 1})
    assert isinstance(config.topk, float) and config.topk == 1.0
    assert config == SLAConfig(topk=1.0)


def test_to_dict_round_trip():
    config = SLAConfig(**CUSTOM)
    assert SLAConfig.parse(config.to_dict()) == config
    assert SLAConfig.parse(json.dumps(config.to_dict())) == config
    assert SLAConfig.parse(repr(config.to_dict())) == config


def test_checkpoint_settings_leave_out_how_states_run():
    """quantized changes how a trained state runs, not what it holds: checkpoints neither save nor compare it."""
    settings = SLAConfig(**CUSTOM).state_settings()
    assert "quantized" not in settings
    assert settings == {k: v for k, v in CUSTOM.items() if k != "quantized"}


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SLAConfig().topk = 0.5


@pytest.mark.parametrize("options, named", [
    ({"topk": 0.0}, "topk"),
    ({"topk": -0.1}, "topk"),
    ({"topk": 1.5}, "topk"),
    ({"topk": float("nan")}, "topk"),
    ({"topk": "0.1"}, "topk"),
    ({"topk": True}, "topk"),
    ({"negligible": -0.1}, "negligible"),
    ({"negligible": 1.0}, "negligible"),
    ({"negligible": False}, "negligible"),
    ({"negligible": None}, "negligible"),
    ({"topk": 0.6, "negligible": 0.5}, "topk \\+ negligible"),
    ({"blkq": 32}, "blkq"),
    ({"blkq": 64.0}, "blkq"),
    ({"blkq": True}, "blkq"),
    ({"blkk": 256}, "blkk"),
    ({"blkk": "64"}, "blkk"),
    ({"feature_map": "gelu"}, "feature_map"),
    ({"feature_map": "Softmax"}, "feature_map"),
    ({"linear_scope": "none"}, "linear_scope"),
    ({"share": "model"}, "share"),
    ({"share": ["layer"]}, "share"),
    ({"tie_feature_map_qk": 1}, "tie_feature_map_qk"),
    ({"use_bf16": "true"}, "use_bf16"),
    ({"quantized": 1}, "quantized"),
])
def test_bad_values_refused_by_name(options, named):
    for form in (options, json.dumps(options, allow_nan=True)):
        with pytest.raises(ValueError, match=named):
            SLAConfig.parse(form)
    with pytest.raises(ValueError, match=named):
        SLAConfig(**options)


@pytest.mark.parametrize("name, allowed", [
    ("blkq", "64, 128"),
    ("feature_map", "'softmax', 'elu', 'relu', 'hedgehog'"),
    ("linear_scope", "'marginal', 'all'"),
    ("share", "'layer', 'head_dim'"),
])
def test_choice_errors_list_the_allowed_values(name, allowed):
    with pytest.raises(ValueError, match=f"{name} must be one of {allowed}, got 'x'"):
        SLAConfig.parse({name: "x"})


def test_fraction_errors_give_the_interval():
    with pytest.raises(ValueError, match=r"topk must be a number in \(0, 1\]"):
        SLAConfig.parse({"topk": 2})
    with pytest.raises(ValueError, match=r"negligible must be a number in \[0, 1\)"):
        SLAConfig.parse({"negligible": 1})


@pytest.mark.parametrize("options", [{"top_k": 0.1}, {"TopK": 0.1}, {"BLKQ": 64}, {"topk": 0.1, "sparsity": 0.9}])
def test_unknown_keys_refused_with_the_known_keys(options):
    with pytest.raises(ValueError, match="unknown key") as info:
        SLAConfig.parse(options)
    message = str(info.value)
    assert all(repr(key) in message for key in options if key not in DEFAULTS)
    assert "known keys: " + ", ".join(DEFAULTS) in message


@pytest.mark.parametrize("text", ["", "  "])
def test_empty_string_means_the_defaults(text):
    assert SLAConfig.parse(text) == SLAConfig()


@pytest.mark.parametrize("text", ["topk=0.1", "{'topk': 0.1", "{'topk': __import__('os')}", "{'topk': x}"])
def test_unparseable_strings_refused(text):
    with pytest.raises(ValueError, match="neither JSON nor a Python literal"):
        SLAConfig.parse(text)


@pytest.mark.parametrize("text, kind", [("[0.1]", "list"), ("0.1", "float"), ('"{}"', "str"), ("null", "NoneType")])
def test_strings_that_are_not_dicts_refused(text, kind):
    with pytest.raises(ValueError, match=f"must hold a dict of options, got {kind}"):
        SLAConfig.parse(text)


@pytest.mark.parametrize("config", [0.1, ["topk", 0.1], b"{}"])
def test_other_types_refused(config):
    with pytest.raises(ValueError, match=f"got {type(config).__name__}"):
        SLAConfig.parse(config)
