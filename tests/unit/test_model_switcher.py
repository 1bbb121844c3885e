"""Switching the served model without a model: the holder's use counts, its release, the
follower's decisions (a moved alias, a version that fails to load, a traffic plan), the traffic
plan's split, and shadow copies giving way to clients.
"""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path

import pytest

from phi3ops.errors import InvalidInputError
from phi3ops.serving import follow
from phi3ops.serving.follow import AliasFollower, LoadedModel, ModelSwitcher, alias_of
from phi3ops.serving.openai_routes import ServedModel
from phi3ops.serving.shadow import ShadowCopies, ShadowCopy
from phi3ops.traffic import Arm, TrafficPlan


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
    assert old.released and _removed(old, tmp_path / "v1")
    assert not new.released and new.users == 1


def test_an_unused_model_is_released_when_switched_away_and_at_close(tmp_path) -> None:
    old, new = _loaded("1", tmp_path / "v1"), _loaded("2", tmp_path / "v2")
    switcher = ModelSwitcher(old)
    with switcher.using() as loaded:
        assert loaded is old and old.users == 1
    assert old.users == 0 and not old.released
    switcher.switch(new)
    assert old.released and _removed(old, tmp_path / "v1")
    with switcher.using():
        switcher.close()
        assert not new.released  # its request is still running
    assert new.released and _removed(new, tmp_path / "v2")
    late = _loaded("3", tmp_path / "v3")
    switcher.switch(late)  # a load that ends after shutdown is released at once
    assert switcher.current is new and late.released
    with pytest.raises(RuntimeError, match="released more often"):
        switcher.release(new)


def _removed(loaded: LoadedModel, folder: Path) -> bool:
    """Whether ``loaded``'s folder is gone once its removal (a thread of its own) has ended."""
    assert loaded.removal is not None
    loaded.removal.join(10)
    return not folder.exists()


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


def test_the_candidate_arm_serves_beside_the_champion_and_moves_when_promoted() -> None:
    champion, candidate = _loaded("1"), _loaded("2")
    switcher = ModelSwitcher(champion)
    assert switcher.acquire_arm(Arm.CANDIDATE) == (Arm.CHAMPION, champion)  # no candidate yet
    switcher.release(champion)
    assert switcher.switch(candidate, arm=Arm.CANDIDATE) is None
    with switcher.using_arm(Arm.CANDIDATE) as (arm, loaded):
        assert (arm, loaded) == (Arm.CANDIDATE, candidate)
        switcher.switch(candidate)  # promoted: the same loaded model moves, nothing reloads
        assert switcher.serving(Arm.CANDIDATE) is None and switcher.current is candidate
        assert champion.released and not candidate.retired  # still serving, now as champion
    switcher.switch(_loaded("3"), arm=Arm.CANDIDATE)
    removed = switcher.remove(Arm.CANDIDATE)
    assert removed is not None and removed.released
    with pytest.raises(ValueError, match="champion arm always serves"):
        switcher.remove(Arm.CHAMPION)


def test_the_plan_applies_only_while_a_candidate_is_loaded() -> None:
    switcher = ModelSwitcher(_loaded("1"))
    plan = TrafficPlan.start("canary", share=0.5)
    switcher.set_plan(plan)
    assert switcher.plan is None and switcher.arm_for("anyone") is Arm.CHAMPION
    switcher.switch(_loaded("2"), arm=Arm.CANDIDATE)
    assert switcher.plan == plan
    arms = {switcher.arm_for(f"user-{i}") for i in range(50)}
    assert arms == {Arm.CHAMPION, Arm.CANDIDATE}


