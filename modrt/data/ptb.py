"""Penn Treebank (Mikolov's language-modelling split), read exactly and verified.

Where the data comes from, first match wins:

1. ``--data DIR`` (a directory holding ``ptb.train.txt``..., or one holding ``ptb/``);
2. the ``MODRT_DATA`` environment variable (same rules);
3. the user cache, ``<cache>/ptb`` (``modrt._cache``: ``$MODRT_CACHE``, else
   ``$XDG_CACHE_HOME/modrt``, else ``~/.cache/modrt``);
4. in a development checkout, ``../shared/data/ptb`` beside the checkout;
5. otherwise Mikolov's ``simple-examples.tgz`` is downloaded into the user cache and
   every file is checked against the sha256 below.

Every file read is checked against its sha256 and token count, so a truncated or
different copy is refused with a line that names the file and what was expected.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modrt import _cache
from modrt._exceptions import DataError
from modrt.data import checkout_dir

SPLITS = ("train", "valid", "test")
EOS = "<eos>"
UNK = "<unk>"
VOCAB_SIZE = 10_000
URL = "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"

# split -> (bytes, sha256, tokens including one <eos> per line)
EXPECTED: dict[str, tuple[int, str, int]] = {
    "train": (5_101_618, "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf", 929_589),
    "valid": (399_782, "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2", 73_760),
    "test": (449_945, "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0", 82_430),
}


@dataclass(frozen=True)
class Corpus:
    """The three splits as int64 token ids over one vocabulary built from train."""

    vocab: tuple[str, ...]  # id -> word, in order of first appearance in train
    train: np.ndarray  # (N_train,) int64
    valid: np.ndarray  # (N_valid,) int64
    test: np.ndarray  # (N_test,) int64
    directory: Path

    def split(self, name: str) -> np.ndarray:
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        return getattr(self, name)


def cache_dir() -> Path:
    return _cache.cache_dir("ptb")


def _checkout_dir() -> Path | None:
    """``../shared/data/ptb`` beside a development checkout (``data.checkout_dir``)."""
    return checkout_dir("ptb")


def _holds_ptb(d: Path) -> Path | None:
    for cand in (d, d / "ptb"):
        if (cand / "ptb.train.txt").is_file():
            return cand
    return None


def resolve(data: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Find the PTB directory in the documented order; download into the cache if allowed."""
    if data is not None:
        found = _holds_ptb(Path(data))
        if found is None:
            raise DataError(f"--data {data}: no ptb.train.txt there (nor in {Path(data) / 'ptb'})")
        return found
    env = os.environ.get("MODRT_DATA")
    if env:
        found = _holds_ptb(Path(env))
        if found is None:
            raise DataError(f"MODRT_DATA={env}: no ptb.train.txt there (nor in {Path(env) / 'ptb'})")
        return found
    for cand in (cache_dir(), _checkout_dir()):
        if cand is not None and _holds_ptb(cand):
            return cand
    if not download:
        raise DataError(_not_found())
    return _download(cache_dir())


def _not_found() -> str:
    return (
        "Penn Treebank not found: pass --data DIR, set MODRT_DATA, or put "
        f"ptb.{{train,valid,test}}.txt in {cache_dir()} (download from {URL})"
    )


def _download(dest: Path) -> Path:
    from tqdm import tqdm

    try:
        with urllib.request.urlopen(URL, timeout=30) as resp:
            total = int(resp.headers.get("Content-Length") or 0)
            buf = io.BytesIO()
            with tqdm(total=total or None, unit="B", unit_scale=True, desc="simple-examples.tgz") as bar:
                while chunk := resp.read(1 << 16):
                    buf.write(chunk)
                    bar.update(len(chunk))
    except OSError as exc:
        raise DataError(f"{_not_found()}; download failed: {exc}") from exc
    dest.mkdir(parents=True, exist_ok=True)
    buf.seek(0)
    with tarfile.open(fileobj=buf, mode="r:gz") as tar:
        for split in SPLITS:
            member = tar.extractfile(f"./simple-examples/data/ptb.{split}.txt")
            if member is None:
                raise DataError(f"{URL}: archive lacks data/ptb.{split}.txt")
            raw = member.read()
            _check_bytes(raw, f"{URL}!ptb.{split}.txt", split)
            tmp = dest / f".ptb.{split}.txt.tmp"
            tmp.write_bytes(raw)
            os.replace(tmp, dest / f"ptb.{split}.txt")
    return dest


def _check_bytes(raw: bytes, name: str, split: str) -> None:
    size, sha, _ = EXPECTED[split]
    got = hashlib.sha256(raw).hexdigest()
    if got != sha:
        raise DataError(
            f"{name}: wrong checksum (sha256 {got[:12]}..., {len(raw):,} bytes; "
            f"expected {sha[:12]}..., {size:,} bytes): not the standard PTB file"
        )


def _words(raw: bytes) -> list[str]:
    out: list[str] = []
    for line in raw.decode("utf-8").splitlines():
        out.extend(line.split())
        out.append(EOS)
    return out


def load(data: str | os.PathLike | None = None, download: bool = True, verify: bool = True) -> Corpus:
    """Read and verify the three splits; the vocabulary comes from train."""
    directory = resolve(data, download=download)
    words: dict[str, list[str]] = {}
    for split in SPLITS:
        path = directory / f"ptb.{split}.txt"
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
        if verify:
            _check_bytes(raw, str(path), split)
        words[split] = _words(raw)
        expected = EXPECTED[split][2]
        if verify and len(words[split]) != expected:
            raise DataError(f"{path}: {len(words[split]):,} tokens, expected {expected:,}")
    index: dict[str, int] = {}
    for w in words["train"]:
        if w not in index:
            index[w] = len(index)
    if verify and len(index) != VOCAB_SIZE:
        raise DataError(f"{directory / 'ptb.train.txt'}: {len(index):,} word types, expected {VOCAB_SIZE:,}")
    arrays = {}
    for split in SPLITS:
        try:
            arrays[split] = np.fromiter((index[w] for w in words[split]), dtype=np.int64, count=len(words[split]))
        except KeyError as exc:
            path = directory / f"ptb.{split}.txt"
            raise DataError(f"{path}: word {exc.args[0]!r} not in the train vocabulary") from exc
    return Corpus(vocab=tuple(index), directory=directory, **arrays)
