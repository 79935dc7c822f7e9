"""The faust app's wiring that needs no broker."""

import asyncio

from pipeline.app import create_app
from pipeline.config import load_settings


def test_the_consumer_waits_for_the_seek_after_a_rebalance(tmp_path):
    """Recovery sends on_rebalance_complete right before it resumes the input partitions and
    seeks; events fetched before that seek were cleared from the queue and then skipped by the
    commit, so the flow must be stopped there (recovery resumes it after the seek)."""
    streams = create_app(load_settings({"RECUR_VAR_DIR": str(tmp_path), "RECUR_APP_ID": "recur-unit"}))
    app = streams.app

    async def rebalance_completes():
        app.consumer.resume_flow()
        app.flow_control.resume()  # as faust's recovery leaves them before it seeks
        assert app.consumer.flow_active and app.flow_control.is_active()
        await app.on_rebalance_complete.send()
        return app.consumer.flow_active, app.flow_control.is_active(), app.consumer.suspend_flow.is_set()

    flow_active, queues_active, suspended = asyncio.run(rebalance_completes())
    assert (flow_active, queues_active, suspended) == (False, False, True)
