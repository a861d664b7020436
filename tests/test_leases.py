"""Replicas sharing one database (issue 9.6), at the store, on SQLite and PostgreSQL: a job is
written only by its owner while the owner's lease is current (fencing), a dead replica's jobs are
claimed once its lease expires and never while it is live, concurrent claimers never take one
job twice, a restarted replica fences its older self, and the shared secrets are the first
replica's."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from orchestrator.models import AttemptStatus, JobSpec, JobStatus
from orchestrator.store import AttemptRow, Fence, LeaseLost, Store

TTL = 30.0


def spec() -> JobSpec:
    return JobSpec.model_validate({"name": "t", "command": ["true"]})


@pytest.fixture
def url(db_url: str) -> str:
    Store(db_url).migrate()
    return db_url


def replica(url: str, name: str, ttl: float = TTL) -> Store:
    s = Store(url)
    s.fence = s.register_replica(name, f"http://{name}", ttl)
    return s


@pytest.fixture
def pair(url: str) -> Iterator[tuple[Store, Store]]:
    a, b = replica(url, "a"), replica(url, "b")
    yield a, b
    a.close()
    b.close()


def attempt(job_id: str, number: int = 1) -> AttemptRow:
    return AttemptRow(job_id=job_id, number=number, name=f"gpuhop-{job_id}-{number}", provider="local",
                      status=AttemptStatus.PENDING.value, created_at=time.time())


def expire(store: Store, fence: Fence) -> None:
    store.retire_replica(fence)  # its lease ends now, as a dead replica's would after the TTL


def test_a_job_submitted_through_a_replica_is_its_own_and_only_it_decides_it(pair: tuple[Store, Store]) -> None:
    a, b = pair
    job = a.create_job("j1", spec())
    assert job.lease_owner == "a"
    jobs, _ = a.active_state()
    assert [j.id for j in jobs] == ["j1"] and a.foreign_active() == set()
    jobs, _ = b.active_state()
    assert jobs == [] and b.foreign_active() == {"j1"}
    a.apply("j1", {"message": "a decides"}, {}, [])
    with pytest.raises(LeaseLost, match="owned by a"):
        b.apply("j1", {"message": "b must not"}, {}, [])
    with pytest.raises(LeaseLost):
        b.add_attempt(attempt("j1"))
    assert b.claim_jobs(b.fence) == []  # a is live: nothing to take  # type: ignore[arg-type]
    assert a.get_job("j1").message == "a decides"  # type: ignore[union-attr]


def test_launch_writes_made_together_are_fenced_job_by_job(pair: tuple[Store, Store]) -> None:
    """The launch workers' group commits: in one transaction, a job another replica owns is
    refused (LeaseLost) and the replica's own are written."""
    from orchestrator.store import LaunchRecord

    a, b = pair
    a.create_job("mine", spec())
    b.create_job("theirs", spec())
    answers = a.add_attempts([attempt("mine"), attempt("theirs")])
    assert isinstance(answers[0], AttemptRow) and isinstance(answers[1], LeaseLost)
    assert "owned by b" in str(answers[1]) and b.attempts("theirs") == []
    theirs = b.add_attempt(attempt("theirs"))
    mine = answers[0]
    got = a.record_launches([LaunchRecord(mine.id or 0, "i-1", 1.0), LaunchRecord(theirs.id or 0, "i-2", 2.0)])
    assert got[0] is True and isinstance(got[1], LeaseLost)
    assert [x.instance_id for x in b.attempts("theirs")] == [None]
    assert a.fence is not None
    expire(a, a.fence)
    assert all(isinstance(x, LeaseLost) for x in a.add_attempts([attempt("mine", 2)]))


def test_a_replica_whose_lease_expired_cannot_write(pair: tuple[Store, Store]) -> None:
    a, _ = pair
    a.create_job("j1", spec())
    row = a.add_attempt(attempt("j1"))
    assert a.fence is not None
    expire(a, a.fence)
    with pytest.raises(LeaseLost, match="expired"):
        a.apply("j1", {"status": JobStatus.RUNNING.value}, {}, [])
    with pytest.raises(LeaseLost):
        a.record_launch(row.id or 0, "i-1", time.time())
    with pytest.raises(LeaseLost):
        a.delete_attempt(row.id or 0)
    # the tick's batch: refused too, job-only items (Core path) and attempt items (ORM) alike
    assert a.apply_many([("j1", {"message": "a must not"}, {}, [(None, "note", "no")]),
                         ("j1", {}, {row.id or 0: {"status": AttemptStatus.RUNNING.value}}, [])]) == {"j1"}
    assert [e.kind for e in a.events("j1")] == ["submitted"]
    assert not a.renew_replica(a.fence, TTL)  # an expired lease is not silently extended
    got = a.attempts("j1")
    assert [(r.status, r.instance_id) for r in got] == [(AttemptStatus.PENDING.value, None)]
    assert a.get_job("j1").status == JobStatus.QUEUED.value  # type: ignore[union-attr]


