"""modrt.data.cifar10: both layouts (python batches, JPEG folders), folder or tarball, give the
same arrays in the documented order; where the data is looked for; the decode cache; refusals."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from modrt import DataError
from modrt.data import cifar10

REAL_JPEG = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cifar10" / cifar10.JPEG_TARBALL
PER_CLASS = {"train": 3, "test": 2}  # the fakes: 30 train, 20 test images
NAMES = [2, 10, 33]  # JPEG file numbers within a class: numeric order 2, 10, 33; lexical 10, 2, 33


def _fake_images(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """split -> (images (N, 32, 32, 3) uint8, labels), class-major. Smooth images plus mild noise,
    so that a quality-100 JPEG stays within a few levels of them."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    out = {}
    for split, per in PER_CLASS.items():
        labels = np.repeat(np.arange(10), per).astype(np.int64)
        images = np.empty((len(labels), 32, 32, 3), np.uint8)
        for i in range(len(labels)):
            a, b, c = rng.uniform(20, 235, 3), rng.uniform(-60, 60, 3), rng.uniform(-60, 60, 3)
            img = a + b * xx[..., None] + c * yy[..., None] + rng.normal(0, 2, (32, 32, 3))
            images[i] = np.clip(img, 0, 255).astype(np.uint8)
        out[split] = (images, labels)
    return out