def test_the_follower_loads_the_candidate_for_a_plan_and_unloads_it_after(
    registry, tmp_path, monkeypatch
) -> None:
    plans: dict[str, TrafficPlan | None] = {"phi3": None}
    monkeypatch.setattr(follow, "read_plan", lambda name: plans[name])
    registry["candidate"] = "2"
    switcher, loads = ModelSwitcher(_loaded("1")), []
    follower = _follower(switcher, tmp_path, loads)
    follower.candidate_alias = "candidate"
    follower.poll_once()
    assert switcher.serving(Arm.CANDIDATE) is None and loads == []  # no plan: no second model
    plans["phi3"] = TrafficPlan.start("shadow", candidate_version="2")
    follower.poll_once()
    candidate = switcher.serving(Arm.CANDIDATE)
    assert candidate is not None and candidate.version == "2" and switcher.plan == plans["phi3"]
    registry["champion"] = "2"  # promoted: the candidate's model becomes the champion's
    assert follower.poll_once() == "2"
    assert switcher.current is candidate and switcher.serving(Arm.CANDIDATE) is None
    assert loads == ["2"]
    registry["candidate"] = "3"  # a candidate that cannot load: the champion serves alone
    plans["phi3"] = TrafficPlan.start("shadow", candidate_version="3")
    follower.poll_once()
    assert switcher.serving(Arm.CANDIDATE) is None and loads == ["2", "3"]
    follower.poll_once()
    assert loads == ["2", "3"]  # not tried again at every look
    registry["candidate"] = "4"
    plans["phi3"] = TrafficPlan.start("canary", share=0.5, candidate_version="4")
    follower.poll_once()
    assert switcher.serving(Arm.CANDIDATE).version == "4"
    plans["phi3"] = None  # the plan ended (a verdict, `phi3ops canary stop`)
    follower.poll_once()
    assert switcher.serving(Arm.CANDIDATE) is None and switcher.plan is None


def test_the_server_serves_the_pinned_candidate_whatever_the_alias_names_later(
    registry, tmp_path, monkeypatch, caplog
) -> None:
    """@candidate moving mid-canary (a registration, a hand move) puts no other version on
    live traffic: the plan's gated version keeps serving, with one warning per move.
    """
    plan = TrafficPlan.start("canary", share=0.5, candidate_version="2")
    plans: dict[str, TrafficPlan | None] = {"phi3": plan}
    monkeypatch.setattr(follow, "read_plan", lambda name: plans[name])
    registry["candidate"] = "2"
    switcher, loads = ModelSwitcher(_loaded("1")), []
    follower = _follower(switcher, tmp_path, loads)
    follower.candidate_alias = "candidate"
    follower.poll_once()
    assert switcher.serving(Arm.CANDIDATE).version == "2"
    registry["candidate"] = "4"  # never gated
    with caplog.at_level(logging.WARNING, logger="phi3ops.serving.follow"):
        for _ in range(3):
            follower.poll_once()
    assert switcher.serving(Arm.CANDIDATE).version == "2" and loads == ["2"]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "moved to version 4" in warning and "still serving version 2" in warning
    plans["phi3"] = TrafficPlan.start("canary", share=0.5)  # a plan pinning nothing
    follower.poll_once()
    assert switcher.serving(Arm.CANDIDATE) is None and loads == ["2"]


def test_a_candidate_that_cannot_stream_takes_no_streamed_request() -> None:
    """Streams routed to a transformers candidate would be refused (and judge nobody): they
    stay with a champion that streams; other requests split as the plan says.
    """
    champion, candidate = _loaded("1"), _loaded("2")
    candidate.streams = False
    switcher = ModelSwitcher(champion)
    switcher.switch(candidate, arm=Arm.CANDIDATE)
    switcher.set_plan(TrafficPlan.start("canary", share=0.5, candidate_version="2"))
    users = [f"user-{i}" for i in range(60)]
    assert {switcher.arm_for(u, stream=True) for u in users} == {Arm.CHAMPION}
    assert {switcher.arm_for(u) for u in users} == {Arm.CHAMPION, Arm.CANDIDATE}
    champion.streams = False  # neither streams: the plan decides (the model refuses it)
    assert {switcher.arm_for(u, stream=True) for u in users} == {Arm.CHAMPION, Arm.CANDIDATE}


