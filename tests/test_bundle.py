"""Model bundle: safetensors + JSON, atomic, checksummed; tampered, foreign or incomplete bundles refused."""

from __future__ import annotations

import json

import pytest
import torch

from normdiff_bids.errors import NormdiffError
from normdiff_bids.model.bundle import FORMAT_VERSION, BundleError, load_bundle, save_bundle


@pytest.fixture
def bundle(tmp_path):
    tensors = {"backbone.w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
               "encoder.emb": torch.ones(2, 2, dtype=torch.float64)}
    meta = {"idps": ["Left-Hippocampus", "Right-Hippocampus"], "config": {"seed": 0, "lr": None}}
    return save_bundle(tmp_path / "model", tensors, meta), tensors, meta


def test_round_trip_is_exact_and_has_no_pickle(bundle):
    path, tensors, meta = bundle
    assert sorted(p.name for p in path.iterdir()) == ["model.json", "model.safetensors"]
    loaded, loaded_meta = load_bundle(path)
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype
    assert loaded_meta["idps"] == meta["idps"] and loaded_meta["config"] == meta["config"]
    assert loaded_meta["format"] == "normdiff-bids-model"
    assert loaded_meta["format_version"] == FORMAT_VERSION
    assert len(loaded_meta["weights"]["sha256"]) == 64
    assert b"pickle" not in (path / "model.safetensors").read_bytes()[:200]


def test_existing_bundle_is_kept_unless_overwrite(bundle):
    path, tensors, meta = bundle
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_bundle(path, tensors, {"idps": ["other"]})
    assert load_bundle(path)[1]["idps"] == meta["idps"]
    save_bundle(path, tensors, {"idps": ["other"]}, overwrite=True)
    assert load_bundle(path)[1]["idps"] == ["other"]
    assert [p.name for p in path.parent.iterdir()] == ["model"]  # no temporary folders left behind


def test_failed_save_leaves_the_old_bundle_intact(bundle):
    path, tensors, _ = bundle
    with pytest.raises(TypeError):
        save_bundle(path, tensors, {"idps": object()}, overwrite=True)
    assert load_bundle(path)[1]["idps"] == ["Left-Hippocampus", "Right-Hippocampus"]
    assert [p.name for p in path.parent.iterdir()] == ["model"]


def test_tampered_weights_are_refused(bundle):
    path, _, _ = bundle
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model.safetensors does not match the sha256"):
        load_bundle(path)


def test_truncated_files_are_refused(bundle):
    path, _, _ = bundle
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:-8])
    with pytest.raises(BundleError, match="truncated"):
        load_bundle(path)
    text = (path / "model.json").read_text()
    (path / "model.json").write_text(text[: len(text) // 2])
    with pytest.raises(BundleError, match="model.json is not valid JSON"):
        load_bundle(path)


def test_foreign_newer_and_incomplete_bundles_are_refused(bundle, tmp_path):
    path, _, _ = bundle
    meta = json.loads((path / "model.json").read_text())
    (path / "model.json").write_text(json.dumps({**meta, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(BundleError, match="upgrade normdiff-bids"):
        load_bundle(path)
    (path / "model.json").write_text(json.dumps({"framework": "sklearn"}))
    with pytest.raises(BundleError, match="not a normdiff-bids model file"):
        load_bundle(path)
    (path / "model.json").write_text(json.dumps(meta))
    (path / "model.safetensors").unlink()
    with pytest.raises(BundleError, match="model.safetensors is missing"):
        load_bundle(path)
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BundleError, match="model.json is missing"):
        load_bundle(empty)


def test_bundle_error_is_a_user_facing_value_error():
    assert issubclass(BundleError, ValueError) and issubclass(BundleError, NormdiffError)


def test_reserved_meta_keys_are_refused(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        save_bundle(tmp_path / "m", {"w": torch.zeros(1)}, {"format": "mine"})
    assert not (tmp_path / "m").exists()
