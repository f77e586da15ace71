"""CIFAR-10, read from either of its two common layouts and verified; torch-free.

Layouts (each as a directory or as a ``.tar.gz`` read without extracting):

- **python batches**, the official ``cifar-10-python.tar.gz`` (holding
  ``cifar-10-batches-py/``): ``data_batch_1``..``data_batch_5`` (train, in that order),
  ``test_batch``, ``batches.meta``; pickled dicts whose ``b"data"`` is (N, 3072) uint8,
  each row the R, G and B 32x32 planes row-major, and ``b"labels"`` N ints. Exact pixels.
- **JPEG class folders**, ``{train,test}/<class>/<n>.jpg`` (e.g. the shared
  ``cifar10-jpeg.tar.gz``, members ``cifar10-jpeg/{train,test}/<class>/<n>.jpg``),
  decoded with Pillow. A re-encoding: pixels close to, not equal to, the official ones.

Where the data comes from, first match wins:

1. ``--data PATH`` (``load(data=...)``): a tarball of either layout, or a directory
   holding one (see ``_find_in``), or one holding ``cifar10/``;
2. the ``MODRT_DATA`` environment variable: a directory, same rules;
3. the user cache, ``<cache>/cifar10`` (``modrt._cache``);
4. in a development checkout, ``../shared/data/cifar10`` beside the checkout;
5. otherwise the official ``cifar-10-python.tar.gz`` is downloaded into the user cache
   (to a temporary file, checked against its md5 and size, then renamed; a failed or
   wrong download leaves nothing behind).

Within one directory the exact layout is preferred: ``cifar-10-batches-py/`` (or the
batch files themselves), then ``cifar-10-python.tar.gz``, then the JPEG folders
(``cifar10-jpeg/`` or ``train/`` + ``test/`` themselves), then ``cifar10-jpeg.tar.gz``.

Order of the examples:

- python batches: the file order, ``data_batch_1`` .. ``data_batch_5`` then ``test_batch``;
- JPEG folders: by class index (``CLASSES`` order, not the folder listing), then by file
  name: names whose stem is a decimal number first, by that number (``2.jpg`` before
  ``10.jpg``; equal numbers, e.g. ``7.jpg`` and ``007.jpg``, by name), then every other
  name lexically (by code point). Files other than ``*.jpg``/``*.jpeg`` (any case) and
  hidden files (``.*``) are ignored; a folder that is not one of the ten classes is refused.

Checks (``verify=True``): 50,000 train and 10,000 test images, 5,000 / 1,000 per class
(10,000 per data batch), 32x32; a wrong count is refused with a line naming the batch
file or class folder. A file named ``cifar-10-python.tar.gz`` must have the official md5
and size, one named ``cifar10-jpeg.tar.gz`` the sha256 of the shared copy (the only two
archives whose bytes are known; other copies are checked by their counts and shapes).
Class names, labels in 0..9 and image shapes are checked always.

Decoded JPEGs are cached as one uncompressed ``.npz`` (uint8 images, int64 labels) in
``<cache>/cifar10/decoded/``, keyed by the source's content: a tarball by its sha256, a
folder by its resolved path and every image's relative name, size and mtime; plus the
Pillow version. The cache is written atomically (temp file + rename), a corrupt or
unreadable one is rebuilt, and the folder may be deleted at any time. The python batches
are not cached: unpickling them is as fast as reading a cache.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib
import io
import logging
import os
import pickle
import re
import tarfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modrt import _cache
from modrt._exceptions import DataError
from modrt.data import checkout_dir

log = logging.getLogger("modrt.data")

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SPLITS = ("train", "test")
EXPECTED = {"train": 50_000, "test": 10_000}  # images per split; a tenth of it per class
SIDE = 32

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
TARBALL = "cifar-10-python.tar.gz"
TARBALL_MD5 = "c58f30108f718f92721af3b95e74349a"
TARBALL_SIZE = 170_498_071
BATCH_DIR = "cifar-10-batches-py"
BATCH_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
META_FILE = "batches.meta"

JPEG_DIR = "cifar10-jpeg"
JPEG_TARBALL = "cifar10-jpeg.tar.gz"
JPEG_TARBALL_SHA256 = "efac85c8ed52f4ead1e1f1b670d8dcf435d551fccebdd8b6365e0a01a504f3a4"
JPEG_TARBALL_SIZE = 19_434_830
JPEG_SUFFIXES = (".jpg", ".jpeg")

CACHE_VERSION = 1
_OPTIONS = "pass --data DIR_OR_TARBALL, set MODRT_DATA"


@dataclass(frozen=True, eq=False)
class CIFAR10:
    """Both splits: images uint8 (N, 32, 32, 3) HWC RGB, labels int64 (N,) indexing ``classes``."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]
    source: Path  # the directory or tarball read
    layout: str = "python"  # "python" (official batches, exact pixels) or "jpeg" (re-encoded)

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        return getattr(self, f"{name}_images"), getattr(self, f"{name}_labels")

    def channel_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and std of the train images over 0..1 pixel values (``channel_stats``)."""
        return channel_stats(self.train_images)


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (R, G, B) mean and population std (ddof 0) over pixel values scaled to 0..1,
    as float32 arrays of shape (3,), for input normalisation. Exact: it counts the 256 values
    of each channel (in chunks, no float copy of the images) and works from the histogram."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
        raise ValueError(f"channel_stats wants uint8 (N, H, W, 3) images with N > 0, got {images.dtype} {images.shape}")
    hist = np.zeros((3, 256), np.int64)
    for i in range(0, len(images), 2048):
        chunk = images[i : i + 2048].reshape(-1, 3)
        for c in range(3):
            hist[c] += np.bincount(chunk[:, c], minlength=256)
    values = np.arange(256, dtype=np.float64) / 255.0
    n = hist.sum(axis=1).astype(np.float64)
    mean = hist @ values / n
    var = hist @ values**2 / n - mean**2
    return mean.astype(np.float32), np.sqrt(np.maximum(var, 0.0)).astype(np.float32)


def normalise(pixels: np.ndarray, mean, std) -> np.ndarray:
    """uint8 (B, H, W, 3) pixels -> the image networks' input, float32 (B, 3, H, W):
    (p / 255 - mean) / std per channel (the bundle's ``task.image`` normalisation)."""
    x = np.asarray(pixels).astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)
    x -= np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    x /= np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    return np.ascontiguousarray(x)


