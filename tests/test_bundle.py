"""Model bundle: safetensors + JSON + a manifest checksumming every file, atomic; tampered, foreign,
other-format or incomplete bundles refused; the loaded parameters pass the estimator's own checks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from normdiff_bids.errors import NormdiffError
from normdiff_bids.model.bundle import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    BundleError,
    load_bundle,
    save_bundle,
    weights_digest,
)


@pytest.fixture
def bundle(tmp_path):
    tensors = {"backbone.w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
               "encoder.emb": torch.ones(2, 2, dtype=torch.float64)}
    meta = {"idps": ["Left-Hippocampus", "Right-Hippocampus"], "config": {"seed": 0, "lr": None}}
    return save_bundle(tmp_path / "model", tensors, meta), tensors, meta


def test_round_trip_is_exact_and_has_no_pickle(bundle):
    path, tensors, meta = bundle
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.json", "model.safetensors"]
    loaded, loaded_meta = load_bundle(path)  # numpy arrays: reading a bundle needs no torch
    for k, v in tensors.items():
        assert np.array_equal(loaded[k], v.numpy()) and loaded[k].dtype == v.numpy().dtype
    assert loaded_meta["idps"] == meta["idps"] and loaded_meta["config"] == meta["config"]
    assert loaded_meta["format"] == "normdiff-bids-model"
    assert loaded_meta["format_version"] == FORMAT_VERSION
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
    with pytest.raises(BundleError, match=r"model.safetensors does not match the sha256.*same size"):
        load_bundle(path)


def test_manifest_lists_the_sha256_and_size_of_every_file(bundle):
    path, _, _ = bundle
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    assert manifest["format"] == "normdiff-bids-model" and manifest["format_version"] == FORMAT_VERSION
    for name in ("model.json", "model.safetensors"):
        data = (path / name).read_bytes()
        assert manifest["files"][name] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert weights_digest(path) == manifest["files"]["model.safetensors"]["sha256"]


def test_a_hand_edited_model_json_is_refused(bundle):
    path, _, _ = bundle
    text = (path / "model.json").read_text()
    (path / "model.json").write_text(text.replace('"seed": 0', '"seed": 1'))
    with pytest.raises(BundleError, match=r"model.json does not match the sha256.*edited by hand"):
        load_bundle(path)


def _count_reads(monkeypatch) -> list[str]:
    """The names of the files read with ``Path.read_bytes`` from now on, in order."""
    reads = []
    original = Path.read_bytes

    def counting(self):
        reads.append(self.name)
        return original(self)

    monkeypatch.setattr(Path, "read_bytes", counting)
    return reads


def test_each_file_is_read_once_and_parsed_from_the_checked_bytes(bundle, monkeypatch):
    """What is verified is what is loaded: no file is opened a second time after its check."""
    path, _, _ = bundle
    reads = _count_reads(monkeypatch)
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: pytest.fail(f"{self} read as text"))
    monkeypatch.setattr("builtins.open", lambda *a, **k: pytest.fail(f"{a[0]} opened again"))
    load_bundle(path)
    assert sorted(reads) == ["manifest.json", "model.json", "model.safetensors"]


def test_a_bundle_loaded_again_in_one_process_is_not_read_again_until_a_file_changes(bundle, monkeypatch):
    path, tensors, _ = bundle
    load_bundle(path)
    reads = _count_reads(monkeypatch)
    again, meta = load_bundle(path)
    assert reads == ["manifest.json"] and np.array_equal(again["backbone.w"], tensors["backbone.w"].numpy())
    meta["idps"].append("changed by the caller")  # each caller gets its own copy
    assert load_bundle(path)[1]["idps"] == ["Left-Hippocampus", "Right-Hippocampus"]
    # an edit after the cached load is still refused
    text = (path / "model.json").read_text()
    (path / "model.json").write_text(text.replace('"seed": 0', '"seed": 10'))
    with pytest.raises(BundleError, match=r"model.json does not match the sha256"):
        load_bundle(path)


def test_truncated_files_are_refused(bundle):
    path, _, _ = bundle
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:-8])
    with pytest.raises(BundleError, match="truncated"):
        load_bundle(path)
    (path / "model.safetensors").write_bytes(data)
    text = (path / "model.json").read_text()
    (path / "model.json").write_text(text[: len(text) // 2])
    with pytest.raises(BundleError, match=r"model.json does not match.*bytes, not the"):
        load_bundle(path)
    manifest = (path / MANIFEST_FILE).read_text()
    (path / MANIFEST_FILE).write_text(manifest[: len(manifest) // 2])
    with pytest.raises(BundleError, match="manifest.json is not valid JSON"):
        load_bundle(path)


def _rewrite_manifest(path, edit):
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    (path / MANIFEST_FILE).write_text(json.dumps(edit(manifest)))


def test_newer_older_and_foreign_formats_are_refused(bundle, tmp_path):
    path, _, _ = bundle
    original = (path / MANIFEST_FILE).read_text()
    _rewrite_manifest(path, lambda m: {**m, "format_version": FORMAT_VERSION + 1, "package_version": "9.0"})
    with pytest.raises(BundleError, match=r"format_version 3, newer.*upgrade normdiff-bids"):
        load_bundle(path)
    (path / MANIFEST_FILE).write_text(original)
    _rewrite_manifest(path, lambda m: {**m, "format_version": 1})
    with pytest.raises(BundleError, match="older than this normdiff-bids"):
        load_bundle(path)
    _rewrite_manifest(path, lambda m: {"framework": "sklearn"})
    with pytest.raises(BundleError, match="not a normdiff-bids model manifest"):
        load_bundle(path)
    (path / MANIFEST_FILE).write_text(original)
    _rewrite_manifest(path, lambda m: {**m, "files": {"model.json": m["files"]["model.json"]}})
    with pytest.raises(BundleError, match="does not list the sha256"):
        load_bundle(path)


def test_a_format_1_bundle_without_manifest_names_its_version(bundle):
    path, _, _ = bundle
    meta = json.loads((path / "model.json").read_text())
    (path / "model.json").write_text(json.dumps({**meta, "format_version": 1}))
    (path / MANIFEST_FILE).unlink()
    with pytest.raises(BundleError, match=r"format version 1, written by an older normdiff-bids.*re-create"):
        load_bundle(path)


def test_files_of_another_model_mixed_in_are_refused(bundle, tmp_path):
    """A manifest that matches foreign files (e.g. rewritten by hand) still needs our model.json."""
    path, _, _ = bundle
    (path / "model.json").write_text(json.dumps({"framework": "sklearn"}))
    data = (path / "model.json").read_bytes()
    _rewrite_manifest(path, lambda m: {**m, "files": {**m["files"], "model.json": {
        "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}}})
    with pytest.raises(BundleError, match="mixes files of different models"):
        load_bundle(path)


def test_incomplete_bundles_are_refused(bundle, tmp_path):
    path, _, _ = bundle
    (path / "model.safetensors").unlink()
    with pytest.raises(BundleError, match="model.safetensors is missing"):
        load_bundle(path)
    (path / MANIFEST_FILE).unlink()
    with pytest.raises(BundleError, match="manifest.json is missing"):
        load_bundle(path)
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BundleError, match="not a normdiff-bids model"):
        load_bundle(empty)


# -- a real model: its parameters pass the estimator's checks on load ------------------------------

@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from normdiff_bids import NormativeDiffusion
    from normdiff_bids.data.synthetic import SyntheticCohort

    train = SyntheticCohort(n_idps=2, n_sites=2, seed=0).sample(120, seed=1)
    model = NormativeDiffusion(seed=0, epochs=2, n_samples=20, steps=4, verbose=False,
                               backbone_config={"hidden": 16, "n_blocks": 1}).fit(train)
    return model.save(tmp_path_factory.mktemp("bundle") / "model")


def _edit_params(src, dest, drop=(), **params):
    """A copy of bundle ``src`` whose params are edited (``drop``: top-level entries of model.json left
    out) and whose manifest is brought up to date."""
    import shutil

    shutil.copytree(src, dest)
    meta = json.loads((dest / "model.json").read_text())
    meta["params"].update(params)
    for key in drop:
        meta.pop(key)
    data = (json.dumps(meta, indent=2) + "\n").encode()
    (dest / "model.json").write_bytes(data)
    _rewrite_manifest(dest, lambda m: {**m, "files": {**m["files"], "model.json": {
        "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}}})
    return dest


@pytest.mark.parametrize(("params", "culprit"), [
    ({"n_samples": 5}, "n_samples=5"),
    ({"sampler": "euler-maruyama"}, "sampler='euler-maruyama'"),
    ({"unknown_site": "guess"}, "unknown_site='guess'"),
    ({"backbone": "resnet"}, "backbone='resnet'"),
    ({"learning_rate_typo": 1}, "learning_rate_typo"),
    ({"joint_shrinkage": 2}, "joint_shrinkage=2"),
])
def test_invalid_parameters_in_model_json_are_refused_by_the_estimator_checks(saved_model, tmp_path,
                                                                              params, culprit):
    from normdiff_bids import load_model

    load_model(saved_model)  # the original loads
    edited = _edit_params(saved_model, tmp_path / "edited", **params)
    with pytest.raises(BundleError) as error:
        load_model(edited)
    message = str(error.value)
    assert "model.json" in message and culprit in message and "re-create" in message


def test_a_bundle_of_another_estimator_is_refused(saved_model, tmp_path):
    import shutil

    from normdiff_bids import load_model

    dest = tmp_path / "other"
    shutil.copytree(saved_model, dest)
    meta = json.loads((dest / "model.json").read_text())
    data = json.dumps({**meta, "estimator": "GaussianProcess"}).encode()
    (dest / "model.json").write_bytes(data)
    _rewrite_manifest(dest, lambda m: {**m, "files": {**m["files"], "model.json": {
        "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}}})
    with pytest.raises(BundleError, match="'GaussianProcess', not a NormativeDiffusion"):
        load_model(dest)


def test_bundle_error_is_a_user_facing_value_error():
    assert issubclass(BundleError, ValueError) and issubclass(BundleError, NormdiffError)


def test_reserved_meta_keys_are_refused(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        save_bundle(tmp_path / "m", {"w": torch.zeros(1)}, {"format": "mine"})
    assert not (tmp_path / "m").exists()


def test_the_model_card_is_read_without_rebuilding_the_model(saved_model):
    from normdiff_bids.model.persistence import load_model, read_model_card

    assert read_model_card(saved_model) == load_model(saved_model).model_card()



def test_a_bundle_from_before_the_joint_shrinkage_floor_scores_without_one(saved_model, tmp_path):
    from normdiff_bids import load_model
    from normdiff_bids.scoring.joint import model_shrinkage

    model = load_model(saved_model)
    assert model.joint_shrinkage_ == model_shrinkage(2, model.n_train_) > 0
    assert model.model_card()["joint_deviation"]["covariance_shrinkage_floor"] == model.joint_shrinkage_
    # its joint map was learnt without a floor, so it must go on scoring without one
    old = load_model(_edit_params(saved_model, tmp_path / "old", drop=("joint_shrinkage",)))
    assert old.joint_shrinkage_ == 0.0
