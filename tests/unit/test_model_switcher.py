"""Switching the served model without a model: the holder's use counts, its release, and the
follower's decisions (a moved alias, a version that fails to load).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from phi3ops.serving import follow
from phi3ops.serving.follow import AliasFollower, LoadedModel, ModelSwitcher, alias_of
from phi3ops.serving.openai_routes import ServedModel


def _loaded(version: str, folder: Path | None = None) -> LoadedModel:
    served = ServedModel.of(name="phi3", version=version, uri="models:/phi3@champion")
    model = LoadedModel(app=None, model=None, served=served, version=version)
    if folder is not None:
        folder.mkdir()
        (folder / "MLmodel").write_text("flavors: {}\n")
        model.folder = folder
    return model


def test_a_switch_waits_for_the_old_models_last_request_before_releasing_it(tmp_path) -> None:
    old, new = _loaded("1", tmp_path / "v1"), _loaded("2", tmp_path / "v2")
    switcher = ModelSwitcher(old)
    first, second = switcher.acquire(), switcher.acquire()
    assert first is second is old and old.users == 2

    assert switcher.switch(new) is old
    assert switcher.current is new and old.retired and not old.released
    assert switcher.acquire() is new  # new requests get the new version at once
    switcher.release(first)
    assert not old.released and (tmp_path / "v1").exists()  # one request still on it
    switcher.release(second)
    assert old.released and not (tmp_path / "v1").exists()
    assert not new.released and new.users == 1


def test_an_unused_model_is_released_when_switched_away_and_at_close(tmp_path) -> None:
    old, new = _loaded("1", tmp_path / "v1"), _loaded("2", tmp_path / "v2")
    switcher = ModelSwitcher(old)
    with switcher.using() as loaded:
        assert loaded is old and old.users == 1
    assert old.users == 0 and not old.released
    switcher.switch(new)
    assert old.released and not (tmp_path / "v1").exists()
    with switcher.using():
        switcher.close()
        assert not new.released  # its request is still running
    assert new.released and not (tmp_path / "v2").exists()
    late = _loaded("3", tmp_path / "v3")
    switcher.switch(late)  # a load that ends after shutdown is released at once
    assert switcher.current is new and late.released
    with pytest.raises(RuntimeError, match="released more often"):
        switcher.release(new)


def test_a_model_someone_else_downloaded_keeps_its_folder(tmp_path) -> None:
    (tmp_path / "first").mkdir()
    first = _loaded("1")  # folder None: start_server's download, removed by stop_server
    switcher = ModelSwitcher(first)
    switcher.switch(_loaded("2"))
    assert first.released and (tmp_path / "first").exists()


def test_only_an_alias_uri_is_followed() -> None:
    assert alias_of("models:/phi3@champion") == ("phi3", "champion")
    for uri in ("models:/phi3/3", "runs:/abc/model", "/tmp/model", None):
        assert alias_of(uri) is None


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str | None]:
    """The alias as the follower reads it; downloads make an empty folder per version."""
    state: dict[str, str | None] = {"champion": "1"}

    def alias_version(model_name: str, alias: str) -> str | None:
        assert model_name == "phi3"
        return state[alias]

    def download_model(model_uri: str, target: Path) -> Path:
        (target / "MLmodel").write_text(model_uri)
        return target

    monkeypatch.setattr(follow, "alias_version", alias_version)
    monkeypatch.setattr(follow, "download_model", download_model)
    return state


def _follower(switcher: ModelSwitcher, tmp_path: Path, loads: list[str]) -> AliasFollower:
    def load(version: str, path: Path) -> LoadedModel:
        loads.append(version)
        if version == "3":
            raise ValueError("onnxruntime-genai: model.onnx is not a model")
        return _loaded(version)

    return AliasFollower(
        switcher,
        model_name="phi3",
        alias="champion",
        load=load,
        download_dir=tmp_path / "serving",
        poll_s=1,
        retry_s=60,
    )


def test_the_follower_switches_when_the_alias_moves(registry, tmp_path) -> None:
    switcher, loads = ModelSwitcher(_loaded("1")), []
    follower = _follower(switcher, tmp_path, loads)
    assert follower.poll_once() is None and loads == []  # the alias has not moved
    registry["champion"] = "2"
    assert follower.poll_once() == "2"
    current = switcher.current
    assert (current.version, current.served.id) == ("2", "phi3/2")
    assert current.folder is not None and current.folder.parent == tmp_path / "serving"
    assert (current.folder / "MLmodel").read_text() == "models:/phi3/2"
    registry["champion"] = None  # the alias was deleted: keep serving what is loaded
    assert follower.poll_once() is None and switcher.current is current


def test_a_version_that_fails_to_load_leaves_the_old_one_serving(registry, tmp_path, caplog):
    first = _loaded("1")
    switcher, loads = ModelSwitcher(first), []
    follower = _follower(switcher, tmp_path, loads)
    registry["champion"] = "3"
    with caplog.at_level(logging.WARNING, logger="phi3ops.serving.follow"):
        assert follower.poll_once() is None
    assert switcher.current is first and not first.retired
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        "version 3" in warning.getMessage() and "model.onnx is not a model" in warning.getMessage()
    )
    assert "Still serving version 1" in warning.getMessage()
    assert not list((tmp_path / "serving").iterdir())  # its download is gone
    assert follower.poll_once() is None and loads == ["3"]  # not tried again at every look
    registry["champion"] = "1"  # rolled back, then moved to it again: worth another try
    assert follower.poll_once() is None
    registry["champion"] = "3"
    assert follower.poll_once() is None and loads == ["3", "3"]
    follower.retry_s = 0  # once retry_s has passed, it is tried again
    assert follower.poll_once() is None and loads == ["3", "3", "3"]
    registry["champion"] = "2"
    assert follower.poll_once() == "2" and first.released


def test_a_poll_interval_of_zero_is_not_a_follower(tmp_path) -> None:
    with pytest.raises(ValueError, match="poll_s=0"):
        AliasFollower(
            ModelSwitcher(_loaded("1")),
            model_name="phi3",
            alias="champion",
            load=lambda version, path: _loaded(version),
            download_dir=tmp_path,
            poll_s=0,
        )
