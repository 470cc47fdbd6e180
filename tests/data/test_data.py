"""datadam_fast.data: readers on the real MNIST/Fashion-MNIST files and on small files written in
the real formats (CIFAR pickles, Tiny ImageNet tree, ImageNet64 npz, ImageFolder, packed)."""
import gzip
import json
import os
import pickle
import shutil
import tarfile

import numpy as np
import pytest
import torch

from conftest import shared_datasets
from datadam_fast.data import (DATASET_NAMES, DatasetError, channel_stats,
                               default_data_root, load_dataset, pack_image_folder)
from datadam_fast.data import _cifar, _digits, _download, _mnist, _packed

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def _real_root():
    root = shared_datasets()
    if not (root / "mnist" / "raw").is_dir() or not (root / "fashion_mnist" / "raw").is_dir():
        pytest.skip(f"real MNIST/Fashion-MNIST files not found under {root}")
    return root


@pytest.fixture(scope="module")
def mnist_train():
    return load_dataset("mnist", root=_real_root())


@pytest.fixture(scope="module")
def fashion_train():
    return load_dataset("fashion_mnist", root=_real_root())


# ----------------------------------------------------------------------------- registry
def test_names_options_and_root(monkeypatch, tmp_path):
    assert DATASET_NAMES == ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100",
                             "tinyimagenet", "imagenet64", "folder")
    assert issubclass(DatasetError, ValueError)
    with pytest.raises(DatasetError, match="unknown dataset 'svhn'.*digits, mnist"):
        load_dataset("svhn")
    with pytest.raises(DatasetError, match="unknown option.*colour"):
        load_dataset("digits", colour=1)
    with pytest.raises(DatasetError, match="unknown split"):
        load_dataset("digits", split="dev")
    with pytest.raises(DatasetError, match="needs path"):
        load_dataset("folder")
    assert load_dataset("Digits", split="val").split == "test"
    monkeypatch.setenv("DATADAM_FAST_DATA", str(tmp_path))
    assert default_data_root() == tmp_path
    monkeypatch.delenv("DATADAM_FAST_DATA")
    assert default_data_root() == __import__("pathlib").Path.home() / ".cache/datadam_fast/data"
    # every user-facing message is a single line naming the expected place
    with pytest.raises(DatasetError) as e:
        load_dataset("fashion-mnist", root=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "fashion_mnist" / "raw") in msg
    assert "train-images-idx3-ubyte.gz" in msg and "--download" in msg


# ----------------------------------------------------------------------------- digits
def test_digits_split_is_fixed_stratified_and_stats_match():
    tr, te = load_dataset("digits"), load_dataset("digits", split="test")
    tr2 = load_dataset("digits")
    assert torch.equal(tr.images, tr2.images) and torch.equal(tr.labels, tr2.labels)
    assert tr.images.dtype == torch.uint8 and tr.images.shape == (1438, 1, 8, 8)
    assert len(te) == 359 and tr.image_size == (8, 8) and tr.channels == 1
    assert tr.num_classes == 10 and tr.class_names == [str(i) for i in range(10)]
    _, labels = _digits.raw_digits()
    total = np.bincount(labels, minlength=10)
    assert tr.counts() == [int(round(0.8 * n)) for n in total]
    assert [a + b for a, b in zip(tr.counts(), te.counts())] == total.tolist()
    itr, ite = _digits.split_indices(labels)
    assert len(set(itr) | set(ite)) == 1797 and not set(itr) & set(ite)
    assert int(tr.images.max()) == 255 and int(tr.images.min()) == 0
    mean, std = channel_stats(tr.images)
    assert mean == pytest.approx(_digits.DIGITS_MEAN, abs=1e-7)
    assert std == pytest.approx(_digits.DIGITS_STD, abs=1e-7)
    big = load_dataset("digits", size=32)
    assert big.images.shape == (1438, 1, 32, 32) and big.mean == tr.mean


