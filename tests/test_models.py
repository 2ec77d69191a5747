"""fastdd.models: architectures, the 28-px rule, generator-driven init, and the flat-parameter forward."""

import math

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

from fastdd.errors import FastddError
from fastdd.models import (
    MODELS,
    AlexNet,
    ConvNet,
    ParameterLayout,
    VGG11,
    build_model,
    flat_parameters,
    functional_forward,
)

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
WIDTH = 8  # ConvNet family in shape tests; the cross-architecture nets have fixed widths

# Embedding size per (model, input shape), worked out by hand from each architecture (None: image too small).
EXPECTED_FEATURE_DIM = {
    # ConvNet: 8 px gets depth 2 (2x2 map); 28 is padded to 32 -> 4 after 3 pools; 32 -> 4 (3), 2 (4), 1 (5).
    ("convnet", 8): WIDTH * 2 * 2, ("convnet", 28): WIDTH * 4 * 4, ("convnet", 32): WIDTH * 4 * 4,
    ("convnetd4", 8): None, ("convnetd4", 28): WIDTH * 2 * 2, ("convnetd4", 32): WIDTH * 2 * 2,
    ("convnetd5", 8): None, ("convnetd5", 28): WIDTH * 1 * 1, ("convnetd5", 32): WIDTH * 1 * 1,
    # AlexNet: size-preserving convs, 3 max-pools, 192 channels at the end.
    ("alexnet", 8): 192 * 1 * 1, ("alexnet", 28): 192 * 4 * 4, ("alexnet", 32): 192 * 4 * 4,
    # Global average pool over 512 channels.
    ("vgg11", 8): 512, ("vgg11", 28): 512, ("vgg11", 32): 512,
    ("resnet18", 8): 512, ("resnet18", 28): 512, ("resnet18", 32): 512,
}


def _build(name, shape, generator, **kwargs):
    kwargs.setdefault("width", WIDTH)
    return build_model(name, channels=shape[0], num_classes=7, image_size=shape[1:], generator=generator, **kwargs)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", MODELS)
def test_output_and_embedding_shapes(name, shape, generator):
    expected_dim = EXPECTED_FEATURE_DIM[(name, shape[1])]
    if expected_dim is None:
        with pytest.raises(ValueError, match="8x8"):
            _build(name, shape, generator)
        return
    net = _build(name, shape, generator)
    x = torch.randn(2, *shape, generator=generator)
    assert net.feature_dim == expected_dim
    assert net.embed(x).shape == (2, expected_dim)
    logits = net(x)
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()


def test_wrong_input_shape_is_rejected(generator):
    net = _build("convnet", (3, 32, 32), generator)
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\].*\[2, 3, 28, 28\]"):
        net(torch.zeros(2, 3, 28, 28))


def test_convnet_feature_dim_and_28px_rule():
    # Structure only: build on the meta device (no parameter memory, no random draws).
    with torch.device("meta"):
        assert ConvNet(3, 10, 32).feature_dim == 128 * 4 * 4 == 2048
        assert ConvNet(3, 10, 32).features[0].padding == (1, 1)

        mnist = ConvNet(1, 10, 28)
        assert mnist.features[0].padding == (3, 3)  # 28 + 2*3 - 2 = 32
        assert all(m.padding == (1, 1) for m in mnist.features[1:] if isinstance(m, nn.Conv2d))
        assert mnist.feature_shape == (128, 4, 4) and mnist.feature_dim == 2048
        assert mnist.features(torch.zeros(1, 1, 28, 28)).shape == (1, 128, 4, 4)

        # The cross-architecture nets follow the same rule (AlexNet's first conv has a 5x5 kernel, padding 2 -> 4).
        assert AlexNet(1, 10, 28).features[0].padding == (4, 4) and AlexNet(1, 10, 28).feature_shape == (192, 4, 4)
        assert VGG11(1, 10, 28).features[0].padding == (3, 3) and VGG11(1, 10, 32).features[0].padding == (1, 1)

        assert ConvNet(3, 10, 64, depth=4).feature_dim == 128 * 4 * 4
        assert ConvNet(3, 10, 128, depth=5, width=4).feature_dim == 4 * 4 * 4
        assert ConvNet(1, 10, 8, width=4).feature_dim == 4 * 1 * 1
        # The rule needs a square 28x28 image; no pooling keeps the (padded) spatial size.
        assert ConvNet(1, 10, (28, 32), width=4).feature_shape == (4, 3, 4)
        assert ConvNet(1, 10, 28, width=4, pooling="none").feature_shape == (4, 32, 32)
        assert ConvNet(1, 10, 8, width=4, pooling="none").feature_dim == 4 * 8 * 8


