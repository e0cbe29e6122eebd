"""The `slattn` command: demo and bench on small CPU workloads."""

from __future__ import annotations

import json

import pytest

import slattn.cli
from slattn.bench import run_bench
from slattn.demo import run_demo
from slattn.workload import Workload


def test_demo_reports_the_sparsity_error_trade(capsys):
    result = run_demo(device="cpu", topk=0.1, block_q=16, block_k=16,
                      workload=Workload((4, 6, 10), heads=2, head_dim=64))
    runs = result["runs"]
    assert [r["topk"] for r in runs] == [0.1, 0.2, 0.4]
    densities = [r["density"] for r in runs]
    errors = [r["rel_l2"] for r in runs]
    assert densities == sorted(densities) and densities[0] < 0.15
    # More critical blocks, closer to dense attention: the locality of the workload at work.
    assert errors[0] > errors[1] > errors[2] > 0
    assert all(0.5 < r["cosine"] <= 1.0 for r in runs)
    printed = capsys.readouterr().out
    assert "density" in printed and "rel. L2" in printed


def test_bench_writes_json_and_a_plot(tmp_path):
    report = run_bench(device="cpu", shapes=[(1, 2, 200, 64)], topk=0.3, block_q=32, block_k=32, repeats=1,
                       out_dir=str(tmp_path), flex=True)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved == json.loads(json.dumps(report))
    (result,) = saved["results"]
    assert result["shape"] == [1, 2, 200, 64]
    assert result["density"] == pytest.approx(2 / 7)  # floor(0.3 * 7) of 7 key blocks per row
    for key in ("route_ms", "sla_fwd_ms", "sla_fwd_bwd_ms", "dense_fwd_ms", "dense_fwd_bwd_ms"):
        assert result[key] > 0, key
    assert all(result["back_to_back"][key] > 0 for key in ("route_ms", "sla_fwd_ms", "sla_fwd_bwd_ms"))
    assert result["dense_backends"]["sdpa"]["fwd_ms"] == result["dense_fwd_ms"]
    assert result["flex"]["fwd_ms"] > 0  # FlexAttention has no backward on the CPU: reported, not hidden
    assert result["flex"].get("fwd_bwd_ms", 0) > 0 or "backward" in result["flex"]["fwd_bwd_unavailable"]
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_cli_refuses_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        slattn.cli.main(["demo", "--device", "tpu"])
    assert exit_info.value.code == 2
    assert slattn.cli.main(["bench", "--device", "cpu", "--shape", "1,2"]) == 2
    assert "B,H,L,D" in capsys.readouterr().err
    assert slattn.cli.main(["demo", "--device", "cpu", "--topk", "1.5"]) == 2
    assert "topk" in capsys.readouterr().err