def test_image_dataset_api():
    ds = load_dataset("digits")
    idx = torch.tensor([5, 0, 5, 1000])
    x = ds.batch(idx)
    ref = (ds.images[idx].float() / 255 - ds.mean[0]) / ds.std[0]
    assert x.dtype == torch.float32 and torch.allclose(x, ref, atol=1e-5)
    assert torch.allclose(ds.batch([5, 0, 5, 1000]), x) and torch.allclose(ds.batch(slice(0, 3)),
                                                                           ds.batch([0, 1, 2]))
    assert ds.batch(idx, dtype=torch.float16).dtype == torch.float16
    allx = ds.normalized_all()
    assert allx.shape == (1438, 1, 8, 8) and abs(allx.mean().item()) < 1e-3
    assert abs(allx.std().item() - 1) < 1e-3
    assert torch.allclose(ds.denormalize(x), ds.images[idx].float() / 255, atol=1e-6)
    ci = ds.class_indices()
    assert ci is ds.class_indices() and len(ci) == 10
    assert [len(c) for c in ci] == ds.counts()
    for c, ind in enumerate(ci):
        assert ind.dtype == torch.int64 and bool((ds.labels[ind] == c).all())
    s = ds.sample(3, 7, generator=torch.Generator().manual_seed(0))
    assert s.shape == (7, 1, 8, 8)
    img, lab = ds[10]
    assert img.shape == (1, 8, 8) and lab == int(ds.labels[10])
    custom = load_dataset("digits", mean=0.5, std="0.25")
    assert custom.mean == (0.5,) and torch.allclose(custom.batch([0]),
                                                    (ds.images[:1].float() / 255 - 0.5) / 0.25)


# ----------------------------------------------------------------------------- MNIST
def test_mnist_real(mnist_train):
    ds = mnist_train
    assert len(ds) == 60000 and ds.images.shape == (60000, 1, 28, 28)
    assert ds.images.dtype == torch.uint8 and ds.labels.dtype == torch.int64
    assert ds.counts() == MNIST_TRAIN_COUNTS
    assert ds.mean == (0.1307,) and ds.std == (0.3081,)
    x = ds.normalized_all()
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-3
    te = load_dataset("mnist", root=_real_root(), split="test")
    assert len(te) == 10000 and sum(te.counts()) == 10000


def test_fashion_mnist_real_and_stats(fashion_train):
    ds = fashion_train
    assert ds.images.shape == (60000, 1, 28, 28) and ds.counts() == [6000] * 10
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    mean, std = channel_stats(ds.images)
    assert mean[0] == pytest.approx(0.2860, abs=5e-5) and std[0] == pytest.approx(0.3530, abs=5e-5)
    assert ds.mean == (0.2860,) and ds.std == (0.3530,)
    x = ds.batch(torch.arange(0, 60000, 7))
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01


def test_mnist_torchvision_layout_and_uncompressed(tmp_path, mnist_train):
    real = _real_root() / "mnist" / "raw"
    (tmp_path / "tv" / "MNIST").mkdir(parents=True)
    os.symlink(real, tmp_path / "tv" / "MNIST" / "raw")
    ds = load_dataset("mnist", root=tmp_path / "tv")
    assert torch.equal(ds.images, mnist_train.images) and torch.equal(ds.labels, mnist_train.labels)
    raw = tmp_path / "plain" / "mnist" / "raw"
    raw.mkdir(parents=True)
    for stem in _mnist._FILES["test"]:
        with gzip.open(real / (stem + ".gz")) as f:
            (raw / stem).write_bytes(f.read())
    a = load_dataset("mnist", root=tmp_path / "plain", split="test")
    b = load_dataset("mnist", root=_real_root(), split="test")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_idx_corruption(tmp_path):
    raw = tmp_path / "mnist" / "raw"
    raw.mkdir(parents=True)
    lab = raw / "t10k-labels-idx1-ubyte"
    img = raw / "t10k-images-idx3-ubyte"
    lab.write_bytes(bytes.fromhex("00000801 00000002") + bytes([1, 2]))
    img.write_bytes(bytes.fromhex("00000803 00000002 00000002 00000002") + bytes(8))
    ds = load_dataset("mnist", root=tmp_path, split="test")
    assert ds.images.shape == (2, 1, 2, 2) and ds.labels.tolist() == [1, 2]
    img.write_bytes(bytes.fromhex("00000801 00000002 00000002 00000002") + bytes(8))
    with pytest.raises(DatasetError, match=f"{img}.*magic"):
        load_dataset("mnist", root=tmp_path, split="test")
    img.write_bytes(bytes.fromhex("00000803 00000002 00000002 00000002") + bytes(7))
    with pytest.raises(DatasetError, match=f"{img}.*truncated"):
        load_dataset("mnist", root=tmp_path, split="test")
    img.unlink()
    gz = raw / "t10k-images-idx3-ubyte.gz"
    gz.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(DatasetError, match=f"{gz}.*corrupt"):
        load_dataset("mnist", root=tmp_path, split="test")
    gz.unlink()
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte.gz.*--download"):
        load_dataset("mnist", root=tmp_path, split="test")


