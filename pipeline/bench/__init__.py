"""Benchmarks: numbers for docs/performance.md, not tests.

    recur bench step --json      the model step alone (pipeline/bench/step.py)
    recur bench e2e --json       the worker through the broker (pipeline/bench/e2e.py, loads.py)
"""

from pipeline.bench.e2e import run_e2e_bench
from pipeline.bench.step import StepBench, run_step_bench

__all__ = ["StepBench", "run_e2e_bench", "run_step_bench"]
