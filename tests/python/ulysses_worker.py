"""The ranks of the Ulysses tests: spawned processes that run every check of
one world size in a single rendezvous, and write their results for pytest.

Each check builds the same full tensors on every rank (one seed), computes the
single-process result on them, then the distributed one on this rank's shard,
and compares. Checks run all their collectives before asserting, so a failed
assertion on one rank cannot leave the others waiting in a collective (the
group's timeout bounds the wait if it happens anyway).

Tolerances. CPU (gloo): fp64 inputs for the functional op and SLA2, so a
head's arithmetic is the same in both runs and only sums across heads (the
projection's and α's gradients, reduced over ranks) change order: fp64
rounding, ~1e-15 relative. The SLA module computes in bf16 (the reference's
default), but its per-head values are again computed identically; its
projection gradient is accumulated in fp32 per rank, then summed across ranks
in fp32: fp32 rounding. CUDA (NCCL): bf16 inputs; assert_close's default bf16 tolerance, and 1e-3 of
the largest term for sums across ranks. (The CUDA variant has not run yet.)
"""

from __future__ import annotations

import datetime
import functools
import importlib.util
import json
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import slattn
from slattn.distributed import (UlyssesAttention, balance_heads, gather_sequence, shard_sequence,
                                ulysses_attention)
from slattn.distributed.yunchang import SLAUlyssesAttention

B, H, L, D = 1, 4, 256, 64
TOPK = 0.5  # 2 of the 4 key blocks of 64: routing matters, both branches run
BLOCK = 64
PADDED_LEN = 255  # a multiple of neither 2 nor 4
GROUP_TIMEOUT = datetime.timedelta(seconds=90)
REPO = Path(__file__).resolve().parents[2]


class Context:
    def __init__(self, rank: int, world_size: int, device: torch.device):
        self.rank, self.world_size, self.device = rank, world_size, device
        self.group = dist.group.WORLD
        cpu = device.type == "cpu"
        self.dtype = torch.float64 if cpu else torch.bfloat16
        self.proj_dtype = torch.float64 if cpu else torch.float32

    def close(self, actual, expected, what: str, *, across_ranks: bool = False):
        """across_ranks: a sum whose order the reduction over ranks changes."""
        actual, expected = actual.detach(), expected.detach().to(actual.dtype)
        if self.device.type != "cpu":
            # fp32 sums of bf16 products, reordered: ~1e-3 of the largest term; else assert_close's defaults.
            scale = max(float(expected.abs().max()), 1.0)
            options = dict(rtol=1e-3, atol=1e-3 * scale) if across_ranks else {}
            torch.testing.assert_close(actual, expected, msg=lambda m: f"{what}: {m}", **options)
            return
        eps = torch.finfo(actual.dtype).eps
        # Same-order arithmetic stays within a few ulps; sums reordered across ranks within ~100 ulps
        # of the largest term (a few hundred terms per sum here).
        ulps = 100 if across_ranks else 4
        atol = ulps * eps * max(float(expected.abs().max()), 1.0)
        torch.testing.assert_close(actual, expected, rtol=ulps * eps, atol=atol, msg=lambda m: f"{what}: {m}")

    def shard(self, full: torch.Tensor, *, pad: bool = False) -> torch.Tensor:
        return shard_sequence(full, self.group, pad=pad).detach().clone().requires_grad_()

    def sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, group=self.group)
        return t


