#!/usr/bin/env python3
"""Numbers for bench/run: one pgbench run summarized, and the final table and files.

    results.py run --scenario S1 --target pgmux --dir RUN_DIR [--dir RUN_DIR ...] --exit-status N \
        [--cpu-ticks T --clk-tck 100] [--rss-peak-kib K] [--set key=value ...]
        reads each round's RUN_DIR/pgbench.out, RUN_DIR/pgbench.err and RUN_DIR/log.*
        (per-transaction logs), prints one JSON object on one line for all the rounds

    results.py skip --scenario S3 --target pgbouncer --reason "..."     an n/a cell
    results.py fail --scenario S8 --target pgmux --reason "..."         a run that could not run

    results.py report --runs runs.jsonl --meta meta.json --out-dir bench/results --name NAME
        prints the table, writes NAME.{json,csv,md} (and latest.* when --latest), exits 1 when
        any run had errors or could not run
"""

import argparse
import csv
import glob
import io
import json
import math
import os
import re
import sys

SCENARIOS = {
    "S1": "S1 select, simple",
    "S2": "S2 select, extended",
    "S3": "S3 select, prepared",
    "S4": "S4 tpcb-like",
    "S5": "S5 storm 1000 clients",
    "S6": "S6 connect per tx",
    "S7": "S7 1 MiB rows (MiB/s)",
    "S8": "S8 S1 + 10k idle",
    "S1T": "S1T S1, client TLS",
    "S1TT": "S1TT S1, TLS both sides",
    "S6T": "S6T connect per tx, TLS",
}
TARGETS = ["direct", "pgbouncer", "pgmux"]
POOLERS = ["pgbouncer", "pgmux"]


# --- one run ------------------------------------------------------------------------------


def parse_pgbench_out(text):
    def number(pattern, cast=float):
        m = re.search(pattern, text, re.M)
        return cast(m.group(1)) if m else None

    return {
        "tps": number(r"^tps = ([0-9.]+)"),
        "transactions": number(r"^number of transactions actually processed: (\d+)", int),
        "failed_transactions": number(r"^number of failed transactions: (\d+)", int) or 0,
        "clients": number(r"^number of clients: (\d+)", int),
    }


def latencies(log_globs):
    """Mean and p99 (ms) of the per-transaction logs, and how many were not successes."""
    values = []
    not_ok = 0
    for path in (p for g in log_globs for p in glob.glob(g)):
        with open(path) as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                if fields[2].isdigit():
                    values.append(int(fields[2]))
                else:  # failed, skipped, serialization, deadlock
                    not_ok += 1
    if not values:
        return None, None, 0, not_ok
    values.sort()
    mean = sum(values) / len(values) / 1000.0
    p99 = values[min(len(values) - 1, math.ceil(0.99 * len(values)) - 1)] / 1000.0
    return mean, p99, len(values), not_ok


def combine(parsed_rounds):
    """One result from several rounds: transactions add up; TPS is all transactions over
    all the measured time (each round's time is its transactions over its TPS)."""
    done = [p for p in parsed_rounds if p["tps"] and p["transactions"]]
    tx = sum(p["transactions"] or 0 for p in parsed_rounds)
    busy = sum(p["transactions"] / p["tps"] for p in done)
    return {
        "tps": tx / busy if busy else None,
        "transactions": tx,
        "failed_transactions": sum(p["failed_transactions"] for p in parsed_rounds),
        "clients": parsed_rounds[0]["clients"],
        "rounds": len(parsed_rounds),
    }


