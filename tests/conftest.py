"""Fixtures shared by several test modules."""

import subprocess

import pytest


@pytest.fixture
def small_file_system(tmp_path):
    """A 9 MiB tmpfs, where a run or a conversion finds no room (mounting needs root, as CI runs): its mount point."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=9m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
    yield mount.resolve()
    subprocess.run(["umount", "--lazy", str(mount)], check=True)