def _write_batches(root: Path, fake) -> Path:
    """The official layout: root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}."""
    d = root / cifar10.BATCH_DIR
    d.mkdir(parents=True)

    def dump(name: str, images: np.ndarray, labels: np.ndarray) -> None:
        rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # R, G, B planes, row-major
        obj = {b"batch_label": name.encode(), b"labels": [int(x) for x in labels], b"data": rows,
               b"filenames": [f"{i}.png".encode() for i in range(len(images))]}
        (d / name).write_bytes(pickle.dumps(obj, protocol=2))

    images, labels = fake["train"]
    for i, (im, lab) in enumerate(zip(np.array_split(images, 5), np.array_split(labels, 5), strict=True)):
        dump(f"data_batch_{i + 1}", im, lab)
    dump("test_batch", *fake["test"])
    meta = {b"num_cases_per_batch": 6, b"label_names": [c.encode() for c in cifar10.CLASSES], b"num_vis": 3072}
    (d / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return d


def _write_jpegs(root: Path, fake, names=NAMES) -> Path:
    """root/cifar10-jpeg/{train,test}/<class>/<n>.jpg, written in a shuffled order."""
    image = pytest.importorskip("PIL.Image")
    d = root / cifar10.JPEG_DIR
    rng = np.random.default_rng(1)
    for split, (images, labels) in fake.items():
        for c, cls in enumerate(cifar10.CLASSES):
            (d / split / cls).mkdir(parents=True)
            idx = np.flatnonzero(labels == c)
            for j in rng.permutation(len(idx)):
                image.fromarray(images[idx[j]]).save(d / split / cls / f"{names[j]}.jpg", quality=100, subsampling=0)
    return d


def _tar(src: Path, out: Path, reverse: bool = False) -> Path:
    """``src`` as ``out`` (tar.gz) under its own name; ``reverse``: members in reverse name order."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:gz") as tar:
        tar.add(src, arcname=src.name, recursive=False)
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames.sort(reverse=reverse)
            for name in sorted(dirnames, reverse=reverse) + sorted(filenames, reverse=reverse):
                p = Path(dirpath) / name
                tar.add(p, arcname=str(src.name / p.relative_to(src)), recursive=False)
    return out


@pytest.fixture
def env(monkeypatch, tmp_path):
    """Nothing to find (no MODRT_DATA, an empty cache, no checkout fallback); the fakes' counts."""
    monkeypatch.delenv("MODRT_DATA", raising=False)
    monkeypatch.setenv("MODRT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cifar10, "_checkout_dir", lambda: tmp_path / "no-checkout")
    monkeypatch.setattr(cifar10, "EXPECTED", {s: 10 * n for s, n in PER_CLASS.items()})
    return monkeypatch


@pytest.fixture
def fake():
    return _fake_images()


@pytest.fixture
def sources(tmp_path, fake):
    """The fakes in all four containers: name -> path to pass as ``data``."""
    batches = _write_batches(tmp_path / "py", fake)
    jpegs = _write_jpegs(tmp_path / "jpeg", fake)
    return {
        "batches-dir": batches,
        "batches-tar": _tar(batches, tmp_path / "tars" / "fake-python.tar.gz", reverse=True),
        "jpeg-dir": jpegs,
        "jpeg-tar": _tar(jpegs, tmp_path / "tars" / "fake-jpeg.tar.gz", reverse=True),
    }


def _load(data, **kw):
    return cifar10.load(data, download=False, progress=False, **kw)


def test_all_layouts_and_containers_agree(env, sources, fake):
    got = {name: _load(path) for name, path in sources.items()}
    for name, d in got.items():
        assert d.classes == cifar10.CLASSES == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                                "horse", "ship", "truck")
        assert d.source == sources[name]
        assert d.layout == ("python" if name.startswith("batches") else "jpeg")
        for split in cifar10.SPLITS:
            images, labels = d.split(split)
            assert images.dtype == np.uint8 and images.shape == (10 * PER_CLASS[split], 32, 32, 3)
            assert images.flags.c_contiguous
            assert labels.dtype == np.int64
            np.testing.assert_array_equal(labels, fake[split][1])  # class-major, as written
    for split in cifar10.SPLITS:
        truth = fake[split][0]
        np.testing.assert_array_equal(got["batches-dir"].split(split)[0], truth)  # exact: CHW planes -> HWC
        np.testing.assert_array_equal(got["batches-tar"].split(split)[0], truth)
        np.testing.assert_array_equal(got["jpeg-tar"].split(split)[0], got["jpeg-dir"].split(split)[0])
        diff = np.abs(got["jpeg-dir"].split(split)[0].astype(int) - truth)  # JPEG q=100, 4:4:4
        assert diff.max() <= 8 and diff.mean() < 1.5, (diff.max(), diff.mean())
    with pytest.raises(DataError, match="unknown split"):
        got["jpeg-dir"].split("valid")


def test_jpeg_order_is_class_then_number_then_name(env, tmp_path):
    image = pytest.importorskip("PIL.Image")
    root = tmp_path / "j"
    files = {"train": ["b.jpg", "10.jpg", "a.jpg", "9.jpg", "009.jpg", "x.png", ".5.jpg"], "test": ["1.JPEG"]}
    value = {}
    for split, names in files.items():
        for cls in ("truck", "airplane"):  # created out of class order
            (root / split / cls).mkdir(parents=True)
            for name in names:
                v = len(value) * 5
                value[(split, cls, name)] = v
                image.fromarray(np.full((32, 32, 3), v, np.uint8)).save(root / split / cls / name, quality=100)
    d = _load(root, verify=False)
    order = ["009.jpg", "9.jpg", "10.jpg", "a.jpg", "b.jpg"]  # numbers by value (ties by name), then names
    want = [value[("train", c, n)] for c in ("airplane", "truck") for n in order]
    np.testing.assert_allclose(d.train_images[:, 0, 0, 0], want, atol=2)  # x.png and .5.jpg ignored
    np.testing.assert_array_equal(d.train_labels, [0] * 5 + [9] * 5)
    np.testing.assert_array_equal(d.test_labels, [0, 9])
    assert sorted(["b", "10", "a", "9", "2"], key=lambda s: cifar10._name_key(s + ".jpg")) == ["2", "9", "10", "a", "b"]


def test_channel_stats_are_exact(fake):
    images = fake["train"][0]
    mean, std = cifar10.channel_stats(images)
    x = images.reshape(-1, 3) / 255.0
    assert mean.dtype == std.dtype == np.float32 and mean.shape == std.shape == (3,)
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(std, x.std(axis=0), rtol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        cifar10.channel_stats(images.astype(np.float32))


def _boom(raw, name):
    raise AssertionError(f"decoded {name} again")


def test_second_load_reads_the_decode_cache(env, sources, tmp_path):
    decode = cifar10._decode_jpeg
    for kind in ("jpeg-tar", "jpeg-dir"):
        env.setattr(cifar10, "_decode_jpeg", decode)
        first = _load(sources[kind])
        cached = list((tmp_path / "cache" / "cifar10" / "decoded").glob("jpeg-*.npz"))
        assert cached, "no decode cache written"
        env.setattr(cifar10, "_decode_jpeg", _boom)
        second = _load(sources[kind])
        for split in cifar10.SPLITS:
            np.testing.assert_array_equal(first.split(split)[0], second.split(split)[0])
            np.testing.assert_array_equal(first.split(split)[1], second.split(split)[1])
        assert not list(cached[0].parent.glob(".*")), "a temp file was left behind"
    assert len(list((tmp_path / "cache" / "cifar10" / "decoded").glob("jpeg-*.npz"))) == 2  # one per source


def test_cache_key_follows_the_source(env, sources):
    _load(sources["jpeg-dir"])
    env.setattr(cifar10, "_decode_jpeg", _boom)
    f = sources["jpeg-dir"] / "test" / "cat" / f"{NAMES[0]}.jpg"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))  # touched: decoded again
    with pytest.raises(AssertionError, match="decoded"):
        _load(sources["jpeg-dir"])


