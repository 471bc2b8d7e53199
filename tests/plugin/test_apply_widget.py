"""The "Apply model" widget: load a saved model and predict on an image layer."""

from __future__ import annotations

import numpy as np
import pytest
import raterseg as rs

from napari_raterseg._apply_widget import ApplyModelWidget


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    learned = ["cm"]
    from raterseg.synth import sample_case

    image, raters, _ = sample_case(dims=2, num_raters=2, seed=0, shape=(32, 32))
    model = rs.create(learned[0], device="cpu", epochs=2, features=(4, 8, 16, 32, 64))
    model.fit(image[None], raters[None])
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    model.save(path)
    return path, image, learned[0]


def test_apply_model_predicts_on_image_layer(make_napari_viewer, qtbot, saved_model):
    path, image, method = saved_model
    viewer = make_napari_viewer()
    layer = viewer.add_image(image, name="new scan", scale=(0.5, 0.5))
    before = np.array(layer.data, copy=True)
    widget = ApplyModelWidget(viewer)
    assert not widget.controls.run_button.isEnabled()  # nothing loaded yet
    widget.model_path.value = str(path)
    widget.load_button.click()
    assert widget.model is not None
    assert widget.model_info.text() == f"{method}: 2D images, 1 channel(s), 2 classes, 2 raters"
    assert widget.image.value is layer
    # the Fuse dock's result of the same method on this image (fused on the case itself)
    fused = viewer.add_labels(np.ones(image.shape, np.uint8), name=f"new scan truth [{method}]",
                              metadata={"method": method})
    with qtbot.waitSignal(widget.controls.done, timeout=60_000) as blocker:
        widget.controls.run_button.click()
    assert blocker.args[0].error is None
    # the prediction is added beside it: both can be compared (it was replaced)
    assert viewer.layers[f"new scan truth [{method}]"] is fused and fused.data.all()
    truth = viewer.layers[f"new scan truth [{method} model]"]
    assert truth._type_string == "labels" and truth.data.shape == image.shape
    np.testing.assert_allclose(truth.scale, (0.5, 0.5))
    expect = rs.load(path).predict(image[None])
    np.testing.assert_array_equal(truth.data, expect.truth[0])
    assert viewer.layers[f"new scan uncertainty [{method} model]"].data.shape == image.shape
    np.testing.assert_array_equal(layer.data, before)


def test_apply_model_predicts_a_volume_slice_by_slice(make_napari_viewer, qtbot, saved_model):
    path, image, method = saved_model
    volume = np.stack([image, image[::-1], image[:, ::-1]])
    viewer = make_napari_viewer()
    viewer.add_image(volume, name="vol")
    widget = ApplyModelWidget(viewer)
    widget.model_path.value = str(path)
    widget.load_button.click()
    with qtbot.waitSignal(widget.controls.done, timeout=60_000):
        widget.controls.run_button.click()
    truth = viewer.layers[f"vol truth [{method} model]"].data
    assert truth.shape == volume.shape
    model = rs.load(path)
    np.testing.assert_array_equal(truth[1], model.predict(volume[1][None]).truth[0])


def test_an_image_refused_before_the_run_replaces_the_status(make_napari_viewer, saved_model,
                                                               notifications):
    path, _, _ = saved_model
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((4, 8, 8, 3), np.uint8), name="rgb", rgb=True)
    widget = ApplyModelWidget(viewer)
    widget.model_path.value = str(path)
    widget.load_button.click()
    widget.controls.status.setText("Failed: an earlier run")
    widget.image.value = viewer.layers["rgb"]
    widget.controls.run_button.click()  # refused at once: no job starts
    assert widget.controls.status.text().startswith("Not started: ")
    assert any(n.severity == "error" for n in notifications)


def test_bad_model_file_is_a_notification(make_napari_viewer, tmp_path, notifications):
    bad = tmp_path / "not_a_model.safetensors"
    bad.write_bytes(b"garbage")
    viewer = make_napari_viewer()
    widget = ApplyModelWidget(viewer)
    widget.model_path.value = str(bad)
    widget.load_button.click()  # must not raise
    assert widget.model is None and not widget.controls.run_button.isEnabled()
    assert any(n.severity == "error" for n in notifications)


def test_apply_model_on_a_multichannel_image_layer(make_napari_viewer, qtbot, tmp_path):
    # A model trained on 2-channel images, applied to a (C, H, W) Image layer with pixel size
    # 0.5: the layers come out (H, W) with the image's spatial scale (the channel axis' scale
    # was handed to the 2D layers and the result failed with "could not broadcast ...").
    learned = ["unet"]
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 2, 32, 32)).astype(np.float32)
    raters = (images[:, :1] > 0).repeat(2, axis=1).astype(np.int16)
    model = rs.create(learned[0], device="cpu", epochs=1, features=(4, 8, 16, 32, 64))
    model.fit(images, raters)
    model.save(tmp_path / "two_channel.safetensors")
    viewer = make_napari_viewer()
    viewer.add_image(images[0], name="two channels", scale=(1.0, 0.5, 0.5))
    widget = ApplyModelWidget(viewer)
    widget.model_path.value = str(tmp_path / "two_channel.safetensors")
    widget.load_button.click()
    with qtbot.waitSignal(widget.controls.done, timeout=60_000) as blocker:
        widget.controls.run_button.click()
    assert blocker.args[0].error is None
    truth = viewer.layers[f"two channels truth [{learned[0]} model]"]
    assert truth.data.shape == (32, 32)
    np.testing.assert_allclose(truth.scale, (0.5, 0.5))
    np.testing.assert_array_equal(truth.data, model.predict(images[:1]).truth[0])


def test_rgb_layer_on_a_single_channel_model_is_refused(make_napari_viewer, qtbot, saved_model,
                                                        notifications):
    # The R, G, B planes were predicted as three slices of a volume: a (3, H, W) "truth"
    # over a 2D picture, without a word.
    path, image, _ = saved_model
    viewer = make_napari_viewer()
    rgb = np.stack([image] * 3, axis=-1)
    viewer.add_image(rgb, name="photo", rgb=True)
    widget = ApplyModelWidget(viewer)
    widget.model_path.value = str(path)
    widget.load_button.click()
    n_layers = len(viewer.layers)
    widget.controls.run_button.click()  # must not raise
    qtbot.wait(200)
    assert not widget.controls.busy
    assert len(viewer.layers) == n_layers
    errors = [str(n.message) for n in notifications if n.severity == "error"]
    assert errors and "photo" in errors[-1] and "channel" in errors[-1]
