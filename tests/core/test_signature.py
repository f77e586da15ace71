"""Model.signature: what a bundle takes and returns, declared once (modrt/runtime/signature.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import modrt
from modrt.runtime.signature import Signature, Tensor


def test_recurrent_signature_matches_what_run_returns(lm_bundle):
    model = modrt.load(lm_bundle(modules=5, k=2), strategy="host")
    sig = model.signature
    H = model.zero_state(1).shape[1]
    assert [(t.name, t.dtype, t.shape, t.optional) for t in sig.inputs] == [
        ("tokens", "int64", (-1, -1), False), ("h", "float32", (-1, 1, H), True)]
    assert sig.input.bounds == (0, 40)
    assert [(t.name, t.dtype, t.shape) for t in sig.outputs] == [
        ("logits", "float32", (-1, -1, 40)), ("next_token", "int64", (-1, -1)), ("modules", "int32", (-1, -1, 1, 2)),
        ("h_last", "float32", (-1, 1, H))]
    out = model.run_checked(sig.check({"tokens": np.ones((3, 4), np.int64)}))
    for t in sig.outputs:  # every declared output is computed, with its dtype and shape
        a = out[t.name]
        assert a.dtype == np.dtype(t.dtype) and a.shape == sig.shape_of(t.name, (3, 4)), (t, a.shape)
    np.testing.assert_array_equal(out["next_token"], out["logits"].argmax(-1))
    assert sig.positions((3, 4)) == 12 and sig.shape_of("h_last", (3, 4)) == (3, 1, H)
    # Model.run keeps its Python form: h_last (B, H) for one layer
    np.testing.assert_array_equal(model.run(tokens=np.ones((3, 4), np.int64))["h_last"], out["h_last"][:, 0])


def test_h_continues_a_stream_and_h_last_is_the_state_after_it(lm_bundle):
    """Tokens in two requests, the second fed the first's h_last, equal one request."""
    model = modrt.load(lm_bundle(modules=5, k=2), strategy="host")
    sig = model.signature
    tok = np.random.default_rng(0).integers(0, 40, (2, 9))
    whole = model.run_checked(sig.check({"tokens": tok}))
    first = model.run_checked(sig.check({"tokens": tok[:, :4]}))
    second = model.run_checked(sig.check({"tokens": tok[:, 4:], "h": first["h_last"]}))
    np.testing.assert_allclose(np.concatenate([first["logits"], second["logits"]], 1), whole["logits"],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.concatenate([first["modules"], second["modules"]], 1), whole["modules"])
    np.testing.assert_allclose(second["h_last"], whole["h_last"], rtol=1e-5, atol=1e-6)
    with pytest.raises(modrt.InputError, match="input 'h' has batch size 1, 'tokens' has 2"):
        sig.check({"tokens": tok, "h": whole["h_last"][:1]})
    with pytest.raises(modrt.InputError, match=r"input 'h' must have shape \[-1, 1, "):
        sig.check({"tokens": tok, "h": whole["h_last"][:, 0]})


def test_logits_are_computed_only_when_asked_for(lm_bundle, monkeypatch):
    """next_token alone: no logits kept, taken chunk by chunk; nothing after the layers
    when neither is asked for. Same next_token in every mode."""
    from modrt.runtime import pipeline

    model = modrt.load(lm_bundle(modules=5, k=2), strategy="host")
    feeds = model.signature.check({"tokens": np.random.default_rng(1).integers(0, 40, (3, 50))})
    full = model.run_checked(feeds)
    calls = []
    head = model.pipeline.post[-1]
    monkeypatch.setattr(head, "_run", lambda names, f, opts, _run=head._run: calls.append(f) or _run(names, f, opts))
    monkeypatch.setattr(pipeline, "HEAD_CHUNK_BYTES", 3 * 40 * 4 * 7)  # 7 time steps of logits a call
    lazy = model.run_checked(feeds, {"next_token"})
    assert "logits" not in lazy
    np.testing.assert_array_equal(lazy["next_token"], full["next_token"])
    assert [next(iter(f.values())).shape[1] for f in calls] == [7] * 7 + [1]  # 50 steps in chunks of 7
    calls.clear()
    chunked = model.run_checked(feeds, {"logits"})  # the logits, assembled from chunks
    np.testing.assert_allclose(chunked["logits"], full["logits"], rtol=1e-6, atol=1e-6)
    calls.clear()
    none = model.run_checked(feeds, {"modules"})
    assert calls == [] and "logits" not in none and "next_token" not in none
    np.testing.assert_array_equal(none["modules"], full["modules"])


def test_feedforward_signature_and_the_task_declares_the_label(ff_bundle, tmp_path):
    d = ff_bundle(modules=4, k=1)
    sig = modrt.load(d, strategy="host").signature
    assert [t.name for t in sig.outputs] == ["y", "modules"]  # task kind "synthetic": nothing derived
    assert sig.output("modules").shape == (-1, 1, 1)
    # The same graphs declared a classifier: the argmax output appears, and run() computes it.
    import shutil

    c = tmp_path / "clf"
    shutil.copytree(d, c)
    m = json.loads((c / "manifest.json").read_text())
    m["task"] = {"name": "toy", "kind": "classification"}
    (c / "manifest.json").write_text(json.dumps(m))
    model = modrt.load(c, strategy="host", verify=False)
    assert [t.name for t in model.signature.outputs] == ["y", "modules"]  # no logits to argmax over
    with pytest.raises(modrt.InputError, match="unknown output 'label'"):
        model.signature.output("label")


def test_check_validates_once_with_one_line_errors():
    sig = Signature("recurrent", (Tensor("tokens", "int64", (-1, -1), bounds=(0, 10), values="token ids"),),
                    (Tensor("logits", "float32", (-1, -1, 10)),))
    ok = sig.check({"tokens": [[1, 2], [3, 9]]})["tokens"]
    assert ok.dtype == np.int64 and ok.flags.c_contiguous
    for bad, match in [({"tokens": [[1, 10]]}, r"token ids must be in \[0, 10\)"),
                       ({"tokens": [[1.0, 2.0]]}, "must be integers"),
                       ({"tokens": [1, 2]}, r"must have shape \[-1, -1\] \(-1: any; a 2-D array\), got \[2\]"),
                       ({"tokens": np.zeros((0, 3), np.int64)}, "is empty"),
                       ({"x": [[1]]}, r"takes 'tokens' \(int64 \[-1, -1\]\); got \['x'\]"),
                       ({}, "got none")]:
        with pytest.raises(modrt.InputError, match=match):
            sig.check(bad)


def test_run_checked_equals_run_on_checked_feeds(lm_bundle, ff_bundle):
    """The server's path: feeds checked once (signature.check), then run without checks."""
    for model, feeds in [(modrt.load(lm_bundle(), strategy="host"), {"tokens": [[1, 2, 3], [4, 5, 6]]}),
                         (modrt.load(ff_bundle(), strategy="host"), {"x": np.ones((3, 8))})]:
        checked = model.signature.check(feeds)
        a, b = model.run_checked(checked), model.run(**feeds)
        for k in ("modules", model.signature.outputs[0].name):
            np.testing.assert_array_equal(a[k], b[k])
