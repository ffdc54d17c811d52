"""lorakit.files: output directories that are checked before use, one writer per directory, and writes that
are complete or absent, also on a full or read-only disk."""

import os
from pathlib import Path

import pytest

from conftest import fill, tmpfs
from lorakit.files import OutputError, OutputLock, check_output_dir, write_atomic, write_directory


def test_output_dir_refuses_files_links_and_loops(tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(OutputError, match="is a file, not a directory"):
        check_output_dir(tmp_path / "file")
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    with pytest.raises(OutputError, match="is a symlink to .*gone, which does not exist"):
        check_output_dir(tmp_path / "dangling")
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    with pytest.raises(OutputError, match="symlink loop"):
        check_output_dir(tmp_path / "loop")
    with pytest.raises(OutputError, match="Not a directory"):
        check_output_dir(tmp_path / "file" / "below")
    assert check_output_dir(tmp_path / "new" / "dir") == tmp_path / "new" / "dir"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    assert (tmp_path / "file").read_text() == "mine"


def test_output_dir_may_not_overlap_an_input(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for out, how in ((adapter, "is"), (adapter / "sub", "lies inside"), (tmp_path, "contains")):
        with pytest.raises(OutputError, match=f"{how} the --adapter"):
            check_output_dir(out, inputs={"--adapter": adapter})
    check_output_dir(tmp_path / "elsewhere", inputs={"--adapter": adapter})


def test_read_only_output_is_refused(tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=64k") as mount:
        for out in (mount, mount / "run"):
            with pytest.raises(OutputError, match="cannot be written"):
                check_output_dir(out)


def test_one_writer_per_directory(tmp_path):
    out = tmp_path / "run"
    with OutputLock(out):
        assert (out / ".lorakit.lock").read_text() == str(os.getpid())
        with pytest.raises(OutputError, match=rf"another lorakit train \(pid {os.getpid()}\) is writing to"):
            with OutputLock(out):
                pass
    assert not out.exists()  # created by the lock, nothing written: removed again
    out.mkdir()
    (out / "mine.txt").write_text("x")
    with OutputLock(out):
        pass
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]


def test_write_directory_new_replace_and_merge(tmp_path):
    target = tmp_path / "model"
    write_directory(target, lambda tmp: (tmp / "a").write_text("1"))
    umask = os.umask(0)
    os.umask(umask)
    assert (target / "a").read_text() == "1" and target.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    write_directory(target, lambda tmp: (tmp / "b").write_text("2"), replace=True)
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    write_directory(target, lambda tmp: (tmp / "c").write_text("3"))  # into an existing one: other files stay
    assert sorted(p.name for p in target.iterdir()) == ["b", "c"]

    def fails(tmp):
        (tmp / "half").write_text("x")
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match="No space left on device.*untouched"):
        write_directory(target, fails, replace=True)
    assert sorted(p.name for p in target.iterdir()) == ["b", "c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary directory left


def test_full_disk_is_an_error_and_keeps_the_old_file(small_disk):
    path = small_disk / "run.json"
    write_atomic(path, lambda tmp: Path(tmp).write_text("old"))
    fill(small_disk)
    with pytest.raises(OutputError, match=r"cannot write .*run.json: No space left on device"):
        write_atomic(path, lambda tmp: Path(tmp).write_text("new" * 100_000))
    assert path.read_text() == "old"
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "run.json"]
