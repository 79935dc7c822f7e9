"""The agent's helpers that need no broker: batching off a queue, counting users."""

import asyncio
from types import SimpleNamespace

from pipeline.agents import batches, count_users


class _Db:
    def __init__(self, keys: int) -> None:
        self.keys = keys

    def property_int_value(self, name: str) -> int:
        assert name == "rocksdb.estimate-num-keys"
        return self.keys + 1  # + the store's own offset record


class _Table:
    def __init__(self, data, size: int) -> None:
        self.data, self.size = data, size

    def __len__(self) -> int:
        return self.size


def test_users_are_counted_from_rocksdb_estimates_without_walking_keys():
    store = SimpleNamespace(use_rocksdict=True, _dbs_for_actives=lambda: iter([_Db(120), _Db(0)]))  # faust yields the DBs
    assert count_users(_Table(store, size=-1)) == 120  # len() is never called: it walks every key
    assert count_users(_Table(SimpleNamespace(), size=7)) == 7  # memory store: exact count


def test_batches_take_a_backlog_at_once_and_wait_briefly_for_more():
    async def scenario():
        queue = asyncio.Queue()
        stream = SimpleNamespace(channel=SimpleNamespace(queue=queue))
        for n in range(2500):
            queue.put_nowait(n)
        it = batches(stream, max_batch=1000, max_wait=0.05)
        sizes = [len(await it.__anext__()) for _ in range(3)]  # the backlog: capped, in order
        loop = asyncio.get_running_loop()
        loop.call_later(0.01, queue.put_nowait, "late")  # arrives within max_wait of the first
        queue.put_nowait("first")
        started = loop.time()
        tail = await it.__anext__()
        waited = loop.time() - started
        return sizes, tail, waited

    sizes, tail, waited = asyncio.run(scenario())
    assert sizes == [1000, 1000, 500]
    assert tail == ["first", "late"] and 0.04 <= waited < 0.5
