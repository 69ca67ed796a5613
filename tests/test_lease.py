"""pipeline.lease on a local folder and on the real S3 server: one trainer per output."""
import threading
import time

import pytest

from pipeline import lease, storage


def _holder(job: str | None = "4242", restart: int = 0) -> lease.Holder:
    return lease.Holder.this_process(job, restart)


def _wait_stale(url: str, timeout: float) -> None:
    """Until the lease at ``url`` is older than ``timeout`` on the store's clock (S3 Date: 1 s resolution)."""
    deadline = time.monotonic() + 60
    while storage.store_time(url) - storage.stat(url).modified <= timeout + 1:
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_a_second_trainer_is_refused_naming_the_holder(store_url):
    first = lease.acquire(store_url, _holder("11"))
    with pytest.raises(lease.LeaseError, match=r"_lease\.json: output held by SLURM job 11 \(restart 0\) on host "
                                               r".*, pid \d+, last heartbeat \d+ s ago"):
        lease.acquire(store_url, _holder("12"))
    with pytest.raises(lease.LeaseError, match="held by SLURM job 11"):
        lease.acquire(store_url, _holder(None))  # outside SLURM
    assert lease.Holder.decode(storage.read_bytes(first.url), first.url) == first.holder


def test_a_stale_lease_is_taken_over_by_exactly_one_of_several_successors_started_together(store_url):
    # The winner's lease has no heartbeat either: a successor that reached the store more than ``timeout``
    # after the winner would rightly take it over in turn. 5 s keeps that out of reach on a loaded machine
    # (1 s did not: one failure in a parallel run).
    timeout = 5.0
    for round_ in range(3):
        old = lease.acquire(store_url, _holder(f"old{round_}"), timeout)  # no heartbeat: it turns stale
        _wait_stale(old.url, timeout)
        start, results = threading.Barrier(4), {}

        def successor(i: int) -> None:
            me = _holder(f"new{round_}-{i}")
            start.wait()
            try:
                results[i] = lease.acquire(store_url, me, timeout)
            except lease.LeaseError as e:
                results[i] = e

        threads = [threading.Thread(target=successor, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [r for r in results.values() if isinstance(r, lease.Lease)]
        assert len(winners) == 1, results
        winner = winners[0]
        assert lease.Holder.decode(storage.read_bytes(winner.url), winner.url) == winner.holder
        for r in results.values():
            if r is not winner:
                assert f"held by SLURM job {winner.holder.job_id} " in str(r)
        with pytest.raises(lease.LeaseLost):
            old.refresh()  # the stale holder, woken up, finds out at its next heartbeat
        winner.release()
        assert not storage.exists(winner.url)


def test_a_requeued_job_takes_its_own_lease_over_at_once(store_url):
    before = lease.acquire(store_url, _holder("77", 0))
    with pytest.raises(lease.LeaseError, match="held by SLURM job 77 \\(restart 0\\)"):
        lease.acquire(store_url, _holder("77", 0))  # the same restart count is another trainer
    after = lease.acquire(store_url, _holder("77", 1))  # fresh, but ours from before the requeue
    assert lease.Holder.decode(storage.read_bytes(after.url), after.url) == after.holder
    with pytest.raises(lease.LeaseLost):
        before.refresh()
    before.release()  # not ours any more: left alone
    assert storage.exists(after.url)
    after.release()
    assert not storage.exists(after.url)


def test_the_heartbeat_keeps_a_lease_fresh_and_reports_a_takeover(store_url):
    timeout = 1.5
    held = lease.acquire(store_url, _holder("5"), timeout)
    failures = []
    held.start_heartbeat(lambda message, lost: failures.append((message, lost)))
    try:
        time.sleep(timeout * 3)
        with pytest.raises(lease.LeaseError, match="held by SLURM job 5"):
            lease.acquire(store_url, _holder("6"), timeout)
        assert held.beat >= 3 and failures == []
        lease.acquire(store_url, _holder("5", 1), timeout)  # a requeue of job 5 takes it over
        deadline = time.monotonic() + 30
        while not failures:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert failures[0][1] is True and "no longer ours" in failures[0][0]
    finally:
        held.stop_heartbeat()


def test_an_unreadable_lease_file_is_refused_naming_it(store_url):
    url = lease.lease_url(store_url)
    storage.write(url, b"{not json")
    with pytest.raises(lease.LeaseError, match=f"^{url}: unreadable lease file"):
        lease.acquire(store_url, _holder())
    storage.write(url, b'{"format": "cantus-lease/1", "host": "h"}')
    with pytest.raises(lease.LeaseError, match="unreadable lease file \\(KeyError"):
        lease.acquire(store_url, _holder())
