"""Bad arguments to the fine-tuning study, its command and its checkpoint cache."""

from __future__ import annotations

import pytest
import torch

import slattn.cli
from slattn.study import StudyPreset, get_preset, run_study
from slattn.study import cache


@pytest.mark.parametrize("kwargs, name", [
    ({"preset": "huge"}, "preset"),
    ({"variants": ["sla", "sla3"]}, "variants"),
    ({"variants": []}, "variants"),
    ({"variants": "sla"}, "variants must be a list"),
    ({"finetune_steps": 0}, "finetune_steps"),
    ({"pretrain_lr": -1.0}, "pretrain_lr"),
    ({"sla_topk": 1.5}, "sla_topk"),
    ({"eval_timesteps": (0.5, 1.0)}, "eval_timesteps"),
    ({"learning_rate": 1e-3}, "learning_rate"),
    ({"device": "tpu"}, "device"),
])
def test_run_study_names_the_bad_argument(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        run_study(**{"preset": "smoke", "out_dir": tmp_path, "progress": False, **kwargs})
    assert not any(tmp_path.iterdir()), "nothing is written before the arguments are checked"


def test_run_study_refuses_other_preset_objects(tmp_path):
    with pytest.raises(ValueError, match="preset"):
        run_study({"name": "smoke"}, out_dir=tmp_path)


def test_presets_check_their_fields():
    with pytest.raises(ValueError, match="batch_size"):
        get_preset("smoke").replace(batch_size=2.0)
    with pytest.raises(ValueError, match="sample_count"):
        get_preset("smoke").replace(sample_count=1)
    assert get_preset("gpu").tokens >= 4096  # the GPU preset's clips are long enough for sparsity to matter
    assert isinstance(get_preset("smoke"), StudyPreset)


def test_cli_reports_bad_arguments(capsys, tmp_path):
    out = str(tmp_path / "out")
    assert slattn.cli.main(["finetune", "--variants", "sla,nope", "--out-dir", out]) == 2
    assert "variants" in capsys.readouterr().err
    assert slattn.cli.main(["finetune", "--pretrain-steps", "0", "--out-dir", out]) == 2
    assert "pretrain_steps" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        slattn.cli.main(["finetune", "--preset", "huge"])
    assert exit_info.value.code == 2


def test_cache_refuses_unsafe_or_foreign_checkpoints(tmp_path):
    preset, device = get_preset("smoke"), torch.device("cpu")
    path = cache.checkpoint_path(tmp_path, preset, device)
    expected = cache.recipe(preset, device)
    assert cache.load(path, expected) is None
    with open(path, "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        cache.load(path, expected)
    cache.save(path, {"w": torch.ones(2)}, [1.0], 0.1, {**expected, "seed": 7})
    with pytest.raises(ValueError, match="not made by this recipe"):
        cache.load(path, expected)
    cache.save(path, {"w": torch.ones(2)}, [1.0], 0.1, expected)
    assert torch.equal(cache.load(path, expected)["state"]["w"], torch.ones(2))
    # Another recipe is another file: changing the pretraining changes the name.
    assert cache.checkpoint_path(tmp_path, preset.replace(pretrain_steps=31), device) != path
    assert cache.checkpoint_path(tmp_path, preset.replace(finetune_steps=99), device) == path
