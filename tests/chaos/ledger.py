"""The chaos ledger (JSON lines written by the scenarios, T2V_CHAOS_LEDGER) as the markdown table
of RELIABILITY.md: `python -m tests.chaos.ledger runs/chaos-ledger.jsonl`."""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def table(rows: list[dict]) -> str:
    by_fault: dict[str, dict] = defaultdict(lambda: {"runs": 0, "injected": 0, "survived": 0,
                                                     "lost": 0, "notes": []})
    for r in rows:
        f = by_fault[r["fault"]]
        f["runs"] += 1
        for k in ("injected", "survived", "lost"):
            f[k] += int(r.get(k) or 0)
        if r.get("note"):
            f["notes"].append(r["note"])
    lines = ["| fault (caused from outside) | runs | injected | survived | lost | notes |",
             "|---|---|---|---|---|---|"]
    for fault, f in by_fault.items():
        note = "; ".join(f["notes"][:3]) + (" ..." if len(f["notes"]) > 3 else "")
        lines.append(f"| {fault} | {f['runs']} | {f['injected']} | {f['survived']} | "
                     f"{f['lost']} | {note} |")
    return "\n".join(lines)


def main(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(x) for x in f if x.strip()]
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
