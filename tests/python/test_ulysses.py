"""Ulysses sequence parallelism (slattn.distributed): multi-process checks that
the distributed outputs and gradients equal the single-process ones, on the
CPU with gloo (world sizes 2 and 4) and on GPUs with NCCL where there are two;
and the pieces that need no process group.

One spawn per world size runs every check (process start-up dominates on two
cores); each test then reads its own check's result from every rank. The
checks and their tolerances are in ulysses_worker.py.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import slattn
from slattn.distributed import UlyssesAttention, balance_heads, head_densities, rank_loads
from ulysses_worker import CHECKS, REPO, run_checks

WORLD_2_ONLY = ("diffusers", "bench_script", "compile")
CPU_WORLDS = {2: list(CHECKS), 4: [name for name in CHECKS if name not in WORLD_2_ONLY]}
GPU_WORLD = 2


def _available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@pytest.fixture(scope="module")
def cpu_results(tmp_path_factory):
    def names(world_size):
        return [n for n in CPU_WORLDS[world_size] if n != "diffusers" or _available("diffusers")]

    return {p: run_checks(p, "gloo", names(p), tmp_path_factory.mktemp(f"gloo{p}")) for p in CPU_WORLDS}


@pytest.fixture(scope="module")
def gpu_results(tmp_path_factory):
    if not torch.cuda.is_available() or torch.cuda.device_count() < GPU_WORLD:
        pytest.skip(f"needs {GPU_WORLD} CUDA GPUs for NCCL, found {torch.cuda.device_count()}")
    if not slattn._C.built_with_cuda():
        pytest.skip("this build of slattn has no CUDA kernels")
    names = [n for n in CHECKS if n != "diffusers" or _available("diffusers")]
    return run_checks(GPU_WORLD, "nccl", names, tmp_path_factory.mktemp("nccl"))


def _assert_passed(results: dict, name: str) -> None:
    if name not in results:
        pytest.skip("diffusers is an optional extra (pip install slattn[diffusers])")
    failures = [f"rank {rank}:\n{tb}" for rank, tb in enumerate(results[name]) if tb is not None]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("name", list(CHECKS))
@pytest.mark.parametrize("world_size", sorted(CPU_WORLDS))
def test_gloo_matches_single_process(cpu_results, world_size, name):
    if name not in CPU_WORLDS[world_size]:
        pytest.skip(f"{name} runs at world size 2 only (its process start-up costs more than it adds at 4)")
    _assert_passed(cpu_results[world_size], name)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CHECKS))
def test_nccl_matches_single_process(gpu_results, name):
    _assert_passed(gpu_results, name)


# ---------------------------------------------------------------- no process group
def test_balance_heads_evens_out_skewed_costs():
    costs = [8.0, 7.0, 6.0, 5.0, 1.0, 1.0, 1.0, 1.0]
    order = balance_heads(costs, 2)
    assert sorted(order.tolist()) == list(range(8))
    assert rank_loads(costs, None, 2).tolist() == [26.0, 4.0]  # in order: one rank does 6.5x the other's work
    assert rank_loads(costs, order, 2).tolist() == [15.0, 15.0]
    assert order.tolist() == [0, 3, 4, 6, 1, 2, 5, 7]  # largest first to the least-loaded rank (ties: lower rank)


def test_balance_heads_keeps_grouped_query_heads_together():
    costs = [5.0, 5.0, 4.0, 4.0, 1.0, 1.0, 1.0, 1.0]  # 4 k/v heads, 2 q heads each: groups cost 10, 8, 2, 2
    order = balance_heads(costs, 2, group_size=2)
    pairs = order.view(-1, 2)
    assert torch.equal(pairs[:, 1] - pairs[:, 0], torch.ones(4, dtype=torch.int64))
    assert (pairs[:, 0] % 2 == 0).all()
    assert rank_loads(costs, None, 2).tolist() == [18.0, 4.0]
    assert rank_loads(costs, order, 2).tolist() == [12.0, 10.0]  # the best split of 10, 8, 2, 2 in pairs


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(costs=[], world_size=2), "costs"),
    (dict(costs=[1.0, -1.0], world_size=2), "costs"),
    (dict(costs=[1.0, float("nan")], world_size=2), "costs"),
    (dict(costs=[1.0] * 4, world_size=0), "world_size"),
    (dict(costs=[1.0] * 6, world_size=4), "world_size"),
    (dict(costs=[1.0] * 6, world_size=2, group_size=4), "group_size"),
])
def test_balance_heads_rejects_bad_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        balance_heads(**kwargs)


def test_head_densities_reads_each_heads_critical_fraction():
    block_map = torch.zeros(2, 3, 4, 4, dtype=torch.int8)
    block_map[:, 0, :, :1] = 1   # head 0: 1 of 4 key blocks critical
    block_map[:, 2, :, :3] = 1   # head 2: 3 of 4
    plan = slattn.plan_from_block_map(block_map, 64, 64)
    assert head_densities(plan).tolist() == [0.25, 0.0, 0.75]
    with pytest.raises(ValueError, match="plan"):
        head_densities(block_map)


def test_sla2_head_index_takes_alpha_at_the_given_heads(make_inputs):
    layer = slattn.SparseLinearAttention2(64, 0.5, num_heads=4, block_q=64, block_k=64)
    with torch.no_grad():
        layer.alpha_logit.copy_(torch.tensor([-2.0, -0.5, 0.5, 2.0]))
    x = make_inputs(1, 4, 4, 128, 128, 64)
    full = layer(x.q, x.k, x.v)
    heads = torch.tensor([3, 1])
    subset = layer(x.q[:, heads], x.k[:, heads], x.v[:, heads], head_index=heads)
    torch.testing.assert_close(subset, full[:, heads], rtol=0, atol=0)
    with pytest.raises(ValueError, match="head_index"):
        layer(x.q[:, heads], x.k[:, heads], x.v[:, heads], head_index=torch.tensor([3, 1, 0]))
    lazy = slattn.SparseLinearAttention2(64, 0.5)
    with pytest.raises(ValueError, match="num_heads"):
        lazy(x.q[:, heads], x.k[:, heads], x.v[:, heads], head_index=heads)


def test_ulysses_needs_an_initialised_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        UlyssesAttention(None, slattn.SparseLinearAttention(64, 0.5))


def test_bench_script_parses_its_arguments():
    spec = importlib.util.spec_from_file_location("bench_ulysses", REPO / "scripts" / "bench_ulysses.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse_args([])
    assert args.shape == [1, 40, 75600, 128] and args.dtype == "bf16" and args.topk == 0.05  # Wan2.1-14B 720p
    assert bench.parse_args(["--shape", "1,8,512,64", "--iters", "2"]).shape == [1, 8, 512, 64]
    for bad in (["--shape", "1,8,512"], ["--shape", "a,b,c,d"], ["--iters", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)

