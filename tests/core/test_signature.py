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
    assert [(t.name, t.dtype, t.shape) for t in sig.inputs] == [("tokens", "int64", (-1, -1))]
    assert sig.input.bounds == (0, 40)
    assert [(t.name, t.dtype, t.shape) for t in sig.outputs] == [
        ("logits", "float32", (-1, -1, 40)), ("next_token", "int64", (-1, -1)), ("modules", "int32", (-1, -1, 1, 2))]
    out = model.run(tokens=np.ones((3, 4), np.int64))
    for t in sig.outputs:  # every declared output is computed, with its dtype and shape
        a = out[t.name]
        assert a.dtype == np.dtype(t.dtype) and a.ndim == len(t.shape), t
        assert all(w in (-1, g) for w, g in zip(t.shape, a.shape, strict=True)), (t, a.shape)
    np.testing.assert_array_equal(out["next_token"], out["logits"].argmax(-1))


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
                       ({"x": [[1]]}, "exactly one input, tokens="),
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
