"""`atomic_write`: a file is replaced whole or not at all; output paths are checked before a command works."""

import pytest

from hvpnet_hf.output_files import atomic_write, check_output_dir, check_output_file


def test_the_file_appears_when_the_block_ends(tmp_path):
    path = tmp_path / "out.txt"
    with atomic_write(path) as temporary:
        temporary.write_text("new\n")
        assert temporary.parent == tmp_path and not path.exists()  # nothing to read until the block is done
    assert path.read_text() == "new\n"
    assert sorted(item.name for item in tmp_path.iterdir()) == ["out.txt"]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failed_block_keeps_the_old_file_and_leaves_no_partial_one(tmp_path, error):
    path = tmp_path / "out.txt"
    path.write_text("old\n")
    with pytest.raises(type(error)):
        with atomic_write(path) as temporary:
            temporary.write_text("half")
            raise error
    assert path.read_text() == "old\n"
    assert sorted(item.name for item in tmp_path.iterdir()) == ["out.txt"]
    # A block that fails before writing anything leaves nothing either.
    with pytest.raises(RuntimeError):
        with atomic_write(tmp_path / "never.txt"):
            raise RuntimeError("before writing")
    assert sorted(item.name for item in tmp_path.iterdir()) == ["out.txt"]


def test_output_paths_that_cannot_be_written_name_their_setting(tmp_path):
    (tmp_path / "taken").write_text("a file")
    check_output_file(tmp_path / "new.txt", "--output")  # a new file in an existing folder
    check_output_dir(tmp_path / "new" / "deeper", "--output_dir")  # created by the command
    with pytest.raises(IsADirectoryError, match=f"--output {tmp_path} is a folder"):
        check_output_file(tmp_path, "--output")
    with pytest.raises(FileNotFoundError, match=f"--output {tmp_path}/absent/out.txt: the folder .* does not exist"):
        check_output_file(tmp_path / "absent" / "out.txt", "--output")
    with pytest.raises(NotADirectoryError, match=f"output_dir {tmp_path}/taken/run: {tmp_path}/taken is a file"):
        check_output_dir(tmp_path / "taken" / "run", "output_dir")
    assert sorted(item.name for item in tmp_path.iterdir()) == ["taken"]
