"""``streamer transcribe -o PATH``: atomic for regular files, in place for devices and FIFOs."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamer.errors import StreamerError
from streamer.service.output_file import output_file


@pytest.fixture
def umask() -> Iterator[None]:
    """Restore the process umask after a test that sets it."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.usefixtures("umask")
@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_file_gets_the_umask_default(tmp_path: Path, mask: int, expected: int) -> None:
    os.umask(mask)
    out = tmp_path / "out.jsonl"
    with output_file(out) as f:
        f.write("héllo\n")
    assert out.read_text(encoding="utf-8") == "héllo\n"
    assert mode(out) == expected  # 0666 & ~umask, not mkstemp's 0600
    assert leftovers(tmp_path) == []


@pytest.mark.usefixtures("umask")
@pytest.mark.parametrize("old_mode", [0o644, 0o640, 0o604])
def test_existing_file_keeps_its_mode(tmp_path: Path, old_mode: int) -> None:
    os.umask(0o077)  # the umask plays no part for an existing file
    out = tmp_path / "out.srt"
    out.write_text("old\n")
    out.chmod(old_mode)
    inode = out.stat().st_ino
    with output_file(out) as f:
        f.write("new\n")
    assert out.read_text() == "new\n"
    assert mode(out) == old_mode
    assert out.stat().st_ino != inode  # replaced by rename, not rewritten in place
    assert leftovers(tmp_path) == []


def test_failed_run_leaves_an_existing_file_untouched(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    out.write_text("keep me\n")
    with pytest.raises(RuntimeError, match="model failed"), output_file(out) as f:
        f.write("partial output")
        raise RuntimeError("model failed")
    assert out.read_text() == "keep me\n"
    assert leftovers(tmp_path) == []


def test_failed_run_creates_no_new_file(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    with pytest.raises(RuntimeError), output_file(out):
        raise RuntimeError("bad audio")
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_symlink_target_is_written_and_the_link_stays(tmp_path: Path) -> None:
    real = tmp_path / "data" / "captions.txt"
    real.parent.mkdir()
    real.write_text("old\n")
    real.chmod(0o640)
    link = tmp_path / "latest.txt"
    link.symlink_to(Path("data") / "captions.txt")  # relative, as `ln -s` often makes them
    with output_file(link) as f:
        f.write("new\n")
    assert link.is_symlink()
    assert os.readlink(link) == os.path.join("data", "captions.txt")
    assert real.read_text() == "new\n"
    assert mode(real) == 0o640
    assert leftovers(tmp_path) == [] and leftovers(real.parent) == []


def test_dangling_symlink_creates_its_target(tmp_path: Path) -> None:
    link = tmp_path / "out.txt"
    link.symlink_to(tmp_path / "target.txt")
    with output_file(link) as f:
        f.write("x\n")
    assert link.is_symlink()
    assert (tmp_path / "target.txt").read_text() == "x\n"


def test_failed_run_through_a_symlink_leaves_the_target(tmp_path: Path) -> None:
    real = tmp_path / "real.txt"
    real.write_text("keep\n")
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    with pytest.raises(RuntimeError), output_file(link) as f:
        f.write("partial")
        raise RuntimeError("boom")
    assert link.is_symlink() and real.read_text() == "keep\n"
    assert leftovers(tmp_path) == []


def test_fifo_is_written_in_place(tmp_path: Path) -> None:
    fifo = tmp_path / "captions.fifo"
    os.mkfifo(fifo)
    received: list[bytes] = []

    def read() -> None:
        with open(fifo, "rb") as r:
            received.append(r.read())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    with output_file(fifo) as f:
        f.write("line 1\nline 2\n")
    reader.join(timeout=10)
    assert not reader.is_alive()
    assert received == [b"line 1\nline 2\n"]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert leftovers(tmp_path) == []


def test_dev_null_stays_a_character_device() -> None:
    with output_file("/dev/null") as f:
        f.write("discarded\n")
    st = os.lstat("/dev/null")
    assert stat.S_ISCHR(st.st_mode)
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)
    assert leftovers(Path("/dev")) == []


def test_character_device_node_is_not_replaced(tmp_path: Path) -> None:
    """The same on a private copy of /dev/null's node (needs CAP_MKNOD, i.e. root)."""
    node = tmp_path / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("mknod needs CAP_MKNOD")
    with output_file(node) as f:
        f.write("discarded\n")
    assert stat.S_ISCHR(os.lstat(node).st_mode)
    assert leftovers(tmp_path) == []


def test_symlink_to_a_device_writes_the_device(tmp_path: Path) -> None:
    link = tmp_path / "sink"
    link.symlink_to("/dev/null")
    with output_file(link) as f:
        f.write("discarded\n")
    assert link.is_symlink() and stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_dash_is_stdout(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with output_file("-") as f:
        f.write("to stdout\n")
    assert capsys.readouterr().out == "to stdout\n"
    assert not (tmp_path / "-").exists() and not Path("-").exists()


def test_folder_is_refused(tmp_path: Path) -> None:
    with (
        pytest.raises(StreamerError, match=f"cannot write {tmp_path}: it is a folder"),
        output_file(tmp_path),
    ):
        pass


def test_missing_folder_names_the_path(tmp_path: Path) -> None:
    out = tmp_path / "no-such-folder" / "out.txt"
    with (
        pytest.raises(StreamerError, match=r"cannot write .*out\.txt: No such file"),
        output_file(out),
    ):
        pass