def cmd_run(a):
    def read(d, name):
        return open(os.path.join(d, name), errors="replace").read()

    err = "".join(read(d, "pgbench.err") for d in a.dir)
    parsed = combine([parse_pgbench_out(read(d, "pgbench.out")) for d in a.dir])
    mean, p99, logged, log_not_ok = latencies([os.path.join(d, "log.*") for d in a.dir])
    aborted = len(re.findall(r"client \d+ aborted", err))
    error_lines = [
        line.strip()
        for line in err.splitlines()
        if re.search(r"error|fatal|abort|FATAL|ERROR|could not", line)
    ]
    rec = {
        "scenario": a.scenario,
        "target": a.target,
        "status": "ok",
        "exit_status": a.exit_status,
        "aborted_clients": aborted,
        "mean_ms": mean,
        "p99_ms": p99,
        "logged_transactions": logged,
        **parsed,
    }
    rec["failed_transactions"] = max(rec["failed_transactions"], log_not_ok)
    rec["errors"] = rec["failed_transactions"] + aborted
    if a.cpu_ticks is not None and a.clk_tck:
        rec["cpu_s"] = a.cpu_ticks / a.clk_tck
        tx = rec["transactions"] or 0
        rec["cpu_s_per_10k_tx"] = rec["cpu_s"] * 10000 / tx if tx else None
    if a.rss_peak_kib:
        rec["rss_peak_kib"] = a.rss_peak_kib
    for kv in a.set or []:
        key, value = kv.split("=", 1)
        try:
            rec[key] = json.loads(value)
        except ValueError:
            rec[key] = value
    problems = []
    if rec.get("timeout_message"):
        problems.append(rec.pop("timeout_message"))
    elif a.exit_status != 0:
        problems.append(f"pgbench exited with status {a.exit_status}")
    if rec["failed_transactions"]:
        problems.append(f"{rec['failed_transactions']} failed transactions")
    if aborted:
        problems.append(f"{aborted} clients aborted")
    if not rec["tps"] or not rec["transactions"]:
        problems.append("no transactions completed")
    if problems:
        rec["status"] = "errors" if rec["transactions"] else "failed"
        rec["errors"] = max(rec["errors"], 1)
        rec["message"] = "; ".join(problems)
        if error_lines:
            # The same error from many clients once: client numbers do not make it different.
            distinct = dict.fromkeys(re.sub(r"client \d+", "client N", e) for e in error_lines)
            rec["message"] += " | pgbench: " + " | ".join(list(distinct)[:3])
    emit(a, rec)


def cmd_mark(a, status):
    rec = {"scenario": a.scenario, "target": a.target, "status": status, "message": a.reason}
    for kv in getattr(a, "set", None) or []:
        key, value = kv.split("=", 1)
        try:
            rec[key] = json.loads(value)
        except ValueError:
            rec[key] = value
    emit(a, rec)


def emit(a, rec):
    """Appends the run to --append (one JSON line) and prints it in one short line."""
    with open(a.append, "a") as f:
        f.write(json.dumps(rec) + "\n")
    where = f"  {rec['scenario']} {rec['target']}:"
    if rec["status"] in ("n/a", "failed"):
        print(f"{where} {rec['status']}: {rec.get('message', '')}")
        return

    def f(v, d=2):
        return "-" if v is None else f"{v:,.{d}f}"

    rss = rec.get("rss_peak_kib")
    print(
        f"{where} {f(rec.get('tps'), 0)} TPS, mean {f(rec.get('mean_ms'))} ms, p99 {f(rec.get('p99_ms'))} ms, "
        f"{rec['errors']} errors"
        + (f", CPU {f(rec.get('cpu_s_per_10k_tx'), 3)} s/10k tx" if rec.get("cpu_s") is not None else "")
        + (f", RSS peak {rss / 1024:.1f} MiB" if rss else "")
        + (f"  [{rec['message']}]" if rec.get("message") else "")
    )


# --- the report ---------------------------------------------------------------------------


def fmt(value, digits=0, suffix=""):
    if value is None:
        return "-"
    if isinstance(value, float) and digits == 0:
        return f"{value:,.0f}{suffix}"
    return f"{value:,.{digits}f}{suffix}"


def ratio(a, b):
    if a is None or b is None or not b:
        return None
    return a / b


def fmt_ratio(r):
    return "-" if r is None else f"{r:.2f}x"


def cell_values(rec):
    """TPS, mean, p99, errors, CPU s/10k, RSS MiB as strings for one cell."""
    if rec is None:
        return ["", "", "", "", "", ""]
    status = rec["status"]
    if status == "n/a":
        return ["n/a", "", "", "", "", ""]
    if status == "failed":
        return ["FAILED", "", "", "", "", ""]
    rss = rec.get("rss_peak_kib")
    return [
        fmt(rec.get("tps")),
        fmt(rec.get("mean_ms"), 2),
        fmt(rec.get("p99_ms"), 2),
        str(rec.get("errors", 0)) + ("!" if rec.get("errors") else ""),
        fmt(rec.get("cpu_s_per_10k_tx"), 3),
        fmt(rss / 1024.0, 1) if rss else "-",
    ]


