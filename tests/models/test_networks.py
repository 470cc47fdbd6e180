"""Networks: shapes, official state-dict layout, feature taps, generator init, channels_last."""
import math

import pytest
import torch
from torch import nn

from datadam_fast.models.networks import (NETWORK_NAMES, ConvNet, default_depth, get_network,
                                   init_from_generator, load_official_state_dict)

def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_registry_names():
    for n in ("ConvNet", "ConvNetBN", "ConvNetIN", "ConvNetD4", "ConvNetD5", "ConvNetD6",
              "ConvNetBNImageNet", "AlexNet", "AlexNetBN", "VGG11", "VGG11BN", "ResNet18", "ResNet18BN"):
        assert n in NETWORK_NAMES
    with pytest.raises(ValueError):
        get_network("NoSuchNet", 3, 10)
    with pytest.raises(ValueError):
        get_network("ResNet18", 3, 10, depth=4)  # depth only applies to ConvNets
    with pytest.raises(ValueError):
        get_network("ConvNetD6", 3, 10, (32, 32))  # 32 / 2**6 < 1
    with pytest.raises(ValueError):
        get_network("ConvNet", 3, 10, norm="weird")


def test_default_norms_and_depths():
    def norms(net):
        return {type(m) for m in net.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm))}
    assert norms(get_network("ConvNet", 3, 10)) == {nn.GroupNorm}
    assert norms(get_network("ConvNetBN", 3, 10)) == {nn.BatchNorm2d}
    net = get_network("ConvNetBNImageNet", 3, 10, (64, 64))
    assert net.depth == 4 and net.norm == "batchnorm" and net.embedding_dim == 2048
    assert get_network("ConvNetD6", 3, 10, (128, 128)).depth == 6
    gn = [m for m in get_network("ConvNetIN", 3, 10).modules() if isinstance(m, nn.GroupNorm)]
    assert all(m.num_groups == m.num_channels == 128 and m.affine for m in gn)
    gn4 = [m for m in get_network("ConvNet", 3, 10, norm="groupnorm").modules() if isinstance(m, nn.GroupNorm)]
    assert all(m.num_groups == 4 for m in gn4)
    ln = [m for m in get_network("ConvNet", 3, 10, norm="layernorm").modules() if isinstance(m, nn.LayerNorm)]
    assert [tuple(m.normalized_shape) for m in ln] == [(128, 32, 32), (128, 16, 16), (128, 8, 8)]
    assert norms(get_network("VGG11", 3, 10)) == {nn.GroupNorm}
    assert norms(get_network("ResNet18BN", 3, 10)) == {nn.BatchNorm2d}
    assert norms(get_network("AlexNet", 3, 10)) == set()
    assert [default_depth(s) for s in (28, 32, (64, 64), 128, 256)] == [3, 3, 4, 6, 7]


@pytest.mark.parametrize("act,cls", [("relu", nn.ReLU), ("leakyrelu", nn.LeakyReLU),
                                     ("sigmoid", nn.Sigmoid), ("swish", nn.SiLU)])
@pytest.mark.parametrize("pooling", ["avgpool", "maxpool", "none"])
def test_convnet_variants(act, cls, pooling):
    net = get_network("ConvNet", 3, 5, (16, 16), width=8, depth=2, act=act, pooling=pooling)
    acts = [m for m in net.features if isinstance(m, cls)]
    assert len(acts) == 2 and not getattr(acts[0], "inplace", False)
    x = torch.randn(3, 3, 16, 16)
    feats, emb = net.features_and_embedding(x)
    s = 16 if pooling == "none" else 4
    assert [tuple(f.shape) for f in feats] == [(3, 8, 16, 16)]
    assert emb.shape == (3, 8 * s * s) == (3, net.embedding_dim)
    assert net(x).shape == (3, 5)


