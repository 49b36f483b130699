"""Render a Helm chart as `helm template` does, with Helm's own engine (Helm v4's Go SDK,
through the helm-python-sdk package), where no helm binary can be installed.

    python render.py CHART [-f VALUES.yaml]... [--set KEY=VALUE]... [--name N] [--namespace NS]

Prints every rendered manifest as one YAML stream (NOTES.txt left out), in a stable order,
each after a `# Source: TEMPLATE` line. Values files and --set expressions are merged in
the order given, later ones winning key by key, as helm does. A template that fails (the
chart's own `fail` messages included) prints Helm's error and exits 1; `--lint` runs
`helm lint --strict` first and exits 1 on any warning or error.
"""

import argparse
import sys

import helm_python as helm


def merge(base, over):
    """Deep merge as helm merges -f files and --set: maps key by key, anything else replaced."""
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("chart")
    parser.add_argument("-f", "--values", action="append", default=[], dest="layers_f")
    parser.add_argument("--set", action="append", default=[], dest="layers_set")
    parser.add_argument("--name", default="pgmux")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--lint", action="store_true")
    # Keep -f and --set in their command-line order.
    layers = []
    argv = sys.argv[1:]
    i = 0
    while i < len(argv):
        if argv[i] in ("-f", "--values", "--set") and i + 1 < len(argv):
            layers.append((argv[i], argv[i + 1]))
        i += 1
    args = parser.parse_args()

    values = {}
    try:
        for kind, arg in layers:
            if kind == "--set":
                layer = helm.parse_set_string(arg)
            else:
                with open(arg, encoding="utf-8") as f:
                    layer = helm.values_from_yaml(f.read()) or {}
            merge(values, layer)
        if args.lint:
            report = helm.lint(args.chart, values, strict=True, namespace=args.namespace)
            problems = [m for m in report.get("messages") or [] if m.get("severity", 0) >= 2]
            problems += [{"severity": 3, "path": "", "error": e} for e in report.get("errors") or []]
            if problems:
                for m in problems:
                    print(f"lint: {m.get('path', '')}: {m.get('error')}", file=sys.stderr)
                return 1
        chart = helm.Chart.load(args.chart)
        manifests = chart.render(values, name=args.name, namespace=args.namespace, is_install=True)
    except helm.HelmError as e:
        print(f"render: {e}", file=sys.stderr)
        return 1
    out = []
    for path in sorted(manifests):
        text = manifests[path].strip()
        if path.endswith("NOTES.txt") or not text or not text.replace("---", "").strip():
            continue
        out.append(f"---\n# Source: {path}\n{text}\n")
    sys.stdout.write("".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
