"""Fused real-side epilogue (kernels/real_epilogue.py + datadam_fast/distill/real_side.py) vs the eager
network followed by the reference attention maps and class sums.

CPU through Triton's interpreter (CI exports TRITON_INTERPRET=1); compiled kernels on a CUDA
machine without it. Shapes are tiny because the interpreter runs every program in Python.

Tolerances: float32 inputs: 2e-5 of the largest entry (the epilogue computes the same formulas
in float32, with different summation orders and a fused multiply-add for the normalisation).
bfloat16 / float16: eager rounds after every op (norm, act, pool) while the fused pass rounds
once, so the maps agree to about one rounding step of the format, compounded over the blocks
(4e-2 / 1e-2 relative).
"""
import copy

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from datadam_fast.kernels import real_epilogue as K
from datadam_fast.models.networks import get_network
from datadam_fast.distill.real_side import blocks_of, real_class_sums, unavailable_reason
from datadam_fast.loss.targets import ClassMeanAccumulator
from conftest import assert_close_to_reference

DEVICE = torch.device("cuda") if torch.cuda.is_available() and not K.interpreter_active() else torch.device("cpu")
pytestmark = pytest.mark.skipif(
    DEVICE.type == "cpu" and not K.interpreter_active(),
    reason="no CUDA and the Triton interpreter is off (run with TRITON_INTERPRET=1 exported)")
RTOL = {torch.float32: 2e-5, torch.bfloat16: 4e-2, torch.float16: 1e-2}


def _net(norm="instancenorm", depth=3, act="relu", pooling="avgpool", channel=1, size=(15, 13), width=8, seed=0):
    torch.manual_seed(seed)
    net = get_network("ConvNet", channel, 10, size, width=width, depth=depth, norm=norm, act=act, pooling=pooling)
    return net.to(DEVICE).train()


