"""slattn.checkpoint: lossless round trips through both files, warnings for missing
state and changed settings, atomic replacement, and no code run from a crafted file."""

from __future__ import annotations

import io
import os
import pickle
import stat

import pytest
import safetensors.torch
import torch

from slattn import checkpoint
from slattn.checkpoint import FORMAT_VERSION, SAFETENSORS_FILE, STATE_FILE, atomic_write, load_state, save_state

SETTINGS = {"topk": 0.2, "feature_map": "softmax", "blkq": 64, "share": "layer"}


def make_state(rng) -> dict[str, dict[str, torch.Tensor]]:
    wide = torch.randn(8, 6, generator=rng)
    return {
        "blocks.0.attn1": {"proj_l.weight": torch.randn(4, 4, generator=rng),
                           "proj_l.bias": torch.randn(4, generator=rng)},
        # Views of one storage: transposed, strided, and a contiguous row.
        "blocks.1.attn1": {"proj_l.weight": wide.t(), "proj_l.bias": wide[::2, 1], "row": wide[3]},
        "128:torch.bfloat16": {"scale": torch.tensor(0.5), "empty": torch.zeros(0, 3)},
    }


def assert_same_state(loaded, expected):
    assert loaded.keys() == expected.keys()
    for key, params in expected.items():
        assert loaded[key].keys() == params.keys()
        for name, t in params.items():
            got = loaded[key][name]
            assert got.device.type == "cpu" and got.dtype == t.dtype and got.shape == t.shape, (key, name)
            assert torch.equal(got, t), (key, name)


def test_round_trip_from_pt(tmp_path, rng):
    state = make_state(rng)
    save_state(tmp_path / "ckpt", SETTINGS, state)
    assert sorted(os.listdir(tmp_path / "ckpt")) == sorted([STATE_FILE, SAFETENSORS_FILE])
    assert_same_state(load_state(tmp_path / "ckpt", SETTINGS), state)


def test_round_trip_from_safetensors(tmp_path, rng):
    state = make_state(rng)
    save_state(tmp_path, SETTINGS, state)
    # Poisoning the .pt proves which file the first load reads; deleting it, that the fallback is complete.
    torch.save({"settings": SETTINGS, "state": {"other": {"w": torch.ones(1)}}, "version": FORMAT_VERSION},
               tmp_path / STATE_FILE)
    assert list(load_state(tmp_path)) == ["other"]
    os.remove(tmp_path / STATE_FILE)
    assert_same_state(load_state(tmp_path, SETTINGS), state)


def test_safetensors_file_layout(tmp_path, rng):
    state = make_state(rng)
    save_state(tmp_path, SETTINGS, state)
    flat = safetensors.torch.load_file(tmp_path / SAFETENSORS_FILE)
    assert set(flat) == {f"{key}::{name}" for key, params in state.items() for name in params}
    with safetensors.safe_open(tmp_path / SAFETENSORS_FILE, framework="pt") as f:
        assert f.metadata() == {"settings": '{"topk": 0.2, "feature_map": "softmax", "blkq": 64, "share": "layer"}',
                                "version": "1"}


def test_pt_holds_compact_copies(tmp_path, rng):
    state = make_state(rng)
    save_state(tmp_path, SETTINGS, state)
    payload = torch.load(tmp_path / STATE_FILE, weights_only=True)
    assert payload["version"] == 1 and payload["settings"] == SETTINGS
    # A saved view would carry the whole 8x6 storage it was sliced from.
    for key, params in payload["state"].items():
        for name, t in params.items():
            assert t.is_contiguous() and t.untyped_storage().nbytes() == t.element_size() * t.numel(), (key, name)


def test_save_replaces_previous_state(tmp_path, rng):
    save_state(tmp_path, SETTINGS, make_state(rng))
    newer = {"a": {"w": torch.arange(3.0)}}
    save_state(tmp_path, SETTINGS, newer)
    assert_same_state(load_state(tmp_path), newer)
    os.remove(tmp_path / STATE_FILE)
    assert_same_state(load_state(tmp_path), newer)


