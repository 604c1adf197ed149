#!/usr/bin/env python3
"""Turns the folder scripts/quality_study.sh wrote into study.json, study.md and study_val_loss.png.

    python3 scripts/study.py STUDY_DIR [--arms NAME...] [--describe "NAME=flags;..."]

The systems are compare.sh's, one report folder per seed (STUDY_DIR/seed<S>/<system>.csv); each arm is
one trainer with one setting changed (STUDY_DIR/arms/<arm>.seed<S>.csv). For every system and arm: the
final validation loss (the whole validation split) over the seeds as mean, sample standard deviation
and range, its difference to the MoE baseline's mean, tokens/s, rows dropped, and the largest expert
share of each layer early (step 100) and at the end.
"""
import argparse
import glob
import json
import os
import re
import signal
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import finite, plt, read_steps, save  # noqa: E402  (the CSV reader and plot helpers of compare.sh's report)

SYSTEMS = ["train_latentmoe", "moe_ep_baseline", "moe_ep_locmoe"]
BASELINE = "moe_ep_baseline"
EARLY_STEP = 100


def finished(csv_path):
    """Whether the run behind a CSV ended: its log (beside it, .log for .csv) has the trainer's 'done:' line."""
    log = csv_path.removesuffix(".csv") + ".log"
    return os.path.exists(log) and re.search(r"^done: ", open(log, errors="replace").read(), re.M) is not None


def runs_of(study, arms, notes):
    """name -> [(seed, cols, loads)]: the systems of every seed folder, then the arms; a run that did not
    finish (cut off, failed) is left out and named in `notes`."""
    found = []  # (name, seed, csv path)
    for folder in glob.glob(os.path.join(study, "seed*")):
        seed = int(os.path.basename(folder).removeprefix("seed"))
        found += [(os.path.basename(p).removesuffix(".csv"), seed, p) for p in glob.glob(os.path.join(folder, "*.csv"))]
    for arm in arms:
        for path in glob.glob(os.path.join(study, "arms", f"{glob.escape(arm)}.seed*.csv")):
            found.append((arm, int(path.rsplit(".seed", 1)[1].removesuffix(".csv")), path))
    runs = {name: [] for name in SYSTEMS + list(arms)}  # compare.sh's order, then the arms'
    for name, seed, path in sorted(found, key=lambda f: f[1]):
        if finished(path):
            runs.setdefault(name, []).append((seed, *read_steps(path)))
        else:
            notes.append(f"{name} seed {seed} left out: {path} has no finished run (no 'done:' line in its log)")
    return {name: seed_runs for name, seed_runs in runs.items() if seed_runs}


def row_at(cols, step):
    """Index of the logged row of `step`, or of the last row when the run is shorter."""
    steps = cols["step"]
    return next((i for i, s in enumerate(steps) if s >= step), len(steps) - 1)


def spread(values):
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "n": len(values)}


def summarize(name, seed_runs, describe):
    finals, rates, dropped, early, late = [], [], [], [], []
    for _, cols, loads in seed_runs:
        vals = [v for v in cols["val_loss"] if finite(v)]
        finals.append(vals[-1])
        rates.append(cols["tokens"][0] / cols["step"][0] / (statistics.median(cols["ms"][1:] or cols["ms"]) / 1000))
        dropped.append(statistics.fmean(cols["dropped"]))
        i = row_at(cols, EARLY_STEP)
        early.append([hi[i] for _, _, hi in loads])
        late.append([hi[-1] for _, _, hi in loads])
    layers = len(early[0])
    return {
        "name": name,
        "changes": describe.get(name, "compare.sh's system, the preset as it is"),
        "seeds": [seed for seed, _, _ in seed_runs],
        "steps": int(seed_runs[0][1]["step"][-1]),
        "tokens": int(seed_runs[0][1]["tokens"][-1]),
        "val_loss_final": spread(finals),
        "val_loss_final_per_seed": finals,
        "tokens_per_s_mean": statistics.fmean(rates),
        "dropped_per_step_mean": statistics.fmean(dropped),
        f"max_expert_share_step{EARLY_STEP}": [statistics.fmean(e[l] for e in early) for l in range(layers)],
        "max_expert_share_last_step": [statistics.fmean(e[l] for e in late) for l in range(layers)],
    }


