"""The loads and floors `recur bench e2e` measures the worker against: pre-loaded events, the paced
load of its latency run, a bare aiokafka consume-and-produce loop, and an empty faust agent (run in
a child process)."""

from __future__ import annotations

import time
from collections.abc import Callable

from pipeline.config import Settings


def _preload(settings: Settings, topic: str, n_events: int, n_users: int, names: list[str], seed: int = 1) -> None:
    """n_events wire-format events keyed by user, Zipf-ish over the item ids `names`, timestamps of now."""
    import random

    from models.events import CLICK, Event
    from pipeline.clients import producer
    from pipeline.records import encode_event

    rng = random.Random(seed)
    weights = [1.0 / (1 + r) for r in range(len(names))]
    items = rng.choices(names, weights=weights, k=n_events)
    now = int(time.time() * 1000)
    prod = producer(settings)
    for n in range(n_events):
        key, value = encode_event(Event(f"u{rng.randrange(n_users)}", items[n], CLICK, now, event_id=f"e{n}"))
        prod.send(topic, key=key, value=value)
    prod.flush()
    prod.close()


async def _passthrough(bootstrap: str, topic: str, out_topic: str, n_events: int) -> float:
    """A plain aiokafka consume-and-produce loop; -> events per second."""
    import uuid

    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"bench-pass-{uuid.uuid4().hex[:6]}",
                                auto_offset_reset="earliest")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await consumer.start()
    await producer.start()
    n, started = 0, None
    try:
        async for msg in consumer:
            if started is None:
                started = time.perf_counter()
            await producer.send(out_topic, key=msg.key, value=b"1")
            n += 1
            if n >= n_events:
                break
        await producer.flush()
        assert started is not None  # n_events > 0 were read
        return n / (time.perf_counter() - started)
    finally:
        await consumer.stop()
        await producer.stop()


async def _paced(settings: Settings, topic: str, warmup_topic: str, rate: float, seconds: float, n_users: int,
                 names: list[str], tick: Callable[[float], None] | None = None) -> int:
    """`recur bench e2e`'s paced load: `rate` events/s for `seconds` (user u{n % n_users} on
    names[n % len(names)], event ids lat{n}), each stamped with the time it is handed to the
    producer; `tick(elapsed)` between rounds. -> events sent, every one acknowledged.

    The load generator shares the machine with the worker and the broker, and what it costs is
    taken from them: kafka-python's `send()` and a `flush()` every round cost ~107 µs of CPU an
    event (0.32 of a core at 3,000 events/s on the 2-vCPU VM, a scratch script). This appends each
    round's events to one aiokafka batch per partition (`pipeline/producing.py`), the partition the
    default partitioner picks for the key, and sends them at once. The producer starts (metadata,
    connection, producer id; one record to `warmup_topic`) before the clock."""
    import asyncio

    from aiokafka import AIOKafkaProducer

    from models.events import CLICK, Event
    from pipeline import security
    from pipeline.producing import PartitionBatches, partitions_for
    from pipeline.records import encode_event

    producer = AIOKafkaProducer(acks="all", enable_idempotence=True, **security.aiokafka(settings))
    await producer.start()
    try:
        await producer.send_and_wait(warmup_topic, value=b"")
        keys = [f"u{u}".encode() for u in range(n_users)]
        partition_of = partitions_for(keys, await PartitionBatches(producer, topic).partitions())
        sent, n_items, acks = 0, len(names), []
        t0 = time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds:
            if tick is not None:
                tick(elapsed)
            due = int(elapsed * rate)
            if sent < due:
                out = PartitionBatches(producer, topic)
                while sent < due:
                    user = sent % n_users
                    key, value = encode_event(Event(f"u{user}", names[sent % n_items], CLICK, int(time.time() * 1000),
                                                    event_id=f"lat{sent}"))
                    out.add(partition_of[user], key, value)
                    sent += 1
                acks += [future for _, _, future in await out.submit()]
            await asyncio.sleep(0.005)
        await asyncio.gather(*acks)  # raises if the broker refused a batch
        return sent
    finally:
        await producer.stop()


def faust_floor_main() -> None:
    """An empty faust agent on the events topic: it batches and acks like the worker's agent
    (same batching, same fetch wait) and does nothing else. Run by `run_e2e_bench` in a child
    process; reads RECUR_* settings plus RECUR_FLOOR_EVENTS and writes events/s to
    RECUR_FLOOR_OUT (whose name, less its suffix, names the consumer group). What any faust worker
    pays before doing any work. Its faust folder sits beside RECUR_FLOOR_OUT, in the run's folder,
    which the bench removes."""
    import os
    import sys
    from pathlib import Path

    import faust

    from pipeline.batching import batches, broker_backlog
    from pipeline.config import load_settings
    from pipeline.faust_internals import ack_all, limit_fetch_wait

    settings = load_settings(os.environ)
    n_events, out = int(os.environ["RECUR_FLOOR_EVENTS"]), Path(os.environ["RECUR_FLOOR_OUT"])
    limit_fetch_wait(max(1, int(settings.fetch_max_wait * 1000)))
    app = faust.App(f"{settings.app_id}-{out.stem}", broker=f"kafka://{settings.bootstrap_servers}", store="memory://",
                    datadir=str(out.parent / f"{out.stem}-data"), processing_guarantee="at_least_once",
                    consumer_auto_offset_reset="earliest", web_enabled=False, topic_allow_declare=False,
                    logging_config=None)
    topic = app.topic(settings.events_topic, key_serializer="raw", value_serializer="raw")
    seen = {"n": 0, "first": 0, "t0": 0.0}

    @app.agent(topic)
    async def floor(stream):  # noqa: ANN001 - faust passes a StreamT
        behind = broker_backlog(app, settings.max_batch)
        async for batch in batches(stream, settings.max_batch, settings.max_wait, settings.backlog_wait, behind):
            if not seen["t0"]:
                seen["t0"], seen["first"] = time.perf_counter(), len(batch)
            ack_all(app, batch)  # as the worker's agent acks (pipeline/agents.py)
            seen["n"] += len(batch)
            if seen["n"] >= n_events:
                out.write_text(str((seen["n"] - seen["first"]) / max(time.perf_counter() - seen["t0"], 1e-9)))
                os._exit(0)

    sys.argv = ["recur-bench-floor", "worker", "-l", "warn"]
    app.main()


def _faust_floor(settings: Settings, n_events: int, folder: str, name: str) -> float:
    """The empty agent's events/s over the topic's `n_events`, in a child process with a consumer
    group of its own (`<app id>-<name>`: each name reads the topic from its beginning)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = Path(folder) / f"{name}.txt"
    env = {**os.environ, **settings.to_env(), "RECUR_FLOOR_EVENTS": str(n_events), "RECUR_FLOOR_OUT": str(out)}
    with open(Path(folder) / f"{name}.log", "wb") as log_file:
        subprocess.run([sys.executable, "-c", "from pipeline.bench.loads import faust_floor_main; faust_floor_main()"],
                       env=env, stdout=log_file, stderr=subprocess.STDOUT, timeout=600, check=False)
    if not out.exists():
        raise RuntimeError(f"bench: the empty faust agent did not finish; see {Path(folder) / f'{name}.log'}")
    return float(out.read_text())
