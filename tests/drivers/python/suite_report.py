"""Compares a driver test suite's junit XML results: direct to PostgreSQL against pgmux.

    python suite_report.py [--expected FILE] DIR TARGET...

Reads DIR/TARGET.xml for each TARGET (direct, session, transaction) and, when it exists,
DIR/direct.xml as the baseline even if `direct` is not among the TARGETs. Prints each
target's passed/failed/errors/skipped counts, then, for every pgmux target, the tests that
pass directly and fail (or are skipped) through pgmux, with the first line of their error.
FILE lists the differences that are known and explained, one `TARGET TEST-PATTERN` a line
(fnmatch patterns, `#` comments): they are marked `expected`, and a listed one that no
longer differs is reported so that the list can shrink.
The last line is `N passed, M failed`: over the pgmux targets, tests that behave as they do
directly or differ as expected, and tests that differ unexpectedly (without a direct
baseline: that pass, and that fail).
Exit status: 0 without unexpected differences, 1 with, 2 when a result file is missing or
unreadable.
"""

import fnmatch
import os
import sys
import xml.etree.ElementTree as ET


def node_id(case):
    """pytest's node id (tests/test_x.py::Class::test_y) from a junit testcase."""
    parts = case.get("classname", "").split(".")
    name = case.get("name", "")
    if parts and parts[-1].startswith("test_"):  # a module-level test function
        return "/".join(parts) + ".py::" + name
    return "/".join(parts[:-1]) + ".py::" + parts[-1] + "::" + name


def first_line(text):
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()[:300]
    return ""


def load(path):
    """{node id: (status, first line of the message)} of a junit XML file."""
    results = {}
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        status, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                status = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = first_line(child.get("message")) or first_line(child.text)
                break
        # A test that failed and then errored in teardown appears twice: keep the worst.
        key = node_id(case)
        if key not in results or results[key][0] in ("passed", "skipped"):
            results[key] = (status, message)
    return results


def counts(results):
    out = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for status, _ in results.values():
        out[status] += 1
    return out


def matches(test, patterns):
    return any(fnmatch.fnmatchcase(test, pattern) for pattern in patterns)


def load_expected(path):
    """[(target, pattern)] of the expected-differences file."""
    expected = []
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            words = line.split("#", 1)[0].split()
            if words:
                if len(words) != 2:
                    raise ValueError(f"{path}: want `TARGET TEST-PATTERN`, got {line.strip()!r}")
                expected.append((words[0], words[1]))
    return expected


def main():
    args = sys.argv[1:]
    expected = []
    if args[:1] == ["--expected"] and len(args) >= 2:
        try:
            expected = load_expected(args[1])
        except (OSError, ValueError) as exc:
            print(f"suite: {exc}", file=sys.stderr)
            return 2
        args = args[2:]
    if len(args) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    directory, targets = args[0], args[1:]
    results = {}
    for target in sorted(set(targets) | {"direct"}):
        path = os.path.join(directory, target + ".xml")
        if target != "direct" or "direct" in targets or os.path.exists(path):
            try:
                results[target] = load(path)
            except (OSError, ET.ParseError) as exc:
                print(f"suite: cannot read the results of {target}: {exc}", file=sys.stderr)
                return 2
    baseline = results.get("direct")

    print(f"{'target':<12} {'tests':>6} {'passed':>7} {'failed':>7} {'errors':>7} {'skipped':>8}")
    for target in ["direct"] + [t for t in targets if t != "direct"]:
        if target not in results:
            continue
        c = counts(results[target])
        note = "" if target in targets else "   (baseline of an earlier run)"
        print(
            f"{target:<12} {len(results[target]):>6} {c['passed']:>7} {c['failed']:>7}"
            f" {c['error']:>7} {c['skipped']:>8}{note}"
        )

    same = differ = 0
    for target in targets:
        patterns = [p for t, p in expected if t == target]

        if target == "direct":
            continue
        got = results[target]
        if baseline is None:
            print(f"\n{target}: no direct run to compare with; tests that did not pass:")
            for test, (status, message) in sorted(got.items()):
                if status in ("failed", "error"):
                    print(f"  {test}  [{status}] {message}")
                    differ += 1
                else:
                    same += 1
            continue
        broken, skipped, missing = [], [], []
        for test, (status, _) in sorted(baseline.items()):
            if test not in got:
                if status == "passed":
                    missing.append(test)
                continue
            now, message = got[test]
            if status == "passed" and now in ("failed", "error"):
                broken.append((test, now, message))
            elif status == "passed" and now == "skipped":
                skipped.append((test, message))
        extra = [t for t in got if t not in baseline and got[t][0] in ("failed", "error")]
        lines = [(t, f"[{now}] {message}") for t, now, message in broken]
        lines += [(t, f"[skipped] {message}") for t, message in skipped]
        lines += [(t, "[not run]") for t in missing]
        lines += [(t, f"[{got[t][0]}, not run directly] {got[t][1]}") for t in extra]
        known = sum(1 for test, _ in lines if matches(test, patterns))
        differ += len(lines) - known
        same += len(got) - len(broken) - len(skipped) - len(extra) + known
        print(
            f"\n{target}: {len(lines)} tests pass directly and not through pgmux"
            f" ({known} expected, {len(lines) - known} unexpected)"
        )
        for test, text in lines:
            print(f"  {test}  {'expected ' if matches(test, patterns) else ''}{text}")
        differing = [test for test, _ in lines]
        for pattern in patterns:
            ran = any(matches(test, [pattern]) for test in got)
            if ran and not any(matches(test, [pattern]) for test in differing):
                print(f"  no longer differs (remove it from the expected list): {pattern}")

    print(f"\n{same} passed, {differ} failed")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