@pytest.mark.parametrize("drop_pt", [False, True], ids=["pt", "safetensors"])
def test_settings_mismatch_warns_naming_each_key(tmp_path, rng, drop_pt):
    state = make_state(rng)
    save_state(tmp_path, {**SETTINGS, "blocks": (64, 64)}, state)
    if drop_pt:
        os.remove(tmp_path / STATE_FILE)
    expected = {"topk": 0.1, "feature_map": "softmax", "blkq": 128, "blocks": (64, 64), "use_bf16": True}
    with pytest.warns(UserWarning, match="different SLA settings") as record:
        loaded = load_state(tmp_path, expected)
    assert len(record) == 1
    message = str(record[0].message)
    assert "topk: saved 0.2, expected 0.1" in message
    assert "blkq: saved 64, expected 128" in message
    assert "share: saved 'layer', expected <absent>" in message
    assert "use_bf16: saved <absent>, expected True" in message
    # Equal values, and a tuple against its JSON list form, are not reported.
    assert "feature_map" not in message and "blocks" not in message
    assert_same_state(loaded, state)


def test_matching_settings_do_not_warn(tmp_path, rng, recwarn):
    save_state(tmp_path, SETTINGS, make_state(rng))
    assert load_state(tmp_path, dict(SETTINGS)) is not None
    assert load_state(tmp_path) is not None
    assert len(recwarn) == 0


@pytest.mark.parametrize("subdir", ["missing", "."], ids=["missing-directory", "empty-directory"])
def test_missing_state_warns_and_returns_none(tmp_path, subdir):
    with pytest.warns(UserWarning, match="fresh weights"):
        assert load_state(tmp_path / subdir, SETTINGS) is None


def _make_marker(path):
    with open(path, "w") as f:
        f.write("code ran")