def draw(ctx: Context, heads: int, length: int = L, seed: int = 0, dtype=None) -> torch.Tensor:
    """(B, length, heads, D), the same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, length, heads, D, generator=gen, dtype=torch.float64)
    return x.to(device=ctx.device, dtype=dtype or ctx.dtype)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def shard_of(ctx: Context, full: torch.Tensor, length: int) -> torch.Tensor:
    local = -(-length // ctx.world_size)
    start = ctx.rank * local
    return full[:, start:min(start + local, length)]


def balanced(ctx: Context, heads: int = H, group_size: int = 1) -> torch.Tensor:
    """A permutation that moves heads between ranks (skewed costs: head 0 the heaviest)."""
    return balance_heads([float(2 ** (heads - h)) for h in range(heads)], ctx.world_size, group_size=group_size)


# ---------------------------------------------------------------- checks
def check_functional_op(ctx: Context) -> None:
    """The functional op through Ulysses (NHD), plain, with balanced heads, and with GQA
    where the group size divides the k/v heads: outputs and q, k, v, W, b gradients."""
    cases = [("in order", H, None), ("balanced", H, balanced(ctx))]
    if 2 % ctx.world_size == 0:
        cases.append(("gqa", 2, balanced(ctx, H, group_size=2)))
    gen = torch.Generator().manual_seed(7)
    weight = (0.3 * torch.randn(D, D, generator=gen, dtype=torch.float64)).to(ctx.device, ctx.proj_dtype)
    bias = (0.3 * torch.randn(D, generator=gen, dtype=torch.float64)).to(ctx.device, ctx.proj_dtype)
    for name, kv_heads, order in cases:
        q, g = draw(ctx, H, seed=1), draw(ctx, H, seed=4)
        k, v = draw(ctx, kv_heads, seed=2), draw(ctx, kv_heads, seed=3)

        def run(q, k, v, w, b, distributed):
            attention = functools.partial(slattn.sparse_linear_attention, proj_weight=w, proj_bias=b, topk=TOPK,
                                          block_q=BLOCK, block_k=BLOCK, layout="NHD")
            if not distributed:
                return attention(q, k, v)
            return ulysses_attention(q, k, v, attention, ctx.group, attention_layout="NHD", head_permutation=order)

        ref = leaves(q, k, v, weight, bias)
        ref_out = run(*ref, distributed=False)
        (ref_out.float() * g.float()).sum().backward()
        mine = [ctx.shard(t) for t in (q, k, v)] + leaves(weight, bias)
        out = run(*mine, distributed=True)
        (out.float() * shard_of(ctx, g, L).float()).sum().backward()
        w_grad, b_grad = (ctx.sum_over_ranks(t.grad) for t in mine[3:])

        ctx.close(out, shard_of(ctx, ref_out, L), f"{name}: out")
        for label, mine_t, ref_t in zip("qkv", mine, ref):
            ctx.close(mine_t.grad, shard_of(ctx, ref_t.grad, L), f"{name}: d{label}")
        ctx.close(w_grad, ref[3].grad, f"{name}: d proj_weight", across_ranks=True)
        ctx.close(b_grad, ref[4].grad, f"{name}: d proj_bias", across_ranks=True)
        assert ref[3].grad.abs().max() > 0, "the linear branch must contribute"


def check_padded_sequence(ctx: Context) -> None:
    """A sequence of 255 tokens: shard_sequence pads it, seq_len keeps the padding out of
    attention, gather_sequence drops it; equal to attention over the 255 tokens."""
    q, k, v, g = (draw(ctx, H, PADDED_LEN, seed=s) for s in (1, 2, 3, 4))
    attention = functools.partial(slattn.sparse_linear_attention, topk=TOPK, block_q=BLOCK, block_k=BLOCK)
    ref = leaves(q, k, v)
    ref_out = attention(*(t.transpose(1, 2) for t in ref)).transpose(1, 2)
    (ref_out.float() * g.float()).sum().backward()
    mine = [ctx.shard(t, pad=True) for t in (q, k, v)]
    out = ulysses_attention(*mine, attention, ctx.group, seq_len=PADDED_LEN)
    whole = gather_sequence(out, ctx.group, seq_len=PADDED_LEN)
    # Every rank holds the whole output and computes the same loss; gather_sequence's backward sums
    # the ranks' gradients (a reduce-scatter), so each rank's copy counts 1/P.
    ((whole.float() * g.float()).sum() / ctx.world_size).backward()

    ctx.close(whole, ref_out, "out over 255 tokens")
    real = shard_of(ctx, ref[0].grad, PADDED_LEN).shape[1]
    for label, mine_t, ref_t in zip("qkv", mine, ref):
        ctx.close(mine_t.grad[:, :real], shard_of(ctx, ref_t.grad, PADDED_LEN), f"d{label}")
        assert torch.count_nonzero(mine_t.grad[:, real:]) == 0, f"d{label} of padding rows must be zero"


def make_sla2(ctx: Context) -> slattn.SparseLinearAttention2:
    torch.manual_seed(11)
    layer = slattn.SparseLinearAttention2(D, TOPK, compression_ratio=2, num_heads=H, block_q=BLOCK, block_k=BLOCK)
    with torch.no_grad():
        layer.alpha_logit.copy_(torch.linspace(-1.5, 2.0, H))  # distinct per head: a head mix-up shows
        for proj in (layer.router.proj_q, layer.router.proj_k):
            proj.weight.add_(0.5 * torch.randn_like(proj.weight))
    return layer.to(ctx.device)


def check_sla2(ctx: Context) -> None:
    """SLA2 through UlyssesAttention, hard routing (α gradients) and SoftTop-k (router
    gradients), with balanced heads: α must follow each head to its rank."""
    q, k, v, g = (draw(ctx, H, seed=s) for s in (1, 2, 3, 4))
    for routing in ("hard", "soft"):
        ref_layer, layer = make_sla2(ctx), make_sla2(ctx)
        ref_layer.set_routing(routing)
        layer.set_routing(routing)
        ref = leaves(q, k, v)
        ref_out = ref_layer(*(t.transpose(1, 2) for t in ref)).transpose(1, 2)
        (ref_out.float() * g.float()).sum().backward()
        ulysses = UlyssesAttention(ctx.group, layer, head_permutation=balanced(ctx))
        mine = [ctx.shard(t) for t in (q, k, v)]
        out = ulysses(*mine)
        (out.float() * shard_of(ctx, g, L).float()).sum().backward()
        grads = {name: ctx.sum_over_ranks(p.grad) for name, p in layer.named_parameters() if p.grad is not None}

        per_rank = H // ctx.world_size
        assert torch.equal(ulysses.local_heads(H), balanced(ctx)[ctx.rank * per_rank:(ctx.rank + 1) * per_rank])
        ctx.close(out, shard_of(ctx, ref_out, L), f"{routing}: out")
        for label, mine_t, ref_t in zip("qkv", mine, ref):
            ctx.close(mine_t.grad, shard_of(ctx, ref_t.grad, L), f"{routing}: d{label}")
        expected = {name: p.grad for name, p in ref_layer.named_parameters() if p.grad is not None}
        assert grads.keys() == expected.keys(), f"{routing}: parameters with gradients {grads.keys()}"
        assert "alpha_logit" in grads and (routing == "hard" or "router.proj_q.weight" in grads)
        for name, grad in grads.items():
            ctx.close(grad, expected[name], f"{routing}: d {name}", across_ranks=True)


def make_sla(ctx: Context) -> slattn.SparseLinearAttention:
    torch.manual_seed(5)
    layer = slattn.SparseLinearAttention(D, TOPK, BLKQ=BLOCK, BLKK=BLOCK)
    with torch.no_grad():
        layer.proj_l.weight.normal_(std=0.3)
        layer.proj_l.bias.normal_(std=0.3)
    return layer.to(ctx.device)


def check_sla_module_ddp(ctx: Context) -> None:
    """SLA's module under DDP: each rank's loss is its own tokens' share, DDP averages, and
    the projection's gradients are the single-process gradients of the mean over ranks,
    identical on every rank; one SGD step keeps the replicas identical."""
    q, k, v, g = (draw(ctx, H, seed=s, dtype=torch.float32) for s in (1, 2, 3, 4))
    ref_layer, layer = make_sla(ctx), make_sla(ctx)
    ref = leaves(q, k, v)
    ref_out = ref_layer(*(t.transpose(1, 2) for t in ref)).transpose(1, 2)
    ((ref_out * g).sum() / ctx.world_size).backward()
    ddp = torch.nn.parallel.DistributedDataParallel(UlyssesAttention(ctx.group, layer))
    mine = [ctx.shard(t) for t in (q, k, v)]
    out = ddp(*mine)
    (out * shard_of(ctx, g, L)).sum().backward()
    grads = [p.grad for p in layer.parameters()]
    gathered = [[torch.empty_like(t) for _ in range(ctx.world_size)] for t in grads]
    for slot, t in zip(gathered, grads):
        dist.all_gather(slot, t, group=ctx.group)
    torch.optim.SGD(ddp.parameters(), lr=0.1).step()
    stepped = [[torch.empty_like(p) for _ in range(ctx.world_size)] for p in layer.parameters()]
    for slot, p in zip(stepped, layer.parameters()):
        dist.all_gather(slot, p.detach(), group=ctx.group)

    ctx.close(out, shard_of(ctx, ref_out, L), "out")
    # The all-to-all's backward sums every rank's loss into each shard's gradient: P times the
    # gradient of the mean the reference differentiates.
    for label, mine_t, ref_t in zip("qkv", mine, ref):
        ctx.close(mine_t.grad, ctx.world_size * shard_of(ctx, ref_t.grad, L), f"d{label}")
    for (name, p), ref_p in zip(layer.named_parameters(), ref_layer.parameters()):
        assert p.grad.abs().max() > 0, f"{name} got no gradient"
        ctx.close(p.grad, ref_p.grad, f"d {name}", across_ranks=True)
    assert all(torch.equal(t, slot[0]) for slot in gathered for t in slot), "gradients differ between ranks"
    assert all(torch.equal(t, slot[0]) for slot in stepped for t in slot), "parameters differ after a step"


def check_yunchang(ctx: Context) -> None:
    """yunchang's forward signature gives the module's single-process output; options SLA
    has no meaning for raise ValueError naming them."""
    q, k, v = (draw(ctx, H, seed=s, dtype=torch.float32) for s in (1, 2, 3))
    ref_out = make_sla(ctx)(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    attention = SLAUlyssesAttention(make_sla(ctx), ctx.group)
    out = attention(*(ctx.shard(t) for t in (q, k, v)), dropout_p=0.0, softmax_scale=None, causal=False)
    ctx.close(out, shard_of(ctx, ref_out, L), "out")
    local = [ctx.shard(t) for t in (q, k, v)]
    for name, options in (("causal", {"causal": True}), ("dropout_p", {"dropout_p": 0.1}),
                          ("window_size", {"window_size": (8, 8)}), ("alibi_slopes", {"alibi_slopes": [1.0]})):
        expect_error(lambda: attention(*local, **options), name)
    expect_error(lambda: SLAUlyssesAttention(make_sla(ctx), ctx.group, scatter_idx=1, gather_idx=2), "scatter_idx")


def expect_error(call, fragment: str, error=ValueError) -> None:
    try:
        call()
    except error as e:
        assert fragment in str(e), f"{error.__name__} should name {fragment!r}: {e}"
        return
    raise AssertionError(f"no {error.__name__} naming {fragment!r}")


def check_errors(ctx: Context) -> None:
    """Bad shapes and options raise ValueError naming the argument, before any all-to-all."""
    p = ctx.world_size
    sla = make_sla(ctx)
    attention = UlyssesAttention(ctx.group, sla)
    odd = [draw(ctx, p + 1, 16, dtype=torch.float32) for _ in range(3)]
    expect_error(lambda: attention(*odd), f"q has {p + 1} heads")
    q = draw(ctx, 2 * p, 16, dtype=torch.float32)
    kv = draw(ctx, 1, 16, dtype=torch.float32)
    expect_error(lambda: ulysses_attention(q, kv, kv, sla, ctx.group), "k has 1 heads")
    fine = [draw(ctx, p, 16, dtype=torch.float32) for _ in range(3)]
    expect_error(lambda: attention(*fine, seq_len=16 * p + 1), "seq_len")
    expect_error(lambda: shard_sequence(draw(ctx, p, 3 * p + 1), ctx.group), "pad=True")
    expect_error(lambda: ulysses_attention(*fine, sla, ctx.group, head_permutation=list(range(p + 1))),
                 "head_permutation")
    expect_error(lambda: UlyssesAttention(ctx.group, sla, head_permutation=[0, 0]), "head_permutation")
    if p == 2:
        split_groups = [0, 2, 1, 3]  # q heads 0 and 1 share k/v head 0: they must move together
        gqa_q, gqa_kv = draw(ctx, 4, 16, dtype=torch.float32), draw(ctx, 2, 16, dtype=torch.float32)
        expect_error(lambda: ulysses_attention(gqa_q, gqa_kv, gqa_kv, sla, ctx.group, head_permutation=split_groups),
                     "together")
    lazy = slattn.SparseLinearAttention2(D, TOPK)
    expect_error(lambda: UlyssesAttention(ctx.group, lazy), "num_heads")
    expect_error(lambda: ulysses_attention(*fine, lazy, ctx.group), "num_heads")
    # A permutation that differs between ranks is caught by the constructor's collective check, on every rank.
    rank_dependent = list(range(p)) if ctx.rank == 0 else list(reversed(range(p)))
    expect_error(lambda: UlyssesAttention(ctx.group, sla, head_permutation=rank_dependent), "differs between ranks")


def check_compile(ctx: Context) -> None:
    """torch.compile(fullgraph=True) traces the functional collectives and slattn's op, forward
    and backward, and computes what eager mode does (aot_eager: tracing and AOT autograd
    without the minutes inductor's code generation takes on two cores)."""
    q, k, v = (draw(ctx, H, seed=s, dtype=torch.float32) for s in (1, 2, 3))
    layer = make_sla(ctx)
    attention = UlyssesAttention(ctx.group, layer)
    compiled = torch.compile(attention, fullgraph=True, backend="aot_eager")
    results = []
    for run in (attention, compiled):
        local = [ctx.shard(t) for t in (q, k, v)]
        layer.zero_grad()
        out = run(*local)
        out.sum().backward()
        results.append((out, local[0].grad, layer.proj_l.weight.grad.clone()))
    for what, eager, traced in zip(("out", "dq", "d proj_l.weight"), *results):
        ctx.close(traced, eager, f"compiled {what}")


def check_bench_script(ctx: Context) -> None:
    """scripts/bench_ulysses.py measures a tiny shape on this group and returns a complete record."""
    spec = importlib.util.spec_from_file_location("bench_ulysses", REPO / "scripts" / "bench_ulysses.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse_args(["--shape", f"1,{2 * ctx.world_size},128,64", "--topk", "0.5", "--dtype", "fp32",
                             "--warmup", "0", "--iters", "1", "--device", ctx.device.type])
    record = bench.measure(args, ctx.group, ctx.device)
    assert record["world_size"] == ctx.world_size and record["shape"] == [1, 2 * ctx.world_size, 128, 64]
    for key in ("forward_ms", "forward_backward_ms", "all_to_all_ms", "local_attention_ms"):
        assert record[key] > 0, f"{key}: {record[key]}"


