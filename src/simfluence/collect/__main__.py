"""``python -m simfluence.collect TASK --runs R --steps T --out STORE``: collect without the full CLI."""

from __future__ import annotations

import argparse
import sys

from simfluence.collect.collector import collect
from simfluence.runs.log import RunDataError
from simfluence.tasks.registry import list_tasks


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m simfluence.collect", description=__doc__)
    parser.add_argument("task", help="task name: " + ", ".join(info.name for info in list_tasks()))
    parser.add_argument("--runs", type=int, required=True, help="runs the store should hold")
    parser.add_argument("--steps", type=int, required=True, help="optimizer steps per run")
    parser.add_argument("--out", required=True, help="run store directory (resumed if it exists)")
    parser.add_argument("--seed", type=int, default=0, help="collection seed (default 0)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1: in-process)")
    parser.add_argument("--chunk-size", type=int, default=None, help="runs per vectorised chunk")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--no-vectorize", action="store_true", help="train runs one by one (reference loop)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        store = collect(args.task, args.out, args.runs, args.steps, args.seed, workers=args.workers,
                        vectorize=not args.no_vectorize, chunk_size=args.chunk_size, threads=args.threads,
                        progress=not args.quiet)
    except (RunDataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(store)
    return 0


if __name__ == "__main__":
    sys.exit(main())
