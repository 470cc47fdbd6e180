"""Winograd F(2x2, 3x3) convolution of the C++ real side (csrc/winograd_cpu.cpp,
``torch.ops.datadam_fast.cpu_winograd_conv3x3`` + ``real_side.winograd_filters``) against the float64
convolution, and the real side that uses it against the one on oneDNN's direct convolution.

Tolerance: Winograd and the direct float32 convolution both differ from the float64 result by
rounding; the check is that Winograd's largest error is within 3x the direct convolution's on the
same data plus 1e-6 of the output's scale (a wrong transform, tile or border is off by O(1)).
"""
import pytest
import torch
from torch import nn

from datadam_fast.distill import real_side
from datadam_fast.distill.real_side import real_class_sums, use_winograd, winograd_filters
from datadam_fast.loss.backends import get_backend
from datadam_fast.models.networks import get_network


@pytest.fixture(scope="module")
def ops():
    get_backend("cpu")  # builds / loads the extension that registers the op
    return torch.ops.datadam_fast


def _check_against_float64(ops, x, w, b):
    y = ops.cpu_winograd_conv3x3(x, winograd_filters(w), b)
    ref = torch.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=1)
    direct = torch.conv2d(x, w, b, padding=1)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert y.is_contiguous(memory_format=torch.channels_last)
    if y.numel() == 0:
        return
    err = (y.double() - ref).abs().max().item()
    err_direct = (direct.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= 3 * err_direct + 1e-6 * scale, (err, err_direct, scale)


@pytest.mark.parametrize("n,cin,cout,h,w", [
    (3, 16, 8, 14, 14),    # the MNIST layer-2 shape, even tiles
    (2, 17, 5, 7, 7),      # odd size: the last tile row and column half outside
    (1, 32, 33, 5, 3),     # odd H and W, Cout not a multiple of the vector width
    (2, 16, 1, 1, 1),      # one pixel: a single tile, mostly padding
    (1, 24, 7, 2, 9),
    (0, 16, 4, 6, 6),      # no images
])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_float64_convolution(ops, n, cin, cout, h, w, bias):
    g = torch.Generator().manual_seed(n * 1000 + cin + h)
    x = torch.randn(n, cin, h, w, generator=g)
    wt = torch.randn(cout, cin, 3, 3, generator=g) / (3 * cin ** 0.5)
    b = torch.randn(cout, generator=g) if bias else None
    _check_against_float64(ops, x, wt, b)


def test_layouts_and_many_blocks(ops):
    """NCHW, channels_last and a non-contiguous slice give the same result; 40 images of 14x14
    (49 tiles each) span several blocks of the kernel's tile loop, and at::parallel_for splits them."""
    g = torch.Generator().manual_seed(1)
    big = torch.randn(40, 48, 14, 16, generator=g)
    wt = torch.randn(20, 24, 3, 3, generator=g) / 15
    b = torch.randn(20, generator=g)
    x = big[:, ::2, :, 1:15]  # non-contiguous in C and W
    assert not x.is_contiguous()
    u = winograd_filters(wt)
    y = ops.cpu_winograd_conv3x3(x, u, b)
    assert torch.equal(y, ops.cpu_winograd_conv3x3(x.contiguous(), u, b))
    assert torch.equal(y, ops.cpu_winograd_conv3x3(x.contiguous(memory_format=torch.channels_last), u, b))
    _check_against_float64(ops, x, wt, b)


def test_opcheck_and_compile(ops):
    """A real torch.library op: schema, fake kernel (shape, channels_last) and AOT dispatch
    (opcheck), and torch.compile(fullgraph=True) around it with no graph break."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, 5, 6, generator=g)
    w = torch.randn(3, 16, 3, 3, generator=g)
    u, b = winograd_filters(w), torch.randn(3, generator=g)
    result = torch.library.opcheck(ops.cpu_winograd_conv3x3.default, (x, u, b))
    assert all(v == "SUCCESS" for v in result.values()), result
    compiled = torch.compile(lambda x: ops.cpu_winograd_conv3x3(x, u, b).relu(), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), ops.cpu_winograd_conv3x3(x, u, b).relu())


def test_bad_input_is_named(ops):
    x = torch.randn(2, 16, 5, 5)
    u = winograd_filters(torch.randn(4, 16, 3, 3))
    with pytest.raises(RuntimeError, match=r"expected filters \[16, 8, Cout\]"):
        ops.cpu_winograd_conv3x3(torch.randn(2, 8, 5, 5), u, None)
    with pytest.raises(RuntimeError, match="expected float32"):
        ops.cpu_winograd_conv3x3(x.double(), u, None)
    with pytest.raises(RuntimeError, match="expected a float32 bias of 4 values"):
        ops.cpu_winograd_conv3x3(x, u, torch.zeros(5))
    with pytest.raises(RuntimeError, match=r"expected x \[N, Cin, H, W\]"):
        ops.cpu_winograd_conv3x3(x[0], u, None)


def test_which_convolutions_use_it(monkeypatch):
    x = torch.zeros(1, 16, 8, 8)
    assert use_winograd(nn.Conv2d(16, 8, 3, padding=1), x)
    assert not use_winograd(nn.Conv2d(8, 8, 3, padding=1), x[:, :8])       # too few input channels
    assert not use_winograd(nn.Conv2d(16, 8, 3, padding=1, stride=2), x)
    assert not use_winograd(nn.Conv2d(16, 8, 3, padding=0), x)
    assert not use_winograd(nn.Conv2d(16, 8, 5, padding=1), x)
    assert not use_winograd(nn.Conv2d(16, 8, 3, padding=1, groups=2), x)
    assert not use_winograd(nn.Conv2d(16, 8, 3, padding=1, padding_mode="reflect"), x)
    assert not use_winograd(nn.Conv2d(16, 8, 3, padding=1).double(), x.double())
    monkeypatch.setenv("DATADAM_FAST_REAL_CONV", "direct")
    assert not use_winograd(nn.Conv2d(16, 8, 3, padding=1), x)


@pytest.mark.parametrize("norm", ["instancenorm", "batchnorm", "none"])
def test_real_side_with_and_without_winograd(norm, monkeypatch):
    """The C++ real side of a width-32 ConvNet (layers 2 and 3 through Winograd) equals the same
    real side on oneDNN's direct convolution and the eager network, to float rounding."""
    torch.manual_seed(0)
    net = get_network("ConvNet", 1, 10, (28, 28), width=32, depth=3, norm=norm).train()
    assert use_winograd(net.features[4] if norm != "none" else net.features[3], torch.zeros(1, 32, 14, 14))
    x = torch.randn(8, 1, 28, 28)
    calls = []
    real_op = torch.ops.datadam_fast.cpu_winograd_conv3x3

    def counting(*a):
        calls.append(1)
        return real_op(*a)

    monkeypatch.setattr(real_side, "_winograd", counting)
    att_w, emb_w = real_class_sums(net, x, 2, 4.0, impl="cpu")
    assert len(calls) == 2  # layers 2 and 3
    monkeypatch.setenv("DATADAM_FAST_REAL_CONV", "direct")
    att_d, emb_d = real_class_sums(net, x, 2, 4.0, impl="cpu")
    assert len(calls) == 2
    with torch.no_grad():
        emb_ref = net.embed(x).view(2, 4, -1).sum(1)
    for a, b in zip(att_w, att_d):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(emb_w, emb_d, rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(emb_w, emb_ref, rtol=2e-5, atol=1e-5)
