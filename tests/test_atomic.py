"""qnext_mlx.atomic: a failed write leaves the old file as it was and no temp file."""

from __future__ import annotations

import pytest

from qnext_mlx.atomic import atomic_path


def test_success_replaces_the_file(tmp_path):
    target = tmp_path / "settings.json"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_text("new")
        assert target.read_text() == "old"  # not visible until the block ends
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["settings.json"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_failure_keeps_the_old_file_and_removes_the_temp(tmp_path, error):
    target = tmp_path / "cache.safetensors"
    target.write_text("old")
    with pytest.raises(type(error)):
        with atomic_path(target, ".safetensors") as tmp:
            assert tmp.name.endswith(".safetensors")
            tmp.write_text("half of the new")
            raise error
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["cache.safetensors"]
