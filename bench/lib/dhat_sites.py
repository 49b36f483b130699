#!/usr/bin/env python3
"""The heap blocks live at a DHAT profile's peak, per idle client (bench/idle --dhat).

    dhat_sites.py dhat.json CLIENTS [TOP]

Reads the JSON that `valgrind --tool=dhat` writes and, for every allocation site, the bytes
and blocks live at the global peak (t-gmax: with all the idle clients connected). Sites are
grouped by their innermost pgmux frame (the code that asked for the memory) and the first
frame inside it (what allocated: a Vec, a BytesMut, a tokio task...). Prints a Markdown table
of bytes and blocks per client, largest first; malloc's own overhead per block is not in
DHAT's bytes (glibc: 8 bytes of header, rounded up to 16).
"""

import json
import re
import sys
from collections import defaultdict

NOISE = re.compile(
    r"^(alloc::|core::|std::|<alloc::|<core::|<std::|__rust|__rdl|__rg|_rjem|malloc|calloc|realloc|"
    r"hashbrown::|<hashbrown|bytes::|<bytes::|\?\?\?|0x)"
)


def name(frame: str) -> str:
    # "0x4A3B2C: pgmux::client::serve::{{closure}} (mod.rs:123)" -> the function and place
    m = re.match(r"^0x[0-9A-Fa-f]+: (.*)$", frame)
    text = m.group(1) if m else frame
    text = re.sub(r"::h[0-9a-f]{16}", "", text)
    text = re.sub(r" \(in [^)]*\)$", "", text)
    return text


def short(fn: str) -> str:
    fn = re.sub(r" \(([^)]*/)?([^/)]+)\)$", r" (\2)", fn)
    return fn if len(fn) <= 110 else fn[:107] + "..."


def main():
    path, clients = sys.argv[1], int(sys.argv[2])
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 30
    d = json.load(open(path))
    ftbl = d["ftbl"]
    groups = defaultdict(lambda: [0, 0])
    total_b = total_k = 0
    for pp in d["pps"]:
        gb, gbk = pp.get("gb", 0), pp.get("gbk", 0)
        if not gb:
            continue
        total_b += gb
        total_k += gbk
        frames = [name(ftbl[i]) for i in pp["fs"]]
        ours = next((k for k, f in enumerate(frames) if "pgmux::" in f.split(" (")[0]), None)
        if ours is None:
            # Not under pgmux code: the first frame that is not the allocator or std.
            inner = next((f for f in frames if not NOISE.match(f)), frames[-1] if frames else "?")
            key = ("(outside pgmux) " + short(inner), "")
        else:
            callee = next((f for f in reversed(frames[:ours]) if "pgmux::" not in f), "")
            # The allocating call just inside pgmux's frame, e.g. RawVec / BytesMut / task.
            inside = [f for f in frames[:ours] if not re.match(r"^(malloc|calloc|realloc|__rust|__rdl|__rg|alloc::alloc::)", f)]
            callee = inside[-1] if inside else callee
            key = (short(frames[ours]), short(callee))
        groups[key][0] += gb
        groups[key][1] += gbk
    gmax = d.get("tg")
    print(f"DHAT, {clients:,} idle clients: {total_b:,} bytes in {total_k:,} blocks live at the heap's peak "
          f"(t-gmax {gmax}), {total_b / clients:,.0f} bytes and {total_k / clients:.1f} blocks per client "
          f"(malloc headers not included: about {16 * total_k / clients:,.0f} bytes more per client)")
    print()
    print("| bytes/client | blocks/client | pgmux frame | allocated by |")
    print("|--:|--:|---|---|")
    rows = sorted(groups.items(), key=lambda kv: -kv[1][0])
    for (ours, callee), (b, k) in rows[:top]:
        print(f"| {b / clients:,.1f} | {k / clients:.2f} | `{ours}` | `{callee}` |")
    rest = rows[top:]
    if rest:
        b = sum(v[0] for _, v in rest)
        k = sum(v[1] for _, v in rest)
        print(f"| {b / clients:,.1f} | {k / clients:.2f} | {len(rest)} other sites | |")


if __name__ == "__main__":
    main()
