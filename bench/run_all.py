"""Run every benchmark module in bench/ (each writes bench/results/<name>.json)."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import bench


def main() -> int:
    failed = []
    for mod in sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if m.name.startswith("bench_")):
        print(f"== bench.{mod}", flush=True)
        sys.argv = [f"bench.{mod}"]
        try:
            importlib.import_module(f"bench.{mod}").main()
        except Exception as exc:  # one failing benchmark should not hide the others' figures
            print(f"bench.{mod} failed: {exc}", file=sys.stderr)
            failed.append(mod)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
