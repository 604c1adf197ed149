#!/usr/bin/env python3
"""Turns the folder scripts/quality_study.sh wrote into study.json, study.md and study_val_loss.png.

    python3 scripts/study.py STUDY_DIR [MORE_DIRS...] [--arms NAME...] [--describe "NAME=flags;..."]

The systems are compare.sh's, one report folder per seed (STUDY_DIR/seed<S>/<system>.csv); each arm is
one trainer with one setting changed (STUDY_DIR/arms/<arm>.seed<S>.csv). For every system and arm: the
final validation loss (the whole validation split) over the seeds as mean, sample standard deviation
and range, its difference to the MoE baseline over the seeds both ran (seed by seed), tokens/s, rows
dropped, and the largest expert share of each layer early (step 100, or the last of a shorter run) and
at the end.
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

SYSTEMS = {"train_latentmoe": "the preset as it is", "moe_ep_baseline": "the preset as it is",
           "moe_ep_locmoe": "moe_ep_baseline --router locmoe"}  # compare.sh's systems, in its order
BASELINE = "moe_ep_baseline"
EARLY_STEP = 100


def finished(csv_path):
    """Whether the run behind a CSV ended: its log (beside it, .log for .csv) has the trainer's 'done:' line."""
    log = csv_path.removesuffix(".csv") + ".log"
    return os.path.exists(log) and re.search(r"^done: ", open(log, errors="replace").read(), re.M) is not None


def runs_of(studies, arms, notes):
    """name -> [(seed, cols, loads)]: the systems of every seed folder, then the arms, gathered from each
    study folder (one study may be run in parts, e.g. one seed per device call); a run that did not
    finish (cut off, failed) is left out and named in `notes`, a seed run twice is an error."""
    found = []  # (name, seed, csv path)
    for study in studies:
        for folder in glob.glob(os.path.join(study, "seed*")):
            m = re.fullmatch(r"seed(\d+)", os.path.basename(folder))
            if m and os.path.isdir(folder):
                found += [(os.path.basename(p).removesuffix(".csv"), int(m.group(1)), p)
                          for p in glob.glob(os.path.join(folder, "*.csv"))]
        for arm in arms:
            for path in glob.glob(os.path.join(study, "arms", f"{glob.escape(arm)}.seed*.csv")):
                m = re.fullmatch(r"seed(\d+)\.csv", path.rsplit(".", 2)[-2] + ".csv")
                if m:
                    found.append((arm, int(m.group(1)), path))
    runs = {name: [] for name in [*SYSTEMS, *arms]}  # compare.sh's order, then the arms'
    for name, seed, path in sorted(found, key=lambda f: f[1]):
        if not finished(path):
            notes.append(f"{name} seed {seed} left out: {path} has no finished run (no 'done:' line in its log)")
        elif any(seed == s for s, _, _ in runs.get(name, [])):
            raise SystemExit(f"study: {name} seed {seed} is in more than one folder (the last: {path})")
        else:
            runs.setdefault(name, []).append((seed, *read_steps(path)))
    return {name: seed_runs for name, seed_runs in runs.items() if seed_runs}


def row_at(cols, step):
    """Index of the logged row of `step`, or of the last row when the run is shorter."""
    steps = cols["step"]
    return next((i for i, s in enumerate(steps) if s >= step), len(steps) - 1)


def spread(values):
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "n": len(values)}


