#!/usr/bin/env python3
"""bench/instructions' bookkeeping: one JSON line per target and protocol, then the table.

  instructions.py total CALLGRIND_OUT
      prints the total instruction count (Ir) of a callgrind output file
  instructions.py record --append RUNS --target T --protocol P --status ok|na|failed ...
      appends one result (see the options below) to RUNS (JSON lines)
  instructions.py report --runs RUNS --meta META --out FILE
      prints the table (target x protocol: instructions per transaction, and the ratios
      pgmux / PgBouncer and pgmux / pgmux-base) and writes FILE (JSON)

Standard library only.
"""

import argparse
import json
import sys

TARGET_NAMES = {"pgmux": "pgmux", "pgbouncer": "PgBouncer", "pgmux-base": "pgmux-base"}


def total(path):
    """The `totals:` line of a callgrind file (its `summary:` line when there is none)."""
    found = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            for key in ("events:", "totals:", "summary:"):
                if line.startswith(key) and key not in found:
                    found[key] = line[len(key):].split()
    events = found.get("events:")
    counts = found.get("totals:") or found.get("summary:")
    if not counts:
        sys.exit(f"{path}: no totals: or summary: line (did the process exit cleanly?)")
    # The first event is Ir unless the tool was told to count more.
    index = events.index("Ir") if events and "Ir" in events else 0
    return int(counts[index])


def record(args):
    row = {"target": args.target, "protocol": args.protocol, "status": args.status}
    if args.reason:
        row["reason"] = args.reason
    if args.status == "ok":
        transactions = args.clients * args.per_client
        extra = args.run_ir - args.base_ir
        row.update(
            clients=args.clients,
            transactions_per_client=args.per_client,
            warmup_per_client=args.warmup,
            transactions=transactions,
            instructions_run=args.run_ir,
            instructions_baseline=args.base_ir,
            instructions_per_transaction=round(extra / transactions, 1),
            baseline_per_warmup_transaction=round(args.base_ir / (args.clients * args.warmup), 1)
            if args.warmup
            else None,
            servers_run=args.servers_run,
            servers_baseline=args.servers_base,
            seconds_run=args.seconds_run,
            seconds_baseline=args.seconds_base,
        )
        if extra <= 0:
            row["status"] = "failed"
            row["reason"] = f"the run counted {args.run_ir} instructions, its baseline {args.base_ir}"
    with open(args.append, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    if row["status"] == "ok":
        print(
            f"instructions: {args.target} {args.protocol}: "
            f"{row['instructions_per_transaction']:,.0f} instructions per transaction "
            f"({args.run_ir:,} - baseline {args.base_ir:,}, over {row['transactions']} transactions; "
            f"{args.seconds_run} s under valgrind)"
        )
    else:
        print(f"instructions: {args.target} {args.protocol}: {row['status']}: {row.get('reason', '')}")


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def report(args):
    rows = [json.loads(line) for line in open(args.runs, encoding="utf-8") if line.strip()]
    meta = json.load(open(args.meta, encoding="utf-8"))
    targets = meta["targets"]
    protocols = meta["protocols"]
    cell = {(r["target"], r["protocol"]): r for r in rows}

    def per_txn(t, p):
        r = cell.get((t, p))
        return r["instructions_per_transaction"] if r and r["status"] == "ok" else None

    ratios = []
    for p in protocols:
        mux = per_txn("pgmux", p)
        entry = {"protocol": p}
        if "pgbouncer" in targets:
            entry["pgmux_over_pgbouncer"] = ratio(mux, per_txn("pgbouncer", p))
        if "pgmux-base" in targets:
            entry["pgmux_over_pgmux_base"] = ratio(mux, per_txn("pgmux-base", p))
        ratios.append(entry)

    header = ["protocol"]
    for t in targets:
        name = TARGET_NAMES.get(t, t)
        if t == "pgbouncer" and meta.get("pgbouncer_version"):
            name += " " + meta["pgbouncer_version"]
        header.append(name)
    if "pgbouncer" in targets:
        header.append("pgmux / PgBouncer")
    if "pgmux-base" in targets:
        header.append("pgmux / pgmux-base")
    table = [header]
    for p, entry in zip(protocols, ratios):
        line = [p]
        for t in targets:
            r = cell.get((t, p))
            if r is None:
                line.append("-")
            elif r["status"] == "ok":
                line.append(f"{r['instructions_per_transaction']:,.0f}")
            elif r["status"] == "na":
                line.append("n/a")
            else:
                line.append("FAILED")
        for key in ("pgmux_over_pgbouncer", "pgmux_over_pgmux_base"):
            if key in entry:
                line.append("-" if entry[key] is None else f"{entry[key]:.2f}")
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print()
    print(
        f"Instructions per transaction (callgrind Ir, pooler process only): "
        f"{meta['clients']} client{'s' if meta['clients'] != 1 else ''} x {meta['transactions_per_client']} transactions of pgbench -S (tpcb: tpcb-like), "
        f"pool of {meta['pool_size']}, transaction mode"
    )
    for row in table:
        print(" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    for t in targets:
        label = {"pgmux": meta.get("pgmux"), "pgmux-base": meta.get("pgmux_base")}.get(t)
        if label:
            print(f"  {t}: {label}")
    failed = [r for r in rows if r["status"] == "failed"]
    for r in rows:
        if r["status"] != "ok" and r.get("reason"):
            print(f"  {r['target']} {r['protocol']}: {r['status']}: {r['reason']}")
    out = {"meta": meta, "results": rows, "ratios": ratios}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    print(f"  written to {args.out}")
    return 1 if failed else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("total")
    p.add_argument("path")
    p = sub.add_parser("record")
    p.add_argument("--append", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--protocol", required=True)
    p.add_argument("--status", required=True, choices=["ok", "na", "failed"])
    p.add_argument("--reason", default="")
    p.add_argument("--clients", type=int, default=0)
    p.add_argument("--per-client", type=int, default=0)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--run-ir", type=int, default=0)
    p.add_argument("--base-ir", type=int, default=0)
    p.add_argument("--servers-run", type=int, default=None)
    p.add_argument("--servers-base", type=int, default=None)
    p.add_argument("--seconds-run", type=int, default=None)
    p.add_argument("--seconds-base", type=int, default=None)
    p = sub.add_parser("report")
    p.add_argument("--runs", required=True)
    p.add_argument("--meta", required=True)
    p.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.command == "total":
        print(total(args.path))
        return 0
    if args.command == "record":
        record(args)
        return 0
    return report(args)


if __name__ == "__main__":
    sys.exit(main())
