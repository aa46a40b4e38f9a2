"""`python -m bench run [NAME...] [--tiny]` runs benchmarks (default: every one but gpu) and renders the report;
`python -m bench report` renders docs/benchmarks.md and the charts from docs/benchmarks/*.json."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time

from bench.common import OUT

BENCHMARKS = {  # name -> (module, function)
    "encoders": ("bench.encoders", "run"),
    "quantized": ("bench.quantized", "run"),
    "overhead": ("bench.service", "run_overhead"),
    "throughput": ("bench.service", "run_throughput"),
    "startup": ("bench.service", "run_startup"),
    "cache": ("bench.cache", "run"),
    "trainer": ("bench.trainer", "run"),
    "world": ("bench.world", "run"),
    "gpu": ("bench.gpu", "run"),
}
DEFAULT = [n for n in BENCHMARKS if n != "gpu"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run benchmarks, then render the report")
    run.add_argument("names", nargs="*", metavar="NAME", help=f"some of {', '.join(BENCHMARKS)} (default: all but gpu)")
    run.add_argument("--tiny", action="store_true",
                     help="a quick check on tiny settings (what CI runs); results go to $BENCH_OUT or a temp dir")
    sub.add_parser("report", help="render docs/benchmarks.md and the charts from the results")
    args = parser.parse_args(argv)
    unknown = [n for n in getattr(args, "names", []) if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
    if args.command == "run" and args.tiny and "BENCH_OUT" not in os.environ:
        os.environ["BENCH_OUT"] = tempfile.mkdtemp(prefix="bench-tiny-")  # never over the committed figures
    if args.command == "run":
        for name in args.names or DEFAULT:
            module, function = BENCHMARKS[name]
            print(f"[{time.strftime('%H:%M:%S')}] {name}{' (tiny)' if args.tiny else ''}", flush=True)
            record = getattr(importlib.import_module(module), function)(tiny=args.tiny)
            for t in record["targets"]:
                print(f"  {'met ' if t['met'] else 'MISS'} {t['name']}: {t['value']:.3g}{t['unit']} ({t['target']})")
        if args.tiny:
            return 0  # a check run: the committed report keeps the full figures
    from bench.report import render

    print(f"wrote {render(OUT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