def _reference(net, x, classes, power, attention=True):
    """Eager network + the reference per-class sums (float64 accumulation)."""
    labels = torch.arange(classes).repeat_interleave(x.shape[0] // classes)
    with torch.no_grad():
        feats, emb = net.features_and_embedding(x)
    acc = ClassMeanAccumulator(classes, power=power, backend="reference")
    acc.update(feats if attention else [], emb.float(), labels=labels)
    return [a.float() for a in acc._att], acc._emb.float()  # the accumulator keeps class sums


def _assert_close(actual, expected, rtol, what):
    assert_close_to_reference(actual, expected, rtol, what, floor=1e-6)


@pytest.fixture(params=["triton", "cpu"])
def impl(request):
    """Both implementations of the epilogue: Triton (interpreter on CPU / compiled on CUDA) and the
    C++ kernels (CPU tensors; the first layer convolved inside the kernel)."""
    if request.param == "cpu":
        if DEVICE.type != "cpu":
            pytest.skip("the C++ epilogue takes CPU tensors")
        why = unavailable_reason(_net(), DEVICE, "cpu")
        if why:
            pytest.skip(why)
    return request.param


def _check(net, x, classes, power, rtol=2e-5, attention=True, impl="triton"):
    ref_net = copy.deepcopy(net)
    att, emb = real_class_sums(net, x, classes, power, attention=attention, impl=impl)
    ratt, remb = _reference(ref_net, x, classes, power, attention)
    assert len(att) == len(ratt) == (len(net.feature_shapes) if attention else 0)
    for i, (a, r) in enumerate(zip(att, ratt)):
        assert a.shape == r.shape and a.dtype == torch.float32
        _assert_close(a, r, rtol, f"attention layer {i}")
    assert emb.shape == remb.shape
    _assert_close(emb, remb, rtol, "embedding")
    return net, ref_net


@pytest.mark.parametrize("norm", ["instancenorm", "batchnorm", "groupnorm", "none"])
@pytest.mark.parametrize("depth", [3, 4])
def test_matches_eager_for_every_norm_and_depth(norm, depth, impl):
    size = (15, 13) if depth == 3 else (16, 16)  # odd maps (attention keeps the last row/col) and even
    net = _net(norm, depth, size=size)
    x = torch.randn(6, 1, *size, device=DEVICE)
    fused, ref = _check(net, x, 3, 4.0, impl=impl)
    if norm == "batchnorm":  # train-mode BN: batch statistics, and the running stats move as in eager
        for a, b in zip(fused.modules(), ref.modules()):
            if isinstance(a, nn.BatchNorm2d):
                assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == 1
                _assert_close(a.running_mean, b.running_mean, 1e-5, "running_mean")
                _assert_close(a.running_var, b.running_var, 1e-5, "running_var")


@pytest.mark.parametrize("channel,size,width", [(1, (15, 13), 40), (3, (11, 9), 33), (1, (28, 28), 32)])
def test_first_layer_convolution_blocks(channel, size, width, impl):
    """The C++ first layer convolves 8 pixels x 16 channels at a time: full channel blocks, a
    channel tail, a pixel count that is not a multiple of 8 (15 x 13, 11 x 9) and the MNIST first
    layer (28 x 28 input, padding 3, 32 x 32 output)."""
    net = _net("instancenorm", channel=channel, size=size, width=width)
    _check(net, torch.randn(5, channel, *size, device=DEVICE), 5, 4.0, impl=impl)


@pytest.mark.parametrize("power", [1.0, 2.0, 4.0, 2.5])
def test_powers(power, impl):
    net = _net("instancenorm", size=(12, 12))
    _check(net, torch.randn(4, 1, 12, 12, device=DEVICE), 2, power, impl=impl)


@pytest.mark.parametrize("act,pooling", [("leakyrelu", "avgpool"), ("sigmoid", "maxpool"), ("swish", "avgpool"),
                                         ("relu", "maxpool"), ("relu", "none")])
def test_activations_and_pooling(act, pooling, impl):
    size = (9, 7) if pooling == "none" else (15, 13)
    net = _net("instancenorm", depth=2 if pooling == "none" else 3, act=act, pooling=pooling, channel=3,
               size=size, width=6)
    _check(net, torch.randn(4, 3, *size, device=DEVICE), 2, 4.0, impl=impl)


def test_batchnorm_eval_mode_uses_running_stats(impl):
    net = _net("batchnorm")
    x = torch.randn(6, 1, 15, 13, device=DEVICE)
    with torch.no_grad():
        net(x)  # move the running stats away from (0, 1)
    net.eval()
    fused, ref = _check(net, torch.randn(4, 1, 15, 13, device=DEVICE), 2, 1.0, impl=impl)
    assert int(fused.features[1].num_batches_tracked) == 1  # eval: no update


def test_channels_last_non_contiguous_and_embedding_only(impl):
    net = _net("instancenorm", channel=3, size=(16, 16), width=12).to(memory_format=torch.channels_last)
    x = torch.randn(6, 3, 16, 32, device=DEVICE)[..., ::2].contiguous(memory_format=torch.channels_last)
    _check(net, x, 3, 4.0, impl=impl)
    _check(net, torch.randn(6, 3, 16, 32, device=DEVICE)[..., ::2], 3, 4.0, impl=impl)  # strided input
    _check(net, x, 3, 4.0, attention=False, impl=impl)
    _check(net.to(memory_format=torch.contiguous_format), x.contiguous(), 3, 4.0, impl=impl)  # NCHW


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype, impl):
    net = _net("instancenorm", size=(16, 16)).to(dtype)
    _check(net, torch.randn(4, 1, 16, 16, device=DEVICE).to(dtype), 2, 4.0, rtol=RTOL[dtype], impl=impl)


def test_cpu_fused_first_convolution_shapes():
    """The C++ kernels convolve a first layer (<= 4 input channels) themselves: other paddings,
    5x5 kernels, no bias, 3 and 4 input channels, against ATen's convolution."""
    if DEVICE.type != "cpu" or unavailable_reason(_net(), DEVICE, "cpu"):
        pytest.skip("the C++ epilogue is unavailable here")
    from datadam_fast.loss.backends import get_backend
    get_backend("cpu")
    ops = torch.ops.datadam_fast
    for cin, k, pad, bias in ((1, 3, (3, 3), True), (3, 3, (1, 1), True), (4, 5, (2, 1), False), (3, 3, (0, 0), True)):
        x = torch.randn(3, cin, 11, 9)
        conv = nn.Conv2d(cin, 20, k, padding=pad, bias=bias)
        y = conv(x).detach()
        ones, zeros = torch.ones(3, 20), torch.zeros(3, 20)
        ref, _ = ops.cpu_real_epilogue(y, ones, zeros, None, None, 1, 0.0, 3, 0.01, 0, 1.0, False)
        got, _ = ops.cpu_real_epilogue(x, ones, zeros, None, None, 1, 0.0, 3, 0.01, 0, 1.0, False,
                                       conv.weight.detach(), conv.bias.detach() if bias else None, list(pad))
        _assert_close(got, ref, 2e-5, f"fused conv cin={cin} k={k} pad={pad}")
        m_ref = ops.cpu_plane_moments(y)
        m_got = ops.cpu_plane_moments(x, conv.weight.detach(), conv.bias.detach() if bias else None, list(pad))
        for a, b in zip(m_got, m_ref):
            _assert_close(a, b, 1e-4, "moments of the fused conv")
    with pytest.raises(RuntimeError, match="float32 input and weight"):
        ops.cpu_real_epilogue(x.double(), ones, zeros, None, None, 1, 0.0, 0, 0.01, 0, 1.0, False,
                              conv.weight.detach().double(), None, [0, 0])
    with pytest.raises(RuntimeError, match=r"scale and shift must be \[N, C\]"):
        ops.cpu_real_epilogue(y, torch.ones(2, 20), zeros, None, None, 1, 0.0, 0, 0.01, 0, 1.0, False)


