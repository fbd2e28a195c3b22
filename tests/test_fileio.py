"""Atomic writes: the old content or the whole new one, with the mode a plain write gives."""

import os
import stat

import pytest

from libra_tok.fileio import atomic_path, atomic_write_text, current_umask


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_files_get_the_mode_of_a_plain_write(tmp_path):
    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        atomic_write_text(tmp_path / "report.json", "{}")
        (tmp_path / "plain.json").write_text("{}")
    finally:
        os.umask(old)
    assert mode(tmp_path / "report.json") == mode(tmp_path / "plain.json") == 0o640


def test_a_replaced_file_keeps_its_mode(tmp_path):
    target = tmp_path / "kept.txt"
    target.write_text("old")
    os.chmod(target, 0o604)
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and mode(target) == 0o604


def test_a_failed_write_leaves_the_old_content_and_no_temporary(tmp_path):
    target = tmp_path / "data.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt"]
