"""Streaming real targets, FeatureExtractor and NVTX profiling."""
import pytest
import torch
from torch import nn

import datadam_fast as dd
from datadam_fast import profiling


def _data(K=4, Br=6, shapes=((3, 6, 6), (5, 3, 3)), D=7):
    feats = [torch.rand(K * Br, *s) for s in shapes]
    emb = torch.randn(K * Br, D)
    labels = torch.arange(K).repeat_interleave(Br)
    return feats, emb, labels


@pytest.mark.parametrize("chunk", [1, 5, 24])
def test_streaming_equals_one_shot(chunk):
    feats, emb, labels = _data()
    one = dd.class_attention_means(feats, num_classes=4, power=4.0, backend="reference")
    perm = torch.randperm(labels.shape[0])  # chunks mix classes in arbitrary order
    acc = dd.ClassMeanAccumulator(4, power=4.0, backend="reference")
    for i in range(0, len(perm), chunk):
        idx = perm[i:i + chunk]
        acc.update([f[idx] for f in feats], emb[idx], labels=labels[idx])
    t = acc.targets()
    for a, b in zip(one, t.attention):
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(t.embedding, dd.class_embedding_means(emb, num_classes=4), atol=1e-6)
    assert t.counts.tolist() == [6.0] * 4


def test_loss_with_targets_equals_loss_with_real():
    feats, emb, labels = _data()
    syn = [torch.rand(8, *f.shape[1:], requires_grad=True) for f in feats]
    se = torch.randn(8, 7, requires_grad=True)
    acc = dd.ClassMeanAccumulator(4, power=4.0, backend="reference")
    acc.update(feats, emb, labels=labels)
    a = dd.attention_matching_loss(acc.targets(), syn, None, se, num_classes=4, backend="reference")
    b = dd.attention_matching_loss(feats, syn, emb, se, num_classes=4, backend="reference")
    assert torch.allclose(a, b, rtol=1e-5)
    ga = torch.autograd.grad(a, syn + [se])
    gb = torch.autograd.grad(b, syn + [se])
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-7)


def test_targets_errors():
    feats, emb, labels = _data()
    acc = dd.ClassMeanAccumulator(4, power=4.0, backend="reference")
    with pytest.raises(dd.UserError, match="no chunk"):
        acc.targets()
    acc.update([f[:6] for f in feats], emb[:6], labels=labels[:6])
    with pytest.raises(ValueError, match=r"classes \[1, 2, 3\] received no samples"):
        acc.targets()
    with pytest.raises(ValueError, match="labels must lie in"):
        acc.update([f[:2] for f in feats], emb[:2], labels=torch.tensor([0, 9]))
    with pytest.raises(ValueError, match="differ from the first chunk"):
        acc.update([feats[0][:2]], emb[:2], labels=labels[:2])
    acc.update([f[6:] for f in feats], emb[6:], labels=labels[6:])
    t = acc.targets()
    syn = [torch.rand(4, *f.shape[1:]) for f in feats]
    with pytest.raises(ValueError, match="power=4.0 but the loss uses power=1.0"):
        dd.attention_matching_loss(t, syn, None, torch.rand(4, 7), num_classes=4, power=1.0)
    with pytest.raises(ValueError, match="real_emb must be None"):
        dd.attention_matching_loss(t, syn, emb, torch.rand(4, 7), num_classes=4)
    with pytest.raises(ValueError, match=r"target attention means \(4, 36\), expected \[4, 9\]"):
        dd.attention_matching_loss(t, syn[::-1], None, torch.rand(4, 7), num_classes=4)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                                  nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2))
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        e = self.body(x).flatten(1)
        return e, self.head(e)


def test_feature_extractor_no_clone_and_grad():
    net = _Net()
    fx = dd.FeatureExtractor(net, ["body.1", "body.4"])
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    feats, emb = fx(x)
    assert [tuple(f.shape) for f in feats] == [(2, 4, 8, 8), (2, 4, 4, 4)]
    assert emb.shape == (2, 16)
    # the captured tensor is the module's own output (no copy)
    captured = {}
    h = net.body[1].register_forward_hook(lambda m, i, o: captured.setdefault("o", o))
    feats, _ = fx(x)
    h.remove()
    assert feats[0].data_ptr() == captured["o"].data_ptr()
    feats[0].sum().backward()
    assert x.grad is not None
    fx2 = dd.FeatureExtractor(net, ["body.1"], embedding="body.5")
    _, e2 = fx2(x)
    assert torch.allclose(e2, emb)
    with pytest.raises(ValueError, match="no module named"):
        dd.FeatureExtractor(net, ["body.9"])
    fx3 = dd.FeatureExtractor(net, ["body.1"], embedding=lambda out: out[1])  # callable embedding
    _, e3 = fx3(x)
    assert torch.equal(e3, net(x)[1])
    fx3.remove()
    fx.remove()
    fx2.remove()
    assert not net.body[1]._forward_hooks


def test_profiling_off_is_null_and_on_does_not_raise_on_cpu(monkeypatch):
    profiling.disable()
    assert profiling.nvtx_range("x") is profiling.nvtx_range("y")  # shared null context, no work
    profiling.enable()
    try:
        with profiling.nvtx_range("datadam_fast.test"):
            pass
        real = [torch.rand(4, 2, 3, 3)]
        syn = [torch.rand(2, 2, 3, 3, requires_grad=True)]
        dd.attention_matching_loss(real, syn, num_classes=2, backend="reference").backward()
        assert profiling.backend_name() in ("nvtx", "torch", "none")
    finally:
        profiling.disable()