def test_plane_moments_are_stable_far_from_zero():
    y = 1000.0 + torch.randn(2, 3, 17, 19, device=DEVICE)
    mean, m2 = K.plane_moments(y)
    ref_var, ref_mean = torch.var_mean(y.double(), dim=(2, 3), unbiased=False)
    assert torch.allclose(mean.double(), ref_mean, rtol=1e-6)
    assert torch.allclose(m2.double() / (17 * 19), ref_var, rtol=1e-3)  # naive fp32 sums would lose it all


def test_bad_input_is_a_clear_error():
    y = torch.randn(2, 3, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match=r"scale and shift must be \[N, C\]"):
        K.apply_epilogue(y, torch.ones(3), torch.zeros(3))
    with pytest.raises(ValueError, match="unsupported activation"):
        K.apply_epilogue(y, torch.ones(2, 3), torch.zeros(2, 3), act="gelu")
    with pytest.raises(TypeError, match="float32/bfloat16/float16"):
        K.plane_moments(y.double())
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        K.plane_moments(y[0])
    with pytest.raises(ValueError, match="do not split into 4 classes"):
        real_class_sums(_net(), torch.randn(6, 1, 15, 13, device=DEVICE), 4, 4.0)
    alex = get_network("AlexNet", 1, 10, (28, 28))
    assert "ConvNet" in unavailable_reason(alex, DEVICE)
    ln = get_network("ConvNet", 1, 10, (16, 16), width=4, norm="layernorm")
    blocks, why = blocks_of(ln)
    assert blocks is None and "LayerNorm" in why


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["triton", "cpu"])
def test_distiller_with_fused_real_side_equals_eager(tmp_path, mode):
    from datadam_fast.distill import DistillConfig, Distiller
    if mode == "cpu" and DEVICE.type != "cpu":
        pytest.skip("the C++ epilogue takes CPU tensors")
    small = dict(dataset="digits", ipc=2, batch_real=6, width=16, iterations=2, eval_every=-1, log_every=1,
                 checkpoint_every=0, compile=False, device=str(DEVICE))
    out = {}
    for m in ("off", mode):
        d = Distiller(DistillConfig(real_epilogue=m, **small), None, progress=False)
        assert d.fused_real == (None if m == "off" else m)
        d.run()
        d.close()
        out[m] = d.syn.detach().clone()
    # two SGD steps (lr 1) through a float32 loss: rounding differences of the real targets grow a little
    assert (out["off"] - out[mode]).abs().max() <= 1e-4 * out["off"].abs().max()


# ------------------------------------------------------------------------------------------------
# NaN and one-value BatchNorm: the same behaviour as the eager network, in every implementation
# ------------------------------------------------------------------------------------------------
def _assert_same_nans_and_close(actual, expected, rtol, what):
    assert_close_to_reference(actual, expected, rtol, what, floor=1e-6)  # NaN exactly where eager has it