def cache_dir() -> Path:
    return _cache.cache_dir("cifar10")


def _checkout_dir() -> Path | None:
    """``../shared/data/cifar10`` beside a development checkout (``data.checkout_dir``)."""
    return checkout_dir("cifar10")


# --------------------------------------------------------------------------- lookup


def _find_in(d: Path) -> Path | None:
    """The first CIFAR-10 source in ``d`` or ``d/cifar10``, exact pixels preferred."""
    for c in (d, d / "cifar10"):
        for cand, is_it in (
            (c / BATCH_DIR, _is_batch_dir),
            (c, _is_batch_dir),
            (c / TARBALL, Path.is_file),
            (c / JPEG_DIR, _is_jpeg_dir),
            (c, _is_jpeg_dir),
            (c / JPEG_TARBALL, Path.is_file),
        ):
            if is_it(cand):
                return cand
    return None


def _is_batch_dir(p: Path) -> bool:
    return (p / BATCH_FILES["train"][0]).is_file()


def _is_jpeg_dir(p: Path) -> bool:
    return all((p / split).is_dir() for split in SPLITS)


def _looked_for(d: Path | str) -> str:
    return (f"no CIFAR-10 in {d} (nor in {Path(d) / 'cifar10'}): looked for {BATCH_DIR}/, {TARBALL}, "
            f"{JPEG_DIR}/ or train/ + test/ class folders, {JPEG_TARBALL}")


def resolve(data: str | os.PathLike | None = None, download: bool = True, progress: bool = True) -> Path:
    """The CIFAR-10 source (a directory or tarball) in the documented order; download if allowed."""
    if data is not None:
        p = Path(data)
        if p.is_file():
            return p
        if not p.exists():
            raise DataError(f"--data {data}: no such file or directory")
        found = _find_in(p)
        if found is None:
            raise DataError(f"--data {data}: {_looked_for(p)}")
        return found
    env = os.environ.get("MODRT_DATA")
    if env:
        found = _find_in(Path(env))
        if found is None:
            raise DataError(f"MODRT_DATA={env}: {_looked_for(env)}")
        return found
    for cand in (cache_dir(), _checkout_dir()):
        if cand is not None:
            found = _find_in(cand)
            if found is not None:
                return found
    if not download:
        raise DataError(_not_found())
    return _download(cache_dir(), progress=progress)