def usable(rec):
    return rec is not None and rec["status"] in ("ok", "errors") and rec.get("tps")


def build_rows(runs, scenarios, targets):
    by = {(r["scenario"], r["target"]): r for r in runs}
    rows = []
    for s in scenarios:
        row = {"scenario": s, "label": SCENARIOS[s], "cells": {}}
        for t in targets:
            row["cells"][t] = by.get((s, t))
        pgb, mux = by.get((s, "pgbouncer")), by.get((s, "pgmux"))
        if usable(pgb) and usable(mux):
            row["ratio"] = {
                "tps": ratio(mux.get("tps"), pgb.get("tps")),
                "cpu": ratio(mux.get("cpu_s_per_10k_tx"), pgb.get("cpu_s_per_10k_tx")),
                "mean": ratio(mux.get("mean_ms"), pgb.get("mean_ms")),
                "p99": ratio(mux.get("p99_ms"), pgb.get("p99_ms")),
            }
        else:
            row["ratio"] = None
        rows.append(row)
    return rows, by


def render_table(rows, targets, names, markdown=False):
    metric_names = ["TPS", "mean ms", "p99 ms", "err", "CPU s/10k", "RSS MiB"]
    per_target = {t: (metric_names[:4] if t == "direct" else metric_names) for t in targets}
    with_ratio = "pgbouncer" in targets and "pgmux" in targets
    ratio_names = ["TPS", "CPU", "mean", "p99"]

    header1 = ["scenario"]
    header2 = [""]
    for t in targets:
        header1 += [names[t]] + [""] * (len(per_target[t]) - 1)
        header2 += per_target[t]
    if with_ratio:
        header1 += ["pgmux / PgBouncer"] + [""] * (len(ratio_names) - 1)
        header2 += ratio_names
    lines = []
    for row in rows:
        line = [row["label"]]
        for t in targets:
            line += cell_values(row["cells"][t])[: len(per_target[t])]
        if with_ratio:
            r = row["ratio"] or {}
            line += [fmt_ratio(r.get(k)) for k in ("tps", "cpu", "mean", "p99")]
        lines.append(line)

    if markdown:
        # One row per scenario and target (a 21-column table does not fit a page); the
        # pgmux row carries the ratios to PgBouncer.
        head = ["scenario", "target"] + metric_names
        if with_ratio:
            head += ["TPS vs PgBouncer", "CPU vs PgBouncer", "mean vs PgBouncer", "p99 vs PgBouncer"]
        out = ["| " + " | ".join(head) + " |", "|---|---|" + "--:|" * (len(head) - 2)]
        for row in rows:
            for i, t in enumerate(targets):
                cells = cell_values(row["cells"][t])
                if t == "direct":
                    cells = cells[:4] + ["", ""]
                line = [row["label"] if i == 0 else "", names[t]] + cells
                if with_ratio:
                    r = row["ratio"] if t == "pgmux" and row["ratio"] else {}
                    line += [fmt_ratio(r[k]) if r else "" for k in ("tps", "cpu", "mean", "p99")]
                out.append("| " + " | ".join(line) + " |")
        return "\n".join(out)

    widths = [max(len(str(x[i])) for x in [header2] + lines) for i in range(len(header2))]
    # Group titles span their columns.
    groups = []
    col = 1
    groups.append((0, 1, header1[0]))
    for t in targets:
        n = len(per_target[t])
        groups.append((col, col + n, names[t]))
        col += n
    if with_ratio:
        groups.append((col, col + len(ratio_names), "pgmux / PgBouncer"))
    sep = " | "
    top = []
    for start, end, title in groups:
        span = sum(widths[start:end]) + 2 * (end - start - 1)
        if start == 0:
            span = widths[0]
        top.append(title.center(span) if start else title.ljust(span))
    out = []

    def join_groups(cells):
        parts = []
        for start, end, _ in groups:
            parts.append("  ".join(cells[start:end]))
        return sep.join(parts)

    out.append(sep.join(top))
    out.append(join_groups([h.rjust(widths[i]) if i else h.ljust(widths[i]) for i, h in enumerate(header2)]))
    out.append("-" * len(out[-1]))
    for line in lines:
        out.append(join_groups([c.rjust(widths[i]) if i else c.ljust(widths[i]) for i, c in enumerate(line)]))
    return "\n".join(out)


