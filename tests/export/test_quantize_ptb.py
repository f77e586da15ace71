"""``modrt quantize`` on an exported PTB bundle: parity on real validation text, and a
perplexity rise over --max-delta refused with nothing written."""

from __future__ import annotations

import json
import math

import pytest

from modrt import quantize
from modrt.evaluate import perplexity, split_ids
from modrt.runtime import load

from .conftest import PTB


def test_parity_on_validation_text_and_the_refusal(bundles, tmp_path):
    _, src = bundles["k1"]
    out = tmp_path / "int8"
    rec = quantize.quantize(src, out, force=True, data=PTB, parity_tokens=2000, progress=False)
    assert rec["split"] == "valid" and rec["parity_tokens"] > 1000
    assert math.isfinite(rec["ppl_int8"]) and rec["ppl_delta"] == pytest.approx(rec["ppl_int8"] / rec["ppl_float"] - 1)
    assert abs(rec["ppl_delta"]) < 0.05, rec  # a small model: int8 within a few percent
    assert json.loads((out / "manifest.json").read_text())["parity"]["int8"]["ppl_int8"] == rec["ppl_int8"]
    # the figure is what modrt eval computes from the int8 bundle alone
    ids = split_ids(load(out).manifest, "valid", PTB)[:2000]
    assert perplexity(load(out, strategy="host"), ids)["ppl"] == pytest.approx(rec["ppl_int8"], rel=1e-6)
    refused = tmp_path / "refused"
    with pytest.raises(quantize.QuantizeError, match=r"int8 perplexity .* above float .*nothing written"):
        quantize.quantize(src, refused, max_delta=-1.0, data=PTB, parity_tokens=2000, progress=False)
    assert not refused.exists() and not list(tmp_path.glob(".modrt-int8-*"))
