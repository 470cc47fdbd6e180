"""NaN in, NaN out: the Triton kernels (interpreter on CPU) against eager PyTorch, and the
channels_last / NCHW / strided layouts of the real-side epilogue kernels against eager."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
from datadam_fast.kernels import real_epilogue as K  # noqa: E402
from datadam_fast.kernels import spatial_attention as SA  # noqa: E402

pytestmark = pytest.mark.skipif(not K.interpreter_active(),
                                reason="runs the kernels on CPU: export TRITON_INTERPRET=1")


def _layouts(y):
    yield "nchw", y.contiguous()
    yield "cl", y.contiguous(memory_format=torch.channels_last)
    wide = torch.zeros(*y.shape[:3], 2 * y.shape[3], dtype=y.dtype)
    wide[..., ::2] = y
    yield "strided", wide[..., ::2]


def _eager(y, scale, shift, act, pool, power):
    v = y.float() * scale[:, :, None, None] + shift[:, :, None, None]
    v = {"relu": F.relu, "leakyrelu": lambda t: F.leaky_relu(t, 0.01), "sigmoid": torch.sigmoid,
         "swish": F.silu}[act](v)
    att = v.abs().pow(power).sum(1).flatten(1)
    out = {"none": lambda t: t, "avgpool": lambda t: F.avg_pool2d(t, 2, 2),
           "maxpool": lambda t: F.max_pool2d(t, 2, 2)}[pool](v)
    return out, att


def _nan_input(shape=(2, 5, 6, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(shape, generator=g)
    y[0, 1, 2, 3] = float("nan")   # one NaN pixel of one channel
    y[1, 3, 0, 0] = float("nan")   # the pivot (first element) of a plane
    y[1, 4, 5, 6] = float("nan")   # in the last (odd, pooled-away) column
    return y


@pytest.mark.parametrize("act", ["relu", "leakyrelu", "sigmoid", "swish"])
@pytest.mark.parametrize("pool", ["none", "avgpool", "maxpool"])
def test_apply_propagates_nan_like_eager(act, pool):
    y = _nan_input()
    N, C = y.shape[:2]
    scale = torch.rand(N, C) + 0.5
    shift = torch.randn(N, C)
    ref_out, ref_att = _eager(y, scale, shift, act, pool, 4.0)
    assert ref_out.isnan().any() and ref_att.isnan().any()
    for name, yl in _layouts(y):
        out, att = K.apply_epilogue(yl, scale, shift, act=act, pool=pool, power=4.0)
        torch.testing.assert_close(out, ref_out, rtol=2e-5, atol=1e-5, equal_nan=True, msg=f"{name} out")
        torch.testing.assert_close(att, ref_att, rtol=2e-5, atol=1e-5, equal_nan=True, msg=f"{name} att")


def test_relu_and_maxpool_of_nan_are_nan_not_zero():
    y = torch.full((1, 1, 2, 2), -1.0)
    y[0, 0, 1, 1] = float("nan")
    one, zero = torch.ones(1, 1), torch.zeros(1, 1)
    out, att = K.apply_epilogue(y, one, zero, act="relu", pool="maxpool", power=2.0)
    assert out.isnan().all() and att[0, 3].isnan() and not att[0, :3].isnan().any()
    assert F.max_pool2d(F.relu(y), 2).isnan().all()  # what eager does


def test_plane_moments_nan_only_in_the_planes_that_hold_one():
    y = _nan_input()
    ref_var, ref_mean = torch.var_mean(y.double(), dim=(2, 3), unbiased=False)
    for name, yl in _layouts(y):
        mean, m2 = K.plane_moments(yl)
        torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-6, equal_nan=True, msg=name)
        torch.testing.assert_close(m2.double() / (6 * 7), ref_var, rtol=1e-4, atol=1e-6, equal_nan=True, msg=name)
        assert mean.isnan().sum() == 3 and m2.isnan().sum() == 3


@pytest.mark.parametrize("shape", [(2, 16, 24, 24), (2, 130, 9, 11), (2, 8, 40, 40), (4, 3, 1, 5)])
def test_plane_moments_pixel_split_matches_single_range(shape):
    """The GPU plan splits the pixels of a plane over programs and combines partial shifted sums;
    run that plan (sm_count of a big GPU) through the interpreter and compare with eager."""
    y = 100.0 + torch.randn(shape)
    y[0, 1, 0, 1] = float("nan")  # NaN in one range of one plane: that plane only
    ref_var, ref_mean = torch.var_mean(y.double(), dim=(2, 3), unbiased=False)
    splits = []
    for name, yl in _layouts(y):
        mean, m2, launches = K.stats_plan(yl, sm_count=132)
        splits.append(launches[0].grid[1])
        SA.run_launches(launches, yl.device)
        torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=1e-5, equal_nan=True, msg=name)
        torch.testing.assert_close(m2.double() / (shape[2] * shape[3]), ref_var, rtol=1e-3, atol=1e-5,
                                   equal_nan=True, msg=name)
        assert mean.isnan().sum() == 1
    if shape[2] * shape[3] > 5:  # the GPU plan splits the pixels of these planes
        assert max(splits) > 1, splits


@pytest.mark.parametrize("fmt", ["nchw", "cl", "strided"])
def test_gpu_apply_plan_matches_eager(fmt):
    """The apply launches a GPU would make (row tiles for NCHW, quads for channels_last), run
    through the interpreter."""
    y = torch.randn(3, 20, 10, 13)
    yl = dict(_layouts(y))[fmt]
    scale, shift = torch.rand(3, 20) + 0.5, torch.randn(3, 20)
    for pool in ("avgpool", "maxpool", "none"):
        out, att, launches = K.apply_plan(yl, scale, shift, act="swish", pool=pool, power=2.5, sm_count=132)
        SA.run_launches(launches, yl.device)
        ref_out, ref_att = _eager(y, scale, shift, "swish", pool, 2.5)
        torch.testing.assert_close(out, ref_out, rtol=2e-5, atol=1e-5)
        torch.testing.assert_close(att, ref_att, rtol=2e-5, atol=1e-5)


def test_spatial_attention_propagates_nan_like_the_reference():
    from datadam_fast.loss.backends import get_backend
    f = torch.randn(3, 6, 5, 5)
    f[1, 2, 3, 3] = float("nan")
    ref = get_backend("reference").forward([f], 4.0)[0][0]
    maps, _ = SA.spatial_attention_forward([f], 4.0)
    assert ref[1].isnan().all() and not ref[[0, 2]].isnan().any()
    torch.testing.assert_close(maps[0], ref.reshape(3, -1).float(), rtol=1e-5, atol=1e-6, equal_nan=True)
