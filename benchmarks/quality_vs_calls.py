"""Sample quality against network calls on digits: DDIM and DPM-Solver++ on the DDPM main job,
EDM's Heun on configs/digits_edm.py, flow matching's Euler and Heun on configs/digits_flow.py.

    python -m launch.train --config configs/digits.py --workdir workdirs/digits
    python -m launch.train --config configs/digits_edm.py --workdir workdirs/digits_edm
    python -m launch.train --config configs/digits_flow.py --workdir workdirs/digits_flow
    python -m benchmarks.quality_vs_calls --out docs/quality_vs_calls.png

All three models share the main job's network, data, optimizer and 3,000 steps; only the
process and the objective differ. Each point scores 500 class-balanced samples (no guidance)
with the digits classifier's FID against the 300 test digits (floor 4.41) and its class
accuracy. Heun's calls are 2 per step but the last, so its budgets are odd (5, 9, 19, 49).
"""

from __future__ import annotations

import argparse
import json
import time

import jax

from benchmarks.plot import line_chart
from jdiff.evaluation.workdir import evaluate_loaded
from jdiff.workdir import load_for_sampling

BUDGETS = (5, 10, 20, 50)
# (label, workdir, method, steps for a budget of n calls)
RUNS = [
    ("DDIM (eps model)", "workdirs/digits", "ddim", lambda n: n),
    ("DPM-Solver++ (eps model)", "workdirs/digits", "dpm_solver++", lambda n: n),
    ("EDM Heun", "workdirs/digits_edm", "heun", lambda n: (n + 1) // 2),
    ("flow Euler", "workdirs/digits_flow", "euler", lambda n: n),
    ("flow Heun", "workdirs/digits_flow", "heun", lambda n: (n + 1) // 2),
]


def calls(method: str, steps: int) -> int:
    return 2 * steps - 1 if method == "heun" else steps


def _plot(path, series):
    line_chart(path, series, title="digits: FID (500 samples) vs network calls (clipped at 30)", xlabel="network calls",
               ylabel="FID", y_max=30.0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--num", type=int, default=500)
    ap.add_argument("--out", default="docs/quality_vs_calls.png")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot_only", default=None, help="Redraw the plot from a --json file of an earlier run.")
    args = ap.parse_args()
    if args.plot_only:
        with open(args.plot_only) as f:
            rows = json.load(f)
        series = {}
        for r in rows:
            series.setdefault(r["sampler"], []).append((r["calls"], r["fid"]))
        _plot(args.out, series)
        return
    loaded = {}
    rows, series_fid = [], {}
    for label, workdir, method, steps_for in RUNS:
        if workdir not in loaded:
            loaded[workdir] = load_for_sampling(workdir)
        for n in BUDGETS:
            steps = steps_for(n)
            t0 = time.perf_counter()
            r = evaluate_loaded(loaded[workdir], args.num, jax.random.key(0), method=method, steps=steps)
            dt = time.perf_counter() - t0
            row = {"sampler": label, "calls": calls(method, steps), "steps": steps, "fid": r["fid"],
                   "class_accuracy": r.get("class_accuracy"), "precision": r["precision"], "recall": r["recall"], "seconds": dt}
            rows.append(row)
            series_fid.setdefault(label, []).append((row["calls"], row["fid"]))
            print(json.dumps(row), flush=True)
    print("\n| sampler | calls | FID | class accuracy | precision | recall |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sampler']} | {r['calls']} | {r['fid']:.2f} | {100 * r['class_accuracy']:.1f}% | {r['precision']:.2f} | {r['recall']:.2f} |")
    _plot(args.out, series_fid)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