def test_profiling_records_ranges_when_enabled(monkeypatch):
    calls = []

    class FakeDomain:
        def get_event_attributes(self, message=None):
            return message

        def push_range(self, attr):
            calls.append(("push", attr))

        def pop_range(self):
            calls.append(("pop",))

    monkeypatch.setattr(profiling, "_impl", ("nvtx", FakeDomain()))
    real = [torch.rand(4, 2, 3, 3)]
    syn = [torch.rand(2, 2, 3, 3, requires_grad=True)]
    profiling.disable()
    dd.attention_matching_loss(real, syn, num_classes=2, backend="reference").backward()
    assert calls == []
    profiling.enable()
    try:
        dd.attention_matching_loss(real, syn, num_classes=2, backend="reference").backward()
    finally:
        profiling.disable()
    names = [c[1] for c in calls if c[0] == "push"]
    assert "datadam_fast.reference.forward" in names and "datadam_fast.reference.backward" in names
    assert sum(c[0] == "push" for c in calls) == sum(c[0] == "pop" for c in calls)


def test_feature_extractor_wrong_name_suggests_close_matches_and_lists_all():
    net = _Net()
    with pytest.raises(dd.UserError) as ei:
        dd.FeatureExtractor(net, ["haed", "bdy.4"])
    msg = str(ei.value)
    assert "'haed' (did you mean 'head'" in msg and "'bdy.4' (did you mean 'body.4'" in msg
    assert "its modules are: body, body.0, body.1, body.2, body.3, body.4, body.5, head" in msg
    with pytest.raises(TypeError, match="did you mean"):
        dd.FeatureExtractor(net, "body.1")
    with pytest.raises(TypeError, match="embedding must be None, a module name or a callable"):
        dd.FeatureExtractor(net, ["body.1"], embedding=3)


def test_feature_extractor_module_that_never_ran_or_ran_twice():
    net = _Net()
    fx = dd.FeatureExtractor(net, ["body.1", "head"])        # head runs, but not in every model
    fx(torch.randn(2, 3, 8, 8))

    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.ReLU(), nn.ReLU()

        def forward(self, x):
            return self.used(x)

    m = Skips()
    with pytest.raises(dd.UserError, match=r"hooked module\(s\) \['unused'\] did not run"):
        dd.FeatureExtractor(m, ["unused"])(torch.randn(2, 1, 2, 2))

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.act(x) - 1)

    t = Twice()
    x = torch.randn(2, 1, 3, 3)
    with pytest.warns(RuntimeWarning, match=r"ran more than once in one forward \{'act': 2\}"):
        feats, _ = dd.FeatureExtractor(t, ["act"])(x)
    assert torch.equal(feats[0], t(x))                       # the last output is the one used


class _BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x))).mean((2, 3))


def test_streaming_with_train_mode_batchnorm_is_refused():
    net = _BNNet()
    fx = dd.FeatureExtractor(net, ["act"])
    x, y = torch.randn(4, 3, 6, 6), torch.tensor([0, 1, 0, 1])
    acc = dd.ClassMeanAccumulator(2, backend="reference")
    with torch.no_grad():
        feats, emb = fx(x)
    with pytest.raises(dd.UserError, match=r"BatchNorm in training mode \(bn\)"):
        acc.update(feats, emb, labels=y, model=net)
    with pytest.raises(dd.UserError, match="BatchNorm in training mode"):
        acc.update(feats, emb, labels=y, model=fx)            # a FeatureExtractor works too
    assert dd.check_streaming_safe(net, error=False) == ["bn"]
    assert fx.check_streaming_safe(error=False) == ["bn"]
    net.eval()                                                # running statistics: exact
    assert dd.check_streaming_safe(net) == []
    acc.update(feats, emb, labels=y, model=net)
    assert acc.targets().counts.tolist() == [2.0, 2.0]
    assert dd.check_streaming_safe(_Net()) == []


def test_class_means_with_labels_any_order_and_counts():
    K = 3
    feats, emb, _ = _data(K=K, Br=4)
    labels = torch.tensor([2, 0, 1, 1, 0, 2, 2, 2, 1, 0, 0, 2])  # counts 4, 3, 5
    for f in feats:
        assert f.shape[0] == 12
    got = dd.class_attention_means(feats, num_classes=K, labels=labels, backend="reference")
    from datadam_fast.loss import reference as R
    for g, f in zip(got, feats):
        maps = R.spatial_attention(f, 4.0)
        want = torch.stack([maps[labels == k].mean(0) for k in range(K)])
        torch.testing.assert_close(g, want, rtol=1e-6, atol=1e-7)
    e = dd.class_embedding_means(emb, num_classes=K, labels=labels)
    torch.testing.assert_close(e, torch.stack([emb[labels == k].mean(0) for k in range(K)]))
    with pytest.raises(dd.UserError, match="cannot be split evenly|not divisible"):
        dd.class_embedding_means(emb[:11], num_classes=K)
    with pytest.raises(dd.UserError, match=r"classes \[1\] have no rows"):
        dd.class_embedding_means(emb[:2], num_classes=K, labels=torch.tensor([0, 2]))
