"""The worker's garbage-collector settings (pipeline/worker.py quiet_gc), in a child process:
they change the interpreter they run in."""

import json
import subprocess
import sys

CHILD = """
import gc, json
from pipeline.worker import GC_YOUNG, quiet_gc
runs = []
gc.callbacks.append(lambda phase, info: runs.append(info["generation"]) if phase == "stop" else None)
def batch(n):  # a batch's worth of short-lived containers alive at once, then dropped
    rows = [{"user": i, "items": [i, i + 1]} for i in range(n)]
    return len(rows)
batch(15_000)
default_runs = len(runs)
quiet_gc()
runs.clear()
batch(15_000)
quiet_runs = len(runs)
class Node:
    def __init__(self):
        self.me = self  # a cycle: only the collector frees it
for _ in range(GC_YOUNG + 1_000):
    Node()
print(json.dumps({"default": default_runs, "quiet": quiet_runs, "cycles": len(runs) - quiet_runs,
                  "young": gc.get_threshold()[0], "frozen": gc.get_freeze_count()}))
"""


def test_a_batch_of_short_lived_objects_runs_no_collection_but_cycles_are_still_collected():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["default"] >= 20  # 30,000 containers at Python's default threshold of 700
    assert got["quiet"] == 0  # the same batch after quiet_gc: no pause inside it
    assert got["cycles"] >= 1  # garbage in cycles still reaches a collection (it is not leaked)
    assert got["young"] == 50_000
    assert got["frozen"] > 1_000  # what was built before (the imports) is out of the collector's way
