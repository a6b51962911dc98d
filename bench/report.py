"""Markdown tables from benchmark JSON files (for docs/benchmarks.md and the README)::

    python bench/report.py bench/results/micro-*.json bench/results/speed-ratio-*.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _header(result: dict, path) -> str:
    v = result["versions"]
    return (f"**{Path(path).name}** — {result['device']['name']}, torch {v['torch']}, "
            f"{result['date'][:10]}")


def micro_tables(result: dict, path, sets=None) -> str:
    rows = [r for r in result["results"] if "time_s" in r]
    out = [_header(result, path) + f"; copy bandwidth {result['copy_bandwidth_gbps']:.1f} GB/s, "
           f"{result['config']['dtype']}, {result['config']['threads']} threads", ""]
    for name in dict.fromkeys(r["param_set"] for r in rows):
        if sets and name not in sets:
            continue
        mine = [r for r in rows if r["param_set"] == name]
        out += [f"{name} ({mine[0]['numel'] / 1e6:.2f} M elements, {mine[0]['num_tensors']} tensors):", "",
                "| step | median ms | p10-p90 ms | GB/s | of copy BW | launches | vs fastest torch | hidden ms |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in mine:
            t = r["time_s"]
            launches = "-" if r["launches_per_step"] is None else f"{r['launches_per_step']:.0f}"
            vs = "-" if r.get("vs_fastest_torch") is None else f"{r['vs_fastest_torch']:.2f}x"
            hidden = "-" if r.get("hidden_s") is None else f"{1e3 * r['hidden_s']:.2f}"
            out.append(f"| {r['algorithm']}[{r['impl']}] | {1e3 * t['median']:.2f} | "
                       f"{1e3 * t['p10']:.2f}-{1e3 * t['p90']:.2f} | {r['gbps']:.2f} | "
                       f"{100 * r['copy_fraction']:.0f}% | {launches} | {vs} | {hidden} |")
        out.append("")
    return "\n".join(out)


def speed_table(result: dict, path) -> str:
    cfg = result["config"]
    kind = next(iter(result["results"].values()))["memory_kind"]
    memory = "peak memory" if kind == "peak_memory_bytes" else "optimizer state"
    out = [_header(result, path) + f"; {cfg['model']}, batch {cfg['batch_size']}, amp {cfg['amp']}, "
           f"{cfg['world_size']} process(es)", "",
           f"| optimizer | images/s | vs base | step ms | exposed ms | {memory} MiB | vs base |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, r in result["results"].items():
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        mem_ratio = "-" if r["memory_ratio"] is None else f"{r['memory_ratio']:.3f}"
        exposed = "-" if r.get("exposed_step_s") is None else f"{1e3 * r['exposed_step_s']['median']:.2f}"
        out.append(f"| {label} | {r['images_per_s']:.1f} | {ratio} | "
                   f"{1e3 * r['step_time_s']['median']:.1f} | {exposed} | {r[kind] / 2**20:.1f} | {mem_ratio} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> str:
    p = argparse.ArgumentParser(prog="bench/report.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+")
    p.add_argument("--sets", help="micro: only these parameter sets (comma-separated)")
    args = p.parse_args(argv)
    parts = []
    for path in args.files:
        result = json.loads(Path(path).read_text())
        schema = result.get("schema", "")
        if schema.startswith("msam-fused/micro/"):
            parts.append(micro_tables(result, path, args.sets.split(",") if args.sets else None))
        elif schema.startswith("msam-fused/speed-ratio/"):
            parts.append(speed_table(result, path))
        else:
            p.error(f"{path}: not a benchmark result (schema {schema!r})")
    text = "\n".join(parts)
    print(text)
    return text


if __name__ == "__main__":
    main()
