"""The alias lock's fence (tasks/alias_lock.py `AliasFence`): a holder that lost the lock while
paused must not write.

Holder A runs a real promotion (or rollback) in a thread and is paused inside it, past a chosen
step. Its lock is then lost the way each kind can lose it: the Prefect slot's lease is revoked
on the server (what Prefect's repossessor does once the lease runs out; its shortest lease is
60 s, so the test does not sit through it), or the lock file is removed underneath it. Holder B
takes the lock and rolls ``@champion`` back to version 3. When A wakes it must stop with
`AliasLockLostError` and write nothing: the registry is exactly what B left.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from phi3ops.errors import AliasLockLostError
from phi3ops.names import CHAMPION_ALIAS, LOCK_TOKEN_TAG
from tasks.alias_lock import alias_lock_kind, promotion_lock
from tasks.gates import Decision

pytestmark = pytest.mark.usefixtures("prefect_harness")

NAME = "phi3-fence"


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[str]]:
    """Versions 1-3 of NAME, ``@champion`` on 1; the events the changes announce, recorded."""
    from mlflow import MlflowClient

    import tasks.promotion
    from phi3ops.settings import get_settings
    from phi3ops.tracking import configure_tracking

    configure_tracking()
    client = MlflowClient()
    client.create_registered_model(NAME)
    for _ in range(3):
        client.create_model_version(NAME, source=str(get_settings().data_dir / "weights"))
    client.set_registered_model_alias(NAME, CHAMPION_ALIAS, "1")
    events: list[str] = []

    def record(event: str, *, model_name: str, version: str, payload: Any, event_id: Any) -> None:
        events.append(f"{event} v{version}")

    monkeypatch.setattr(tasks.promotion, "emit", record)
    return client, events


@pytest.fixture(params=["prefect", "file"])
def lose_lock(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Callable[[], None]:
    """Which lock A holds, and how the test takes it away from A while A is paused."""
    from phi3ops.settings import get_settings

    if request.param == "file":
        monkeypatch.setenv("PHI3OPS_ALIAS_LOCK", "file")
        get_settings.cache_clear()
        assert alias_lock_kind() == "file"

        def remove_lock_file() -> None:  # a cleanup of the data dir while A holds it
            (path,) = (get_settings().data_dir / "locks").glob(f"promote-{NAME}.lock")
            path.unlink()

        return remove_lock_file

    import prefect.concurrency._sync as prefect_sync
    from prefect.client.orchestration import get_client

    from deployments import setup

    monkeypatch.setenv("PHI3OPS_ALIAS_LOCK", "auto")  # the harness is a server at a URL
    get_settings.cache_clear()
    assert alias_lock_kind() == "prefect"
    with get_client(sync_client=True) as client:
        setup.ensure_alias_limits(client, model_names=[NAME])
    leases: list[Any] = []
    acquire = prefect_sync.acquire_concurrency_slots_with_lease

    def spy(*args: Any, **kwargs: Any) -> Any:
        response = acquire(*args, **kwargs)
        leases.append(response.lease_id)
        return response

    monkeypatch.setattr(prefect_sync, "acquire_concurrency_slots_with_lease", spy)

    def expire_lease() -> None:  # what the repossessor does to a lease that ran out
        with get_client(sync_client=True) as client:
            client.release_concurrency_slots_with_lease(leases[0])

    return expire_lease


def _snapshot(client: Any, events: list[str]) -> dict[str, Any]:
    """Everything an alias change writes: the model's tags and aliases, each version's tags,
    the decision runs, the events.
    """
    model = client.get_registered_model(NAME)
    versions = {v.version: dict(v.tags) for v in client.search_model_versions(f"name='{NAME}'")}
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = {
        r.info.run_id: (r.info.status, dict(r.data.tags))
        for r in client.search_runs(experiments, max_results=1000)
    }
    return {
        "tags": dict(model.tags),
        "aliases": dict(model.aliases),
        "versions": versions,
        "runs": runs,
        "events": list(events),
    }


def _promote_v2() -> Any:
    from tasks.promotion import apply_decision

    decision = Decision(
        model_name=NAME,
        version="2",
        promote=True,
        gates=[],
        eval_set_hash=None,
        candidate_run_id=None,
        champion_version="1",
        champion_run_id=None,
    )
    return apply_decision(decision, triggered_by="holder A")


def _rollback_to_v2() -> Any:
    from tasks.promotion import rollback

    return rollback(NAME, to_version="2", triggered_by="holder A")


# (what A runs, where it is paused, what it left written before the pause)
PAUSES = {
    "promote: before the intent": (_promote_v2, "_intent", "nothing"),
    "promote: after the intent": (_promote_v2, "promote.after-intent", "its intent"),
    "promote: after the aliases": (_promote_v2, "promote.after-aliases", "aliases"),
    "promote: after the run": (_promote_v2, "promote.after-run", "tags and run"),
    "rollback: after @champion": (_rollback_to_v2, "rollback.after-champion", "@champion"),
}


@pytest.mark.parametrize("pause", PAUSES)
def test_a_holder_paused_past_its_lease_writes_nothing(
    store: tuple[Any, list[str]],
    lose_lock: Callable[[], None],
    monkeypatch: pytest.MonkeyPatch,
    pause: str,
) -> None:
    import tasks.promotion

    client, events = store
    run_a, point, _ = PAUSES[pause]
    paused, resume = threading.Event(), threading.Event()
    outcome: list[BaseException | object] = []

    def hold_a_here() -> None:
        if threading.current_thread() is holder_a:
            paused.set()
            assert resume.wait(120), "never resumed"

    if point.startswith("_"):  # a function of tasks.promotion: pause before calling it
        original = getattr(tasks.promotion, point)

        def paused_call(*args: Any, **kwargs: Any) -> Any:
            hold_a_here()
            return original(*args, **kwargs)

        monkeypatch.setattr(tasks.promotion, point, paused_call)
    else:
        crash_point = tasks.promotion.crash_point

        def paused_point(name: str) -> None:
            if name == point:
                hold_a_here()
            crash_point(name)

        monkeypatch.setattr(tasks.promotion, "crash_point", paused_point)

    def a() -> None:
        try:
            outcome.append(run_a())
        except BaseException as exc:
            outcome.append(exc)

    holder_a = threading.Thread(target=a, name="holder-a")
    holder_a.start()
    try:
        assert paused.wait(120), f"holder A never reached {point}: {outcome}"
        token_a = client.get_registered_model(NAME).tags[LOCK_TOKEN_TAG]
        lose_lock()

        # Holder B: takes the lock (finishing whatever A left half done), rolls back to 3.
        from tasks.promotion import pending_intent, rollback

        state_b = rollback(NAME, to_version="3", triggered_by="holder B")
        assert (state_b.champion, state_b.previous) == ("3", None)
        token_b = client.get_registered_model(NAME).tags[LOCK_TOKEN_TAG]
        assert int(token_b.split()[0]) > int(token_a.split()[0])
        left_by_b = _snapshot(client, events)
    finally:
        resume.set()
        holder_a.join(timeout=120)

    (error,) = outcome
    assert isinstance(error, AliasLockLostError), error
    message = str(error)
    assert f"The alias lock of {NAME}" in message and "was lost" in message
    assert "the other holder's change stands" in message
    assert "run the command again" in message
    assert token_a in message and token_b in message
    # A wrote nothing after it woke: the registry is what B left, B's change stands.
    assert _snapshot(client, events) == left_by_b
    assert {k: str(v) for k, v in client.get_registered_model(NAME).aliases.items()} == {
        CHAMPION_ALIAS: "3"
    }
    assert pending_intent(NAME) is None


def test_each_acquisition_takes_a_newer_token_and_a_fresh_holder_passes(
    store: tuple[Any, list[str]],
) -> None:
    from mlflow import MlflowClient

    tokens = []
    for _ in range(3):
        with promotion_lock(NAME) as fence:
            fence.check("move the aliases")  # its own token: no error
            tokens.append(MlflowClient().get_registered_model(NAME).tags[LOCK_TOKEN_TAG])
    assert [int(t.split()[0]) for t in tokens] == [1, 2, 3]
    assert len(set(tokens)) == 3


def test_a_model_created_after_the_lock_was_taken_stops_the_holder(
    store: tuple[Any, list[str]],
) -> None:
    """No registered model, no token to take: the check then asks that none appeared since."""
    from mlflow import MlflowClient

    from tasks.alias_lock import _take_token

    name = "phi3-fence-new"
    with promotion_lock(name) as fence:
        assert fence.token is None
        fence.check("register the model")  # still nothing: no error
        MlflowClient().create_registered_model(name)
        fence.check("register the model")  # a model, but no other holder's token: no error
        _take_token(name)  # what another holder's acquisition writes, once A's lock had gone
        with pytest.raises(AliasLockLostError, match=f"alias lock of {name}"):
            fence.check("move the aliases")
