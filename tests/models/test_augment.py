"""Batched Siamese DSA against per-sample loop references of the official DiffAugment formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

from datadam_fast.models.augment import DSA, DSA_FAMILIES, DEFAULT_STRATEGY, ParamDiffAug


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ per-sample references
# Written from the official utils.py formulas, one image [C, H, W] at a time.
P = ParamDiffAug()


def ref_color(xi, b, s, c):
    xi = xi + (b - 0.5) * P.brightness
    m = xi.mean(dim=0, keepdim=True)
    xi = (xi - m) * (s * P.saturation) + m
    m = xi.mean()
    return (xi - m) * (c + P.contrast) + m


def ref_crop(xi, tx, ty):
    C, H, W = xi.shape
    xp = F.pad(xi, [1, 1, 1, 1])  # official: zero-pad by one, clamp indices into the padded image
    out = torch.empty_like(xi)
    for i in range(H):
        for j in range(W):
            out[:, i, j] = xp[:, min(max(i + tx + 1, 0), H + 1), min(max(j + ty + 1, 0), W + 1)]
    return out


def ref_cutout(xi, ox, oy):
    C, H, W = xi.shape
    ch, cw = int(H * P.ratio_cutout + 0.5), int(W * P.ratio_cutout + 0.5)
    mask = torch.ones(H, W, dtype=xi.dtype)
    for a in range(ch):
        for b in range(cw):
            mask[min(max(a + ox - ch // 2, 0), H - 1), min(max(b + oy - cw // 2, 0), W - 1)] = 0
    return xi * mask


def ref_flip(xi, f):
    return xi.flip(2) if f else xi


def ref_affine(xi, theta):
    theta = torch.tensor([theta], dtype=torch.float).to(xi.dtype)
    grid = F.affine_grid(theta, [1, *xi.shape], align_corners=False)
    return F.grid_sample(xi[None], grid, align_corners=False)[0]


def ref_family(fam, xi, p, g):
    if fam == "color":
        return ref_color(xi, p.brightness[g].item(), p.saturation[g].item(), p.contrast[g].item())
    if fam == "crop":
        return ref_crop(xi, int(p.crop[g, 0]), int(p.crop[g, 1]))
    if fam == "cutout":
        return ref_cutout(xi, int(p.cutout[g, 0]), int(p.cutout[g, 1]))
    if fam == "flip":
        return ref_flip(xi, bool(p.flip[g]))
    if fam == "scale":
        sx, sy = p.scale[g].tolist()
        return ref_affine(xi, [[sx, 0, 0], [0, sy, 0]])
    t = p.rotate[g]
    return ref_affine(xi, [[torch.cos(t).item(), torch.sin(-t).item(), 0], [torch.sin(t).item(), torch.cos(t).item(), 0]])


def ref_apply(dsa, x, p, group):
    outs = []
    for i in range(x.shape[0]):
        g = int(group[i])
        xi = x[i]
        if p.family is None:  # mode 'M': every family, strategy order
            for fam in dsa.families:
                xi = ref_family(fam, xi, p, g)
        else:
            xi = ref_family(DSA_FAMILIES[int(p.family[g])], xi, p, g)
        outs.append(xi)
    return torch.stack(outs)


# ------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("fam", DSA_FAMILIES)
@pytest.mark.parametrize("size", [(9, 8), (8, 11), (32, 32)])
def test_each_family_matches_reference(fam, size):
    dsa = DSA(fam)
    G, N = 5, 12
    x = torch.randn(N, 3, *size)
    group = torch.randint(0, G, (N,))
    for seed in range(3):
        p = dsa.sample(G, _gen(seed), "cpu", size)
        assert p.present == (fam,)
        out = dsa.apply(x, p, group)
        assert torch.allclose(out, ref_apply(dsa, x, p, group), atol=1e-5), (fam, size, seed)


def test_mixed_families_siamese_matches_reference():
    dsa = DSA()
    G, N = 16, 40
    x = torch.randn(N, 3, 10, 12)
    group = torch.randint(0, G, (N,))
    for seed in range(4):
        p = dsa.sample(G, _gen(seed), "cpu", (10, 12))
        assert len(set(p.family.tolist())) > 1
        out = dsa.apply(x, p, group)
        assert torch.allclose(out, ref_apply(dsa, x, p, group), atol=1e-5)


def test_mode_M_applies_all_in_order():
    dsa = DSA(DEFAULT_STRATEGY, ParamDiffAug(aug_mode="M"))
    x = torch.randn(6, 3, 9, 9)
    group = torch.tensor([0, 1, 2, 0, 1, 2])
    p = dsa.sample(3, _gen(0), "cpu", (9, 9))
    assert p.family is None and p.present == tuple(dsa.families)
    assert torch.allclose(dsa.apply(x, p, group), ref_apply(dsa, x, p, group), atol=1e-5)


def test_parameter_distributions():
    dsa = DSA()
    H, W = 32, 30
    G = 12000
    p = dsa.sample(G, _gen(0), "cpu", (H, W))
    fam_counts = torch.bincount(p.family, minlength=6).float() / G
    assert torch.allclose(fam_counts, torch.full((6,), 1 / 6), atol=0.02)
    assert set(p.crop[:, 0].tolist()) == set(range(-4, 5))            # int(32*0.125+0.5) = 4
    assert set(p.crop[:, 1].tolist()) == set(range(-4, 5))            # int(30*0.125+0.5) = 4
    assert set(p.cutout[:, 0].tolist()) == set(range(0, H + 1))       # cutout 16 (even): 0..H
    assert set(p.cutout[:, 1].tolist()) == set(range(0, W))           # cutout 15 (odd): 0..W-1
    assert abs(p.flip.float().mean().item() - 0.5) < 0.02
    assert p.scale.min() >= 1 / 1.2 and p.scale.max() < 1.2 and p.scale.shape == (G, 2)
    assert p.scale.min() < 1 / 1.2 + 0.01 and p.scale.max() > 1.19
    deg = p.rotate * 180 / math.pi
    assert deg.min() >= -15 and deg.max() < 15 and deg.min() < -14.9 and deg.max() > 14.9
    for v in (p.brightness, p.saturation, p.contrast):
        assert v.min() >= 0 and v.max() < 1 and abs(v.mean().item() - 0.5) < 0.02
    # duplicates in the strategy weight the family draw, as the official list draw does
    p2 = DSA("flip_flip_crop").sample(6000, _gen(1), "cpu", (8, 8))
    assert abs((p2.family == DSA_FAMILIES.index("flip")).float().mean().item() - 2 / 3) < 0.03


def test_determinism_and_global_rng_untouched():
    dsa = DSA()
    x = torch.randn(20, 3, 16, 16)
    group = torch.arange(20) % 5
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = dsa.apply(x, dsa.sample(5, _gen(7), "cpu", (16, 16)), group)
    b = dsa.apply(x, dsa.sample(5, _gen(7), "cpu", (16, 16)), group)
    c = dsa.apply(x, dsa.sample(5, _gen(8), "cpu", (16, 16)), group)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(dsa(x, _gen(3)), dsa(x, _gen(3)))
    assert not torch.equal(dsa(x, _gen(3)), dsa(x, _gen(4)))
    assert torch.equal(torch.get_rng_state(), state)
    # the generator advances: two consecutive calls differ
    g = _gen(11)
    assert not torch.equal(dsa(x, g), dsa(x, g))
    with pytest.raises(TypeError):
        dsa.sample(3, None, "cpu", (16, 16))


def test_siamese_property():
    """Real and synthetic rows of the same class get the identical transform; classes differ."""
    dsa = DSA()
    K, H = 8, 16
    imgs = torch.randn(K, 3, H, H)
    real = imgs.repeat_interleave(5, 0)                     # class-major, 5 per class
    real_lab = torch.arange(K).repeat_interleave(5)
    perm = torch.randperm(K * 2)
    syn = imgs.repeat(2, 1, 1, 1)[perm]                      # other batch size and order
    syn_lab = torch.arange(K).repeat(2)[perm]
    for seed in range(5):
        p = dsa.sample(K, _gen(seed), "cpu", (H, H))
        ar, as_ = dsa.apply(real, p, real_lab), dsa.apply(syn, p, syn_lab)
        for k in range(K):
            want = ar[real_lab == k][0]
            assert all(torch.equal(r, want) for r in ar[real_lab == k])
            assert all(torch.equal(s, want) for s in as_[syn_lab == k])
    # one image under every class label: the class transforms are independent (not all equal)
    same = imgs[:1].expand(K, -1, -1, -1)
    out = dsa.apply(same, dsa.sample(K, _gen(0), "cpu", (H, H)), torch.arange(K))
    distinct = {tuple(o.flatten()[:64].tolist()) for o in out}
    assert len(distinct) >= K // 2
    # single-family check: scale parameters differ between classes
    ps = DSA("scale").sample(K, _gen(0), "cpu", (H, H))
    o = DSA("scale").apply(same, ps, torch.arange(K))
    assert not any(torch.equal(o[0], o[k]) for k in range(1, K))


def test_non_siamese_call_one_family_per_batch():
    dsa = DSA()
    x = torch.randn(30, 3, 12, 12)
    seen = set()
    for seed in range(12):
        p = dsa.sample(30, _gen(seed), "cpu", (12, 12), shared_family=True)
        assert len(set(p.family.tolist())) == 1 and len(p.present) == 1
        seen |= set(p.present)
        out = dsa.apply(x, p)
        assert torch.allclose(out, ref_apply(dsa, x, p, torch.arange(30)), atol=1e-5)
        assert torch.equal(dsa(x, _gen(seed)), out)  # __call__ = sample(shared_family) + apply
    assert len(seen) >= 4
    # per-sample params: with 'scale' forced, every row differs
    s = DSA("scale")
    same = x[:1].expand(6, -1, -1, -1)
    o = s(same, _gen(0))
    assert not any(torch.equal(o[0], o[k]) for k in range(1, 6))
    # grouped __call__: equals sample(G) + apply
    grp = torch.arange(30) % 4
    assert torch.equal(dsa(x, _gen(2), grp), dsa.apply(x, dsa.sample(4, _gen(2), "cpu", (12, 12)), grp))


@pytest.mark.parametrize("fam", DSA_FAMILIES)
def test_gradcheck(fam):
    dsa = DSA(fam)
    x = torch.randn(3, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    group = torch.tensor([0, 1, 0])
    p = dsa.sample(2, _gen(1), "cpu", (5, 6))
    assert torch.autograd.gradcheck(lambda t: dsa.apply(t, p, group), (x,), eps=1e-6, atol=1e-5)


def test_gradcheck_mixed():
    dsa = DSA()
    x = torch.randn(6, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    group = torch.arange(6)
    p = dsa.sample(6, _gen(0), "cpu", (5, 5))
    assert len(p.present) > 2
    assert torch.autograd.gradcheck(lambda t: dsa.apply(t, p, group), (x,), eps=1e-6, atol=1e-5)


def test_shape_dtype_memory_format_no_grad():
    dsa = DSA()
    x = torch.randn(10, 3, 16, 16)
    group = torch.arange(10) % 3
    p = dsa.sample(3, _gen(0), "cpu", (16, 16))
    with torch.no_grad():
        y = dsa.apply(x, p, group)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device and not y.requires_grad
    assert torch.equal(y, dsa.apply(x, p, group))
    xd = x.double()
    yd = dsa.apply(xd, p, group)
    assert yd.dtype == torch.float64 and torch.allclose(yd.float(), y, atol=1e-5)
    xc = x.contiguous(memory_format=torch.channels_last)
    yc = dsa.apply(xc, p, group)
    assert yc.is_contiguous(memory_format=torch.channels_last) and torch.allclose(yc, y, atol=1e-6)
    xr = x.clone().requires_grad_(True)
    dsa.apply(xr, p, group).square().sum().backward()
    assert xr.grad is not None and torch.isfinite(xr.grad).all()


def test_identity_and_errors():
    x = torch.randn(4, 3, 8, 8)
    for s in ("none", "None", ""):
        d = DSA(s)
        assert d(x, _gen(0)) is x and not d.enabled
    with pytest.raises(ValueError):
        DSA("color_noise")
    with pytest.raises(ValueError):
        DSA(params=ParamDiffAug(aug_mode="X"))
    d = DSA("crop")
    p = d.sample(2, _gen(0), "cpu", (8, 8))
    with pytest.raises(ValueError):
        d.apply(torch.randn(4, 3, 9, 9), p, torch.zeros(4, dtype=torch.long))  # sampled for 8x8
    with pytest.raises(ValueError):
        d.apply(x, p)  # group=None needs num_groups == N
    with pytest.raises(ValueError):
        d.sample(2, _gen(0), "cpu")  # crop needs the image size
    # scale/rotate/flip/color need no image size
    DSA("scale_rotate_flip_color").sample(2, _gen(0), "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    dsa = DSA()
    x = torch.randn(40, 3, 16, 16)
    group = torch.arange(40) % 8
    p = dsa.sample(8, _gen(0), "cpu", (16, 16))
    pc = dsa.sample(8, _gen(0), "cuda", (16, 16))  # CPU generator, params moved to the GPU
    assert pc.family.is_cuda
    yc = dsa.apply(x.cuda(), pc, group.cuda())
    assert yc.is_cuda and torch.allclose(yc.cpu(), dsa.apply(x, p, group), atol=1e-5)
    assert torch.allclose(dsa.apply(x.cuda(), p, group).cpu(), yc.cpu())  # CPU params moved on use
    g = torch.Generator(device="cuda").manual_seed(0)
    assert dsa(x.cuda(), g).is_cuda