class Payload:
    """Unpickling this calls _make_marker: a stand-in for arbitrary code in a crafted checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return _make_marker, (self.marker,)


# A zipped torch checkpoint and a bare pickle, each with the reader that would run its payload.
CRAFTED_FORMATS = {
    "torch.save": (torch.save, lambda f: torch.load(f, weights_only=False)),
    "pickle.dump": (lambda obj, f: pickle.dump(obj, f, protocol=2), pickle.load),
}


@pytest.mark.parametrize("form", list(CRAFTED_FORMATS))
def test_crafted_pickle_is_refused_and_not_run(tmp_path, form):
    write, unsafe_read = CRAFTED_FORMATS[form]
    marker = tmp_path / "marker"
    crafted = {"settings": {}, "state": {"layer": {"w": Payload(marker)}}, "version": FORMAT_VERSION}
    with open(tmp_path / STATE_FILE, "wb") as f:
        write(crafted, f)
    # A valid safetensors file beside it must not be used as a way around the refusal.
    save_state(tmp_path / "good", SETTINGS, {"a": {"w": torch.ones(1)}})
    os.replace(tmp_path / "good" / SAFETENSORS_FILE, tmp_path / SAFETENSORS_FILE)
    with pytest.raises(ValueError, match=f"{STATE_FILE}: refused"):
        load_state(tmp_path)
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it.
    with open(tmp_path / STATE_FILE, "rb") as f:
        unsafe_read(f)
    assert marker.read_text() == "code ran"


@pytest.mark.parametrize("payload, message", [
    ({"settings": {}, "state": {}, "version": 2}, "format version 2"),
    ({"settings": {}, "state": {}, "version": True}, "format version True"),
    ({"settings": {}, "state": {}}, "expected a dict with keys"),
    ({"settings": {}, "state": {}, "version": 1, "extra": 0}, "expected a dict with keys"),
    ([1, 2], "expected a dict with keys .* got list"),
    ({"settings": [], "state": {}, "version": 1}, "'settings' must be a dict"),
    ({"settings": {}, "state": [], "version": 1}, "'state' must be a dict"),
    ({"settings": {}, "state": {"a": torch.ones(1)}, "version": 1}, r"\['a'\] must be a non-empty dict"),
    ({"settings": {}, "state": {"a": {}}, "version": 1}, r"\['a'\] must be a non-empty dict"),
    ({"settings": {}, "state": {"a": {"w": [1.0]}}, "version": 1}, r"\['a'\]\['w'\] must be a tensor.*got list"),
    ({"settings": {}, "state": {1: {"w": torch.ones(1)}}, "version": 1}, "layer key 1 must be a string"),
])
def test_malformed_pt_refused(tmp_path, payload, message):
    torch.save(payload, tmp_path / STATE_FILE)
    with pytest.raises(ValueError, match=message):
        load_state(tmp_path)


@pytest.mark.parametrize("data", [b"", b"not a checkpoint", "truncated"])
def test_corrupt_pt_refused(tmp_path, data):
    if data == "truncated":
        buffer = io.BytesIO()
        torch.save({"settings": {}, "state": {"a": {"w": torch.ones(64)}}, "version": 1}, buffer)
        data = buffer.getvalue()[:-40]
    (tmp_path / STATE_FILE).write_bytes(data)
    with pytest.raises(ValueError, match=STATE_FILE):
        load_state(tmp_path)


@pytest.mark.parametrize("tensors, metadata, message", [
    ({"a::w": torch.ones(1)}, {"settings": "{}", "version": "2"}, "format version '2'"),
    ({"a::w": torch.ones(1)}, None, "format version None"),
    ({"a::w": torch.ones(1)}, {"version": "1"}, "'settings' is missing or not JSON"),
    ({"a::w": torch.ones(1)}, {"settings": "{", "version": "1"}, "'settings' is missing or not JSON"),
    ({"a::w": torch.ones(1)}, {"settings": "[]", "version": "1"}, "'settings' must hold a dict"),
    ({"a.w": torch.ones(1)}, {"settings": "{}", "version": "1"}, "tensor name 'a.w'"),
])
def test_malformed_safetensors_refused(tmp_path, tensors, metadata, message):
    safetensors.torch.save_file(tensors, tmp_path / SAFETENSORS_FILE, metadata=metadata)
    with pytest.raises(ValueError, match=message):
        load_state(tmp_path)


def test_corrupt_safetensors_refused(tmp_path):
    (tmp_path / SAFETENSORS_FILE).write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_state(tmp_path)


@pytest.mark.parametrize("settings, state, message", [
    (SETTINGS, {"a::b": {"w": torch.ones(1)}}, "without '::'"),
    (SETTINGS, {"a": {}}, "non-empty dict"),
    (SETTINGS, {"a": {"w": 1.0}}, "must be a tensor"),
    ({"f": object()}, {"a": {"w": torch.ones(1)}}, "JSON-serialisable"),
    ([("topk", 0.2)], {"a": {"w": torch.ones(1)}}, "settings must be a dict"),
])
def test_bad_save_refused_before_writing(tmp_path, settings, state, message):
    with pytest.raises(ValueError, match=message):
        save_state(tmp_path / "ckpt", settings, state)
    assert not (tmp_path / "ckpt").exists()


def test_atomic_write_replaces(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"old")
    atomic_write(path, lambda f: f.write(b"new contents"))
    assert path.read_bytes() == b"new contents"
    assert os.listdir(tmp_path) == ["file.bin"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_atomic_write_uses_the_umask(tmp_path):
    umask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "file.bin", lambda f: f.write(b"x"))
    finally:
        os.umask(umask)
    assert (tmp_path / "file.bin").stat().st_mode & 0o777 == 0o644


@pytest.mark.skipif(os.name != "posix", reason="directories can be opened and synced on POSIX")
def test_atomic_write_syncs_file_and_directory(tmp_path, monkeypatch):
    synced = []
    fsync = os.fsync

    def recording_fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        fsync(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", recording_fsync)
    atomic_write(tmp_path / "file.bin", lambda f: f.write(b"x"))
    assert synced == [False, True]


class Interrupted(Exception):
    pass


def _fail_midway(f):
    f.write(b"partial new contents")
    raise Interrupted


def test_interrupted_write_keeps_previous_file(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"previous")
    with pytest.raises(Interrupted):
        atomic_write(path, _fail_midway)
    assert path.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["file.bin"]


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, rng, monkeypatch):
    save_state(tmp_path, SETTINGS, make_state(rng))
    before = {name: (tmp_path / name).read_bytes() for name in (STATE_FILE, SAFETENSORS_FILE)}

    def failing_replace(src, dst):
        raise Interrupted

    monkeypatch.setattr(checkpoint.os, "replace", failing_replace)
    with pytest.raises(Interrupted):
        save_state(tmp_path, {"topk": 0.5}, {"a": {"w": torch.ones(2)}})
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == sorted(before)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