def test_while_a_plan_is_in_force_every_arm_answers_as_the_registered_model() -> None:
    """No answer names the arm, and a request naming what /v1/models listed before or during
    the plan (``phi3/1``, ``phi3``) is served by either arm.
    """
    champion, candidate = _loaded("1"), _loaded("2")
    switcher = ModelSwitcher(champion)
    assert switcher.current.served.id == "phi3/1"  # no plan: the version, as before
    plan = TrafficPlan.start("canary", share=0.5, candidate_version="2")
    switcher.set_plan(plan)  # known before its candidate has loaded: named by the plan already
    assert champion.served.id == "phi3" and switcher.arm_for("anyone") is Arm.CHAMPION
    switcher.switch(candidate, arm=Arm.CANDIDATE)
    switcher.set_plan(plan)
    for loaded in (champion, candidate):
        assert loaded.served.id == "phi3" and loaded.served.listing()["data"][0]["id"] == "phi3"
        assert {"phi3", "phi3/1", "phi3/2", "phi3@champion"} <= loaded.served.names
        assert loaded.served.answer_model("phi3-mini-onnx") == "phi3"
    switcher.remove(Arm.CANDIDATE)  # the plan ended
    switcher.set_plan(None)
    assert champion.served.id == "phi3/1" and "phi3/2" not in champion.served.names


def test_a_canary_plan_is_sticky_per_user_and_splits_by_its_share() -> None:
    plan = TrafficPlan.start("canary", share=0.2)
    assert all(plan.arm_for("ada") is plan.arm_for("ada") for _ in range(5))
    users = [plan.arm_for(f"user-{i}") for i in range(5000)]
    assert 0.18 < users.count(Arm.CANDIDATE) / 5000 < 0.22
    other = TrafficPlan.start("canary", share=0.2)  # each canary draws its own users
    assert [other.arm_for(f"user-{i}") for i in range(200)] != users[:200]
    rng = random.Random(7)
    anonymous = [plan.arm_for(None, rng=rng) for _ in range(5000)]
    assert 0.18 < anonymous.count(Arm.CANDIDATE) / 5000 < 0.22
    assert TrafficPlan.start("shadow").arm_for("ada") is Arm.CHAMPION
    assert TrafficPlan.from_tag(plan.to_tag()) == plan
    assert TrafficPlan.from_tag("not json") is None and TrafficPlan.from_tag(None) is None


@pytest.mark.parametrize(
    ("mode", "share", "message"),
    [
        ("canary", 0.0, "between 0 and 1"),
        ("canary", 1.0, "between 0 and 1"),
        ("shadow", 0.5, "canary mode only"),
        ("blue-green", None, "use canary, shadow"),
    ],
)
def test_a_plan_that_makes_no_sense_is_refused(mode, share, message) -> None:
    with pytest.raises(InvalidInputError, match=message):
        TrafficPlan.start(mode, share=share)


def test_shadow_copies_wait_for_idle_moments_are_cut_off_by_clients_and_shed_first() -> None:
    async def scenario() -> tuple[list[str], ShadowCopies]:
        events: list[str] = []

        async def run(copy: ShadowCopy, preempt: asyncio.Event) -> None:
            events.append(f"start {copy.body.decode()}")
            try:
                await asyncio.wait_for(preempt.wait(), 0.2)
                events.append(f"cut {copy.body.decode()}")
            except TimeoutError:
                events.append(f"done {copy.body.decode()}")

        copies = ShadowCopies(run, max_pending=2, idle_s=0.02)
        with copies.client_call():
            for body in (b"a", b"b", b"c"):  # a client call in flight: nothing starts
                copies.offer(ShadowCopy(scope={}, body=body, openai=True))
            await asyncio.sleep(0.05)
            assert events == [] and copies.pending == 2 and copies.dropped == 1
        await asyncio.sleep(0.05)  # idle: the oldest copy kept starts
        with copies.client_call():  # a client arrives: the running copy stops
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.4)
        await copies.close()
        return events, copies

    events, copies = asyncio.run(scenario())
    assert events == ["start b", "cut b", "start c", "done c"]
    assert copies.answered == 2 and copies.dropped == 1