def test_corrupt_cache_is_rebuilt(env, sources, tmp_path):
    first = _load(sources["jpeg-tar"])
    (cached,) = (tmp_path / "cache" / "cifar10" / "decoded").glob("jpeg-*.npz")
    good = cached.read_bytes()
    for bad in (good[: len(good) // 2], b"not a zip"):
        cached.write_bytes(bad)
        again = _load(sources["jpeg-tar"])
        np.testing.assert_array_equal(again.train_images, first.train_images)
        assert cifar10._read_cache(cached) is not None  # rewritten whole
        assert abs(cached.stat().st_size - len(good)) < 64


def test_cache_false_writes_nothing(env, sources, tmp_path):
    _load(sources["jpeg-tar"], cache=False)
    assert not (tmp_path / "cache" / "cifar10" / "decoded").exists()


def _marker(d: Path, kind: str = "batches") -> Path:
    """A directory ``resolve`` accepts (it looks for data_batch_1, or train/ + test/)."""
    if kind == "batches":
        d.mkdir(parents=True, exist_ok=True)
        (d / "data_batch_1").write_bytes(b"")
    else:
        for s in cifar10.SPLITS:
            (d / s).mkdir(parents=True, exist_ok=True)
    return d


def test_resolve_order(env, tmp_path):
    env_dir = _marker(tmp_path / "env" / "cifar10" / cifar10.BATCH_DIR)  # MODRT_DATA holding cifar10/
    cache = _marker(tmp_path / "cache" / "cifar10" / cifar10.JPEG_DIR, "jpeg")
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / cifar10.JPEG_TARBALL).write_bytes(b"")
    env.setattr(cifar10, "_checkout_dir", lambda: checkout)
    env.setenv("MODRT_DATA", str(tmp_path / "env"))
    explicit = _marker(tmp_path / "explicit", "jpeg")
    assert cifar10.resolve(explicit) == explicit  # 1. explicit beats MODRT_DATA
    assert cifar10.resolve(checkout / cifar10.JPEG_TARBALL) == checkout / cifar10.JPEG_TARBALL  # a tarball
    assert cifar10.resolve() == env_dir  # 2. MODRT_DATA beats the cache
    env.delenv("MODRT_DATA")
    assert cifar10.resolve() == cache  # 3. the user cache beats the checkout
    (cache / "train").rmdir()
    assert cifar10.resolve() == checkout / cifar10.JPEG_TARBALL  # 4. ../shared/data/cifar10
    (checkout / cifar10.JPEG_TARBALL).unlink()
    with pytest.raises(DataError, match="--data.*MODRT_DATA"):
        cifar10.resolve(download=False)


def test_one_directory_prefers_exact_pixels(env, tmp_path):
    d = tmp_path / "d"
    _marker(d / cifar10.JPEG_DIR, "jpeg")
    (d / cifar10.JPEG_TARBALL).write_bytes(b"")
    assert cifar10.resolve(d) == d / cifar10.JPEG_DIR  # the folder beats its tarball
    (d / cifar10.TARBALL).write_bytes(b"")
    assert cifar10.resolve(d) == d / cifar10.TARBALL  # python batches beat JPEG
    _marker(d / cifar10.BATCH_DIR)
    assert cifar10.resolve(d) == d / cifar10.BATCH_DIR  # extracted beats the tarball


def test_missing_sources_are_one_line_refusals(env, tmp_path):
    (tmp_path / "empty").mkdir()
    env.setenv("MODRT_DATA", str(tmp_path / "empty"))
    _marker(tmp_path / "cache" / "cifar10" / cifar10.BATCH_DIR)
    with pytest.raises(DataError, match=r"^MODRT_DATA=.*no CIFAR-10 in") as info:
        cifar10.resolve()  # refused, not skipped for the cache
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match=r"^--data .*: no CIFAR-10 in"):
        cifar10.resolve(tmp_path / "empty")
    with pytest.raises(DataError, match=r"^--data .*nope: no such file"):
        cifar10.resolve(tmp_path / "nope")