def _not_found() -> str:
    return (f"CIFAR-10 not found: {_OPTIONS}, or put {TARBALL} (or {BATCH_DIR}/, or {{train,test}}/<class>/*.jpg) "
            f"in {cache_dir()} (download from {URL})")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# Monkeypatchable in tests (a local fake; no network): called as _urlopen(URL, timeout=...).
_urlopen = urllib.request.urlopen


def _download(dest: Path, progress: bool = True) -> Path:
    """``URL`` -> ``dest/cifar-10-python.tar.gz`` through a temp file, kept only if md5 and size match."""
    from tqdm import tqdm

    target = dest / TARBALL
    tmp = dest / f".{TARBALL}.{os.getpid()}.part"
    try:
        dest.mkdir(parents=True, exist_ok=True)
        md5, size = hashlib.md5(usedforsecurity=False), 0
        with _urlopen(URL, timeout=60) as resp, open(tmp, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=TARBALL, disable=not progress) as bar:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    md5.update(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
        got = md5.hexdigest()
        if got != TARBALL_MD5 or size != TARBALL_SIZE:
            raise DataError(
                f"{_not_found()}; the download is not the official file (md5 {got[:12]}..., {size:,} bytes; "
                f"expected {TARBALL_MD5[:12]}..., {TARBALL_SIZE:,} bytes) and was not kept"
            )
        os.replace(tmp, target)
    except (OSError, http.client.HTTPException) as exc:
        raise DataError(f"{_not_found()}; download failed: {_one_line(exc)}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return target


# --------------------------------------------------------------------------- python batches

_NUMPY_GLOBALS = {"_reconstruct", "scalar", "_frombuffer", "ndarray", "dtype"}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, lists, dicts, str, bytes, numbers: nothing that can run code."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):  # bytes in a protocol-2 pickle written by Python 3
            return super().find_class(module, name)
        if name in _NUMPY_GLOBALS and (module == "numpy" or module.startswith(("numpy.core.", "numpy._core."))):
            if module.startswith("numpy.core."):  # pickles from numpy 1.x; numpy 2 moved it to numpy._core
                try:
                    return getattr(importlib.import_module("numpy._core." + module[11:]), name)
                except (ImportError, AttributeError):
                    pass
            return getattr(importlib.import_module(module), name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")


def _unpickle(raw: bytes, name: str) -> dict:
    try:
        obj = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # any malformed pickle: one line naming the file
        raise DataError(f"{name}: not a CIFAR-10 python batch ({_one_line(exc)})") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{name}: not a CIFAR-10 python batch (a {type(obj).__name__}, not a dict)")
    return {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _batch_arrays(raw: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(raw, name)
    if "data" not in d or "labels" not in d:
        raise DataError(f"{name}: not a CIFAR-10 python batch (no data/labels)")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * SIDE**2:
        what = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{name}: data is {what}, expected uint8 (N, {3 * SIDE**2})")
    labels = np.asarray(d["labels"], dtype=np.int64)
    if labels.shape != (len(data),):
        raise DataError(f"{name}: {labels.size:,} labels for {len(data):,} images")
    images = np.ascontiguousarray(data.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1))
    return images, labels


def _check_meta(raw: bytes, name: str) -> None:
    names = _unpickle(raw, name).get("label_names")
    got = tuple(n.decode("latin-1") if isinstance(n, bytes) else n for n in (names or ()))
    if got != CLASSES:
        raise DataError(f"{name}: label_names {list(got)}, expected {list(CLASSES)}")


def _read_batches(files: dict[str, bytes], where: str, verify: bool) -> dict[str, np.ndarray]:
    """``files``: batch file name -> its bytes; ``where``: the prefix that names them in errors."""
    for fname in (META_FILE, *BATCH_FILES["train"], *BATCH_FILES["test"]):
        if fname not in files:
            raise DataError(f"{where}{fname}: missing")
    _check_meta(files[META_FILE], f"{where}{META_FILE}")
    out: dict[str, np.ndarray] = {}
    for split, names in BATCH_FILES.items():
        images, labels = [], []
        for fname in names:
            im, lab = _batch_arrays(files[fname], f"{where}{fname}")
            expected = EXPECTED[split] // len(names)
            if verify and len(im) != expected:
                raise DataError(f"{where}{fname}: {len(im):,} images, expected {expected:,}")
            _check_labels(lab, f"{where}{fname}")
            images.append(im)
            labels.append(lab)
        out[f"{split}_images"] = np.concatenate(images)
        out[f"{split}_labels"] = np.concatenate(labels)
        if verify:
            _check_class_counts(out[f"{split}_labels"], split, lambda c, s=split: f"{where}{s} ({c})")
    return out


def _check_labels(labels: np.ndarray, name: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise DataError(f"{name}: labels outside 0..{len(CLASSES) - 1}")


def _check_class_counts(labels: np.ndarray, split: str, where) -> None:
    """``where(class_name)`` names the folder (or batches) the class's images came from."""
    counts = np.bincount(labels, minlength=len(CLASSES))
    expected = EXPECTED[split] // len(CLASSES)
    for i, n in enumerate(counts):
        if n != expected:
            raise DataError(f"{where(CLASSES[i])}: {n:,} {CLASSES[i]} images, expected {expected:,}")


# --------------------------------------------------------------------------- JPEG folders


def _name_key(name: str) -> tuple[int, int, str]:
    stem = name.rsplit(".", 1)[0]
    if stem.isascii() and stem.isdigit():
        return (0, int(stem), name)
    return (1, 0, name)


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(JPEG_SUFFIXES)


def _class_index(cls: str, where: str) -> int:
    try:
        return CLASSES.index(cls)
    except ValueError:
        raise DataError(f"{where}: {cls!r} is not a CIFAR-10 class (expected {' '.join(CLASSES)})") from None


@dataclass
class _Entry:
    label: int
    name: str
    size: int
    mtime_ns: int = 0
    raw: bytes | None = None  # tarball members are read up front
    path: Path | None = None  # folder files are read while decoding


def _list_folder(root: Path) -> dict[str, list[_Entry]]:
    out: dict[str, list[_Entry]] = {}
    for split in SPLITS:
        entries: list[_Entry] = []
        try:
            with os.scandir(root / split) as classes:
                class_dirs = sorted((e.name, e.path) for e in classes if e.is_dir() and not e.name.startswith("."))
            for cls, cpath in class_dirs:
                label = _class_index(cls, f"{root / split / cls}")
                with os.scandir(cpath) as files:
                    for f in files:
                        if _is_image_name(f.name) and f.is_file():
                            st = f.stat()
                            entries.append(_Entry(label, f.name, st.st_size, st.st_mtime_ns, path=Path(f.path)))
        except OSError as exc:
            raise DataError(f"{root / split}: cannot read ({exc.strerror or exc})") from exc
        out[split] = entries
    return out


_MEMBER = re.compile(r"^(?P<prefix>(?:.*/)?)(?P<split>train|test)/(?P<cls>[^/]+)/(?P<name>[^/]+)$")


def _list_tar(path: Path) -> tuple[dict[str, list[_Entry]], str]:
    """Every image member of a JPEG-folder tarball (read in one streaming pass) and their prefix."""
    out: dict[str, list[_Entry]] = {s: [] for s in SPLITS}
    prefixes: set[str] = set()
    try:
        with tarfile.open(path, "r|*") as tar:
            for m in tar:
                match = _MEMBER.match(m.name.removeprefix("./"))
                if not m.isfile() or match is None or not _is_image_name(match["name"]):
                    continue
                label = _class_index(match["cls"], f"{path}!{m.name}")
                f = tar.extractfile(m)
                out[match["split"]].append(_Entry(label, match["name"], m.size, raw=f.read() if f else b""))
                prefixes.add(match["prefix"])
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise DataError(f"{path}: cannot read the tarball ({_one_line(exc)})") from exc
    if len(prefixes) > 1:
        raise DataError(f"{path}: images under several roots ({', '.join(sorted(prefixes))}); expected one")
    return out, next(iter(prefixes), "")


def _folder_key(root: Path, listing: dict[str, list[_Entry]]) -> str:
    h = hashlib.sha256(str(root.resolve()).encode())
    for split in SPLITS:
        for e in sorted(listing[split], key=lambda e: (e.label, e.name)):
            h.update(f"\0{split}/{CLASSES[e.label]}/{e.name}\0{e.size}\0{e.mtime_ns}".encode())
    return h.hexdigest()


def _file_digest(path: Path, algo: str) -> tuple[str, int]:
    h, size = hashlib.new(algo, usedforsecurity=False), 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return h.hexdigest(), size


def _decode_jpeg(raw: bytes, name: str) -> np.ndarray:
    """One image -> uint8 (32, 32, 3) RGB (monkeypatchable in tests)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as im:
            if im.size != (SIDE, SIDE):
                raise DataError(f"{name}: {im.size[0]}x{im.size[1]} image, expected {SIDE}x{SIDE}")
            return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DataError(f"{name}: cannot decode ({_one_line(exc)})") from exc


def _pillow_version() -> str:
    try:
        import PIL
    except ImportError:
        raise DataError(
            "reading CIFAR-10 JPEG folders needs Pillow: pip install 'pillow>=10' (or modrt[train]); "
            f"the official python batches ({TARBALL}) need nothing more"
        ) from None
    return PIL.__version__


def _decode_all(listing: dict[str, list[_Entry]], where, progress: bool, desc: str) -> dict[str, np.ndarray]:
    from tqdm import tqdm

    out: dict[str, np.ndarray] = {}
    total = sum(len(v) for v in listing.values())
    with tqdm(total=total, unit="img", desc=desc, disable=not progress) as bar:
        for split in SPLITS:
            entries = sorted(listing[split], key=lambda e: (e.label, _name_key(e.name)))
            images = np.empty((len(entries), SIDE, SIDE, 3), np.uint8)
            for i, e in enumerate(entries):
                name = f"{where(split, CLASSES[e.label])}/{e.name}"
                if e.raw is None:
                    try:
                        e.raw = e.path.read_bytes()
                    except OSError as exc:
                        raise DataError(f"{name}: cannot read ({exc.strerror or exc})") from exc
                images[i] = _decode_jpeg(e.raw, name)
                e.raw = None  # keep memory flat
                bar.update(1)
            out[f"{split}_images"] = images
            out[f"{split}_labels"] = np.fromiter((e.label for e in entries), np.int64, count=len(entries))
    return out


def _check_listing(listing: dict[str, list[_Entry]], where, verify: bool) -> None:
    for split in SPLITS:
        if not listing[split]:
            raise DataError(f"{where(split, '*')}: no images")
        if verify:
            labels = np.fromiter((e.label for e in listing[split]), np.int64)
            _check_class_counts(labels, split, lambda c, s=split: where(s, c))


def _where(path: Path, prefix: str | None):
    """Names a class folder in errors: ``DIR/train/cat``, or ``TARBALL!cifar10-jpeg/train/cat``."""
    if prefix is None:
        return lambda split, cls: str(path / split / cls)
    return lambda split, cls: f"{path}!{prefix}{split}/{cls}"


def _read_jpeg(path: Path, verify: bool, progress: bool, cache: bool) -> dict[str, np.ndarray]:
    pil = _pillow_version()
    listing, prefix = None, None
    if path.is_dir():
        listing = _list_folder(path)
        key = _folder_key(path, listing)
    else:
        key, size = _file_digest(path, "sha256")
        if verify and path.name == JPEG_TARBALL and (key != JPEG_TARBALL_SHA256 or size != JPEG_TARBALL_SIZE):
            raise DataError(
                f"{path}: wrong checksum (sha256 {key[:12]}..., {size:,} bytes; expected "
                f"{JPEG_TARBALL_SHA256[:12]}..., {JPEG_TARBALL_SIZE:,} bytes): not the shared CIFAR-10 JPEG copy"
            )
    key = hashlib.sha256(f"cifar10-jpeg v{CACHE_VERSION} pillow {pil} {key}".encode()).hexdigest()
    file = cache_dir() / "decoded" / f"jpeg-{key[:32]}.npz"
    arrays = _read_cache(file) if cache else None
    if arrays is not None:
        prefix = None if path.is_dir() else str(arrays.get("prefix", ""))
    else:
        if listing is None:
            listing, prefix = _list_tar(path)
        _check_listing(listing, _where(path, prefix), verify)
        arrays = _decode_all(listing, _where(path, prefix), progress, f"decoding {path.name}")
        if cache:
            _write_cache(file, {**arrays, "prefix": np.array(prefix or "")})
    arrays.pop("prefix", None)
    if verify:
        for split in SPLITS:
            _check_class_counts(arrays[f"{split}_labels"], split, lambda c, s=split: _where(path, prefix)(s, c))
    return arrays


def _read_cache(file: Path) -> dict[str, np.ndarray] | None:
    if not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        for split in SPLITS:
            im, lab = arrays[f"{split}_images"], arrays[f"{split}_labels"]
            if im.dtype != np.uint8 or im.shape[1:] != (SIDE, SIDE, 3) or lab.dtype != np.int64 or lab.shape != (
                    len(im),) or (lab.size and (lab.min() < 0 or lab.max() >= len(CLASSES))):
                raise ValueError(f"{split}: {im.dtype} {im.shape}, labels {lab.dtype} {lab.shape}")
        return arrays
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        log.warning("cifar10: the decode cache %s is unreadable (%s); decoding again", file, _one_line(exc))
        file.unlink(missing_ok=True)
        return None


def _write_cache(file: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, file)
    except OSError as exc:  # a read-only or full cache must not stop a load
        log.warning("cifar10: cannot write the decode cache %s (%s)", file, _one_line(exc))
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- load


def _read_batch_source(path: Path, verify: bool) -> dict[str, np.ndarray]:
    wanted = {META_FILE, *BATCH_FILES["train"], *BATCH_FILES["test"]}
    files: dict[str, bytes] = {}
    if path.is_dir():
        for fname in sorted(wanted):
            try:
                files[fname] = (path / fname).read_bytes()
            except FileNotFoundError:
                continue  # reported as missing below
            except OSError as exc:
                raise DataError(f"{path / fname}: cannot read ({exc.strerror or exc})") from exc
        return _read_batches(files, f"{path}/", verify)
    prefix = ""
    try:
        with tarfile.open(path, "r|*") as tar:
            for m in tar:
                base = m.name.rsplit("/", 1)[-1]
                if m.isfile() and base in wanted:
                    if base in files:
                        raise DataError(f"{path}: two {base} members; expected one copy of the batches")
                    f = tar.extractfile(m)
                    files[base] = f.read() if f else b""
                    prefix = m.name[: len(m.name) - len(base)]
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise DataError(f"{path}: cannot read the tarball ({_one_line(exc)})") from exc
    return _read_batches(files, f"{path}!{prefix}", verify)


def _tar_layout(path: Path) -> str:
    """"python" or "jpeg", from the tarball's first member that is a file."""
    try:
        with tarfile.open(path, "r|*") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                base = m.name.rsplit("/", 1)[-1]
                if base in (META_FILE, *BATCH_FILES["train"], *BATCH_FILES["test"], "readme.html"):
                    return "python"
                if _MEMBER.match(m.name.removeprefix("./")) or _is_image_name(base):
                    return "jpeg"
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise DataError(f"{path}: cannot read the tarball ({_one_line(exc)})") from exc
    raise DataError(f"{path}: neither CIFAR-10 python batches nor JPEG class folders in this tarball")


def load(data: str | os.PathLike | None = None, download: bool = True, verify: bool = True,
         progress: bool = True, cache: bool = True) -> CIFAR10:
    """Find (or download), read and verify CIFAR-10; JPEGs are decoded once, then read from the cache."""
    source = resolve(data, download=download, progress=progress)
    if source.is_dir():
        layout = "python" if _is_batch_dir(source) else "jpeg"
        if layout == "jpeg" and not _is_jpeg_dir(source):
            raise DataError(f"{source}: {_looked_for(source)}")
    else:
        if verify and source.name == TARBALL:
            digest, size = _file_digest(source, "md5")
            if digest != TARBALL_MD5 or size != TARBALL_SIZE:
                raise DataError(
                    f"{source}: wrong checksum (md5 {digest[:12]}..., {size:,} bytes; expected "
                    f"{TARBALL_MD5[:12]}..., {TARBALL_SIZE:,} bytes): not the official {TARBALL}"
                )
        layout = _tar_layout(source)
    if layout == "python":
        arrays = _read_batch_source(source, verify)
    else:
        arrays = _read_jpeg(source, verify, progress, cache)
    if verify:
        for split in SPLITS:
            n = len(arrays[f"{split}_labels"])
            if n != EXPECTED[split]:
                raise DataError(f"{source}: {n:,} {split} images, expected {EXPECTED[split]:,}")
    return CIFAR10(classes=CLASSES, source=source, layout=layout, **arrays)


__all__ = ["CIFAR10", "CLASSES", "SPLITS", "cache_dir", "channel_stats", "load", "normalise", "resolve"]
