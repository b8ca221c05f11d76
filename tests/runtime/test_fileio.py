"""sha256_file and atomic_write, the one copy of each that host and device share."""

from __future__ import annotations

import errno
import hashlib
import os

import pytest

from edgekit_runtime import fileio


@pytest.mark.parametrize("size", [0, 1, 1024 * 1024 - 1, 1024 * 1024, 1024 * 1024 + 1, 3 * 1024 * 1024 + 7])
def test_sha256_file_matches_hashlib_around_the_chunk_size(tmp_path, size):
    data = os.urandom(size)
    (tmp_path / "b.ekb").write_bytes(data)
    assert fileio.sha256_file(tmp_path / "b.ekb") == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("durable", [True, False])
def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path, durable):
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    fileio.atomic_write(target, b"new", durable=durable)
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["state.json"]
    fileio.atomic_write(tmp_path / "fresh.json", b"x")
    assert (tmp_path / "fresh.json").read_bytes() == b"x"


def test_a_failed_atomic_write_keeps_the_old_file_and_frees_the_temporary(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    target.write_bytes(b"old")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError) as err:
        fileio.atomic_write(target, b"new")
    assert err.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_directory_fsync_tolerates_filesystems_that_cannot_but_not_failing_storage(tmp_path, monkeypatch):
    def cannot(fd):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "fsync", cannot)
    fileio.fsync_dir(tmp_path)  # the rename happened; nothing more can be done there

    def failing(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError):
        fileio.fsync_dir(tmp_path)


def test_the_agent_and_the_host_use_this_copy():
    from edgekit.flash import rollout, server, ssh
    from edgekit_runtime.agent import fetch, state

    assert state.atomic_write is fileio.atomic_write and rollout.atomic_write is fileio.atomic_write
    assert fetch.sha256_file is fileio.sha256_file and server.sha256_file is fileio.sha256_file
    assert ssh.sha256_file is fileio.sha256_file
