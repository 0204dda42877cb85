"""The JSON report every benchmark ends with (run the benchmarks as modules: ``python -m benchmarks.<name>``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_report(report: dict[str, Any], out: str | None) -> str:
    """``report`` as indented JSON, also written to ``out`` (parent folders created) when given."""
    text = json.dumps(report, indent=2)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    return text
