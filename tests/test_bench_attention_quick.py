"""benchmarks/bench_attention.py --quick runs on CPU (tiny shapes, torch backend), so the script never rots."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_attention.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_attention", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_mode_runs_on_cpu(tmp_path, capsys):
    bench = _load_script()
    out = tmp_path / "bench.jsonl"
    bench.main(["--quick", "--device", "cpu", "--dtypes", "fp32,bf16", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| case | dtype | fused | fused+pad | fused+packed | sdpa | sdpa+pad | eager+pad |" in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(bench.QUICK_CASES) * 2 * len(bench.METHODS)
    assert all(row["ms"] > 0 and row["error"] is None and row["backend"] == "torch" for row in rows)
    assert {row["method"] for row in rows} == set(bench.METHODS)