def test_a_dead_replicas_jobs_are_claimed_and_its_writes_fenced(pair: tuple[Store, Store]) -> None:
    a, b = pair
    for n in range(5):
        a.create_job(f"j{n}", spec())
    a.create_job("done", spec())
    a.apply("done", {"status": JobStatus.SUCCEEDED.value}, {}, [])
    assert a.fence is not None and b.fence is not None
    expire(a, a.fence)
    claimed = b.claim_jobs(b.fence)
    assert sorted(claimed) == [f"j{n}" for n in range(5)]  # not the finished one
    assert b.claim_jobs(b.fence) == []  # once
    jobs, _ = b.active_state()
    assert sorted(j.id for j in jobs) == sorted(claimed)
    b.apply("j0", {"message": "b decides"}, {}, [])
    # a comes back (it was only paused): a new epoch, but the jobs are b's now
    a.fence = a.register_replica("a", "http://a", TTL)
    with pytest.raises(LeaseLost, match="owned by b"):
        a.apply("j0", {"message": "a must not"}, {}, [])
    assert a.active_state()[0] == [] and a.foreign_active() == set(claimed)


def test_a_restarted_replica_keeps_its_jobs_and_fences_its_older_self(url: str) -> None:
    old = replica(url, "r")
    old.create_job("j1", spec())
    new = replica(url, "r")  # the same replica id: a restart (or a second process by mistake)
    assert new.fence is not None and old.fence is not None and new.fence.epoch == old.fence.epoch + 1
    new.apply("j1", {"message": "new"}, {}, [])  # its jobs are its own at once, no TTL to wait
    with pytest.raises(LeaseLost, match="replaced"):
        old.apply("j1", {"message": "old"}, {}, [])
    assert not old.renew_replica(old.fence, TTL)
    assert new.renew_replica(new.fence, TTL)
    old.close()
    new.close()


def test_a_dead_replicas_jobs_are_shared_out_among_the_survivors(url: str) -> None:
    """Each survivor claims up to an equal share of all unfinished jobs, so the first to look
    does not take everything; once the others are gone it takes the rest."""
    dead, b, c = replica(url, "dead"), replica(url, "b"), replica(url, "c")
    for n in range(30):
        dead.create_job(f"d{n:02}", spec())
    for n in range(10):
        b.create_job(f"b{n:02}", spec())
    assert dead.fence is not None and b.fence is not None and c.fence is not None
    expire(dead, dead.fence)
    assert len(b.claim_jobs(b.fence)) == 10  # 40 jobs, 2 live replicas: 20 each, b had 10
    assert len(c.claim_jobs(c.fence)) == 20
    assert b.claim_jobs(b.fence) == [] and c.claim_jobs(c.fence) == []
    assert sorted(j.lease_owner or "" for j in b.list_jobs(limit=100)).count("b") == 20
    for s in (dead, b, c):
        s.close()


def test_concurrent_claimers_take_each_job_exactly_once(url: str) -> None:
    dead = replica(url, "dead")
    for n in range(300):
        dead.create_job(f"j{n:03}", spec())
    assert dead.fence is not None
    expire(dead, dead.fence)
    claimers = [replica(url, f"c{n}") for n in range(5)]
    with ThreadPoolExecutor(len(claimers)) as pool:
        rounds = list(pool.map(lambda s: [j for _ in range(3) for j in s.claim_jobs(s.fence, limit=40)], claimers))
    taken = [j for r in rounds for j in r]
    leftovers = claimers[0].claim_jobs(claimers[0].fence)  # type: ignore[arg-type]
    assert len(taken) == len(set(taken))  # no job claimed by two replicas
    assert sorted(taken + leftovers) == [f"j{n:03}" for n in range(300)]
    owners = {j.id: j.lease_owner for j in claimers[0].list_jobs(limit=1000)}
    for store, got in zip(claimers, rounds, strict=True):
        assert all(owners[j] == store.fence.replica_id for j in got)  # type: ignore[union-attr]
    for s in [dead, *claimers]:
        s.close()


def test_replicas_share_the_first_ones_secrets(pair: tuple[Store, Store]) -> None:
    a, b = pair
    assert a.shared_secret("api_token", "from-a") == "from-a"
    assert b.shared_secret("api_token", "from-b") == "from-a"
    assert b.shared_secret("agent_key", "k-b") == "k-b"
    assert {r.id for r in a.replicas()} == {"a", "b"}