def plot_val_loss(runs, summaries, path):
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = plt.cm.tab20([i / 20 for i in range(20)])  # distinct for up to 20 runs; systems solid, arms dashed
    for index, (name, seed_runs) in enumerate(runs.items()):
        points = {}
        for _, cols, _ in seed_runs:
            for t, v in zip(cols["tokens"], cols["val_loss"]):
                if finite(v):
                    points.setdefault(t, []).append(v)
        tokens = sorted(t for t, vs in points.items() if len(vs) == len(seed_runs))
        mean = [statistics.fmean(points[t]) for t in tokens]
        line, = ax.plot(tokens, mean, "o-" if name in SYSTEMS else "o--", ms=3, lw=1.2, color=colors[index % 20],
                        label=f"{name}: {summaries[name]['val_loss_final']['mean']:.4f}")
        ax.fill_between(tokens, [min(points[t]) for t in tokens], [max(points[t]) for t in tokens],
                        color=line.get_color(), alpha=0.15)
    ax.set(xlabel="tokens trained", ylabel="validation loss (nats), whole split",
           title="validation loss: mean over the seeds, band = their range")
    finals = [s["val_loss_final"]["mean"] for s in summaries.values()]
    ax.set_ylim(min(finals) - 0.1, min(finals) + 1.0)  # the end of training, where the systems differ
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, path)


def markdown(summaries, preset_line):
    base = summaries.get(BASELINE, {}).get("val_loss_final", {}).get("mean")
    lines = [preset_line, "",
             "| run | what changes | seeds | val loss, mean ± sd | range | vs moe_ep_baseline | tokens/s | "
             f"rows dropped / step | max expert share of the last layer, step {EARLY_STEP} → end |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in summaries.values():
        v = s["val_loss_final"]
        sd = f" ± {v['sd']:.4f}" if v["sd"] is not None else ""
        delta = f"{v['mean'] - base:+.4f}" if base is not None else "-"
        early, late = s[f"max_expert_share_step{EARLY_STEP}"][-1], s["max_expert_share_last_step"][-1]
        lines.append(f"| {s['name']} | {s['changes']} | {len(s['seeds'])} | {v['mean']:.4f}{sd} | "
                     f"{v['min']:.4f}–{v['max']:.4f} | {delta} | {s['tokens_per_s_mean']:,.0f} | "
                     f"{s['dropped_per_step_mean']:,.0f} | {early:.3f} → {late:.3f} |")
    layers = len(next(iter(summaries.values()))["max_expert_share_last_step"])
    lines += ["", f"Largest expert share of each layer (mean over the seeds), step {EARLY_STEP} / last step:", "",
              "| run | " + " | ".join(f"L{l}" for l in range(layers)) + " |",
              "|---|" + "---|" * layers]
    for s in summaries.values():
        cells = [f"{a:.3f} / {b:.3f}" for a, b in zip(s[f"max_expert_share_step{EARLY_STEP}"],
                                                    s["max_expert_share_last_step"])]
        lines.append(f"| {s['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", help="the folder quality_study.sh wrote")
    ap.add_argument("--arms", nargs="*", default=[])
    ap.add_argument("--describe", default="", help="NAME=what the arm changes;... (quality_study.sh's arm table)")
    a = ap.parse_args()
    describe = dict(item.split("=", 1) for item in a.describe.split(";") if "=" in item)
    notes = []
    runs = runs_of(a.study, a.arms, notes)
    if not runs:
        raise SystemExit(f"study: no runs in {a.study}")
    summaries = {name: summarize(name, seed_runs, describe) for name, seed_runs in runs.items()}
    first = next(iter(summaries.values()))
    preset_line = f"{first['steps']} steps, {first['tokens']:,} tokens a run; seeds {', '.join(map(str, first['seeds']))}."
    out = lambda name: os.path.join(a.study, name)  # noqa: E731
    with open(out("study.json"), "w") as f:
        json.dump({"runs": summaries, "notes": notes}, f, indent=1, allow_nan=False)
    with open(out("study.md"), "w") as f:
        f.write(markdown(summaries, preset_line) + "".join(f"\nNote: {n}\n" for n in notes))
    plot_val_loss(runs, summaries, out("study_val_loss.png"))
    print(f"study: {out('study.json')}, study.md and study_val_loss.png in {a.study}")
    print(open(out("study.md")).read())


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # output piped into `head`: end quietly
    main()