def test_convnet_too_small_image_names_the_sizes():
    with pytest.raises(ValueError, match=r"depth 4 .* 16x16 .* 12x12"), torch.device("meta"):
        ConvNet(3, 10, 12, depth=4)


def test_default_convnet_parameter_count(generator):
    def conv(c_in, c_out):  # 3x3 kernel + bias
        return c_in * c_out * 9 + c_out

    norm = 2 * 128  # GroupNorm affine weight + bias
    expected = (conv(3, 128) + norm) + 2 * (conv(128, 128) + norm) + (128 * 4 * 4 * 10 + 10)
    net = build_model("convnet", channels=3, num_classes=10, image_size=32, generator=generator)
    assert sum(p.numel() for p in net.parameters()) == expected == 320010
    assert len(list(net.buffers())) == 0


@pytest.mark.parametrize("name", MODELS)
def test_generator_determines_parameters(name):
    rng_before = torch.get_rng_state()
    a = _build(name, (3, 32, 32), torch.Generator().manual_seed(1))
    b = _build(name, (3, 32, 32), torch.Generator().manual_seed(1))
    c = _build(name, (3, 32, 32), torch.Generator().manual_seed(2))
    assert torch.equal(torch.get_rng_state(), rng_before), "building from a generator must not touch the global RNG"
    for (name_a, p_a), (name_b, p_b), (_, p_c) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert name_a == name_b
        assert torch.equal(p_a, p_b), name_a
        if p_a.numel() > 1 and p_a.std() > 0:  # constant-initialised norm weights/biases agree by design
            assert not torch.equal(p_a, p_c), name_a


@pytest.mark.parametrize(
    "make",
    [
        lambda: ConvNet(3, 10, 32, width=16),
        lambda: ConvNet(1, 10, 28, width=16, norm="batchnorm", pooling="maxpool"),
        lambda: AlexNet(3, 10, 32),
        lambda: VGG11(1, 10, 8, norm="batchnorm"),
    ],
    ids=["convnet", "convnet-bn", "alexnet", "vgg11"],
)
def test_init_reproduces_pytorch_default_init(make):
    # Oracle: PyTorch's own default init, drawn from the global RNG in construction order. The global RNG is
    # seeded only inside fork_rng, which restores it afterwards.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        reference = make()
    net = build_model(
        type(reference).__name__.lower(),
        channels=reference.channels,
        num_classes=10,
        image_size=reference.image_size,
        norm=getattr(reference, "norm", "instancenorm"),
        generator=torch.Generator().manual_seed(123),
        **({"width": reference.width, "pooling": reference.pooling} if isinstance(reference, ConvNet) else {}),
    )
    expected, actual = reference.state_dict(), net.state_dict()
    assert list(expected) == list(actual)
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_resnet18_uses_pytorch_default_init_laws():
    # torchvision would draw kaiming-normal conv weights, which exceed the uniform bound checked here.
    net = build_model("resnet18", channels=3, num_classes=10, image_size=32, norm="batchnorm",
                      generator=torch.Generator().manual_seed(0))
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)
    for name, module in net.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            bound = 1 / math.sqrt(module.weight[0].numel())
            w = module.weight
            assert w.abs().max() <= bound, name
            if w.numel() >= 1000:  # uniform on [-bound, bound]: max |w| < 0.9 bound has probability < 1e-22
                assert w.abs().max() > 0.9 * bound, name
        elif isinstance(module, nn.BatchNorm2d):
            assert torch.equal(module.weight, torch.ones_like(module.weight)), name
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
            assert torch.equal(module.running_var, torch.ones_like(module.running_var)), name
            assert torch.equal(module.running_mean, torch.zeros_like(module.running_mean)), name
    assert net.fc.bias.abs().max() <= 1 / math.sqrt(512)


