"""Fixtures shared by several test modules."""

import subprocess

import pytest


@pytest.fixture
def small_file_system(tmp_path):
    """A 9 MiB tmpfs, where a run or a conversion finds no room (mounting needs root, as CI runs): its mount point."""
    mount = tmp_path / "small"
    mount.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=9m", "tmpfs", str(mount)],
                                 capture_output=True).returncode == 0
    except FileNotFoundError:  # no mount command
        mounted = False
    if not mounted:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN) and the mount command")
    yield mount.resolve()
    subprocess.run(["umount", "--lazy", str(mount)], check=True)
