"""Persistence of per-layer SLA state next to a trainer's checkpoint.

Two files hold the same tensors: ``sla_attention.pt`` (what SimpleTuner-style
trainers look for) and ``sla_attention.safetensors`` (readable without pickle by
any tool). Both are read without executing code: the .pt only through
``torch.load(weights_only=True)``, never falling back to unsafe loading. Each
file is replaced atomically, so a crash mid-save leaves the previous checkpoint.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import secrets
import warnings
from typing import BinaryIO, Callable

import safetensors
import safetensors.torch
import torch

STATE_FILE = "sla_attention.pt"
SAFETENSORS_FILE = "sla_attention.safetensors"
FORMAT_VERSION = 1

# Joins a layer key and a parameter name into one safetensors tensor name.
_SEPARATOR = "::"

State = dict[str, dict[str, torch.Tensor]]


def atomic_write(path, write: Callable[[BinaryIO], None]) -> None:
    """Writes `path` through `write(file)` so that readers see the old file or the new one, never a mix."""
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    # The temporary file lives in the target's directory so that os.replace is a rename within one
    # file system. It is opened with os.open rather than tempfile.mkstemp so that the umask, not
    # mkstemp's 0600, sets the final file's permissions, as for any other checkpoint file.
    temporary = os.path.join(directory, f".{name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.remove(temporary)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    # Makes the rename itself durable. Windows cannot open a directory, so it is skipped there.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_state(directory, settings: dict, state: State) -> None:
    """Writes `state` (layer key -> parameter name -> tensor) and `settings` to both files in `directory`."""
    _check_state(state, "state")
    if not isinstance(settings, dict):
        raise ValueError(f"settings must be a dict, got {type(settings).__name__}")
    try:
        settings_json = json.dumps(settings)
    except (TypeError, ValueError) as e:
        raise ValueError(f"settings must be JSON-serialisable (the safetensors file stores them as JSON): {e}"
                         ) from None
    # Both files hold the JSON form of the settings, so a comparison on load gives the same answer
    # whichever file is read (a tuple would otherwise come back as a list from one of them only).
    settings = json.loads(settings_json)
    # Contiguous CPU copies: safetensors needs them, and torch.save would otherwise write the whole
    # storage behind a view, or a device tensor that a CPU-only machine must map.
    tensors = {key: {param: t.detach().to("cpu").clone(memory_format=torch.contiguous_format)
                     for param, t in params.items()} for key, params in state.items()}
    # Both files are serialised before either is written, so a tensor that one format cannot hold
    # fails the save without touching the directory.
    buffer = io.BytesIO()
    torch.save({"settings": settings, "state": tensors, "version": FORMAT_VERSION}, buffer)
    flat = {f"{key}{_SEPARATOR}{param}": t for key, params in tensors.items() for param, t in params.items()}
    safetensors_bytes = safetensors.torch.save(flat, metadata={"settings": settings_json,
                                                               "version": str(FORMAT_VERSION)})
    os.makedirs(directory, exist_ok=True)
    # The preferred .pt goes last: once it is new, the safetensors file is new too.
    atomic_write(os.path.join(directory, SAFETENSORS_FILE), lambda f: f.write(safetensors_bytes))
    atomic_write(os.path.join(directory, STATE_FILE), lambda f: f.write(buffer.getvalue()))


def load_state(directory, expected_settings: dict | None = None) -> State | None:
    """The state saved in `directory`, from sla_attention.pt or else sla_attention.safetensors.

    Returns None, with a warning, when neither exists. Raises ValueError for a file that is corrupt,
    malformed or holds pickled code. Warns, naming each key, when the saved settings differ from
    `expected_settings`; the state is returned all the same.
    """
    pt_path = os.path.join(directory, STATE_FILE)
    st_path = os.path.join(directory, SAFETENSORS_FILE)
    if os.path.isfile(pt_path):
        path = pt_path
        settings, state = _load_pt(pt_path)
    elif os.path.isfile(st_path):
        path = st_path
        settings, state = _load_safetensors(st_path)
    else:
        warnings.warn(f"no SLA attention state in {os.fspath(directory)!r} (neither {STATE_FILE} nor "
                      f"{SAFETENSORS_FILE}); the SLA layers start from fresh weights", stacklevel=2)
        return None
    if expected_settings is not None:
        _warn_on_mismatch(path, settings, json.loads(json.dumps(expected_settings)))
    return state


def _load_pt(path: str) -> tuple[dict, State]:
    try:
        payload = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused by torch.load(weights_only=True), which loads only tensors and "
                         f"plain containers (the file is corrupt or holds pickled code, which was not run): {e}"
                         ) from None
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"{path}: not a readable torch checkpoint (truncated or corrupt): {e}") from None
    if not isinstance(payload, dict) or set(payload) != {"settings", "state", "version"}:
        found = sorted(map(repr, payload)) if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path}: expected a dict with keys 'settings', 'state' and 'version', got {found}")
    version = payload["version"]
    if isinstance(version, bool) or version != FORMAT_VERSION:
        raise ValueError(f"{path}: format version {version!r} is not supported (this slattn reads version "
                         f"{FORMAT_VERSION})")
    if not isinstance(payload["settings"], dict):
        raise ValueError(f"{path}: 'settings' must be a dict, got {type(payload['settings']).__name__}")
    _check_state(payload["state"], f"{path}: 'state'")
    return payload["settings"], payload["state"]


def _load_safetensors(path: str) -> tuple[dict, State]:
    try:
        with safetensors.safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            flat = {name: f.get_tensor(name) for name in f.keys()}
    except safetensors.SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file: {e}") from None
    if metadata.get("version") != str(FORMAT_VERSION):
        raise ValueError(f"{path}: format version {metadata.get('version')!r} is not supported (this slattn "
                         f"reads version {FORMAT_VERSION})")
    try:
        settings = json.loads(metadata["settings"])
    except (KeyError, ValueError):
        raise ValueError(f"{path}: metadata 'settings' is missing or not JSON") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: metadata 'settings' must hold a dict, got {type(settings).__name__}")
    state: State = {}
    for name, tensor in flat.items():
        key, sep, param = name.partition(_SEPARATOR)
        if not sep:
            raise ValueError(f"{path}: tensor name {name!r} is not of the form '<layer key>::<parameter>'")
        state.setdefault(key, {})[param] = tensor
    return settings, state


def _check_state(state, what: str) -> None:
    if not isinstance(state, dict):
        raise ValueError(f"{what} must be a dict of layer key -> dict of tensors, got {type(state).__name__}")
    for key, params in state.items():
        if not isinstance(key, str) or _SEPARATOR in key:
            raise ValueError(f"{what}: layer key {key!r} must be a string without {_SEPARATOR!r}")
        # An empty layer would vanish from the safetensors file, which stores tensors only.
        if not isinstance(params, dict) or not params:
            raise ValueError(f"{what}[{key!r}] must be a non-empty dict of parameter name -> tensor, "
                             f"got {params!r}")
        for param, t in params.items():
            if not isinstance(param, str) or not isinstance(t, torch.Tensor):
                raise ValueError(f"{what}[{key!r}][{param!r}] must be a tensor under a string name, "
                                 f"got {type(t).__name__}")


def _warn_on_mismatch(path: str, saved: dict, expected: dict) -> None:
    def show(settings: dict, key) -> str:
        return repr(settings[key]) if key in settings else "<absent>"

    differing = [f"{key}: saved {show(saved, key)}, expected {show(expected, key)}"
                 for key in sorted(set(saved) | set(expected), key=str)
                 if key not in saved or key not in expected or saved[key] != expected[key]]
    if differing:
        warnings.warn(f"{path} was saved with different SLA settings (its state is loaded anyway): "
                      + "; ".join(differing), stacklevel=3)
