"""Damaged weights never load: renamed or dropped tensors, flipped bytes, stale records."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from agent.modeling import RELOOK_TINY_DIR, load_policy
from agent.weights import WEIGHT_HASHES, verify_weight_hashes, write_weight_hashes


@pytest.fixture()
def model_dir(tiny_dir, tmp_path):
    """A private copy of the session's tiny model (build_tiny_model records its sha256)."""
    return shutil.copytree(tiny_dir, tmp_path / "model")


def _rename_tensor(folder, old_part: str, new_part: str) -> str:
    """Rewrite ``model.safetensors`` with one tensor's key renamed; returns the old key."""
    tensors = load_file(folder / "model.safetensors")
    key = next(k for k in tensors if old_part in k)
    tensors[key.replace(old_part, new_part)] = tensors.pop(key)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return key


def test_relook_written_folder_round_trips(tiny_dir, model_dir, tmp_path):
    record = json.loads((tiny_dir / WEIGHT_HASHES).read_text())
    assert list(record["files"]) == ["model.safetensors"]
    assert verify_weight_hashes(model_dir) is True
    policy = load_policy(model_dir)
    assert "lm_head.weight" in policy.model.state_dict()  # tied, not in the file, not "missing"
    policy.model.save_pretrained(tmp_path / "again")
    expected, again = (
        load_file(tiny_dir / "model.safetensors"),
        load_file(tmp_path / "again" / "model.safetensors"),
    )
    assert again.keys() == expected.keys() and "lm_head.weight" not in expected
    assert all(torch.equal(again[k], v) for k, v in expected.items())


def test_renamed_tensor_is_an_error_naming_it(model_dir):
    (model_dir / WEIGHT_HASHES).unlink()  # a folder from elsewhere: no record, still checked
    _rename_tensor(model_dir, "layers.0.mlp.", "layers.0.mlpx.")
    with pytest.raises(ValueError) as err:
        load_policy(model_dir)
    message = str(err.value)
    assert str(model_dir) in message
    assert "missing tensors ['model.language_model.layers.0.mlp.down_proj.weight']" in message
    assert "unexpected tensors ['model.language_model.layers.0.mlpx.down_proj.weight']" in message


def test_dropped_tensor_is_an_error(model_dir):
    (model_dir / WEIGHT_HASHES).unlink()
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors \['model.language_model.norm.weight'\]"):
        load_policy(model_dir)


def test_flipped_bytes_are_an_error_naming_the_file_and_hashes(model_dir):
    weights = model_dir / "model.safetensors"
    recorded = json.loads((model_dir / WEIGHT_HASHES).read_text())["files"][weights.name]
    data = bytearray(weights.read_bytes())
    data[-100:-90] = bytes(b ^ 0xFF for b in data[-100:-90])  # inside the last tensor's data
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError) as err:
        load_policy(model_dir)
    message = str(err.value)
    assert str(weights) in message and "damaged" in message
    assert recorded["sha256"] in message
    assert hashlib.sha256(weights.read_bytes()).hexdigest() in message
    # verify=False skips the hash (sizes match), and the damage then goes unseen: the opt-out
    load_policy(model_dir, verify=False)


def test_stale_or_cut_off_record_is_an_error(model_dir):
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(ValueError, match=r"model\.safetensors is \d+ bytes, .* records \d+"):
        load_policy(model_dir, verify=False)
    write_weight_hashes(model_dir)
    shutil.copyfile(weights, model_dir / "model-00001-of-00002.safetensors")
    with pytest.raises(ValueError, match=r"model-00001-of-00002\.safetensors.*not in"):
        verify_weight_hashes(model_dir)


@pytest.mark.skipif(not (RELOOK_TINY_DIR / "config.json").is_file(), reason="no models/relook-tiny")
def test_committed_model_records_the_model_card_sha256():
    card = (RELOOK_TINY_DIR / "README.md").read_text()
    record = json.loads((RELOOK_TINY_DIR / WEIGHT_HASHES).read_text())
    sha = record["files"]["model.safetensors"]["sha256"]
    assert f"`sha256sum <out>/model.safetensors` = `{sha}`" in card
    assert verify_weight_hashes(RELOOK_TINY_DIR) is True


def test_every_relook_writer_records_the_hashes(policy, tmp_path):
    from train.pretrain import _save_model

    _save_model(policy, tmp_path / "pretrain")
    assert verify_weight_hashes(tmp_path / "pretrain") is True
    load_policy(tmp_path / "pretrain")
    # a later save_pretrained without a new record is caught, not loaded as the old weights
    policy.model.lm_head.weight.data += 1.0
    policy.model.save_pretrained(tmp_path / "pretrain")
    with pytest.raises(ValueError, match=r"damaged: sha256"):
        load_policy(tmp_path / "pretrain")
