#!/usr/bin/env python3
"""Turns the folder scripts/compare.sh wrote into report.json (every figure) and PNG plots.

    python3 scripts/report.py REPORT_DIR --systems NAME... [--preset P] [--launch L] [--flags F]

For each system NAME the folder holds NAME.log (the trainer's output) and NAME.csv (its --log-file, one
row a step, columns as train/step_log.h lists them); layer_bench.tsv holds the layer benchmark where a
GPU ran one. A plot whose figures the runs did not log (the step breakdown on the CPU, bytes on one
rank) is left out, and the report says why in its "notes".
"""
import argparse
import csv
import json
import math
import os
import re
import statistics

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import matplotlib.ticker  # noqa: E402

# train/step_log.h's columns; then min, median, max expert load of each layer
COLUMNS = ["step", "loss", "norm", "val_loss", "ms", "lr", "tokens", "elapsed_s", "sent_bytes",
           "attention_ms", "ffn_compute_ms", "all_to_all_ms", "all_reduce_ms", "optimizer_ms", "rest_ms",
           "aux_loss", "loc_loss", "dropped"]
SECTIONS = COLUMNS[9:15]


def finite(x):
    return x is not None and math.isfinite(x)


def read_steps(path):
    """The CSV as one list per column, and loads[l] = (mins, medians, maxes) of layer l."""
    rows = [[float(x) for x in r] for r in csv.reader(open(path)) if r]
    if not rows:
        raise SystemExit(f"report: {path} has no rows: the run logged no step")
    extra = len(rows[0]) - len(COLUMNS)
    if extra < 0 or extra % 3 or any(len(r) != len(rows[0]) for r in rows):
        raise SystemExit(f"report: {path}: rows are not the columns of train/step_log.h")
    cols = {name: [r[i] for r in rows] for i, name in enumerate(COLUMNS)}
    loads = [tuple([r[len(COLUMNS) + 3 * l + j] for r in rows] for j in range(3)) for l in range(extra // 3)]
    return cols, loads


def read_log(path):
    """What the trainer printed that the CSV does not hold: its configuration, the MFU of its summary
    line (GPU) and its last text sample."""
    text = open(path, errors="replace").read()
    info = {}
    m = re.search(r"^config: (.*)$", text, re.M)
    info["config"] = m.group(1) if m else None
    m = re.search(r"\| [^|:]*: (?:H \d+ dh \d+ )?E (\d+) fe? (\d+) k (\d+) \|", text)
    info["experts"], info["expert_dim"], info["topk"] = (int(g) for g in m.groups()) if m else (None,) * 3
    m = re.search(r"^done: .*, MFU ([\d.]+)%", text, re.M)
    info["mfu_percent"] = float(m.group(1)) if m else None
    samples = re.findall(r"^--- sample at step (\d+) \((.*?)\) ---\n(.*?)\n---$", text, re.M | re.S)
    info["sample"] = {"step": int(samples[-1][0]), "settings": samples[-1][1], "text": samples[-1][2]} if samples else None
    info["device"] = "gpu" if re.search(r"^\d+ x GPU ", text, re.M) else "cpu"
    return info


def read_bench(path):
    if not os.path.exists(path):
        return []
    rows = []
    for r in csv.DictReader(open(path), delimiter="\t"):
        for key in ("k", "E", "expert_dim"):
            r[key] = int(r[key]) if r.get(key) else None
        for key in ("forward_ms", "forward_backward_ms", "tflops", "gib"):
            r[key] = float(r[key]) if r.get(key) else None
        rows.append(r)
    return rows


def summarize(name, cols, loads, info):
    vals = [(s, t, e, v) for s, t, e, v in zip(cols["step"], cols["tokens"], cols["elapsed_s"], cols["val_loss"])
            if finite(v)]
    steady = cols["ms"][1:] or cols["ms"]  # the first step pays for warm-up
    tokens_per_step = int(cols["tokens"][0] / cols["step"][0])
    breakdown = {s: statistics.median(cols[s][1:] or cols[s]) for s in SECTIONS}
    sent = cols["sent_bytes"][1:] or cols["sent_bytes"]
    return {
        "system": name,
        "device": info["device"],
        "config": info["config"],
        "experts": info["experts"], "expert_dim": info["expert_dim"], "topk": info["topk"],
        "steps": int(cols["step"][-1]),
        "tokens_per_step": tokens_per_step,
        "tokens": int(cols["tokens"][-1]),
        "wall_s": cols["elapsed_s"][-1],
        "train_loss_first": cols["loss"][0],
        "train_loss_last": cols["loss"][-1],
        "val_loss_last": vals[-1][3] if vals else None,
        "val_loss_curve": [{"step": int(s), "tokens": int(t), "elapsed_s": e, "val_loss": v} for s, t, e, v in vals],
        "median_step_ms": statistics.median(steady),
        "tokens_per_s": tokens_per_step / (statistics.median(steady) / 1000),
        "mfu_percent": info["mfu_percent"],
        "step_breakdown_median_ms": breakdown if all(finite(x) for x in breakdown.values()) else None,
        "sent_bytes_per_step_median": statistics.median(sent) if any(sent) else None,
        "expert_load_last_step": [{"layer": l, "min": lo[-1], "median": med[-1], "max": hi[-1]}
                                  for l, (lo, med, hi) in enumerate(loads)],
        "expert_load_max_over_steps": [max(hi) for _, _, hi in loads],
        "sample": info["sample"],
    }


def dress(ax, legend=True, **labels):
    """Labels and title, the y axis from 0 to a little above the highest point, a grid, a legend."""
    ax.set(**labels)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.05)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend()


def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_losses(runs, path):
    fig, (by_tokens, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, (cols, _, s) in runs.items():
        curve = s["val_loss_curve"]
        line, = by_tokens.plot([p["tokens"] for p in curve], [p["val_loss"] for p in curve], "o-", label=name)
        by_tokens.plot(cols["tokens"], cols["loss"], color=line.get_color(), alpha=0.25, lw=1)
        by_time.plot([p["elapsed_s"] for p in curve], [p["val_loss"] for p in curve], "o-", label=name)
        by_time.plot(cols["elapsed_s"], cols["loss"], color=line.get_color(), alpha=0.25, lw=1)
    by_tokens.set(xlabel="tokens trained", ylabel="loss (nats)", title="validation loss (train loss faint) against tokens")
    by_time.set(xlabel="wall time (s), evaluations included", ylabel="loss (nats)",
                title="validation loss against wall time")
    for ax in (by_tokens, by_time):
        ax.grid(alpha=0.3)
        ax.legend()
    save(fig, path)


def plot_throughput(runs, path):
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, (cols, _, s) in runs.items():
        rate = [s["tokens_per_step"] / (ms / 1000) for ms in cols["ms"]]
        line, = ax.plot(cols["step"], rate, lw=1, alpha=0.6, label=f"{name} (median {s['tokens_per_s']:,.0f})")
        ax.axhline(s["tokens_per_s"], color=line.get_color(), ls="--", lw=1)
    dress(ax, xlabel="step", ylabel="tokens/s", title="training throughput (dashed: median after the first step)")
    save(fig, path)


def plot_breakdown(summaries, path):
    names = list(summaries)
    fig, ax = plt.subplots(figsize=(2.2 * len(names) + 3, 4.5))
    bottom = [0.0] * len(names)
    for section in SECTIONS:
        heights = [summaries[n]["step_breakdown_median_ms"][section] for n in names]
        ax.bar(names, heights, bottom=bottom, label=section.removesuffix("_ms").replace("_", " "))
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set(ylabel="ms per step (median)", title="where a step's time goes")
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1))
    save(fig, path)


