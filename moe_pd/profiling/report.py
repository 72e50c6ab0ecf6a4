"""Merges per-rank traces and reports how much all-to-all time was hidden under compute.

    python -m moe_pd.profiling.report DIR [--out merged_trace.json.gz]

DIR holds rank<r>_trace.json.gz files (an iter_<step> folder), or is a run's profile/<role> folder, in
which case the latest iter_<step> is used. Writes one Chrome/Perfetto trace with a process per rank and
prints, per layer and stage, communication and compute time summed over ranks and profiled steps.

Communication of a dispatch (or combine) runs from the start of its 'DISPATCH' range, where it is issued,
to the end of its 'DISPATCH-WAIT' range, where the rank has its data; only the wait range blocks the rank.
Hidden fraction = 1 - blocked / in-flight time: 1 when compute placed between issue and wait covered the
whole transfer, 0 when the rank sat waiting for all of it.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

LABEL = re.compile(r"^L(\d+) ([A-Z0-9-]+)(?:\((\d+)\))?$")
COMPUTE_STAGES = ("ATTN-0", "ATTN-1", "SHARED", "MLP", "OUTPUT")
COMM = {"DISPATCH": "DISPATCH-WAIT", "COMBINE": "COMBINE-WAIT"}


def find_traces(path: Path) -> list[Path]:
    traces = sorted(path.glob("rank*_trace.json*"))
    if traces:
        return traces
    iters = sorted((d for d in path.glob("iter_*") if d.is_dir()), key=lambda d: int(d.name.split("_")[1]))
    return sorted(iters[-1].glob("rank*_trace.json*")) if iters else []


def load_events(file: Path) -> list[dict]:
    opener = gzip.open if file.suffix == ".gz" else open
    with opener(file, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def rank_of(file: Path) -> int:
    return int(re.search(r"rank(\d+)", file.name).group(1))


def analyse(events_by_rank: dict[int, list[dict]]) -> dict:
    """Per layer: compute time per stage, and per comm op its in-flight and blocked time (microseconds)."""
    compute = defaultdict(lambda: defaultdict(float))
    comm = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0, 0]))  # layer -> op -> [in flight, blocked, count]
    micro_batches = set()
    for events in events_by_rank.values():
        issued: dict[tuple, list[float]] = defaultdict(list)
        labelled = []
        for e in events:
            if e.get("ph") != "X":
                continue
            m = LABEL.match(e.get("name", ""))
            if m:
                labelled.append((float(e["ts"]), float(e.get("dur", 0.0)), int(m.group(1)), m.group(2), m.group(3)))
        for ts, dur, layer, stage, mb in sorted(labelled):
            micro_batches.add(mb)
            if stage in COMPUTE_STAGES:
                compute[layer][stage] += dur
            elif stage in COMM:
                issued[(layer, stage, mb)].append(ts)
            elif stage in COMM.values():
                op = next(k for k, v in COMM.items() if v == stage)
                starts = issued[(layer, op, mb)]
                if starts:
                    start = starts.pop(0)
                    entry = comm[layer][op]
                    entry[0] += ts + dur - start
                    entry[1] += dur
                    entry[2] += 1
    return {"compute": compute, "comm": comm, "micro_batches": sorted(m for m in micro_batches if m is not None)}


def hidden_fraction(comm: dict) -> float:
    in_flight = sum(v[0] for ops in comm.values() for v in ops.values())
    blocked = sum(v[1] for ops in comm.values() for v in ops.values())
    return 1.0 - blocked / in_flight if in_flight > 0 else 0.0


def merge(events_by_rank: dict[int, list[dict]]) -> dict:
    merged = []
    for rank, events in sorted(events_by_rank.items()):
        merged.append({"ph": "M", "name": "process_name", "pid": rank, "tid": 0, "args": {"name": f"rank{rank}"}})
        merged.append({"ph": "M", "name": "process_sort_index", "pid": rank, "tid": 0, "args": {"sort_index": rank}})
        for e in events:
            if e.get("ph") == "M" and e.get("name") in ("process_name", "process_sort_index"):
                continue
            merged.append({**e, "pid": rank})
    return {"traceEvents": merged, "displayTimeUnit": "ms"}


def format_report(stats: dict, ranks: int) -> str:
    lines = [f"{ranks} ranks, micro-batches {stats['micro_batches'] or ['(none: plain forward)']}; times in ms, "
             "summed over ranks and profiled steps",
             f"{'layer':>5} {'disp fly':>9} {'disp wait':>9} {'comb fly':>9} {'comb wait':>9} {'hidden':>7} "
             + " ".join(f"{s:>7}" for s in COMPUTE_STAGES)]
    layers = sorted(set(stats["compute"]) | set(stats["comm"]))
    for layer in layers:
        d = stats["comm"][layer].get("DISPATCH", [0.0, 0.0, 0])
        c = stats["comm"][layer].get("COMBINE", [0.0, 0.0, 0])
        fly, wait = d[0] + c[0], d[1] + c[1]
        hidden = f"{1 - wait / fly:7.1%}" if fly > 0 else f"{'-':>7}"
        lines.append(f"{layer:5d} {d[0] / 1e3:9.2f} {d[1] / 1e3:9.2f} {c[0] / 1e3:9.2f} {c[1] / 1e3:9.2f} {hidden} "
                     + " ".join(f"{stats['compute'][layer].get(s, 0.0) / 1e3:7.2f}" for s in COMPUTE_STAGES))
    lines.append(f"communication hidden under compute: {hidden_fraction(stats['comm']):.1%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="merged trace (default: DIR/merged_trace.json.gz)")
    args = parser.parse_args(argv)
    traces = find_traces(args.dir)
    if not traces:
        print(f"error: no rank*_trace.json.gz under {args.dir}", file=sys.stderr)
        return 2
    events = {rank_of(t): load_events(t) for t in traces}
    out = args.out or traces[0].parent / "merged_trace.json.gz"
    with gzip.open(out, "wt") as f:
        json.dump(merge(events), f)
    print(f"merged {len(traces)} traces into {out}")
    print(format_report(analyse(events), len(traces)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
