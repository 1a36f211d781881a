"""The one atomic-write helper: a reader sees the old file or the new one, never a mix."""

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stresswatch.fsio import atomic_write, atomic_writer


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path):
    target = tmp_path / "accounts.json"
    atomic_write(target, "old\n")
    with pytest.raises(RuntimeError), atomic_writer(target) as fh:
        fh.write("half of the new")
        raise RuntimeError("disk full, say")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accounts.json"]


def test_files_are_private_unless_asked(tmp_path: Path):
    old = os.umask(0)
    try:
        atomic_write(tmp_path / "secret", "x")
        atomic_write(tmp_path / "public.conf", "x", mode=0o644)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "public.conf").stat().st_mode) == 0o644


@settings(max_examples=50, deadline=None)
@given(st.one_of(st.text(), st.binary()))
def test_what_is_written_is_what_is_read(tmp_path_factory, data):
    target = tmp_path_factory.mktemp("w") / "sub" / "f"
    atomic_write(target, data)
    got = target.read_bytes()
    assert got == (data if isinstance(data, bytes) else data.encode("utf-8"))