def test_without_a_fence_the_store_decides_every_job(url: str) -> None:
    """A store no cluster fenced (unit tests, tools) reads and writes every job, as before."""
    s = Store(url)
    other = replica(url, "x")
    other.create_job("j1", spec())
    s.create_job("j2", spec())
    assert sorted(j.id for j in s.active_state()[0]) == ["j1", "j2"]
    s.apply("j1", {"message": "unfenced"}, {}, [])
    s.close()
    other.close()


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)  # SQLite serializes every writer anyway
def test_a_claim_skips_a_job_whose_row_a_writer_holds(url: str) -> None:
    """PostgreSQL: a claimer passes over a job some transaction has locked (the old owner
    mid-write) instead of waiting for it, and takes it on a later round."""
    from orchestrator.store import JobRow

    a, b = replica(url, "a"), replica(url, "b")
    a.create_job("j1", spec())
    a.create_job("j2", spec())
    assert a.fence is not None and b.fence is not None
    expire(a, a.fence)
    with a._write() as held:
        held.get(JobRow, "j1", with_for_update=True)  # a writer of j1, in flight
        with ThreadPoolExecutor(1) as pool:  # a claim that waited for the lock would never return
            claim = pool.submit(b.claim_jobs, b.fence)
            assert claim.result(timeout=60) == ["j2"]
        held.rollback()
    assert b.claim_jobs(b.fence) == ["j1"]
    a.close()
    b.close()


def test_a_job_running_on_its_replicas_own_machine_waits_for_that_replica(pair: tuple[Store, Store]) -> None:
    """A live attempt on a host-bound provider (local) is visible only to the replica that
    launched it: another replica adopting the job would run it twice on one volume."""
    a, b = pair
    a.create_job("local-job", spec())
    a.create_job("cloud-job", spec())
    a.add_attempt(attempt("local-job"))
    cloud = attempt("cloud-job")
    cloud.provider = "runpod"
    a.add_attempt(cloud)
    assert a.fence is not None and b.fence is not None
    expire(a, a.fence)
    assert b.claim_jobs(b.fence, host_bound=frozenset({"local"})) == ["cloud-job"]
    a.fence = a.register_replica("a", "http://a", TTL)  # its replica is back: still its own
    a.apply("local-job", {"message": "back"}, {}, [])


async def test_a_replica_whose_lease_lapsed_registers_again_and_one_whose_id_was_taken_stops(url: str) -> None:
    from orchestrator.cluster import Cluster

    store, other = Store(url), Store(url)
    cluster = Cluster(store, "r", "http://r", TTL, claim_interval=0.1)
    first = await cluster.start()
    assert store.fence == first and cluster.leader
    store.retire_replica(first)  # the lease ran out (a long stall)
    cluster._renewed_at = 0.0  # renewal due
    await cluster.step()
    assert store.fence is not None and store.fence.epoch == first.epoch + 1  # a new epoch fences the old
    store.create_job("j1", spec())
    store.apply("j1", {"message": "writes again"}, {}, [])
    other.register_replica("r", "http://elsewhere", TTL)  # a second daemon under the same id
    reasons: list[str] = []
    cluster._renewed_at = 0.0
    await cluster.step(reasons.append)
    assert reasons and "another daemon registered as replica r" in reasons[0]
    with pytest.raises(LeaseLost):
        store.apply("j1", {"message": "fenced"}, {}, [])
    store.close()
    other.close()


def test_a_batch_of_transitions_skips_the_jobs_no_longer_ours_and_writes_the_rest(pair: tuple[Store, Store]) -> None:
    """The tick's one-transaction commit (store.apply_many): a job another replica took over
    meanwhile is reported back, unwritten; the others are written."""
    a, b = pair
    a.create_job("mine", spec())
    b.create_job("theirs", spec())
    refused = a.apply_many([("theirs", {"message": "a must not"}, {}, []),
                            ("mine", {"message": "a decides"}, {}, [(None, "note", "written")])])
    assert refused == {"theirs"}
    assert a.get_job("mine").message == "a decides"  # type: ignore[union-attr]
    assert b.get_job("theirs").message == "queued"  # type: ignore[union-attr]
    assert [e.kind for e in a.events("mine")][-1] == "note"


def test_replicas_that_never_came_back_are_forgotten_once_they_own_nothing(url: str) -> None:
    gone, owner, live = replica(url, "gone"), replica(url, "owner"), replica(url, "live")
    owner.create_job("j1", spec())
    assert gone.fence is not None and owner.fence is not None
    expire(gone, gone.fence)
    expire(owner, owner.fence)
    later = time.time() + 2 * 86400
    assert live.prune_replicas(86400, now=later) == 2  # "live" too: its lease is long over by then
    assert {r.id for r in live.replicas()} == {"owner"}  # still owns an unfinished job
    for s in (gone, owner, live):
        s.close()


def test_jobs_from_before_replicas_are_claimed_whatever_they_run_on(url: str) -> None:
    """An upgrade: jobs written before leases existed own no replica. The daemon that opens
    the database takes them all, a job running on its local machine too (it launched it)."""
    old = Store(url)  # no fence: the version before replicas
    old.create_job("local-job", spec())
    old.add_attempt(attempt("local-job"))
    old.create_job("queued", spec())
    new = replica(url, "upgraded")
    assert new.fence is not None
    assert sorted(new.claim_jobs(new.fence, host_bound=frozenset({"local"}))) == ["local-job", "queued"]
    old.close()
    new.close()