def test_build_model_errors(generator):
    with pytest.raises(FastddError, match="convnet, convnetd4, convnetd5, alexnet, vgg11, resnet18"):
        build_model("lenet", channels=3, num_classes=10, image_size=32)
    with pytest.raises(FastddError, match="depth"):
        build_model("convnetd4", channels=3, num_classes=10, image_size=64, depth=3)
    with pytest.raises(FastddError, match="depth"):
        build_model("alexnet", channels=3, num_classes=10, image_size=32, depth=3)
    with pytest.raises(FastddError, match="instancenorm, batchnorm, none"):
        build_model("convnet", channels=3, num_classes=10, image_size=32, norm="layer")
    with pytest.raises(FastddError, match="avgpool, maxpool, none"):
        build_model("convnet", channels=3, num_classes=10, image_size=32, pooling="median")
    same = dict(channels=3, num_classes=10, image_size=64, width=4, generator=generator)
    assert build_model("ConvNetD4", **same).depth == 4
    assert build_model("convnet", depth=4, **same).feature_dim == 4 * 4 * 4


def test_parameter_layout_round_trip(generator):
    net = _build("convnet", (3, 32, 32), generator, norm="batchnorm")
    layout = ParameterLayout.from_module(net)
    named = list(net.named_parameters())
    assert layout.names == tuple(n for n, _ in named)
    assert layout.shapes == tuple(p.shape for _, p in named)
    assert layout.offsets == (0, *torch.tensor(layout.numels).cumsum(0)[:-1].tolist())
    assert layout.numel == sum(p.numel() for _, p in named)
    assert set(layout.buffer_names) == {n for n, _ in net.named_buffers()}

    flat = flat_parameters(net).detach()
    assert torch.equal(flat, torch.nn.utils.parameters_to_vector(net.parameters()))
    views = layout.unflatten(flat)
    assert list(views) == list(layout.names)
    for name, param in named:
        assert torch.equal(views[name], param), name
        assert views[name].untyped_storage().data_ptr() == flat.untyped_storage().data_ptr(), "must be a view"
    with pytest.raises(ValueError, match=rf"\[{layout.numel}\].*\[{layout.numel - 1}\]"):
        layout.unflatten(flat[1:])


FUNCTIONAL_CASES = {
    "convnet": (lambda g: _build("convnet", (3, 32, 32), g), True),
    "convnet-maxpool-28": (lambda g: _build("convnet", (1, 28, 28), g, pooling="maxpool"), True),
    "convnet-bn-train": (lambda g: _build("convnet", (3, 32, 32), g, norm="batchnorm"), True),
    "convnet-bn-eval": (lambda g: _build("convnet", (3, 32, 32), g, norm="batchnorm"), False),
    "alexnet": (lambda g: _build("alexnet", (1, 8, 8), g), True),
    "vgg11": (lambda g: _build("vgg11", (1, 8, 8), g), True),
    "resnet18-bn": (lambda g: _build("resnet18", (3, 8, 8), g, norm="batchnorm"), True),
}