def summarize(name, seed_runs, describe):
    finals, rates, dropped, early, late, early_steps = [], [], [], [], [], []
    for _, cols, loads in seed_runs:
        vals = [v for v in cols["val_loss"] if finite(v)]
        finals.append(vals[-1])
        rates.append(cols["tokens"][0] / cols["step"][0] / (statistics.median(cols["ms"][1:] or cols["ms"]) / 1000))
        dropped.append(statistics.fmean(cols["dropped"]))
        i = row_at(cols, EARLY_STEP)
        early_steps.append(int(cols["step"][i]))
        early.append([hi[i] for _, _, hi in loads])
        late.append([hi[-1] for _, _, hi in loads])
    layers = len(early[0])
    return {
        "name": name,
        "changes": describe.get(name, SYSTEMS.get(name, "-")),
        "seeds": [seed for seed, _, _ in seed_runs],
        "steps": int(seed_runs[0][1]["step"][-1]),
        "tokens": int(seed_runs[0][1]["tokens"][-1]),
        "val_loss_final": spread(finals),
        "val_loss_final_per_seed": finals,
        "tokens_per_s_mean": statistics.fmean(rates),
        "dropped_per_step_mean": statistics.fmean(dropped),
        "early_step": min(early_steps),  # EARLY_STEP, or the last step of a shorter run
        "max_expert_share_early": [statistics.fmean(e[l] for e in early) for l in range(layers)],
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


def paired_delta(run, base):
    """The mean over the seeds both ran of (run's final validation loss − base's of the same seed), and
    those seeds; None when they share none."""
    base_by_seed = dict(zip(base["seeds"], base["val_loss_final_per_seed"]))
    pairs = [(seed, v - base_by_seed[seed]) for seed, v in zip(run["seeds"], run["val_loss_final_per_seed"])
             if seed in base_by_seed]
    return (statistics.fmean(d for _, d in pairs), [seed for seed, _ in pairs]) if pairs else None


def markdown(summaries, preset_line):
    base = summaries.get(BASELINE)
    early_step = min(s["early_step"] for s in summaries.values())
    lines = [preset_line, "",
             "| run | what changes | seeds | val loss, mean ± sd | range | vs moe_ep_baseline, same seeds | tokens/s | "
             f"rows dropped / step | max expert share of the last layer, step {early_step} → end |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in summaries.values():
        v = s["val_loss_final"]
        sd = f" ± {v['sd']:.4f}" if v["sd"] is not None else ""
        paired = paired_delta(s, base) if base else None
        delta = "-" if paired is None else f"{paired[0]:+.4f}" + (
            "" if paired[1] == s["seeds"] else f" (seeds {', '.join(map(str, paired[1]))})")
        early, late = s["max_expert_share_early"][-1], s["max_expert_share_last_step"][-1]
        lines.append(f"| {s['name']} | {s['changes']} | {', '.join(map(str, s['seeds']))} | {v['mean']:.4f}{sd} | "
                     f"{v['min']:.4f}–{v['max']:.4f} | {delta} | {s['tokens_per_s_mean']:,.0f} | "
                     f"{s['dropped_per_step_mean']:,.0f} | {early:.3f} → {late:.3f} |")
    layers = len(next(iter(summaries.values()))["max_expert_share_last_step"])
    lines += ["", f"Largest expert share of each layer (mean over the seeds), step {early_step} / last step:", "",
              "| run | " + " | ".join(f"L{l}" for l in range(layers)) + " |",
              "|---|" + "---|" * layers]
    for s in summaries.values():
        cells = [f"{a:.3f} / {b:.3f}" for a, b in zip(s["max_expert_share_early"], s["max_expert_share_last_step"])]
        lines.append(f"| {s['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", nargs="+", help="the folder quality_study.sh wrote (the results go there), and "
                    "more folders of the same study run in parts")
    ap.add_argument("--arms", nargs="*", default=[])
    ap.add_argument("--describe", default="", help="NAME=what the arm changes;... (quality_study.sh's arm table)")
    a = ap.parse_args()
    describe = dict(item.split("=", 1) for item in a.describe.split(";") if "=" in item)
    notes = []
    runs = runs_of(a.study, a.arms, notes)
    if not runs:
        raise SystemExit(f"study: no finished runs in {', '.join(a.study)}")
    summaries = {name: summarize(name, seed_runs, describe) for name, seed_runs in runs.items()}
    first = next(iter(summaries.values()))
    preset_line = f"{first['steps']} steps, {first['tokens']:,} tokens a run."

    def out(name):
        return os.path.join(a.study[0], name)

    with open(out("study.json"), "w") as f:
        json.dump({"runs": summaries, "notes": notes}, f, indent=1, allow_nan=False)
    with open(out("study.md"), "w") as f:
        f.write(markdown(summaries, preset_line) + "".join(f"\nNote: {n}\n" for n in notes))
    plot_val_loss(runs, summaries, out("study_val_loss.png"))
    print(f"study: {out('study.json')}, study.md and study_val_loss.png in {a.study[0]}")
    print(open(out("study.md")).read())


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # output piped into `head`: end quietly
    main()
