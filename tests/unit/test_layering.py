"""The shape of the code: a core (`models/`) without I/O libraries, records without torch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOT_IN_THE_CORE = {"faust", "mode", "aiokafka", "kafka", "prometheus_client", "pyarrow", "rocksdict", "pipeline"}


def _imports(path: Path) -> set[str]:
    """Top-level names of every module `path` imports, at any depth (function-local imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_core_module_imports_kafka_faust_prometheus_or_parquet():
    found = {p.name: sorted(_imports(p) & NOT_IN_THE_CORE) for p in sorted((ROOT / "models").glob("*.py"))}
    assert len(found) >= 12
    assert {name: bad for name, bad in found.items() if bad} == {}


def _loaded_after(*modules: str) -> set[str]:
    code = f"import json, sys; import {', '.join(modules)}; print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return set(json.loads(out.stdout))


def test_importing_the_whole_core_loads_none_of_them():
    core = [f"models.{p.stem}" for p in (ROOT / "models").glob("*.py") if p.stem != "__init__"]
    assert _loaded_after(*core) & NOT_IN_THE_CORE == set()


def test_the_event_record_wire_format_and_clients_do_not_load_torch():
    loaded = _loaded_after("models.events", "models.vocab", "pipeline.records", "pipeline.clients")
    assert "torch" not in loaded and "kafka" in loaded  # the clients do load their kafka library