def test_shapes_official_sizes():
    x = torch.randn(1, 3, 32, 32)
    net = get_network("ConvNet", 3, 10)
    feats, emb = net.features_and_embedding(x)
    assert [tuple(f.shape) for f in feats] == [(1, 128, 32, 32), (1, 128, 16, 16)]
    assert emb.shape == (1, 2048) and net(x).shape == (1, 10)
    # MNIST quirk: channel 1 -> padding 3 on the first conv, 28x28 behaves as 32x32
    mn = get_network("ConvNetBN", 1, 10, (28, 28))
    assert mn.features[0].padding == (3, 3) and mn.features[4].padding == (1, 1)
    f, e = mn.features_and_embedding(torch.randn(2, 1, 28, 28))
    assert [tuple(t.shape[1:]) for t in f] == [(128, 32, 32), (128, 16, 16)] and e.shape == (2, 2048)
    assert mn.classifier.in_features == 2048
    # 8x8 digits: shapes computed, not assumed (pad 3 -> 12x12 -> 6x6 -> 3x3 -> 1x1)
    dg = get_network("ConvNet", 1, 10, (8, 8))
    f, e = dg.features_and_embedding(torch.randn(2, 1, 8, 8))
    assert [tuple(t.shape[1:]) for t in f] == [(128, 12, 12), (128, 6, 6)] and e.shape == (2, 128)  # 3x3 -> pool -> 1x1
    # TinyImageNet
    t = get_network("ConvNetD4", 3, 200, (64, 64))
    f, e = t.features_and_embedding(torch.randn(1, 3, 64, 64))
    assert len(f) == 3 and e.shape == (1, 2048)
    # cross-architecture nets at 32x32: official embedding sizes
    for name, d in (("AlexNet", 192 * 4 * 4), ("AlexNetBN", 192 * 4 * 4), ("VGG11", 512),
                    ("VGG11BN", 512), ("ResNet18", 512), ("ResNet18BN", 512)):
        n = get_network(name, 3, 10).eval()
        f, e = n.features_and_embedding(x)
        assert e.shape == (1, d) == (1, n.embedding_dim), name
        assert [tuple(t.shape[1:]) for t in f] == [tuple(s) for s in n.feature_shapes], name
        assert torch.allclose(n(x), n.head(e), atol=1e-6), name
    assert [s[1] for s in get_network("VGG11", 3, 10).feature_shapes] == [32, 16, 8, 4]
    assert get_network("ResNet18", 3, 10).feature_shapes == [(64, 32, 32), (128, 16, 16), (256, 8, 8)]


def _official_convnet_bn_sd(K=10, width=128, depth=3, channel=3, dim=2048):
    sd = {}
    c = channel
    for d in range(depth):
        conv, bn = 4 * d, 4 * d + 1
        sd[f"features.{conv}.weight"] = torch.randn(width, c, 3, 3)
        sd[f"features.{conv}.bias"] = torch.randn(width)
        sd[f"features.{bn}.weight"] = torch.rand(width)
        sd[f"features.{bn}.bias"] = torch.randn(width)
        sd[f"features.{bn}.running_mean"] = torch.randn(width)
        sd[f"features.{bn}.running_var"] = torch.rand(width) + 0.5
        sd[f"features.{bn}.num_batches_tracked"] = torch.tensor(7)
        c = width
    sd["classifier.weight"] = torch.randn(K, dim)
    sd["classifier.bias"] = torch.randn(K)
    return sd


def test_official_state_dict_keys_and_loading():
    net = get_network("ConvNetBN", 3, 10, (32, 32))
    sd = _official_convnet_bn_sd()
    assert set(net.state_dict()) == set(sd)
    net.load_state_dict(sd, strict=True)
    assert torch.equal(net.features[8].weight, sd["features.8.weight"])
    # DataParallel prefix and the released file layout {"net_parameters": sd}
    net2 = get_network("ConvNetBN", 3, 10)
    load_official_state_dict(net2, {"net_parameters": {"module." + k: v for k, v in sd.items()}})
    x = torch.randn(2, 3, 32, 32)
    net.eval(), net2.eval()
    assert torch.equal(net(x), net2(x))
    # CIFAR100 head
    get_network("ConvNetBN", 3, 100).load_state_dict(_official_convnet_bn_sd(K=100), strict=True)
    # norm='none' omits the norm module exactly as the official code: conv, act, pool per block
    nn_keys = set(get_network("ConvNetNN", 3, 10).state_dict())
    assert nn_keys == {f"features.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")} | {
        "classifier.weight", "classifier.bias"}
    # IN ConvNet: GroupNorm weight/bias at 1, 5, 9
    assert {k for k in get_network("ConvNetIN", 3, 10).state_dict() if k.startswith("features.5")} == {
        "features.5.weight", "features.5.bias"}
    # depth-6 BN ConvNet at 128x128 (released ImageWoof model): 512-d embedding
    assert get_network("ConvNet128IN", 3, 10, (128, 128)).classifier.in_features == 512
    # official AlexNet / VGG / ResNet key layouts
    ak = get_network("AlexNet", 3, 10).state_dict()
    assert {k.rsplit(".", 1)[0] for k in ak} == {"features.0", "features.3", "features.6", "features.8",
                                                 "features.10", "fc"}
    assert ak["fc.weight"].shape == (10, 3072)
    vk = get_network("VGG11", 3, 10).state_dict()
    assert "features.0.weight" in vk and "features.1.weight" in vk and "features.4.weight" in vk
    assert vk["classifier.weight"].shape == (10, 512)
    rk = get_network("ResNet18BN", 3, 10).state_dict()
    for k in ("conv1.weight", "bn1.running_mean", "layer2.0.shortcut.0.weight", "layer2.0.shortcut.1.weight",
              "layer4.1.bn2.num_batches_tracked", "classifier.weight"):
        assert k in rk
    assert "layer1.0.shortcut.0.weight" not in rk