def test_mnist_download_file_url_and_checksum(tmp_path, monkeypatch):
    real = _real_root() / "mnist" / "raw"
    monkeypatch.setitem(_mnist.SPECS["mnist"], "urls", ("file:///nonexistent/", real.as_uri() + "/"))
    ds = load_dataset("mnist", root=tmp_path / "dl", split="test", download=True, progress=False)
    assert len(ds) == 10000
    got = tmp_path / "dl" / "mnist" / "raw" / "t10k-labels-idx1-ubyte.gz"
    assert _download.md5sum(got) == "ec29112dd5afa0611ce80d1b7f02629c"

    def bad_fetch(url, fileobj, **kw):
        fileobj.write(b"not the real file")

    monkeypatch.setattr(_download, "fetch", bad_fetch)
    with pytest.raises(DatasetError, match="MD5 mismatch"):
        load_dataset("fashion_mnist", root=tmp_path / "bad", split="test", download=True)
    leftovers = list((tmp_path / "bad").rglob("*"))
    assert all(p.is_dir() for p in leftovers), leftovers  # no partial or unverified files


# ----------------------------------------------------------------------------- CIFAR
def _write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _fake_cifar(base, name, rng):
    spec = _cifar.SPECS[name]
    d = base / spec["folder"]
    d.mkdir(parents=True)
    k = spec["num_classes"]
    arrays = {}
    for split, files in spec["files"].items():
        xs, ys = [], []
        for i, f in enumerate(files):
            n = 3 + i
            x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            y = rng.integers(0, k, n).tolist()
            _write_pickle(d / f, {b"data": x, spec["label_key"]: y, b"batch_label": b"x",
                                  b"filenames": [b"f"] * n})
            xs.append(x)
            ys += y
        arrays[split] = (np.concatenate(xs).reshape(-1, 3, 32, 32), ys)
    _write_pickle(d / spec["meta"], {spec["names_key"]: [f"c{i}".encode() for i in range(k)]})
    return d, arrays


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_readers(tmp_path, name):
    rng = np.random.default_rng(0)
    d, arrays = _fake_cifar(tmp_path / name, name, rng)
    for split in ("train", "test"):
        ds = load_dataset(name, root=tmp_path, split=split)
        x, y = arrays[split]
        assert torch.equal(ds.images, torch.from_numpy(x)) and ds.labels.tolist() == y
        assert ds.num_classes == _cifar.SPECS[name]["num_classes"] and ds.class_names[1] == "c1"
        assert ds.mean == _cifar.SPECS[name]["mean"] and ds.channels == 3
    (tmp_path / "alt").mkdir()
    shutil.move(str(d), str(tmp_path / "alt" / d.name))  # <root>/cifar-10-batches-py layout
    assert len(load_dataset(name, root=tmp_path / "alt", split="test")) == len(arrays["test"][1])


