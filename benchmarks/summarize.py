"""Summarise the JSON results of benchmarks/gpu_bench.sh: the ratios the targets are stated in.

python benchmarks/summarize.py bench_results      # prints a table, writes bench_results/summary.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from crossdistill.files import write_text_atomic


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summarize(folder: Path) -> dict:
    out: dict = {"runs": {}}
    loader = _load(folder / "loader.json")
    if loader:
        out["loader"] = {
            k: loader[k]["img_per_s"] for k in ("float", "uint8_gpu_normalise", "device_augment") if k in loader
        }
        out["loader"]["source"] = loader["source"]
        out["loader"]["workers"] = loader["workers"]
    for path in sorted(folder.glob("*.json")):
        if path.name in ("loader.json", "summary.json"):
            continue
        result = _load(path)
        if not result or "variants" not in result:
            out["runs"][path.stem] = "failed (see the .log)"
            continue
        v, r = result["variants"], result["ratios"]
        row = {
            "device": result["config"]["device_name"],
            "amp": result["config"]["amp"],
            "img_per_s": {name: round(x["img_per_s"], 1) for name, x in v.items() if x.get("steps")},
            "peak_mem_mb": {
                name: (None if x.get("peak_mem_mb") is None else round(x["peak_mem_mb"]))
                for name, x in v.items()
                if x.get("steps")
            },
            "ratios": {k: (None if x is None else round(x, 3)) for k, x in r.items()},
        }
        if loader:
            for pipeline in ("float", "device_augment"):
                for name in ("ours", "ours_cached"):
                    if pipeline in loader and name in v:
                        row.setdefault("loader_over_step", {})[f"{pipeline}/{name}"] = round(
                            loader[pipeline]["img_per_s"] / v[name]["img_per_s"], 3
                        )
        out["runs"][path.stem] = row
    return out


def main(argv=None) -> int:
    folder = Path((argv or sys.argv[1:] or ["bench_results"])[0])
    summary = summarize(folder)
    write_text_atomic(folder / "summary.json", json.dumps(summary, indent=2), hint="the bench's output folder")
    if "loader" in summary:
        print(
            f"loader ({summary['loader']['source']}, {summary['loader']['workers']} workers): "
            + ", ".join(f"{k} {v:.0f} img/s" for k, v in summary["loader"].items() if isinstance(v, float))
        )
    for name, row in summary["runs"].items():
        if isinstance(row, str):
            print(f"{name}: {row}")
            continue
        ips = row["img_per_s"]
        print(
            f"{name} [{row['device']}, amp {row['amp']}]: "
            + ", ".join(f"{k} {x:.0f}" for k, x in ips.items())
            + " img/s"
        )
        print(
            "    "
            + ", ".join(f"{k} {x}" for k, x in row["ratios"].items())
            + (f", loader/step {row['loader_over_step']}" if "loader_over_step" in row else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
