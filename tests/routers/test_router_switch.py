"""Switch Transformer's top-1 router ("switch") against its definition (Fedus et al. 2021; Hugging Face's
SwitchTransformersTop1Router): the top-1 probability, jitter on the router's input in training only, a bias."""
import pytest
import torch

from moe_kernels import routers


def test_gate_is_the_top_probability():
    torch.manual_seed(2)
    router = routers.build("switch", 7, 7, 1, dtype=torch.float64, bias=True)
    with torch.no_grad():
        router.weight.copy_(torch.eye(7))
        router.bias.normal_()
    x = torch.randn(17, 7, dtype=torch.float64)
    routing = router(x)
    probabilities = torch.softmax(x + router.bias.detach(), -1)
    assert routing.experts.shape == (17, 1)
    torch.testing.assert_close(routing.weights[:, 0], probabilities.max(-1).values)
    assert torch.equal(routing.experts[:, 0].long(), probabilities.argmax(-1))


def test_jitter_multiplies_the_router_input_in_training_only():
    torch.manual_seed(3)
    router = routers.build("switch", 6, 4, 1, jitter_noise=0.1)
    x = torch.randn(50, 6)
    torch.manual_seed(9)
    routing = router(x)
    torch.manual_seed(9)
    factor = torch.empty(50, 6).uniform_(0.9, 1.1)  # the forward's first draw, float32
    torch.testing.assert_close(routing.logits, (x * factor) @ router.weight.detach().t())
    assert not torch.equal(routing.logits, x @ router.weight.detach().t())
    router.eval()
    state = torch.get_rng_state()
    torch.testing.assert_close(router(x).logits, x @ router.weight.detach().t())
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize(
    "arguments,error,message",
    [
        (dict(k=2), ValueError, "router 'switch' sends each token to one expert: k must be 1, got k=2"),
        (dict(jitter_noise=1.5), ValueError, r"jitter_noise must be in \[0, 1\)"),
        (dict(jitter_noise=-0.1), ValueError, "jitter_noise must be a finite number >= 0.0, got -0.1"),
        (dict(renormalize=True), TypeError, "router 'switch' takes no option 'renormalize'"),
    ],
)
def test_bad_configuration_names_the_argument(arguments, error, message):
    arguments = {"k": 1, **arguments}
    with pytest.raises(error, match=message):
        routers.build("switch", 8, 4, **arguments)
