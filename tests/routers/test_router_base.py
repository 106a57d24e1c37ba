"""What every router shares: the one ranking rule (base.top_k), float32 routing whatever autocast says, the
registry's errors, and a Routing every router returns with the documented dtypes and shapes."""
import pytest
import torch

from moe_kernels import routers
from moe_kernels.routers import base
from moe_kernels.routers.base import linear, top_k


def _ranked(row):
    """Indices by descending value, NaN first, ties (and -0.0 vs 0.0) to the lower index: written out."""
    return sorted(range(len(row)), key=lambda i: (0 if row[i] != row[i] else 1, -(row[i] if row[i] == row[i] else 0.0), i))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_top_k_is_exact_with_ties_to_the_lower_index(dtype):
    rows = [
        [1.0, 3.0, 3.0, 0.0, 3.0],
        [0.0, -0.0, 0.0, -1.0, -0.0],
        [float("nan"), 2.0, float("nan"), float("inf"), -float("inf")],
        [-float("nan"), 1.0, -2.0, -2.0, 1.0],
        [-1e-45, 1e-45, 0.0, -3.0e38, 3.0e38],  # denormals, extremes
        [1.0, 1.0 + 2**-23, 1.0 - 2**-24, 1.0, 0.5],  # one-ulp differences
    ]
    few = torch.tensor(rows, dtype=dtype)
    many = few.repeat(base.SORT_ROWS // len(rows) + 1, 1)  # past SORT_ROWS: float32 takes the int64 keys
    for scores in (few, many):
        for k in range(1, 6):
            got = top_k(scores, k)
            assert got.dtype == torch.int32
            assert got.tolist() == [_ranked(row)[:k] for row in scores.tolist()]


def test_top_k_on_random_near_ties_matches_a_stable_sort():
    """Issue 16 item 4: one rule on every path. Integer logits (many ties) and random ones, E up to 256."""
    for num_experts, k in [(7, 3), (64, 8), (256, 8)]:
        scores = torch.cat([torch.randint(-3, 3, (300, num_experts)).float(), torch.randn(300, num_experts)])
        expected = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(top_k(scores, k).long(), expected)
        assert torch.equal(top_k(scores.double(), k).long(), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_router_logits_are_float32_under_autocast(dtype):
    """Issue 16 item 2: Switch's selective precision, whatever autocast says."""
    x, weight = torch.randn(5, 8), torch.randn(4, 8)
    with torch.autocast("cpu", dtype=dtype):
        logits = linear(x.to(dtype), weight)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, x.to(dtype).float() @ weight.t())
    assert linear(x.double(), weight).dtype == torch.float64


@pytest.mark.parametrize("name", sorted(routers.ROUTERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_every_router_returns_a_documented_routing(name, dtype, training):
    torch.manual_seed(0)
    k = 1 if name == "switch" else 2
    router = routers.build(name, 16, 6, k).to(dtype).train(training)
    x = torch.randn(11, 16, dtype=dtype)
    routing = router(x)
    router_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    slots = router.slots
    assert routing.logits.shape == (11, 6) and routing.logits.dtype == router_dtype
    assert routing.weights.shape == (11, slots) and routing.weights.dtype == router_dtype
    assert routing.experts.shape == (11, slots) and routing.experts.dtype == torch.int32
    assert ((routing.experts >= 0) & (routing.experts < 6)).all()
    assert routing.aux_loss.shape == () and routing.aux_loss.dtype == router_dtype
    with torch.no_grad():
        assert (router(x).aux_loss is None) == (not training)  # computed only where it can matter


def test_build_errors_name_the_router_and_the_option():
    with pytest.raises(ValueError, match=r"router must be one of \(.*'topk'.*\), got 'softmax'"):
        routers.build("softmax", 8, 4, 2)
    with pytest.raises(TypeError, match=r"router 'topk' takes no option 'noise_epsilon'; its options are \("):
        routers.build("topk", 8, 4, 2, noise_epsilon=0.1)
