"""The store's verbs for moves (orchestrator/store/moves.py) on real SQLite (and PostgreSQL when
one answers, through the shared `db_url` fixture): each step of a move is a compare-and-set on the
volume row, and no step forgets a provider volume."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from orchestrator.models import JobSpec
from orchestrator.store import Conflict, Store, VolumeRow


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store(db_url)
    s.migrate()
    s.create_job("j1", JobSpec.model_validate({
        "name": "t", "command": ["true"], "volume": {"name": "ckpt", "size_gb": 10, "sync": "object-store"}}))
    s.set_volume_location("ckpt", "aws", "us-east-1a", "vol-old")
    yield s
    s.close()


def volume(store: Store) -> VolumeRow:
    row = store.volume("ckpt")
    assert row is not None
    return row


def retired(store: Store) -> list[tuple[str, str, str]]:
    return [(r.provider, r.region, r.provider_volume_id) for r in store.retired_volumes()]


def test_a_committed_move_retires_the_old_volume_in_the_same_step(store: Store) -> None:
    assert store.begin_volume_move("ckpt", "vol-old", "aws", "us-west-2a", "gpuhop-j1-2") is None
    assert store.set_move_volume("ckpt", "gpuhop-j1-2", "vol-new")
    assert not store.commit_volume_move("ckpt", "gpuhop-j1-3", "vol-new", "x")  # not this move's attempt
    assert store.commit_volume_move("ckpt", "gpuhop-j1-2", "vol-new", "left behind")
    vol = volume(store)
    assert (vol.provider, vol.region, vol.provider_volume_id, vol.move_attempt) == ("aws", "us-west-2a", "vol-new", None)
    assert retired(store) == [("aws", "us-east-1a", "vol-old")]
    assert not store.commit_volume_move("ckpt", "gpuhop-j1-2", "vol-new", "again")  # settled once only


def test_an_aborted_move_retires_the_new_volume_and_keeps_the_old(store: Store) -> None:
    assert store.begin_volume_move("ckpt", "vol-old", "aws", "us-west-2a", "gpuhop-j1-2") is None
    assert store.abort_volume_move("ckpt", "gpuhop-j1-2", "vol-new", "never launched")
    vol = volume(store)
    assert (vol.region, vol.provider_volume_id, vol.move_attempt, vol.move_region) == ("us-east-1a", "vol-old", None, None)
    assert retired(store) == [("aws", "us-west-2a", "vol-new")]
    # a volume of that name retired in us-west-2a but not deleted yet: a move there would find
    # it by name and reuse what is about to be deleted, so it waits
    refused = store.begin_volume_move("ckpt", "vol-old", "aws", "us-west-2a", "gpuhop-j1-3")
    assert refused is not None and "not deleted yet" in refused
    store.forget_retired_volume(store.retired_volumes()[0].id or 0)
    assert store.begin_volume_move("ckpt", "vol-old", "aws", "us-west-2a", "gpuhop-j1-3") is None


def test_a_move_begins_only_from_the_volume_it_was_decided_on(store: Store) -> None:
    assert "changed meanwhile" in (store.begin_volume_move("ckpt", "vol-other", "aws", "b", "gpuhop-j1-2") or "")
    assert store.begin_volume_move("ckpt", "vol-old", "aws", "b", "gpuhop-j1-2") is None
    assert "already moving" in (store.begin_volume_move("ckpt", "vol-old", "aws", "c", "gpuhop-j1-3") or "")
    store.update_job("j1", status="cancelled")
    with pytest.raises(Conflict, match="is moving"):  # `gpuhop volume rm` waits for the move to settle
        store.begin_volume_delete("ckpt", "tok")


def test_replacing_a_volume_by_any_path_retires_the_one_replaced(store: Store) -> None:
    store.set_volume_location("ckpt", "aws", "us-east-1b", "vol-b")
    assert retired(store) == [("aws", "us-east-1a", "vol-old")]
    store.set_volume_location("ckpt", "aws", "us-east-1b", "vol-b")  # the same volume again: nothing retired
    assert len(retired(store)) == 1


def test_capacity_gaps_open_once_and_add_up(store: Store) -> None:
    key = [("aws", "a", "A100")]
    store.open_capacity_gaps(key, 100.0)
    store.open_capacity_gaps(key, 150.0)  # still the same gap
    assert store.open_gap_keys() == {("aws", "a", "A100")}
    store.close_capacity_gaps(key, 160.0)
    store.open_capacity_gaps(key, 200.0)
    assert store.capacity_gap_stats(0.0, 230.0) == {("aws", "a", "A100"): (1, 60.0 + 30.0)}
    store.prune_capacity_gaps(150.0)  # the ended gap is forgotten, the open one kept
    assert store.capacity_gap_stats(0.0, 230.0) == {("aws", "a", "A100"): (0, 30.0)}


def test_volume_ids_are_compared_with_their_provider(store: Store) -> None:
    """Two providers may both call a volume vol-old: moving from one to the other still retires
    the one left behind."""
    assert store.begin_volume_move("ckpt", "vol-old", "runpod", "EU-RO-1", "gpuhop-j1-2") is None
    assert store.commit_volume_move("ckpt", "gpuhop-j1-2", "vol-old", "left behind")
    assert retired(store) == [("aws", "us-east-1a", "vol-old")]
    store.set_volume_location("ckpt", "aws", "us-east-1a", "vol-old")
    assert retired(store)[-1] == ("runpod", "EU-RO-1", "vol-old")