@pytest.mark.parametrize("name", ["ConvNet", "ConvNetBN", "AlexNetBN", "VGG11"])
def test_features_match_hooks_and_are_not_overwritten(name):
    """The taps are the very tensors DataDAM hooks capture (act outputs before pooling)."""
    net = get_network(name, 3, 10, generator=_gen(1))
    captured = {}
    handles = [dict(net.named_modules())[n].register_forward_hook(
        lambda m, i, o, n=n: captured.__setitem__(n, o.clone())) for n in net.feature_layers]
    x = torch.randn(4, 3, 32, 32)
    feats, emb = net.features_and_embedding(x)
    for h in handles:
        h.remove()
    assert len(feats) == len(net.feature_layers)
    for f, n in zip(feats, net.feature_layers):
        assert torch.equal(f, captured[n])  # still equal after the rest of the forward ran
    if name.startswith("ConvNet"):
        assert all(isinstance(dict(net.named_modules())[n], nn.ReLU) for n in net.feature_layers)
        assert net.feature_layers == ["features.2", "features.6"]
    assert torch.equal(emb, net.embed(x))
    assert torch.allclose(net(x), net.head(emb), atol=1e-6)
    e2, logits = net.embed_and_logits(x)
    assert torch.equal(e2, emb) and torch.allclose(logits, net(x), atol=1e-6)


def test_gradient_reaches_input():
    for name in ("ConvNet", "ResNet18"):
        net = get_network(name, 3, 10, (16, 16), generator=_gen(0))
        x = torch.randn(2, 3, 16, 16, requires_grad=True)
        feats, emb = net.features_and_embedding(x)
        (sum(f.sum() for f in feats) + emb.square().sum()).backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["ConvNet", "ConvNetBN", "ConvNetBNImageNet", "AlexNetBN", "VGG11",
                                  "ResNet18BN"])
def test_generator_init_deterministic_and_equals_default(name):
    im = (64, 64) if name == "ConvNetBNImageNet" else (32, 32)
    a = get_network(name, 3, 10, im, generator=_gen(123)).state_dict()
    b = get_network(name, 3, 10, im, generator=_gen(123)).state_dict()
    c = get_network(name, 3, 10, im, generator=_gen(124)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    w = [k for k in a if k.endswith("weight") and a[k].dim() >= 2]
    assert all(not torch.equal(a[k], c[k]) for k in w)
    # identical to PyTorch's default init after manual_seed(seed) (same scheme, same order)
    torch.manual_seed(123)
    d = get_network(name, 3, 10, im).state_dict()
    assert all(torch.equal(a[k], d[k]) for k in a)


def test_generator_init_leaves_global_rng_and_bounds():
    torch.manual_seed(5)
    state = torch.get_rng_state()
    net = get_network("ConvNet", 3, 10, generator=_gen(9))
    assert torch.equal(torch.get_rng_state(), state)
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            bound = 1 / math.sqrt(fan_in)
            w = m.weight.detach()
            assert w.abs().max() <= bound and w.abs().max() > 0.97 * bound
            assert abs(w.mean().item()) < 0.05 * bound
            assert abs(w.std().item() - bound / math.sqrt(3)) < 0.05 * bound
            assert m.bias.abs().max() <= bound
    # init_from_generator on an existing net is reproducible
    n1 = init_from_generator(get_network("ConvNetBN", 3, 10), _gen(3))
    n2 = init_from_generator(get_network("ConvNetBN", 3, 10), _gen(3))
    assert all(torch.equal(p, q) for p, q in zip(n1.parameters(), n2.parameters()))


@pytest.mark.parametrize("name,size", [("ConvNet", 32), ("ConvNetBN", 32), ("ConvNetLN", 16),
                                       ("AlexNet", 16), ("VGG11BN", 32), ("ResNet18", 16)])
def test_channels_last(name, size):
    net = get_network(name, 3, 10, (size, size), generator=_gen(2)).eval()
    x = torch.randn(2 if size < 32 else 1, 3, size, size)
    f0, e0 = net.features_and_embedding(x)
    y0 = net(x)
    net = net.to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)
    f1, e1 = net.features_and_embedding(xc)
    assert torch.allclose(e0, e1, atol=1e-4, rtol=1e-4)
    assert torch.allclose(y0, net(xc), atol=1e-4, rtol=1e-4)
    for a, b in zip(f0, f1):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_batchnorm_train_and_eval():
    net = get_network("ConvNetBN", 3, 10, generator=_gen(0))
    x = torch.randn(6, 3, 32, 32)
    net.train()
    _, e = net.features_and_embedding(x)
    assert net.features[1].num_batches_tracked.item() == 1
    net.eval()
    assert net(x).shape == (6, 10)