def issue_targets(by):
    """The targets of issue 5, each with its measured value: (name, measured text, met or None)."""
    checks = []

    def get(s, t, key):
        r = by.get((s, t))
        return r.get(key) if usable(r) else None

    for s in ("S1", "S2", "S4"):
        r_tps = ratio(get(s, "pgmux", "tps"), get(s, "pgbouncer", "tps"))
        r_cpu = ratio(get(s, "pgmux", "cpu_s_per_10k_tx"), get(s, "pgbouncer", "cpu_s_per_10k_tx"))
        if r_tps is not None:
            checks.append((f"{s}: pgmux TPS >= 1.0x PgBouncer", fmt_ratio(r_tps), r_tps >= 1.0))
        if r_cpu is not None:
            us = [get(s, t, "cpu_s_per_10k_tx") * 100 for t in POOLERS]  # s/10k tx -> us/tx
            checks.append(
                (
                    f"{s}: pgmux CPU per tx <= 0.8x PgBouncer",
                    f"{fmt_ratio(r_cpu)} ({us[1]:.1f} us vs {us[0]:.1f} us)",
                    r_cpu <= 0.8,
                )
            )
    r = ratio(get("S3", "pgmux", "tps"), get("S2", "pgmux", "tps"))
    if r is not None:
        checks.append(("S3: pgmux prepared TPS >= 1.2x pgmux extended", fmt_ratio(r), r >= 1.2))
    s5 = by.get(("S5", "pgmux"))
    if s5 is not None and s5["status"] != "n/a":
        errs = s5.get("errors", 0) if s5["status"] != "failed" else "run failed"
        checks.append(("S5: pgmux zero errors", str(errs), errs == 0))
    for s in ("S5", "S6"):
        r = ratio(get(s, "pgmux", "tps"), get(s, "pgbouncer", "tps"))
        if r is not None:
            checks.append((f"{s}: pgmux TPS >= 1.0x PgBouncer", fmt_ratio(r), r >= 1.0))
    r = ratio(get("S7", "pgmux", "tps"), get("S7", "direct", "tps"))
    if r is not None:
        pgb = ratio(get("S7", "pgbouncer", "tps"), get("S7", "direct", "tps"))
        extra = f" (PgBouncer {fmt_ratio(pgb)})" if pgb is not None else ""
        checks.append(("S7: pgmux MiB/s >= 0.9x direct", fmt_ratio(r) + extra, r >= 0.9))
    per_client = by.get(("S8", "pgmux"), {}).get("rss_per_client_kib")
    if per_client is not None:
        pgb = by.get(("S8", "pgbouncer"), {}).get("rss_per_client_kib")
        extra = f" (PgBouncer {pgb:.1f} KiB)" if pgb is not None else ""
        checks.append(("S8: pgmux RSS per idle client <= 6 KiB", f"{per_client:.1f} KiB{extra}", per_client <= 6))
    r = ratio(get("S8", "pgmux", "tps"), get("S1", "pgmux", "tps"))
    if r is not None:
        checks.append(("S8: pgmux S1 beside the idle clients within 5% of S1 alone", fmt_ratio(r), r >= 0.95))
    # Issue 11: over TLS (rustls against PgBouncer's OpenSSL), at least PgBouncer's TPS at no
    # more CPU per transaction.
    for s in ("S1T", "S1TT", "S6T"):
        r_tps = ratio(get(s, "pgmux", "tps"), get(s, "pgbouncer", "tps"))
        r_cpu = ratio(get(s, "pgmux", "cpu_s_per_10k_tx"), get(s, "pgbouncer", "cpu_s_per_10k_tx"))
        if r_tps is not None:
            checks.append((f"{s}: pgmux TPS >= 1.0x PgBouncer", fmt_ratio(r_tps), r_tps >= 1.0))
        if r_cpu is not None:
            us = [get(s, t, "cpu_s_per_10k_tx") * 100 for t in POOLERS]
            checks.append(
                (
                    f"{s}: pgmux CPU per tx <= 1.0x PgBouncer",
                    f"{fmt_ratio(r_cpu)} ({us[1]:.1f} us vs {us[0]:.1f} us)",
                    r_cpu <= 1.0,
                )
            )
    d, b, m = (get("S1", t, "mean_ms") for t in TARGETS)
    if None not in (d, b, m):
        added_b, added_m = b - d, m - d
        met = added_m <= 1.2 * added_b if added_b > 0 else added_m <= 0
        checks.append(
            (
                "S1: mean latency added over direct <= 1.2x PgBouncer's",
                f"pgmux +{added_m:.2f} ms vs PgBouncer +{added_b:.2f} ms",
                met,
            )
        )
    return checks