def test_wrong_counts_name_the_folder_or_batch(env, sources, tmp_path):
    (sources["jpeg-dir"] / "train" / "dog" / f"{NAMES[1]}.jpg").unlink()
    with pytest.raises(DataError, match=r"jpeg/train/dog: 2 dog images, expected 3$"):
        _load(sources["jpeg-dir"])
    assert _load(sources["jpeg-dir"], verify=False).train_images.shape[0] == 29
    env.setattr(cifar10, "EXPECTED", {"train": 40, "test": 20})
    with pytest.raises(DataError, match=r"cifar-10-batches-py/data_batch_1: 6 images, expected 8$"):
        _load(sources["batches-dir"])
    with pytest.raises(DataError, match=r"fake-python.tar.gz!cifar-10-batches-py/data_batch_1: 6 images"):
        _load(sources["batches-tar"])
    with pytest.raises(DataError, match=r"fake-jpeg.tar.gz!cifar10-jpeg/train/airplane: 3 airplane images, exp"):
        _load(sources["jpeg-tar"])


def test_known_archive_names_are_checksummed(env, sources, tmp_path):
    for src, name, algo in (("batches-tar", cifar10.TARBALL, "md5"), ("jpeg-tar", cifar10.JPEG_TARBALL, "sha256")):
        renamed = tmp_path / "named" / name
        renamed.parent.mkdir(exist_ok=True)
        renamed.write_bytes(sources[src].read_bytes())
        with pytest.raises(DataError, match=rf"{name}: wrong checksum \({algo} "):
            _load(renamed)
        assert _load(renamed, verify=False).train_labels.shape == (30,)


def test_bad_batches_are_refused(env, sources):
    d = sources["batches-dir"]
    meta = pickle.loads((d / "batches.meta").read_bytes())
    meta[b"label_names"] = meta[b"label_names"][::-1]
    (d / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    with pytest.raises(DataError, match=r"batches.meta: label_names \['truck'"):
        _load(d)
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": [c.encode() for c in cifar10.CLASSES]}))
    # a pickle that would run code: refused before anything runs
    (d / "test_batch").write_bytes(pickle.dumps(os.system, protocol=2))
    with pytest.raises(DataError, match=r"test_batch: not a CIFAR-10 python batch \(global (posix|nt)\.system"):
        _load(d)
    (d / "test_batch").unlink()
    with pytest.raises(DataError, match=r"test_batch: missing"):
        _load(d)


def test_unknown_class_folder_is_refused(env, sources):
    (sources["jpeg-dir"] / "test" / "kitten").mkdir()
    with pytest.raises(DataError, match=r"test/kitten: 'kitten' is not a CIFAR-10 class"):
        _load(sources["jpeg-dir"])


def _fake_opener(payload: bytes | None, seen: list):
    def urlopen(url, timeout=None):
        seen.append(url)
        if payload is None:
            raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))
        resp = io.BytesIO(payload)
        resp.headers = {"Content-Length": str(len(payload))}
        return resp

    return urlopen


