"""Saved models: save → load → predict is exact; nothing but our safetensors files loads,
and nothing in a file is ever executed."""

from __future__ import annotations

import json
import os
import pickle
import struct

import numpy as np
import pytest
import raterseg as rs
import torch
from raterseg.serialization import load_method, read_header

torch.set_num_threads(2)

TINY = {"features": (4, 8, 8, 8, 8), "batch_size": 4, "epochs": 1}


@pytest.fixture(scope="module")
def data():
    g = np.random.default_rng(0)
    truth = np.zeros((4, 20, 20), np.int16)
    truth[:, 5:14, 6:15] = 1
    images = truth + 0.3 * g.standard_normal(truth.shape).astype(np.float32)
    raters = np.stack([truth, np.roll(truth, 1, axis=-1)], axis=1)
    return images, raters


@pytest.mark.parametrize("method,params", [("cm", {"cm_level": "image"}), ("cm", {}),
                                           ("unet", {"target": "mean"}), ("softseg", {})])
def test_save_load_predict_is_identical(tmp_path, data, method, params):
    images, raters = data
    m = rs.create(method, seed=2, **TINY, **params).fit(images, raters)
    path = tmp_path / "model.safetensors"
    m.save(path)
    loaded = rs.load(path)
    assert type(loaded) is type(m) and loaded.config == m.config
    assert loaded.history_ == m.history_
    a, b = m.predict(images), loaded.predict(images)
    for field in ("probabilities", "rater_maps", "rater_estimates", "rater_confusion"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None and y is None) or np.array_equal(x, y), field
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]  # no temporary left behind


def test_header_is_plain_json_with_the_config(tmp_path, data):
    images, raters = data
    path = tmp_path / "m.safetensors"
    rs.create("cm", trace_weight=0.3, **TINY).fit(images, raters).save(path)
    meta = read_header(path)
    assert meta["method"] == "cm" and meta["config"]["trace_weight"] == 0.3
    assert meta["num_classes"] == 2 and meta["num_raters"] == 2
    assert meta["config"]["spatial_dims"] == 2 and meta["data_ndim"] == 2
    # the same bytes, read by hand: 8-byte length + JSON header
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert json.loads(json.loads(raw[8:8 + n])["__metadata__"]["raterseg"])["method"] == "cm"


class _Boom:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return (open, (self.marker, "w"))


def test_a_pickle_named_like_a_model_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps({"state_dict": _Boom(str(marker))}))
    with pytest.raises(rs.RaterSegError, match="not one"):
        rs.load(path)
    assert not marker.exists()
    # a torch checkpoint (a zip holding a pickle) is refused the same way
    torch.save({"w": torch.zeros(2), "boom": _Boom(str(marker))}, tmp_path / "ckpt.safetensors")
    with pytest.raises(rs.RaterSegError, match="not one"):
        rs.load(tmp_path / "ckpt.safetensors")
    assert not marker.exists()


def test_other_files_are_refused_with_clear_errors(tmp_path, data):
    from safetensors.torch import save_file

    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "junk.safetensors").write_bytes(os.urandom(1000))
    save_file({"w": torch.zeros(3)}, tmp_path / "plain.safetensors")  # no raterseg metadata
    for name in ("empty", "junk", "plain"):
        with pytest.raises(rs.RaterSegError, match="path"):
            rs.load(tmp_path / f"{name}.safetensors")
    with pytest.raises(rs.RaterSegError, match="no such file"):
        rs.load(tmp_path / "missing.safetensors")
    images, raters = data
    path = tmp_path / "cm.safetensors"
    rs.create("cm", **TINY).fit(images, raters).save(path)
    with pytest.raises(rs.RaterSegError, match="'unet' model"):
        load_method(path, method="unet")
    # weights that do not fit the stored configuration
    meta = read_header(path)
    meta["config"]["features"] = [8, 8, 8, 8, 8]
    from safetensors.torch import load_file

    save_file(load_file(path), tmp_path / "bad.safetensors", metadata={"raterseg": json.dumps(meta)})
    with pytest.raises(rs.RaterSegError, match="do not fit"):
        rs.load(tmp_path / "bad.safetensors")
    # bytes of the weights damaged under an intact header: refused, not loaded as they are
    raw = bytearray(path.read_bytes())
    raw[-100:] = bytes(100)
    (tmp_path / "damaged.safetensors").write_bytes(bytes(raw))
    with pytest.raises(rs.RaterSegError, match="damaged weights .*SHA-256"):
        rs.load(tmp_path / "damaged.safetensors")
    # a parameter that a newer raterseg added: the message says to update
    meta = read_header(path)
    meta["config"]["newthing"] = 1
    meta["raterseg_version"] = "99.0"
    save_file(load_file(path), tmp_path / "new.safetensors", metadata={"raterseg": json.dumps(meta)})
    with pytest.raises(rs.RaterSegError, match=r"newthing: not a parameter.*saved by raterseg "
                                               r"99.0 \(this is .*\): update raterseg"):
        rs.load(tmp_path / "new.safetensors")
    meta["raterseg_version"] = "0.0.1"  # an older file: no advice to update
    save_file(load_file(path), tmp_path / "old.safetensors", metadata={"raterseg": json.dumps(meta)})
    with pytest.raises(rs.RaterSegError, match=r"saved by raterseg 0.0.1 \(this is [^)]*\)$"):
        rs.load(tmp_path / "old.safetensors")


def test_saving_an_untrained_or_classical_method_is_an_error(tmp_path):
    with pytest.raises(rs.RaterSegError, match="not trained"):
        rs.create("cm").save(tmp_path / "m.safetensors")
    with pytest.raises(rs.RaterSegError):
        rs.create("majority_vote").save(tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_saved_model_is_readable_like_any_file_and_errors_name_the_problem(tmp_path, data,
                                                                           monkeypatch):
    images, raters = data
    m = rs.create("cm", **TINY).fit(images, raters)
    old = os.umask(0o022)
    try:
        m.save(tmp_path / "m.safetensors")  # mkstemp alone would leave it 0600
    finally:
        os.umask(old)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o644
    with pytest.raises(rs.RaterSegError, match=r"MODEL: .*\(a folder\)"):
        read_header(tmp_path, "MODEL")
    # a path under a regular file is not a folder
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(rs.RaterSegError, match="path: expected a file in an existing folder"):
        m.save(tmp_path / "afile" / "m.safetensors")
    # a folder that refuses the write (a 0o555 folder would not stop root, who runs CI here)
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(rs.RaterSegError, match="path: cannot write the model"):
        m.save(tmp_path / "refused.safetensors")
    assert not list(tmp_path.glob("*refused*"))  # no model, no temporary file left