def check_diffusers(ctx: Context) -> None:
    """A tiny diffusers Wan with diffusers' Ulysses context parallelism: apply_sla_ulysses
    gives the single-process output and gradients (summed over ranks: the loss is
    replicated); plain apply_sla, before or after enable_parallelism, is refused (it would
    attend within each shard, or train with dense attention's gradients)."""
    import diffusers
    from slattn.distributed.diffusers import apply_sla_ulysses
    from slattn.integrations.diffusers import apply_sla

    if ctx.device.type == "cpu":
        # diffusers places rank r on device r % torch.accelerator.device_count(), which is 0 without
        # an accelerator; one "device" puts every rank on the CPU.
        torch.accelerator.device_count = lambda: 1
    config = {"topk": 0.5, "blkq": 64, "blkk": 64, "use_bf16": False}

    def wan():
        torch.manual_seed(0)
        model = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=64,
                                                in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
                                                num_layers=2, rope_max_seq_len=32)
        return model.to(ctx.device)

    def randomise_sla(model):
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "sla_attention" in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=gen))

    def parallel(model):
        # Without the plan's entry for the 1-D timestep, which diffusers would leave unsplit anyway:
        # its notice goes through `logger.warning_once`, which only exists once transformers is imported.
        plan = {key: value for key, value in model._cp_plan.items() if key != ""}
        model.enable_parallelism(config=diffusers.ContextParallelConfig(ulysses_degree=ctx.world_size), cp_plan=plan)

    gen = torch.Generator().manual_seed(1)
    # 2 frames of 16x16 latents in patches of 2x2: 128 video tokens, split over the ranks.
    inputs = dict(hidden_states=torch.randn(1, 4, 2, 16, 16, generator=gen).to(ctx.device),
                  timestep=torch.tensor([500], device=ctx.device),
                  encoder_hidden_states=torch.randn(1, 12, 32, generator=gen).to(ctx.device), return_dict=False)

    reference = wan()
    apply_sla(reference, config)
    randomise_sla(reference)
    ref_out = reference(**inputs)[0]
    ref_out.square().mean().backward()

    model = wan()
    parallel(model)
    controller = apply_sla_ulysses(model, config)
    randomise_sla(model)
    out = model(**inputs)[0]
    out.square().mean().backward()
    grads = {name: ctx.sum_over_ranks(p.grad) for name, p in model.named_parameters() if p.grad is not None}

    for plain_first in (True, False):
        plain = wan()
        if plain_first:
            apply_sla(plain, config)
            parallel(plain)
        else:
            parallel(plain)
            apply_sla(plain, config)
        try:
            plain(**inputs)
        except RuntimeError as error:
            assert "apply_sla_ulysses" in str(error), error
        else:
            raise AssertionError(f"plain apply_sla {'before' if plain_first else 'after'} enable_parallelism ran")

    assert controller.statistics()["sla_calls"] == 2 and controller.statistics()["fallbacks"] == 0
    ctx.close(out, ref_out, "apply_sla_ulysses: out")
    expected = {name: p.grad for name, p in reference.named_parameters() if p.grad is not None}
    assert grads.keys() == expected.keys()
    assert any("sla_attention" in name for name in grads)
    for name, grad in grads.items():
        ctx.close(grad, expected[name], f"apply_sla_ulysses: d {name}", across_ranks=True)