def test_download_offline_is_one_line_and_leaves_nothing(env, tmp_path):
    seen: list = []
    env.setattr(cifar10, "_urlopen", _fake_opener(None, seen))
    with pytest.raises(DataError) as info:
        cifar10.load(progress=False)
    msg = str(info.value)
    assert seen == [cifar10.URL] == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    assert msg.startswith("CIFAR-10 not found: pass --data") and "MODRT_DATA" in msg and "download failed" in msg
    assert "\n" not in msg
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_download_mismatch_keeps_nothing(env, sources, tmp_path):
    payload = sources["batches-tar"].read_bytes()
    env.setattr(cifar10, "_urlopen", _fake_opener(payload, []))
    with pytest.raises(DataError, match=r"--data.*MODRT_DATA.*not the official file \(md5 .*expected c58f30108f71"
                                        r".*170,498,071 bytes\) and was not kept$"):
        cifar10.load(progress=False)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_download_then_found_in_the_cache(env, sources, tmp_path):
    payload = sources["batches-tar"].read_bytes()
    env.setattr(cifar10, "_urlopen", _fake_opener(payload, []))
    env.setattr(cifar10, "TARBALL_MD5", hashlib.md5(payload).hexdigest())
    env.setattr(cifar10, "TARBALL_SIZE", len(payload))
    d = cifar10.load(progress=False)
    target = tmp_path / "cache" / "cifar10" / cifar10.TARBALL
    assert d.source == target and target.read_bytes() == payload
    assert sorted(p.name for p in target.parent.iterdir()) == [cifar10.TARBALL]
    env.setattr(cifar10, "_urlopen", _fake_opener(None, []))
    assert cifar10.load(progress=False, download=False).source == target


def test_real_shared_jpeg_tarball(monkeypatch, tmp_path):
    """The shared copy, decoded into a temp cache (about 17 s on 2 busy cores), then read back from it."""
    if not REAL_JPEG.is_file():
        pytest.skip(f"the shared CIFAR-10 JPEG copy is not at {REAL_JPEG}")
    pytest.importorskip("PIL.Image")
    monkeypatch.setenv("MODRT_CACHE", str(tmp_path / "cache"))
    start = time.perf_counter()
    d = cifar10.load(REAL_JPEG, download=False, progress=False)
    first = time.perf_counter() - start
    assert d.source == REAL_JPEG and d.layout == "jpeg" and d.classes == cifar10.CLASSES
    assert d.train_images.shape == (50_000, 32, 32, 3) and d.test_images.shape == (10_000, 32, 32, 3)
    assert d.train_images.dtype == d.test_images.dtype == np.uint8
    assert d.train_labels.dtype == d.test_labels.dtype == np.int64
    assert np.bincount(d.train_labels).tolist() == [5_000] * 10
    assert np.bincount(d.test_labels).tolist() == [1_000] * 10
    mean, _ = d.channel_stats()
    np.testing.assert_allclose(mean, [0.4914, 0.4822, 0.4465], atol=0.003)  # the official figures, near
    monkeypatch.setattr(cifar10, "_decode_jpeg", _boom)
    start = time.perf_counter()
    again = cifar10.load(REAL_JPEG, download=False, progress=False)
    print(f"first decode {first:.1f} s, cache hit {time.perf_counter() - start:.2f} s")
    np.testing.assert_array_equal(again.test_images, d.test_images)