def test_cifar_corrupt_missing_and_unsafe(tmp_path):
    d, _ = _fake_cifar(tmp_path / "cifar10", "cifar10", np.random.default_rng(1))
    (d / "data_batch_3").write_bytes(b"\x80\x02}q\x00(U\x04data")  # truncated pickle
    with pytest.raises(DatasetError, match="data_batch_3.*corrupt"):
        load_dataset("cifar10", root=tmp_path)
    _write_pickle(d / "data_batch_3", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(DatasetError, match=r"data_batch_3.*\[n, 3072\]"):
        load_dataset("cifar10", root=tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    _write_pickle(d / "data_batch_3", Evil())
    with pytest.raises(DatasetError, match="not allowed"):
        load_dataset("cifar10", root=tmp_path)
    (d / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="missing data_batch_3.*--download"):
        load_dataset("cifar10", root=tmp_path)
    with pytest.raises(DatasetError, match=f"{tmp_path / 'cifar100'}.*--download"):
        load_dataset("cifar100", root=tmp_path)


def test_cifar_download_extract_and_checksum(tmp_path, monkeypatch):
    src = tmp_path / "src"
    _, arrays = _fake_cifar(src, "cifar10", np.random.default_rng(2))
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    root = tmp_path / "root"
    monkeypatch.setitem(_cifar.SPECS["cifar10"], "url", archive.as_uri())
    with pytest.raises(DatasetError, match="MD5 mismatch"):  # the official MD5 is checked
        load_dataset("cifar10", root=root, download=True, progress=False)
    assert not (root / "cifar10" / "cifar-10-python.tar.gz").exists()
    monkeypatch.setitem(_cifar.SPECS["cifar10"], "md5", _download.md5sum(archive))
    ds = load_dataset("cifar10", root=root, split="test", download=True, progress=False)
    assert torch.equal(ds.images, torch.from_numpy(arrays["test"][0]))
    assert (root / "cifar10" / "cifar-10-batches-py" / "batches.meta").is_file()


# ----------------------------------------------------------------------------- Tiny ImageNet
def _jpeg(path, arr):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, "JPEG")


def _decoded(path):
    from PIL import Image
    with Image.open(path) as im:
        return np.ascontiguousarray(np.asarray(im.convert("RGB")).transpose(2, 0, 1))


def test_tinyimagenet_reader_and_cache(tmp_path, monkeypatch):
    base = tmp_path / "tinyimagenet" / "tiny-imagenet-200"
    base.mkdir(parents=True)
    wnids = ["n02", "n01", "n03"]  # file order differs from the (sorted) class order
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    rng = np.random.default_rng(3)
    for w in wnids:
        for i in range(2):
            _jpeg(base / "train" / w / "images" / f"{w}_{i}.JPEG",
                  rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    _jpeg(base / "train" / "n01" / "images" / "gray.JPEG",
          rng.integers(0, 256, (64, 64), dtype=np.uint8))  # Tiny ImageNet has grayscale files
    ann = []
    for i, w in enumerate(["n03", "n01", "n01"]):
        _jpeg(base / "val" / "images" / f"val_{i}.JPEG",
              rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        ann.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")

    ds = load_dataset("tinyimagenet", root=tmp_path, progress=False)
    assert ds.class_names == ["n01", "n02", "n03"] and ds.counts() == [3, 2, 2]
    assert ds.images.shape == (7, 3, 64, 64) and ds.mean == (0.485, 0.456, 0.406)
    first = base / "train" / "n01" / "images" / "gray.JPEG"  # sorted file order within a class
    assert torch.equal(ds.images[0], torch.from_numpy(_decoded(first)))
    val = load_dataset("tinyimagenet", root=tmp_path, split="val", progress=False)
    assert val.labels.tolist() == [2, 0, 0]
    assert torch.equal(val.images[1], torch.from_numpy(_decoded(base / "val/images/val_1.JPEG")))
    cache = base / "datadam_fast_cache"
    assert (cache / "train_images.npy").is_file() and (cache / "test_cache.json").is_file()

    from datadam_fast.data import _tinyimagenet

    def no_decode(*a, **k):
        raise AssertionError("should have used the cache")

    monkeypatch.setattr(_tinyimagenet, "decode_into", no_decode)
    again = load_dataset("tinyimagenet", root=tmp_path, progress=False, in_memory=False)
    assert isinstance(again.images, np.memmap)
    assert torch.equal(again.batch(torch.arange(7)), ds.batch(torch.arange(7)))
    (base / "val" / "images" / "val_2.JPEG").unlink()
    with pytest.raises(DatasetError, match="val_2.JPEG"):
        load_dataset("tinyimagenet", root=tmp_path, split="test")
    with pytest.raises(DatasetError, match="tiny-imagenet-200"):
        load_dataset("tinyimagenet", root=tmp_path / "none")


# ----------------------------------------------------------------------------- ImageNet64
def test_imagenet64_npz_pack_and_memmap(tmp_path):
    base = tmp_path / "imagenet64"
    (base / "part2").mkdir(parents=True)
    rng = np.random.default_rng(4)
    xs, ys = [], []
    for i in range(1, 11):
        x = rng.integers(0, 256, (2 + i % 3, 12288), dtype=np.uint8)
        y = rng.integers(1, 1001, x.shape[0])
        where = base if i <= 5 else base / "part2"
        np.savez(where / f"train_data_batch_{i}.npz", data=x, labels=y.tolist(),
                 mean=np.zeros(12288))
        xs.append(x)
        ys.append(y)
    vx = rng.integers(0, 256, (3, 12288), dtype=np.uint8)
    np.savez_compressed(base / "val_data.npz", data=vx, labels=[1, 1000, 5])
    want = np.concatenate(xs).reshape(-1, 3, 64, 64)

    ds = load_dataset("imagenet64", root=tmp_path, progress=False)
    assert isinstance(ds.images, np.memmap) and ds.images.shape == want.shape
    assert np.array_equal(np.asarray(ds.images), want)
    assert ds.labels.tolist() == (np.concatenate(ys) - 1).tolist() and ds.num_classes == 1000
    mem = load_dataset("imagenet64", root=tmp_path, in_memory=True)
    assert torch.equal(mem.images, torch.from_numpy(want))
    idx = torch.tensor([7, 0, 7, 3])
    assert torch.equal(ds.batch(idx), mem.batch(idx))
    val = load_dataset("imagenet64", root=tmp_path, split="val", progress=False)
    assert val.labels.tolist() == [0, 999, 4]
    assert np.array_equal(np.asarray(val.images), vx.reshape(-1, 3, 64, 64))
    for p in base.rglob("*.npz"):
        p.unlink()
    again = load_dataset("imagenet64", root=tmp_path)  # the packed copy suffices
    assert torch.equal(again.labels, ds.labels)
    np.savez(base / "val_data.npz", data=vx, labels=[0, 1, 2])
    with pytest.raises(DatasetError, match="labels must be 1..1000"):
        load_dataset("imagenet64", root=tmp_path, split="val", in_memory=True)
    (base / "val_data.npz").write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(DatasetError, match="val_data.npz"):
        load_dataset("imagenet64", root=tmp_path, split="val", in_memory=True)


# ----------------------------------------------------------------------------- folder / pack
def _png(path, arr):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _make_folder(root, rng, sizes=((8, 8),)):
    arrays = {}
    for cls in ("cat", "dog"):
        for i in range(3):
            h, w = sizes[i % len(sizes)]
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            _png(root / cls / f"{i}.png", arr)
            arrays[(cls, i)] = arr
    return arrays


def test_image_folder_and_splits(tmp_path):
    rng = np.random.default_rng(5)
    arrays = _make_folder(tmp_path / "flat", rng, sizes=((8, 8), (12, 8), (8, 16)))
    (tmp_path / "flat" / "dog" / "notes.txt").write_text("ignored")
    ds = load_dataset("folder", path=tmp_path / "flat", size=8, progress=False)
    assert ds.class_names == ["cat", "dog"] and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.images.shape == (6, 3, 8, 8) and ds.mean == (0.485, 0.456, 0.406)
    assert torch.equal(ds.images[0], torch.from_numpy(arrays[("cat", 0)].transpose(2, 0, 1)))
    with pytest.raises(DatasetError, match="no test split"):
        load_dataset("folder", path=tmp_path / "flat", split="test")
    # train/val layout; val may lack a class, classes come from train
    _make_folder(tmp_path / "split" / "train", rng)
    _png(tmp_path / "split" / "val" / "dog" / "v.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    tr = load_dataset("folder", root=tmp_path / "split", progress=False)
    va = load_dataset("folder", path=tmp_path / "split", split="val", progress=False)
    assert len(tr) == 6 and len(va) == 1 and va.labels.tolist() == [1] and va.num_classes == 2
    (tmp_path / "flat" / "cat" / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="bad.png"):
        load_dataset("folder", path=tmp_path / "flat", size=8, progress=False)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images.*a"):
        load_dataset("folder", path=tmp_path / "empty")
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("folder", path=tmp_path / "missing")


def test_pack_memmap_equals_direct_load(tmp_path):
    rng = np.random.default_rng(6)
    _make_folder(tmp_path / "src" / "train", rng, sizes=((10, 10), (12, 9)))
    _make_folder(tmp_path / "src" / "test", rng, sizes=((10, 10),))
    direct = load_dataset("folder", path=tmp_path / "src", size=8, progress=False)
    direct_te = load_dataset("folder", path=tmp_path / "src", split="test", size=8, progress=False)
    dst = tmp_path / "packed"
    assert pack_image_folder(tmp_path / "src", dst, 8, workers=2, progress=False) == dst
    meta = json.loads((dst / "train" / "meta.json").read_text())
    assert meta["classes"] == ["cat", "dog"] and meta["count"] == 6 and meta["size"] == [8, 8]
    assert meta["mean"] == [0.485, 0.456, 0.406] and not (dst / "train" / ".partial").exists()
    mean, std = channel_stats(direct.images)
    assert meta["data_mean"] == pytest.approx(mean) and meta["data_std"] == pytest.approx(std)
    for split, ref in (("train", direct), ("test", direct_te)):
        ds = load_dataset("folder", path=dst, split=split)
        assert isinstance(ds.images, np.memmap) and ds.class_names == ref.class_names
        assert np.array_equal(np.asarray(ds.images), ref.images.numpy())
        assert torch.equal(ds.labels, ref.labels)
        assert torch.equal(ds.batch([3, 1, 3]), ref.batch([3, 1, 3]))
        assert torch.equal(ds.normalized_all(), ref.normalized_all())
    mtime = (dst / "train" / "images.u8").stat().st_mtime_ns
    pack_image_folder(tmp_path / "src", dst, 8, progress=False)  # identical pack: no-op
    assert (dst / "train" / "images.u8").stat().st_mtime_ns == mtime
    with pytest.raises(DatasetError, match="different packed dataset"):
        pack_image_folder(tmp_path / "src", dst, 6, progress=False)
    with pytest.raises(DatasetError, match="packed at 8x8"):
        load_dataset("folder", path=dst, size=6)
    single = pack_image_folder(tmp_path / "src" / "train", tmp_path / "one", "8x8", progress=False)
    one = load_dataset("folder", path=single)
    assert torch.equal(one.labels, direct.labels)
    with pytest.raises(DatasetError, match="train-only"):
        load_dataset("folder", path=single, split="test")
    ref = one.batch([5, 0])
    assert isinstance(one.to("cpu").images, torch.Tensor) and torch.equal(one.batch([5, 0]), ref)
    with open(dst / "train" / "images.u8", "r+b") as f:
        f.truncate(100)
    with pytest.raises(DatasetError, match="images.u8.*truncated"):
        load_dataset("folder", path=dst)


def test_pack_writer_resumes(tmp_path):
    rows = np.random.default_rng(7).integers(0, 256, (5, 3, 4, 4), dtype=np.uint8)
    w = _packed.PackWriter(tmp_path / "p", 5, (3, 4, 4), "fp1")
    w.write(rows[:2])
    del w  # "crash"
    assert not (tmp_path / "p" / "meta.json").exists()
    w = _packed.PackWriter(tmp_path / "p", 5, (3, 4, 4), "fp1")
    assert w.done == 2
    w.write(rows[2:])
    w.finalize([0, 1, 0, 1, 1], ["a", "b"], (0.5,) * 3, (0.5,) * 3)
    ds = load_dataset("folder", path=tmp_path / "p")
    assert np.array_equal(np.asarray(ds.images), rows) and ds.counts() == [2, 3]
    fresh = _packed.PackWriter(tmp_path / "q", 5, (3, 4, 4), "fp1")
    fresh.write(rows[:1])
    assert _packed.PackWriter(tmp_path / "q", 5, (3, 4, 4), "other").done == 0  # inputs changed
