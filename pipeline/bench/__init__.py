"""Benchmarks: numbers for docs/performance.md, not tests.

    recur bench step --json      the model step alone (pipeline/bench/step.py; torch only, so that
                                 deploy/gpu-bench.sh runs it on a GPU machine without the broker)
    recur bench e2e --json       the worker through the broker (pipeline/bench/e2e.py, loads.py)
"""
