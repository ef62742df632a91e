"""Compare per-step loss curves streamed by `bench_train.py --stream` (JSON lines: variant,
step, loss): for each pair, the relative difference per step (max and mean over step ranges)
and the relative difference of the mean loss over windows of steps.

    python3 bench/compare_curves.py bench/results/a.jsonl bench/results/b.jsonl \
        --pair curve_b:curve_a --pair r_copies:r_plain --ranges 0,24,48,73,82,100 --window 10

A pair `x:y` compares x against y (y is the reference, the denominator).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys


def load(paths: list[str]) -> dict[str, dict[int, float]]:
    curves: dict[str, dict[int, float]] = {}
    for path in paths:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                try:
                    r = json.loads(line)
                    curves.setdefault(r["variant"], {})[int(r["step"])] = float(r["loss"])
                except (ValueError, KeyError) as exc:
                    raise SystemExit(f"error: {path}:{n}: not a curve record ({exc})") from None
    return curves


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--pair", action="append", required=True, help="x:y, x compared against y")
    p.add_argument("--ranges", default="0,25,50,75,100", help="step range bounds, comma-separated")
    p.add_argument("--window", type=int, default=10, help="steps per window for the mean-loss comparison")
    args = p.parse_args(argv)
    curves = load(args.files)
    bounds = [int(b) for b in args.ranges.split(",")]
    ranges = list(zip(bounds, bounds[1:]))
    for pair in args.pair:
        x, _, y = pair.partition(":")
        for name in (x, y):
            if name not in curves:
                raise SystemExit(f"error: --pair {pair}: no curve {name!r} in {args.files} (have {sorted(curves)})")
    def per_step(x: str, y: str, a: int, b: int) -> str:
        rel = [abs(curves[x][i] - curves[y][i]) / abs(curves[y][i]) for i in range(a, b)
               if i in curves[x] and i in curves[y]]
        return f"{max(rel):.1e} / {statistics.mean(rel):.1e}" if rel else "-"

    def window_mean(x: str, y: str, a: int, b: int) -> str:
        steps = [i for i in range(a, b) if i in curves[x] and i in curves[y]]
        if not steps:
            return "-"
        mx, my = (statistics.mean(curves[c][i] for i in steps) for c in (x, y))
        return f"{(mx - my) / my:+.1e}"

    n = min(max(c) + 1 for c in curves.values())
    windows = [(a, min(a + args.window, n)) for a in range(0, n, args.window)]
    for title, spans, cell in (
            ("relative difference per step, max / mean over each step range", ranges, per_step),
            (f"\nrelative difference of the mean loss over windows of {args.window} steps", windows, window_mean)):
        print(title)
        print("| pair | " + " | ".join(f"{a}-{b - 1}" for a, b in spans) + " |")
        print("|---|" + "---|" * len(spans))
        for pair in args.pair:
            x, _, y = pair.partition(":")
            print(f"| {x} vs {y} | " + " | ".join(cell(x, y, a, b) for a, b in spans) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
