"""Checkpoints: never run code, never advise weights_only=False, verify CRCs and finiteness, atomic and umask-moded."""

import errno
import os
import zipfile

import pytest
import torch

from common.errors import CheckpointError, StorageError
from common.io import atomic_write_bytes, atomic_write_text
from engine.checkpoint import load_checkpoint, save_checkpoint


def _state(**extra):
    return {"model": {"w": torch.ones(3, 2), "bn.running_var": torch.ones(2)}, "config": {"method": "ce"}, **extra}


def test_round_trip(tmp_path):
    save_checkpoint(tmp_path / "a.pt", _state())
    assert torch.equal(load_checkpoint(tmp_path / "a.pt")["model"]["w"], torch.ones(3, 2))


def test_pickle_payload_never_runs_and_no_unsafe_advice(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format": 1, "model": Payload(), "config": {}}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    message = str(info.value)
    assert "weights_only" not in message and "False" not in message and "\n" not in message
    assert "system" in message  # names what was refused


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_or_buffers_refused(tmp_path, value):
    state = _state()
    state["model"]["bn.running_var"][1] = value
    save_checkpoint(tmp_path / "a.pt", state)
    with pytest.raises(CheckpointError, match=r"non-finite values in 1 tensor\(s\), e.g. bn.running_var"):
        load_checkpoint(tmp_path / "a.pt")


def test_flipped_byte_is_a_crc_error(tmp_path):
    path = tmp_path / "a.pt"
    save_checkpoint(path, {**_state(), "model": {"w": torch.arange(4096, dtype=torch.float32)}})
    with zipfile.ZipFile(path) as z:  # flip one byte inside the tensor storage
        info = next(i for i in z.infolist() if "/data/" in i.filename)
    raw = bytearray(path.read_bytes())
    offset = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 100
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(path)


def test_missing_config_is_a_clear_error(tmp_path):
    torch.save({"format": 1, "model": {"w": torch.ones(1)}}, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match="no saved 'config' entry"):
        load_checkpoint(tmp_path / "a.pt")


def test_files_get_the_users_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "metrics.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == 0o644


def test_read_only_folder_names_path_and_cause(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as a user that ignores folder permissions (root); ENOSPC test covers the path")
        with pytest.raises(StorageError, match=rf"cannot write {folder / 'x.txt'}: .*\(EACCES\)"):
            atomic_write_text(folder / "x.txt", "x")
    finally:
        folder.chmod(0o755)


def test_disk_full_names_path_and_enospc(tmp_path):
    def full(f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


    with pytest.raises(StorageError, match=r"cannot write .*last.pt: No space left on device \(ENOSPC\)"):
        atomic_write_bytes(tmp_path / "last.pt", full)
    assert list(tmp_path.iterdir()) == []  # the temp file is gone too
