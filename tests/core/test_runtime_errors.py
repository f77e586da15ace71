"""onnxruntime's errors become modrt's once, at the run boundary (modrt/runtime/errors.py)."""

from __future__ import annotations

import numpy as np
import pytest

import modrt
from modrt._exceptions import BundleError, InputError, ModrtError, ProviderError
from modrt.runtime import errors


class InvalidArgument(Exception):  # named as onnxruntime's pybind11 class is
    pass


def test_convert_table():
    assert type(errors.convert("graph 'c'", InvalidArgument("bad dtype"))) is InputError
    assert type(errors.convert("graph 'c'", ValueError("Required inputs (['x']) are missing"))) is InputError
    e = errors.convert("graph 'c'", RuntimeError("kernel\n  failed"))
    assert type(e) is ModrtError and str(e) == "graph 'c' failed (RuntimeError): kernel failed"
    own = BundleError("x")
    assert errors.convert("g", own) is own
    assert type(errors.convert_load("m.onnx", RuntimeError("protobuf parsing failed"))) is BundleError
    assert type(errors.convert_load("m.onnx", RuntimeError("... global thread pool ..."))) is ProviderError


def test_boundary_converts_only_what_it_should():
    with pytest.raises(InputError, match="^graph 'c': bad$") as e:
        with errors.running("graph 'c'"):
            raise InvalidArgument("bad")
    assert isinstance(e.value.__cause__, InvalidArgument)
    own = InputError("mine")
    with pytest.raises(InputError) as e, errors.running("graph 'c'"):
        raise own
    assert e.value is own
    with pytest.raises(KeyboardInterrupt), errors.loading("m.onnx"):
        raise KeyboardInterrupt
    with errors.running("graph 'c'"):
        pass


def test_a_graph_fed_the_wrong_dtype_is_an_input_error(ff_bundle):
    model = modrt.load(ff_bundle(modules=4, k=1), strategy="host")
    g = model.sessions[model.manifest.layers[0].controller]
    x = np.zeros((2, 8), np.float64)
    with pytest.raises(InputError, match=f"^graph '{g.name}': "):
        g({g.input_names[0]: x})
    with pytest.raises(InputError, match=f"^graph '{g.name}': "):
        g({})


@pytest.mark.parametrize("strategy", ["graph", "host"])
def test_a_failed_fast_path_call_is_reported_not_rerun(ff_bundle, monkeypatch, strategy):
    """Model.run's shortcut converts the failure of its raw session call and raises it;
    it never runs the request again on the general path."""
    model = modrt.load(ff_bundle(modules=4, k=1), strategy=strategy)
    x = np.ones((3, 8), np.float32)
    model.run(x=x)

    def boom(feeds, out):
        raise RuntimeError("device lost")

    layer = model._routed["layer0"]
    layer.cache[3] = (layer.pick(3), boom)
    monkeypatch.setattr(model, "_run", lambda *a: pytest.fail("the request ran again on the general path"))
    with pytest.raises(ModrtError, match=r"^layer layer0 failed \(RuntimeError\): device lost$") as e:
        model.run(x=x)
    assert not isinstance(e.value, InputError)
