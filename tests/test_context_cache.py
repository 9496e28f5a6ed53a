"""context.load's cache of verified hashes: a repeated load of an unchanged model folder takes the
scope content hashes and blob sha256s from the cache; any changed file is hashed again, so a
blob or a weight tampered with after a cached load is still rejected (and the model still runs).

Most tests set ``cache.RACY_NS`` to 0: files written by the test a few milliseconds before a load
would otherwise (rightly) not be cached; the guard itself is tested on its own.
"""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_context_format import FEEDS, plain_model

from onnxgen import context
from onnxgen.context import cache as hash_cache
from onnxgen.context.backends import ort_session


@pytest.fixture(autouse=True)
def private_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hash_cache, "RACY_NS", 0)


@pytest.fixture
def model(tmp_path):
    """The MLP with its weights in an external-data file, scope 'mlp' with an onnxruntime blob file."""
    folder = tmp_path / "m"
    folder.mkdir()
    path = folder / "model.onnx"
    onnx.save(plain_model(), path, save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    context.annotate(path, nodes={"mlp": ["mm1", "relu", "mm2"]})
    assert not context.compile(path, "onnxruntime")[0].error
    return path


def blob_file(path):
    return path.parent / context.read_manifest(onnx.load(path, load_external_data=False)).scopes["mlp"].blobs[0].path


def tamper(file, change):
    """Rewrite ``file`` with ``change(bytes)``, same size, and set its times back as they were."""
    st = os.stat(file)
    data = change(bytearray(file.read_bytes()))
    assert len(data) == st.st_size
    file.write_bytes(bytes(data))
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(file).st_mtime_ns == st.st_mtime_ns  # only the status-change time tells


def flip(data):
    data[len(data) // 2] ^= 0xFF
    return data


def outputs(path):
    return ort_session(onnx.load(path)).run(None, FEEDS)[0]


def test_a_repeated_load_takes_the_hashes_from_the_cache(model):
    first = context.load(model, ["onnxruntime"])
    assert first.choices["mlp"].runner == "onnxruntime"
    assert first.verification == {"computed": 2, "cached": 0}  # the scope's content hash, the blob's sha256
    second = context.load(model, ["onnxruntime"])
    assert second.verification == {"computed": 0, "cached": 2}
    assert second.choices["mlp"].runner == "onnxruntime"
    np.testing.assert_allclose(second.run(None, FEEDS)[0], outputs(model), atol=1e-6)
    assert (hash_cache.cache_dir() / hash_cache.CACHE_FILE).stat().st_mode & 0o777 == 0o600
    off = context.load(model, ["onnxruntime"], hash_cache=False)
    assert off.verification is None and off.choices["mlp"].runner == "onnxruntime"


def test_a_blob_tampered_with_after_a_cached_load_is_still_rejected(model):
    context.load(model, ["onnxruntime"])
    assert context.load(model, ["onnxruntime"]).verification["cached"] == 2
    original = blob_file(model).read_bytes()
    tamper(blob_file(model), flip)
    with pytest.warns(context.ContextWarning, match="sha256"):
        session = context.load(model, ["onnxruntime"])
    assert session.verification == {"computed": 1, "cached": 1}  # the blob hashed again; the scope's hash cached
    assert session.choices["mlp"].runner == "original"
    np.testing.assert_allclose(session.run(None, FEEDS)[0], outputs(model), atol=1e-6)
    tamper(blob_file(model), lambda data: bytearray(original))  # the right bytes again: verified again, then used
    again = context.load(model, ["onnxruntime"])
    assert again.verification == {"computed": 1, "cached": 1} and again.choices["mlp"].runner == "onnxruntime"


def test_a_weight_changed_after_a_cached_load_is_caught(model):
    context.load(model, ["onnxruntime"])
    assert context.load(model, ["onnxruntime"]).verification["cached"] == 2
    data = model.parent / "model.onnx.data"
    tamper(data, lambda b: bytearray(np.frombuffer(bytes(b), np.float32) * np.float32(1.5)))  # w1 and w2
    with pytest.warns(context.ContextWarning, match="content hash"):
        session = context.load(model, ["onnxruntime"])
    assert session.choices["mlp"].runner == "original"
    np.testing.assert_allclose(session.run(None, FEEDS)[0], outputs(model), atol=1e-6)  # the changed model's
    w1 = numpy_helper.to_array(onnx.load(model).graph.initializer[0])
    np.testing.assert_array_equal(w1, numpy_helper.to_array(plain_model().graph.initializer[0]) * np.float32(1.5))


def test_a_copied_folder_is_hashed_again(model, tmp_path):
    context.load(model, ["onnxruntime"])
    copy = tmp_path / "copy"
    shutil.copytree(model.parent, copy)  # same bytes, same modification times: other files all the same
    assert context.load(copy / "model.onnx", ["onnxruntime"]).verification == {"computed": 2, "cached": 0}


def test_files_changed_just_before_hashing_are_not_cached(model, monkeypatch):
    monkeypatch.setattr(hash_cache, "RACY_NS", 100_000_000)
    store = hash_cache.HashCache()
    identity = hash_cache.file_identity(model)
    started = time.time_ns()
    os.utime(model)  # just now
    assert not store.put("k", "v", [hash_cache.file_identity(model)], started)
    assert store.put("k", "v", [identity], identity[5] + 200_000_000)  # changed long before hashing began
    assert not store.put("k", "v", [None], started)


def test_a_cache_file_others_can_write_is_ignored(model):
    context.load(model, ["onnxruntime"])
    file = hash_cache.cache_dir() / hash_cache.CACHE_FILE
    file.chmod(0o666)
    with pytest.warns(UserWarning, match="writable by others"):
        session = context.load(model, ["onnxruntime"])
    assert session.verification == {"computed": 2, "cached": 0}
    assert file.stat().st_mode & 0o777 == 0o666  # not rewritten either
