"""benchmarks/gpu_suite.py cannot rot: its quick mode runs the memory rows (a real PUMIT training step counted
against the memory model) end to end on the CPU and writes its JSON. No timing is asserted."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_quick_memory_rows_run_and_write_json(tmp_path, capsys) -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import gpu_suite
    finally:
        sys.path.remove(str(BENCHMARKS))
    out = tmp_path / "suite.json"
    assert gpu_suite.main(["--quick", "--device", "cpu", "--sections", "memory", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {row["name"]: row for row in result["rows"]}
    assert set(rows) == {"memory model: training_memory_bytes", "memory model: peak_memory_bytes"}
    counted = rows["memory model: training_memory_bytes"]
    # the memory model's own acceptance band (tests/test_memory_model.py) holds for the suite's quick network too
    assert math.isfinite(counted["ratio"]) and 0.85 <= counted["ratio"] <= 1.15
    assert rows["memory model: peak_memory_bytes"]["value"] > counted["value"]
    assert "memory model: training_memory_bytes" in capsys.readouterr().out
