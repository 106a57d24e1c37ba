"""On the GPU: the fused forward never waits on the device, so it runs under sync-debug mode "error" and
captures in a CUDA graph whose replays follow new inputs."""
import pytest
import torch

import moe_kernels
from helpers import randomize_, skip_unless_runnable

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_layer(backend):
    skip_unless_runnable(backend)
    torch.manual_seed(0)
    layer = randomize_(moe_kernels.MoE(64, 96, 8, k=2, capacity_factor=1.25, backend=backend))
    return layer.to("cuda", torch.bfloat16).eval()


def test_forward_and_backward_never_synchronise():
    layer = cuda_layer("triton")
    x = torch.randn(300, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().square().sum().backward()  # compile the kernels first
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = layer(x)
        y.float().square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_forward_captures_in_a_cuda_graph():
    layer = cuda_layer("triton")
    static_x = torch.randn(200, 64, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(2):
            layer(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_y = layer(static_x)
    fresh = torch.randn_like(static_x)
    static_x.copy_(fresh)
    graph.replay()
    with torch.no_grad():
        torch.testing.assert_close(static_y, layer(fresh), rtol=0, atol=0)