@pytest.mark.parametrize("case", list(FUNCTIONAL_CASES))
def test_functional_forward_matches_module(case, generator):
    make, train = FUNCTIONAL_CASES[case]
    net = make(generator).double().train(train)
    if not train:  # give eval-mode BatchNorm non-trivial running statistics
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
    x = torch.randn(2, net.channels, *net.image_size, generator=generator, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 7, generator=generator, dtype=torch.float64)
    flat = flat_parameters(net).detach().requires_grad_()
    buffers_before = {n: b.clone() for n, b in net.named_buffers()}

    out_functional = functional_forward(net, flat, x)
    grad_flat, grad_x_functional = torch.autograd.grad((out_functional * weights).sum(), (flat, x))
    for name, buffer in net.named_buffers():  # running statistics are not updated by the functional path
        assert torch.equal(buffer, buffers_before[name]), name

    out_module = net(x)
    grads = torch.autograd.grad((out_module * weights).sum(), (*net.parameters(), x))
    torch.testing.assert_close(out_functional, out_module, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_flat, torch.nn.utils.parameters_to_vector(grads[:-1]), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_x_functional, grads[-1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "norm, pooling, width, batch, fast",
    [
        ("instancenorm", "avgpool", 2, 1, False),
        ("instancenorm", "avgpool", 4, 2, True),
        ("batchnorm", "maxpool", 4, 2, True),
    ],
)
def test_functional_forward_gradcheck_and_double_backward(norm, pooling, width, batch, fast, generator):
    # Full mode compares every Jacobian entry with finite differences; fast mode compares random projections
    # u^T J v (the full double-backward check costs about a minute on 2 cores).
    net = build_model("convnet", channels=1, num_classes=3, image_size=8, width=width, norm=norm, pooling=pooling,
                      generator=generator).double()
    flat = flat_parameters(net).detach().requires_grad_()
    x = torch.randn(batch, 1, 8, 8, generator=generator, dtype=torch.float64, requires_grad=True)

    def forward(params, images):
        return functional_forward(net, params, images)

    assert gradcheck(forward, (flat, x), fast_mode=fast)
    assert gradgradcheck(forward, (flat, x), fast_mode=True)


def test_functional_forward_hessian_vector_product_matches_finite_differences(generator):
    # The trajectory-matching use: d/dtheta <grad_theta loss(theta), v>, checked against central differences.
    net = build_model("convnet", channels=3, num_classes=5, image_size=8, width=4, generator=generator).double()
    x = torch.randn(6, 3, 8, 8, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 5, (6,), generator=generator)
    theta = flat_parameters(net).detach()
    v = torch.randn(theta.shape, generator=generator, dtype=torch.float64)
    v /= v.norm()  # a small step, so no ReLU changes side between theta - eps v and theta + eps v

    def grad(params, create_graph=False):
        params = params.detach().requires_grad_()
        loss = nn.functional.cross_entropy(functional_forward(net, params, x), y)
        return params, torch.autograd.grad(loss, params, create_graph=create_graph)[0]

    params, g = grad(theta, create_graph=True)
    hvp = torch.autograd.grad(g @ v, params)[0]
    eps = 1e-6
    finite = (grad(theta + eps * v)[1] - grad(theta - eps * v)[1]) / (2 * eps)
    torch.testing.assert_close(hvp, finite, rtol=1e-6, atol=1e-8)
    assert hvp.norm() > 0


def test_functional_forward_rejects_wrong_length(generator):
    net = _build("convnet", (1, 8, 8), generator)
    with pytest.raises(ValueError, match="flat parameter vector"):
        functional_forward(net, torch.zeros(3), torch.zeros(1, 1, 8, 8))


def test_functional_forward_under_vmap(generator):
    # Batched students: one forward per row of a [S, P] parameter matrix.
    net = _build("convnet", (3, 8, 8), generator)
    x = torch.randn(2, 3, 8, 8, generator=generator)
    thetas = torch.stack([flat_parameters(net).detach(), torch.randn(flat_parameters(net).shape, generator=generator)])
    batched = torch.func.vmap(lambda p: functional_forward(net, p, x))(thetas)
    assert batched.shape == (2, 2, 7)
    for s in range(2):
        torch.testing.assert_close(batched[s], functional_forward(net, thetas[s], x))


def test_default_convnet_depth_follows_image_size():
    from fastdd.models.registry import default_convnet_depth

    assert [default_convnet_depth((s, s)) for s in (8, 16, 28, 32, 64, 128)] == [2, 3, 3, 3, 4, 5]
    net = build_model("convnet", channels=1, num_classes=10, image_size=8, width=4)
    assert net.depth == 2 and net.feature_dim == 4 * 2 * 2