def s8_lines(by, names):
    out = []
    for t in POOLERS:
        r = by.get(("S8", t))
        if r is None or r.get("idle_clients") is None:
            continue
        alone = by.get(("S1", t))
        vs = ratio(r.get("tps"), alone.get("tps")) if usable(alone) else None
        out.append(
            f"S8 {names[t]}: {r['idle_clients']} idle clients logged in in {r.get('idle_login_s', 0):.1f}s; "
            f"RSS {r['rss_baseline_kib'] / 1024:.1f} -> {r['rss_idle_kib'] / 1024:.1f} MiB "
            f"= {r['rss_per_client_kib']:.2f} KiB per idle client; "
            + (
                f"open files {r['fds_baseline']} -> {r['fds_idle']} = {r['fds_per_client']:.2f} per client; "
                if r.get("fds_per_client") is not None
                else ""
            )
            + (f"S1 beside them: {fmt(r.get('tps'))} TPS" if usable(r) else "S1 beside them: FAILED")
            + (f" = {fmt_ratio(vs)} of S1 alone" if vs is not None else "")
            + (f"; {r['idle_alive']} still open after" if r.get("idle_alive") is not None else "")
        )
    return out


def cmd_report(a):
    meta = json.load(open(a.meta))
    runs = [json.loads(line) for line in open(a.runs) if line.strip()]
    if not runs:
        print("bench: FAILED: no run was recorded: nothing to report", file=sys.stderr)
        return 1
    scenarios = [s for s in meta["scenarios"] if any(r["scenario"] == s for r in runs)]
    targets = [t for t in meta["targets"]]
    names = {
        "direct": "direct PostgreSQL",
        "pgbouncer": f"PgBouncer {meta.get('pgbouncer_version', '')}".strip(),
        "pgmux": "pgmux",
    }
    idle = meta.get("idle_clients", 10000)
    SCENARIOS["S8"] = f"S8 S1 + {idle / 1000:g}k idle"
    rows, by = build_rows(runs, scenarios, targets)
    table = render_table(rows, targets, names)
    checks = issue_targets(by)
    s8 = s8_lines(by, names)
    problems = [r for r in runs if r["status"] in ("errors", "failed")]

    print()
    print(
        f"pgmux benchmark, {meta['date']}, {meta['cores']} cores ({meta['cpu']}), "
        f"PostgreSQL {meta['postgres_version']}, {meta['mode']} run: {meta.get('rounds', 1)} x {meta['seconds']}s per scenario "
        f"after {meta['warmup']}s warm-up, pool size {meta['pool_size']}, pgbench -j {meta['pgbench_threads']}, "
        f"scale {meta['scale']}, ulimit -n {meta.get('open_files_limit', '?')}, "
        f"poolers to PostgreSQL over {meta.get('upstream', 'tcp')}"
    )
    print()
    print(table)
    print()
    print(
        "TPS: transactions/s (S7: MiB/s, one 1 MiB row per transaction). Latency per transaction from "
        "pgbench's per-transaction log. CPU s/10k: pooler user+system CPU seconds per 10 000 "
        "transactions. RSS: pooler's peak resident memory sampled during the run. ! = errors."
    )
    for line in s8:
        print(line)
    if checks:
        print()
        print("Issue 5 and 11 targets:")
        for name, measured, met in checks:
            print(f"  [{'met' if met else 'MISSED'}] {name}: {measured}")

    doc = {
        "meta": meta,
        "runs": runs,
        "ratios": {row["scenario"]: row["ratio"] for row in rows},
        "targets": [{"target": n, "measured": m, "met": met} for n, m, met in checks],
        "s8": s8,
        "ok": not problems,
    }
    os.makedirs(a.out_dir, exist_ok=True)
    md = io.StringIO()
    md.write(
        f"pgmux benchmark, {meta['date']}, {meta['cores']} cores ({meta['cpu']}), PostgreSQL "
        f"{meta['postgres_version']}, {meta['mode']} run ({meta.get('rounds', 1)} x {meta['seconds']}s per scenario, targets alternating), "
        f"poolers to PostgreSQL over {meta.get('upstream', 'tcp')}, pgmux {meta.get('pgmux_commit', '?')}\n\n"
    )
    md.write(render_table(rows, targets, names, markdown=True) + "\n\n")
    for line in s8:
        md.write(f"- {line}\n")
    if checks:
        md.write("\n| issue 5 and 11 target | measured | |\n|---|---|---|\n")
        for name, measured, met in checks:
            md.write(f"| {name} | {measured} | {'met' if met else '**missed**'} |\n")
    if problems:
        md.write("\nRuns with errors, or that could not run:\n\n")
        for r in problems:
            md.write(f"- {r['scenario']} {names[r['target']]}: {r.get('message', r['status'])}\n")
    csv_buf = io.StringIO()
    fields = [
        "scenario", "target", "status", "tps", "mean_ms", "p99_ms", "errors", "failed_transactions",
        "aborted_clients", "exit_status", "transactions", "cpu_s", "cpu_s_per_10k_tx", "rss_peak_kib",
        "idle_clients", "idle_login_s", "rss_baseline_kib", "rss_idle_kib", "rss_per_client_kib",
        "fds_baseline", "fds_idle", "fds_per_client", "idle_alive", "message",
    ]
    w = csv.DictWriter(csv_buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in runs:
        w.writerow(r)
    names_out = [a.name] + (["latest"] if a.latest else [])
    for name in names_out:
        with open(os.path.join(a.out_dir, name + ".json"), "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        with open(os.path.join(a.out_dir, name + ".csv"), "w") as f:
            f.write(csv_buf.getvalue())
        with open(os.path.join(a.out_dir, name + ".md"), "w") as f:
            f.write(md.getvalue())
    print()
    print(f"results: {', '.join(os.path.join(a.out_dir, n) + '.{json,csv,md}' for n in names_out)}")

    if problems:
        print(file=sys.stderr)
        print(f"bench: FAILED: {len(problems)} run(s) had errors or could not run:", file=sys.stderr)
        for r in problems:
            print(f"  {r['scenario']} {names[r['target']]}: {r.get('message', r['status'])}", file=sys.stderr)
        return 1
    return 0


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--scenario", required=True)
    r.add_argument("--target", required=True)
    r.add_argument("--dir", required=True, action="append", help="one per round")
    r.add_argument("--exit-status", type=int, required=True)
    r.add_argument("--cpu-ticks", type=int)
    r.add_argument("--clk-tck", type=int)
    r.add_argument("--rss-peak-kib", type=int)
    r.add_argument("--set", action="append")
    r.add_argument("--append", required=True)
    for name in ("skip", "fail"):
        m = sub.add_parser(name)
        m.add_argument("--append", required=True)
        m.add_argument("--scenario", required=True)
        m.add_argument("--target", required=True)
        m.add_argument("--reason", required=True)
        m.add_argument("--set", action="append")
    rep = sub.add_parser("report")
    rep.add_argument("--runs", required=True)
    rep.add_argument("--meta", required=True)
    rep.add_argument("--out-dir", required=True)
    rep.add_argument("--name", required=True)
    rep.add_argument("--latest", action="store_true")
    a = p.parse_args()
    if a.cmd == "run":
        cmd_run(a)
    elif a.cmd == "skip":
        cmd_mark(a, "n/a")
    elif a.cmd == "fail":
        cmd_mark(a, "failed")
    else:
        sys.exit(cmd_report(a))


if __name__ == "__main__":
    main()
