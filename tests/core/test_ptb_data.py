"""modrt.data.ptb: exact reading of the real PTB, where the data is looked for, refusals."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

from modrt import DataError
from modrt.data import ptb

FILES = [f"ptb.{split}.txt" for split in ptb.SPLITS]


def _copy_ptb(src: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copyfile(src / name, dest / name)
    return dest


def _marker(dest: Path) -> Path:
    """A directory ``resolve`` accepts (it only looks for ptb.train.txt)."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "ptb.train.txt").write_text("a b\n")
    return dest


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No MODRT_DATA, an empty user cache, no checkout fallback: nothing to find."""
    monkeypatch.delenv("MODRT_DATA", raising=False)
    monkeypatch.delenv("MODRT_CACHE", raising=False)  # the user cache under XDG_CACHE_HOME
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(ptb, "_checkout_dir", lambda: tmp_path / "no-checkout")
    return monkeypatch


def test_load_real_ptb(ptb_dir):
    c = ptb.load(ptb_dir, download=False)
    assert len(c.vocab) == 10_000
    assert len(set(c.vocab)) == 10_000
    assert {ptb.EOS, ptb.UNK} <= set(c.vocab)
    assert (len(c.train), len(c.valid), len(c.test)) == (929_589, 73_760, 82_430)
    for split in ptb.SPLITS:
        arr = c.split(split)
        assert arr.dtype == np.int64
        assert 0 <= arr.min() and arr.max() < 10_000
    assert c.directory == ptb_dir
    # Every line ends with <eos>: the last token of each split is <eos>.
    assert all(c.vocab[c.split(s)[-1]] == ptb.EOS for s in ptb.SPLITS)
    with pytest.raises(DataError, match="unknown split"):
        c.split("dev")


def test_resolve_explicit_dir_and_parent_of_ptb(tmp_path, clean_env):
    direct = _marker(tmp_path / "direct")
    parent = tmp_path / "parent"
    nested = _marker(parent / "ptb")
    clean_env.setenv("MODRT_DATA", str(_marker(tmp_path / "env")))
    assert ptb.resolve(direct) == direct  # explicit beats MODRT_DATA
    assert ptb.resolve(parent) == nested
    assert ptb.resolve(str(parent)) == nested


def test_resolve_order(tmp_path, clean_env):
    env = _marker(tmp_path / "env")
    cache_root = tmp_path / "cache"
    cache = _marker(cache_root / "modrt" / "ptb")
    checkout = _marker(tmp_path / "checkout")
    clean_env.setenv("XDG_CACHE_HOME", str(cache_root))
    clean_env.setattr(ptb, "_checkout_dir", lambda: checkout)
    clean_env.setenv("MODRT_DATA", str(env))
    assert ptb.resolve() == env  # 2. MODRT_DATA beats the cache
    clean_env.delenv("MODRT_DATA")
    assert ptb.cache_dir() == cache
    assert ptb.resolve() == cache  # 3. the user cache beats the checkout
    shutil.rmtree(cache)
    assert ptb.resolve() == checkout  # 4. the checkout's ../shared/data/ptb


def test_resolve_env_holding_ptb_subdir(tmp_path, clean_env):
    nested = _marker(tmp_path / "data" / "ptb")
    clean_env.setenv("MODRT_DATA", str(tmp_path / "data"))
    assert ptb.resolve() == nested


def test_env_without_ptb_is_refused_not_skipped(tmp_path, clean_env):
    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _marker(tmp_path / "cache" / "modrt" / "ptb")
    (tmp_path / "empty").mkdir()
    clean_env.setenv("MODRT_DATA", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="MODRT_DATA"):
        ptb.resolve()


def test_checkout_dir_is_shared_data_beside_the_repo(ptb_dir):
    assert ptb._checkout_dir() == ptb_dir


def test_loads_a_copy(tmp_path, ptb_dir):
    c = ptb.load(_copy_ptb(ptb_dir, tmp_path / "copy" / "ptb"), download=False)
    assert len(c.valid) == 73_760


@pytest.mark.parametrize("split", ptb.SPLITS)
def test_one_changed_byte_is_refused(tmp_path, ptb_dir, split):
    d = _copy_ptb(ptb_dir, tmp_path / "ptb")
    path = d / f"ptb.{split}.txt"
    raw = bytearray(path.read_bytes())
    i = raw.index(b"the ")  # a letter for a letter: still valid text, same size
    raw[i] = ord("T")
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError) as info:
        ptb.load(d, download=False)
    msg = str(info.value)
    assert str(path) in msg
    assert "wrong checksum" in msg


def test_truncated_file_is_refused(tmp_path, ptb_dir):
    d = _copy_ptb(ptb_dir, tmp_path / "ptb")
    path = d / "ptb.test.txt"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match="ptb.test.txt: wrong checksum"):
        ptb.load(d, download=False)


def test_missing_split_file_is_refused(tmp_path, ptb_dir):
    d = _copy_ptb(ptb_dir, tmp_path / "ptb")
    (d / "ptb.valid.txt").unlink()
    with pytest.raises(DataError, match="ptb.valid.txt"):
        ptb.load(d, download=False)


def test_missing_dir_is_refused(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="--data .*nope"):
        ptb.load(missing)
    with pytest.raises(DataError):
        ptb.resolve(missing)


def test_nothing_found_without_download(clean_env):
    with pytest.raises(DataError) as info:
        ptb.resolve(download=False)
    assert "--data" in str(info.value) and "MODRT_DATA" in str(info.value)


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_failed_download_names_the_options(tmp_path, clean_env):
    clean_env.setenv("no_proxy", "*")  # talk to 127.0.0.1 directly, whatever the proxy setup
    clean_env.setenv("NO_PROXY", "*")
    clean_env.setattr(ptb, "URL", f"http://127.0.0.1:{_closed_port()}/x.tgz")
    with pytest.raises(DataError) as info:
        ptb.load()
    msg = str(info.value)
    assert "--data" in msg and "MODRT_DATA" in msg
    assert "download failed" in msg
    # Nothing half-written into the cache.
    assert not (tmp_path / "empty-cache" / "modrt" / "ptb" / "ptb.train.txt").exists()
