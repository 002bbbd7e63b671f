"""altdiff_min.storage.files: the one JSON reader, append-only logs with torn lines, writes that never follow a
final symbolic link, and temporary files told apart from a killed write's leftovers."""
import os
import subprocess
import sys

import pytest

from altdiff_min.storage import files
from altdiff_min.errors import BadFile

DEEP = "[" * 100_000


@pytest.mark.parametrize("text", [DEEP, "[" * 65 + "]" * 65, '{"a": ' * 70 + "1" + "}" * 70])
def test_deep_json_is_one_line(text, tmp_path):
    with pytest.raises(BadFile, match="nests JSON deeper than 64 levels"):
        files.parse_json(text, "x.json")
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(BadFile, match=r"config\.json nests JSON deeper"):
        files.read_json(tmp_path / "config.json")


def test_json_at_the_depth_bound_and_other_bad_json(tmp_path):
    assert files.json_depth(files.parse_json("[" * 64 + "]" * 64, "x")) == 64
    for text, message in (("{", "is not valid JSON"), ("1" * 5000, "is not valid JSON"), (b"\xff", "is not valid JSON")):
        with pytest.raises(BadFile, match=message):
            files.parse_json(text, "x")


def test_a_log_skips_torn_and_bad_lines(tmp_path):
    log = tmp_path / "manifest.jsonl"
    log.write_text('{"a": 1}\n' + DEEP + '\nnot json\n\n{"b": 2}\n' + "x" * (files.MAX_LINE_BYTES + 10) + '\n{"c": 3}\n{"d": ')
    rows, unread = files.read_log(log)
    assert rows == [(1, {"a": 1}), (5, {"b": 2}), (7, {"c": 3})]
    assert unread == [2, 3, 6, 8]
    assert files.read_log(tmp_path / "absent.jsonl") == ([], [])
    with pytest.raises(BadFile, match="not a regular file"):
        files.read_log(tmp_path)


def test_an_append_after_a_torn_line_stays_whole(tmp_path):
    log = tmp_path / "loss.jsonl"
    log.write_text('{"step": 1}\n{"st')
    files.append_line(str(log), '{"step": 2}')
    assert files.read_log(log) == ([(1, {"step": 1}), (3, {"step": 2})], [2])


@pytest.fixture
def link(tmp_path):
    """A symbolic link in the output folder pointing at a file the user cares about."""
    target = tmp_path / "precious.txt"
    target.write_text("keep\n")
    os.symlink(target, tmp_path / "out.jsonl")
    return tmp_path / "out.jsonl", target


def test_append_does_not_follow_a_link(link):
    path, target = link
    with pytest.raises(BadFile, match="out.jsonl is a symbolic link; altdiff-min does not write"):
        files.append_line(str(path), "{}")
    assert target.read_text() == "keep\n"
    dangling = path.parent / "dangling.jsonl"
    os.symlink(path.parent / "nowhere", dangling)
    with pytest.raises(BadFile, match="dangling.jsonl is a symbolic link"):
        files.append_line(str(dangling), "{}")
    assert not (path.parent / "nowhere").exists()


def test_atomic_write_does_not_replace_a_link_or_a_folder(link, tmp_path):
    path, target = link
    for destination, message in ((path, "is a symbolic link"), (tmp_path, "not a regular file")):
        with pytest.raises(BadFile, match=message):
            with files.atomic_file(str(destination)) as tmp:
                open(tmp, "w").write("new")
    assert os.path.islink(path) and target.read_text() == "keep\n"
    assert files.partial_files(str(tmp_path)) == []


def test_lock_file_is_not_followed(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep\n")
    os.symlink(target, tmp_path / ".model.lock")
    with pytest.raises(BadFile, match=r"\.model\.lock is a symbolic link"):
        with files.locked(str(tmp_path / "model")):
            pass
    assert target.read_text() == "keep\n"


KILLED_WRITER = """
import os, sys, signal
from altdiff_min.storage import files
def write(tmp):
    open(tmp, "w").write("half")
    os.kill(os.getpid(), signal.SIGKILL)
files.save_numbered(sys.argv[1], "{:05}.png", write)
"""


def test_a_killed_writers_partial_is_cleaned_and_a_living_ones_kept(tmp_path):
    subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], check=False)
    left = files.partial_files(str(tmp_path))
    assert len(left) == 1 and os.path.basename(left[0]).startswith(".new.png.partial-")
    living, fd = files.new_temporary(str(tmp_path / "x.png"))  # held by this process: under way
    try:
        assert files.clean_partials(str(tmp_path)) == left
        assert files.partial_files(str(tmp_path)) == [living]
    finally:
        os.close(fd)
    assert files.clean_partials(str(tmp_path)) == [living]
    assert files.clean_partials(str(tmp_path / "absent")) == []


def test_save_numbered_runs_then_while_the_picture_is_locked(tmp_path):
    seen = []

    def then(path):
        seen.append((os.path.basename(path), files.clean_partials(str(tmp_path)), locked_elsewhere(path)))

    assert files.save_numbered(str(tmp_path), "{:05}.png", lambda tmp: open(tmp, "w").write("x"), then).endswith("00000.png")
    assert seen == [("00000.png", [], True)]
    assert not locked_elsewhere(str(tmp_path / "00000.png"))


def test_numbered_pictures_never_overwrite(tmp_path):
    from altdiff_min.storage.files import save_numbered

    (tmp_path / "00001.png").write_bytes(b"keep")  # a gap: one file, numbered 1
    written = [save_numbered(str(tmp_path), "{:05}.png", lambda p: open(p, "wb").write(b"new")) for _ in range(2)]
    assert [os.path.basename(p) for p in written] == ["00002.png", "00003.png"]
    assert (tmp_path / "00001.png").read_bytes() == b"keep"


def locked_elsewhere(path: str) -> bool:
    """Whether a flock on `path` is held by another open file (another writer, or a killed one's)."""
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
