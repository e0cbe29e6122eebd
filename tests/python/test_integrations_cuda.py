"""The integrations on a GPU: a patched model under autocast and GradScaler,
forward+backward of a patched model captured in a CUDA graph, and diffusers'
Wan transformer with SLA on CUDA against the CPU path."""

from __future__ import annotations

import pytest
import torch

import slattn
from test_sdpa_patch import CONFIG, Model, tokens

pytestmark = pytest.mark.gpu


def sla_weights(controller) -> list[torch.nn.Parameter]:
    return [p for p in controller.parameters() if p.dim() == 2]


def test_autocast_and_grad_scaler_keep_fp32_master_weights_on_cuda():
    model = Model().cuda()
    with slattn.patch_sdpa(CONFIG) as controller:
        controller.attach(model)
        model(tokens().cuda())  # the SLA states exist before the optimizer collects the parameters
        weights = sla_weights(controller)
        before = [w.detach().clone() for w in weights]
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cuda")
        with torch.autocast("cuda", dtype=torch.float16):
            out = model(tokens(1).cuda())
        scaler.scale(out.float().pow(2).mean()).backward()
        scaler.step(optimizer)
        scaler.update()
    assert torch.isfinite(out).all()
    assert len(weights) == 2  # one projection per attention layer
    for weight, old in zip(weights, before):
        assert weight.dtype == weight.grad.dtype == torch.float32
        assert torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0
        assert not torch.equal(weight, old)  # the scaled step was taken, not skipped as overflowed


def test_forward_and_backward_of_a_patched_model_in_a_cuda_graph():
    model = Model().cuda()
    static_x = tokens().cuda()
    with slattn.patch_sdpa(CONFIG) as controller:
        controller.attach(model)
        model(static_x)
        weights = sla_weights(controller)

        def step():
            for p in model.parameters():
                p.grad = None
            out = model(static_x)
            out.pow(2).mean().backward()
            return out

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()

        static_x.copy_(tokens(1).cuda())
        graph.replay()
        torch.cuda.synchronize()
        replayed, replayed_grads = captured.clone(), [w.grad.clone() for w in weights]
        eager = step()
    torch.testing.assert_close(replayed, eager)
    for replayed_grad, weight in zip(replayed_grads, weights):
        torch.testing.assert_close(replayed_grad, weight.grad)


def test_wan_transformer_with_sla_on_cuda_matches_the_cpu_path():
    pytest.importorskip("diffusers", reason="diffusers is an optional extra (pip install slattn[diffusers])")
    from slattn.integrations.diffusers import apply_sla
    from test_diffusers import CONFIG as WAN_CONFIG, inputs, randomise_sla_weights, tiny_wan

    model = tiny_wan()
    apply_sla(model, WAN_CONFIG)
    randomise_sla_weights(model)
    cpu_out = model(**inputs())[0]
    model.cuda()
    gpu_inputs = {name: t.cuda() if isinstance(t, torch.Tensor) else t for name, t in inputs().items()}
    gpu_out = model(**gpu_inputs)[0]
    gpu_out.pow(2).mean().backward()
    # Both paths compute in fp16 (use_bf16=False) but round differently: compare as relative L2 error.
    error = (gpu_out.float().cpu() - cpu_out).norm() / cpu_out.norm()
    assert error < 1e-2, f"relative L2 error {error:.2e}"
    sla_grads = [p.grad for name, p in model.named_parameters() if "sla_attention" in name]
    assert sla_grads and all(g is not None and torch.isfinite(g).all() for g in sla_grads)
    assert any(g.abs().sum() > 0 for g in sla_grads)