def plot_bytes(runs, path):
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, (cols, _, _) in runs.items():
        ax.plot(cols["step"], [b / 2**20 for b in cols["sent_bytes"]], label=name)
    dress(ax, xlabel="step", ylabel="MiB sent by rank 0", title="bytes sent per step (all peers)")
    save(fig, path)


def plot_loads(runs, path):
    names = list(runs)
    fig, axes = plt.subplots(2, len(names), figsize=(5.5 * len(names), 7), squeeze=False, sharex="col")
    for col, name in enumerate(names):
        cols, loads, s = runs[name]
        colors = plt.cm.viridis([l / max(1, len(loads) - 1) for l in range(len(loads))])
        for row, (which, stat) in enumerate((("max", 2), ("median", 1))):
            ax = axes[row][col]
            for l, layer in enumerate(loads):
                ax.plot(cols["step"], layer[stat], color=colors[l], lw=1, label=f"L{l}")
            if s["experts"]:
                ax.axhline(1 / s["experts"], color="k", ls="--", lw=1, label="balanced 1/E")
            dress(ax, legend=False, title=f"{name}: {which} expert share per layer", ylabel="share of routed slots")
        axes[1][col].set_xlabel("step")
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1, 1), fontsize=8)
    save(fig, path)


def plot_bench(bench, path):
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in dict.fromkeys(r["system"] for r in bench):
        points = [(r["k"], r["forward_backward_ms"]) for r in bench if r["system"] == name and r["forward_backward_ms"]]
        if points:
            ax.plot(*zip(*points), "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    dress(ax, xlabel="k (E and the expert size scaled: E/k and k·fe fixed)", ylabel="ms, forward + backward",
          title="one FFN layer over k at fixed expert FLOPs")
    save(fig, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", help="the folder compare.sh wrote")
    ap.add_argument("--systems", nargs="+", required=True)
    ap.add_argument("--preset", default=None)
    ap.add_argument("--launch", default="")
    ap.add_argument("--flags", default="")
    a = ap.parse_args()
    out = lambda name: os.path.join(a.report, name)  # noqa: E731

    runs, notes = {}, []
    for name in a.systems:
        cols, loads = read_steps(out(f"{name}.csv"))
        runs[name] = (cols, loads, summarize(name, cols, loads, read_log(out(f"{name}.log"))))
    summaries = {name: s for name, (_, _, s) in runs.items()}
    if len({s["tokens_per_step"] for s in summaries.values()}) > 1 or len({s["steps"] for s in summaries.values()}) > 1:
        notes.append("the systems did not train the same token budget: compare the curves against tokens")
    bench = read_bench(out("layer_bench.tsv"))

    plots = ["val_loss.png", "tokens_per_s.png"]
    plot_losses(runs, out("val_loss.png"))
    plot_throughput(runs, out("tokens_per_s.png"))
    if all(s["step_breakdown_median_ms"] for s in summaries.values()):
        plot_breakdown(summaries, out("step_breakdown.png"))
        plots.append("step_breakdown.png")
    else:
        notes.append("no step breakdown: the CPU path does not time a step's sections (the GPU path does)")
    if any(s["sent_bytes_per_step_median"] for s in summaries.values()):
        plot_bytes(runs, out("bytes_per_step.png"))
        plots.append("bytes_per_step.png")
    else:
        notes.append("no bytes plot: on one rank nothing is sent")
    notes.append("bytes across nodes are not plotted: the trainers log only the bytes a rank sends to all its peers")
    if all(loads for _, loads, _ in runs.values()):
        plot_loads(runs, out("expert_load.png"))
        plots.append("expert_load.png")
    if any(r["forward_backward_ms"] for r in bench):
        plot_bench(bench, out("layer_bench.png"))
        plots.append("layer_bench.png")
    else:
        notes.append("no layer benchmark: it needs a GPU (--bench-layer)")

    report = {"preset": a.preset, "launch": a.launch, "flags": a.flags, "systems": summaries,
              "layer_bench": bench, "plots": plots, "notes": notes}
    with open(out("report.json"), "w") as f:
        json.dump(report, f, indent=1, allow_nan=False)
    print(f"report: {out('report.json')} and {', '.join(plots)} in {a.report}")
    for s in summaries.values():
        val = f"{s['val_loss_last']:.4f}" if finite(s["val_loss_last"]) else "-"
        print(f"  {s['system']:<16} val loss {val} | train loss {s['train_loss_last']:.4f} | "
              f"{s['median_step_ms']:.2f} ms/step | {s['tokens_per_s']:,.0f} tok/s | {s['wall_s']:.1f} s")
    for n in notes:
        print(f"  note: {n}")


if __name__ == "__main__":
    main()
