"""Output folders the pipeline owns: it replaces or deletes only folders it created (a marker file),
and path parameters that would point an output at the project, the sample or the home folder are
refused before anything runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from food101.config import ConfigError
from food101.errors import Food101Error
from food101.io import (
    OWNED_MARKER,
    ForeignFolderError,
    InsufficientSpaceError,
    remove_owned,
    replace_dir,
    require_free_space,
    staging_dir,
)
from tasks.preprocess import build_cache, load_cache
from tests.conftest import REPO, SAMPLE, make_config, sample_classes, sample_manifest


def foreign_folder(parent: Path) -> Path:
    """A user's folder: a file and a subfolder the pipeline never wrote."""
    folder = parent / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes")
    (folder / "sub" / "keep.txt").write_text("keep me")
    return folder


def assert_untouched(folder: Path) -> None:
    assert (folder / "notes.txt").read_text() == "my notes"
    assert (folder / "sub" / "keep.txt").read_text() == "keep me"
    assert not (folder / OWNED_MARKER).exists()


def test_replace_dir_refuses_a_folder_it_did_not_create(tmp_path: Path) -> None:
    folder = foreign_folder(tmp_path)
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "out.json").write_text("{}")
    with pytest.raises(ForeignFolderError, match=f"{folder}.*not created by this pipeline"):
        replace_dir(folder, staged)
    assert_untouched(folder)
    with pytest.raises(ForeignFolderError, match=str(folder)):
        staging_dir(folder)  # refused before any work is staged beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "staged"]
    with pytest.raises(ForeignFolderError):
        remove_owned(folder)
    assert_untouched(folder)


def test_owned_folders_are_replaced_and_empty_ones_adopted(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()  # empty: adopted
    staged = staging_dir(final)
    (staged / "a.txt").write_text("first")
    replace_dir(final, staged)
    assert (final / "a.txt").read_text() == "first" and (final / OWNED_MARKER).is_file()

    staged = staging_dir(final)
    (staged / "b.txt").write_text("second")
    replace_dir(final, staged)
    assert sorted(p.name for p in final.iterdir()) == sorted([OWNED_MARKER, "b.txt"])
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or .old debris
    remove_owned(final)
    assert not final.exists()


def test_preprocess_refuses_a_foreign_cache_folder(tmp_path: Path) -> None:
    folder = foreign_folder(tmp_path)
    config = make_config(tmp_path, paths__cache=str(folder))
    with pytest.raises(Food101Error, match=f"{folder}.*paths.cache"):
        build_cache(sample_manifest(), SAMPLE, sample_classes(), config.preprocess, config.paths.cache, workers=1)
    assert_untouched(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "mlflow.db"]  # nothing staged beside it


def test_preprocess_adopts_a_cache_from_before_markers(tmp_path: Path) -> None:
    """A cache written before ownership markers holds only cache files: it is the pipeline's."""
    config = make_config(tmp_path)
    out = config.paths.cache
    build_cache(sample_manifest(), SAMPLE, sample_classes(), config.preprocess, out, workers=1)
    (out / OWNED_MARKER).unlink()
    summary = build_cache(sample_manifest(), SAMPLE, sample_classes(), config.preprocess, out, workers=1)
    assert (out / OWNED_MARKER).is_file() and not summary["rebuilt"]
    assert load_cache(out).images("test").shape[0] == 50


@pytest.mark.parametrize("value", [".", str(REPO), "data", "data/sample", "data/sample/images", "/", "~"])
def test_dangerous_cache_paths_are_rejected_at_configuration(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="paths.cache"):
        make_config(tmp_path, paths__cache=value)


def test_an_output_path_may_not_contain_another(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"paths\.(cache|eval).*contains paths\.(eval|cache)"):
        make_config(tmp_path, paths__cache=str(tmp_path / "artifacts" / "eval"))
    with pytest.raises(ConfigError, match=r"paths\.models.*contains paths\.eval"):
        make_config(tmp_path, paths__models=str(tmp_path / "artifacts"))
    make_config(tmp_path, paths__cache=str(tmp_path / "elsewhere" / "cache"))  # a new folder is fine


def test_free_space_is_checked_before_writing(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    require_free_space(tmp_path / "not" / "yet", 1, "a test")  # the nearest existing folder counts
    with pytest.raises(InsufficientSpaceError, match=f"a test needs .* in {tmp_path}.*free"):
        require_free_space(tmp_path, free + 10**15, "a test")

    config = make_config(tmp_path)
    with pytest.raises(InsufficientSpaceError, match=f"{config.paths.cache.parent}.*free"):
        build_cache(sample_manifest(), SAMPLE, sample_classes(), config.preprocess, config.paths.cache,
                    workers=1, reserve_bytes=free + 10**15)
    assert not config.paths.cache.exists()