def test_convnet_class_direct():
    net = ConvNet(3, 4, width=16, depth=2, norm="batchnorm", pooling="maxpooling", im_size=(12, 10))
    f, e = net.features_and_embedding(torch.randn(2, 3, 12, 10))
    assert [tuple(t.shape) for t in f] == [(2, 16, 12, 10)] and e.shape == (2, 16 * 3 * 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_and_cuda_generator():
    net = get_network("ConvNetBN", 3, 10, generator=_gen(0))
    x = torch.randn(4, 3, 32, 32)
    y = net.eval()(x)
    netc = net.cuda().to(memory_format=torch.channels_last)
    yc = netc(x.cuda().contiguous(memory_format=torch.channels_last))
    assert torch.allclose(yc.cpu(), y, atol=1e-3, rtol=1e-3)
    a = get_network("ConvNet", 3, 10, generator=torch.Generator(device="cuda").manual_seed(1))
    b = get_network("ConvNet", 3, 10, generator=torch.Generator(device="cuda").manual_seed(1))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# ------------------------------------------------------------------ ResNet18BN_AP, taps, helpers
def test_resnet18bn_ap_layout_and_shapes():
    from datadam_fast.models.networks import ResNetAP
    net = get_network("ResNet18BN_AP", 3, 10, generator=_gen(0))
    assert isinstance(net, ResNetAP) and net.norm == "batchnorm"
    # downsampling is by average pooling only: every convolution has stride 1
    assert all(m.stride == (1, 1) for m in net.modules() if isinstance(m, nn.Conv2d))
    sd = net.state_dict()
    for k in ("layer2.0.shortcut.0.weight", "layer2.0.shortcut.2.running_mean", "layer4.1.bn2.num_batches_tracked"):
        assert k in sd, k
    assert "layer2.0.shortcut.1.weight" not in sd and "layer1.0.shortcut.0.weight" not in sd
    assert isinstance(net.layer2[0].shortcut[1], nn.AvgPool2d)
    # the final avg_pool2d(kernel_size=1) keeps 4x4 (32 px) / 3x3 (28 px): official 512*4*4 / 512*3*3
    for c, s, dim in ((3, 32, 512 * 4 * 4), (1, 28, 512 * 3 * 3)):
        n = get_network("ResNet18BN_AP", c, 10, (s, s), generator=_gen(1)).eval()
        x = torch.randn(2, c, s, s)
        f, e = n.features_and_embedding(x)
        assert e.shape == (2, dim) == (2, n.classifier.in_features)
        assert [tuple(t.shape[1:]) for t in f] == [(64, s, s), (128, s // 2, s // 2), (256, s // 4, s // 4)]
        assert torch.allclose(n(x), n.head(e), atol=1e-5)
    # a stride-2 block: conv (stride 1) -> norm -> relu -> avgpool -> conv -> norm, + pooled shortcut
    blk = get_network("ResNet18BN_AP", 3, 10, generator=_gen(2)).layer2[0].eval()
    x = torch.randn(2, 64, 8, 8)
    import torch.nn.functional as F
    out = F.avg_pool2d(F.relu(blk.bn1(blk.conv1(x))), 2, 2)
    ref = F.relu(blk.bn2(blk.conv2(out)) + blk.shortcut[2](F.avg_pool2d(blk.shortcut[0](x), 2, 2)))
    assert torch.allclose(blk(x), ref, atol=1e-6)
    assert {type(m) for m in get_network("ResNet18_AP", 3, 10).modules()} >= {nn.GroupNorm}


@pytest.mark.parametrize("name,n_relu", [("AlexNet", 5), ("AlexNetBN", 5), ("VGG11", 8), ("VGG11BN", 8),
                                         ("ConvNet", 3)])
def test_official_taps_are_every_relu_in_features_but_the_last(name, n_relu):
    """What the official code hooks: every nn.ReLU inside net.features, minus the last."""
    net = get_network(name, 3, 10, taps="official", generator=_gen(4))
    relus = [f"features.{i}" for i, m in enumerate(net.features) if isinstance(m, nn.ReLU)]
    assert len(relus) == n_relu and net.feature_layers == relus[:-1]
    captured = {}
    hs = [dict(net.named_modules())[n].register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o.clone()))
          for n in relus]
    x = torch.randn(2, 3, 32, 32)
    feats, emb = net.features_and_embedding(x)
    for h in hs:
        h.remove()
    assert len(feats) == n_relu - 1
    for f, n, shape in zip(feats, net.feature_layers, net.feature_shapes):
        assert torch.equal(f, captured[n]) and tuple(f.shape[1:]) == tuple(shape)
    blocks = get_network(name, 3, 10, taps="blocks")
    if name == "ConvNet":
        assert blocks.feature_layers == net.feature_layers
    else:
        assert len(blocks.feature_layers) < len(net.feature_layers)
        assert set(blocks.feature_layers) <= set(net.feature_layers)
    # same weights either way: the tap set changes only what is returned
    assert blocks.state_dict().keys() == net.state_dict().keys()
    with pytest.raises(ValueError, match="taps"):
        get_network(name, 3, 10, taps="all")


def test_describe_and_infer_network():
    from datadam_fast.models.networks import describe_network, infer_network_from_state_dict
    d = describe_network(get_network("ConvNetBN", 1, 10, (28, 28), width=32), "ConvNetBN")
    assert (d["model"], d["family"], d["norm"], d["width"], d["depth"]) == ("ConvNetBN", "ConvNet", "batchnorm", 32, 3)
    assert describe_network(get_network("ResNet18", 3, 10))["depth"] == 18
    assert describe_network(get_network("VGG11", 3, 10))["depth"] == 8
    for name, kw, norm in (("ConvNetBN", {}, "batchnorm"), ("ConvNet", {"width": 16, "depth": 2}, "instancenorm"),
                           ("ConvNetLN", {}, "layernorm"), ("ConvNetNN", {"depth": 4}, "none")):
        sd = get_network(name, 3, 10, (32, 32), **kw).state_dict()
        got = infer_network_from_state_dict({"module." + k: v for k, v in sd.items()})
        assert got["norm"] == norm and got["width"] == kw.get("width", 128) and got["depth"] == kw.get("depth", 3)
        net = get_network(got["model"], 3, 10, (32, 32), norm=got["norm"], width=got["width"], depth=got["depth"])
        load_official_state_dict(net, sd)  # the inferred network takes the weights
    with pytest.raises(ValueError, match="ConvNet"):
        infer_network_from_state_dict(get_network("ResNet18BN", 3, 10).state_dict())


@pytest.mark.parametrize("name", ["ResNet18", "ResNet18BN_AP"])
def test_resnet_pooled_embedding_has_a_name(name):
    """FeatureExtractor(resnet, [...], embedding="avgpool") gives the network's own embedding, and the
    named pooling module adds no state-dict keys (official weights still load)."""
    import datadam_fast as dd
    net = get_network(name, 3, 10, (32, 32)).eval()
    fx = dd.FeatureExtractor(net, ["layer1", "layer2", "layer3"], embedding="avgpool")
    x = torch.randn(2, 3, 32, 32)
    feats, emb = fx(x)
    want_feats, want_emb = net.features_and_embedding(x)
    torch.testing.assert_close(emb, want_emb)
    assert [f.shape for f in feats] == [f.shape for f in want_feats]
    assert not any(k.startswith("avgpool") for k in net.state_dict())