@pytest.mark.parametrize("pooling", ["maxpool", "avgpool"])
@pytest.mark.parametrize("norm", ["none", "batchnorm_eval"])
def test_nan_in_gives_nan_out_like_eager(impl, norm, pooling):
    """A NaN pixel in one image of class 1: eager PyTorch (conv, ReLU, pooling, F.normalize) turns
    that class's attention sums and some embedding entries into NaN and leaves class 0 finite."""
    net = _net("batchnorm" if norm == "batchnorm_eval" else "none", depth=3, pooling=pooling, size=(16, 16))
    if norm == "batchnorm_eval":
        with torch.no_grad():
            net(torch.randn(8, 1, 16, 16, device=DEVICE))
        net.eval()  # scale / shift from running statistics: no batch statistics to spread the NaN
    x = torch.randn(4, 1, 16, 16, device=DEVICE)
    x[3, 0, 5, 6] = float("nan")
    att, emb = real_class_sums(copy.deepcopy(net), x, 2, 4.0, impl=impl)
    ratt, remb = _reference(copy.deepcopy(net), x, 2, 4.0)
    assert torch.isnan(remb[1]).any() and torch.isfinite(remb[0]).all()  # the case is meaningful
    for i, (a, r) in enumerate(zip(att, ratt)):
        _assert_same_nans_and_close(a, r, 2e-5, f"attention layer {i}")
    _assert_same_nans_and_close(emb, remb, 2e-5, "embedding")


def test_cpu_epilogue_op_propagates_nan_like_eager_for_every_act_and_pool():
    """Element by element: act(y * scale + shift), then the 2x2 pool, against eager with NaN
    scattered over the map (a NaN operand anywhere in a pooling window gives NaN)."""
    if DEVICE.type != "cpu" or unavailable_reason(_net(), DEVICE, "cpu"):
        pytest.skip("the C++ epilogue is unavailable here")
    from datadam_fast.loss.backends import get_backend
    from datadam_fast._constants import EPILOGUE_ACTS, EPILOGUE_POOLS
    get_backend("cpu")
    y = torch.randn(2, 19, 6, 8)
    y[y.abs() < 0.15] = float("nan")  # ~12% NaN, some windows with several
    scale, shift = torch.rand(2, 19) + 0.5, torch.randn(2, 19)
    eager_act = {"relu": torch.relu, "leakyrelu": lambda v: torch.nn.functional.leaky_relu(v, 0.01),
                 "sigmoid": torch.sigmoid, "swish": torch.nn.functional.silu}
    eager_pool = {"none": lambda v: v, "avgpool": lambda v: torch.nn.functional.avg_pool2d(v, 2),
                  "maxpool": lambda v: torch.nn.functional.max_pool2d(v, 2)}
    for a, act in enumerate(EPILOGUE_ACTS):
        for p, pool in enumerate(EPILOGUE_POOLS):
            out, att = torch.ops.datadam_fast.cpu_real_epilogue(y, scale, shift, None, None, 1, 0.0, a, 0.01, p,
                                                                4.0, True)
            v = eager_act[act](y * scale[:, :, None, None] + shift[:, :, None, None])
            _assert_same_nans_and_close(out.float(), eager_pool[pool](v), 1e-5, f"{act}/{pool} output")
            _assert_same_nans_and_close(att, v.abs().pow(4).sum(1).flatten(1), 1e-5, f"{act}/{pool} attention")


@pytest.mark.parametrize("impl_name", ["triton", "cpu"])
def test_batchnorm_with_one_value_per_channel_raises_like_eager(impl_name):
    """Batch statistics of one value (N*H*W == 1) are undefined: nn.BatchNorm2d raises, and so
    does the fused real side (checked once, before any implementation runs, so it holds for the
    C++ and Triton paths alike); eval mode and two values per channel are fine."""
    if impl_name == "cpu" and (DEVICE.type != "cpu" or unavailable_reason(_net(), DEVICE, "cpu")):
        pytest.skip("the C++ epilogue is unavailable here")
    net = _net("batchnorm", depth=2, pooling="none", channel=3, size=(1, 1))  # 1x1 conv outputs
    x = torch.randn(1, 3, 1, 1, device=DEVICE)
    with pytest.raises(ValueError) as eager:
        with torch.no_grad():
            copy.deepcopy(net).features_and_embedding(x)
    assert "Expected more than 1 value per channel when training" in str(eager.value)
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError) as fused:
        real_class_sums(net, x, 1, 4.0, impl=impl_name)
    assert str(fused.value) == str(eager.value)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # nothing ran
    _check(net, torch.randn(2, 3, 1, 1, device=DEVICE), 2, 4.0, impl=impl_name)  # N*H*W == 2: defined
    _check(net.eval(), x, 1, 4.0, impl=impl_name)  # running statistics: no batch statistics needed