CHECKS = {
    "functional_op": check_functional_op,
    "padded_sequence": check_padded_sequence,
    "sla2": check_sla2,
    "sla_module_ddp": check_sla_module_ddp,
    "yunchang": check_yunchang,
    "errors": check_errors,
    "compile": check_compile,
    "bench_script": check_bench_script,
    "diffusers": check_diffusers,
}


# ---------------------------------------------------------------- processes
def _rank_main(rank: int, world_size: int, backend: str, init_method: str, names: list[str], out_dir: str) -> None:
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # Two cores shared by every rank: one thread each keeps them from oversubscribing.
    torch.set_num_threads(1)
    slattn.set_num_threads(1)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=GROUP_TIMEOUT)
    results = {}
    try:
        ctx = Context(rank, world_size, device)
        for name in names:
            try:
                CHECKS[name](ctx)
                results[name] = None
            except Exception:  # reported to pytest through the file, per check
                results[name] = traceback.format_exc()
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


def run_checks(world_size: int, backend: str, names: list[str], out_dir: Path) -> dict[str, list]:
    """Spawns the ranks; returns, per check, every rank's traceback (None where it passed)."""
    init_method = f"file://{out_dir / 'rendezvous'}"
    mp.spawn(_rank_main, args=(world_size, backend, init_method, names, str(out_dir)), nprocs=world_size)
    per_rank = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world_size)]
    return {name: [results.get(name, "not run") for results in per_rank] for name in names}
