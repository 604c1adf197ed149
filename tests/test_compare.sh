#!/usr/bin/env bash
# scripts/compare.sh end to end on a tiny budget (the tiny preset on generated text, the CPU reference
# path): it must write the report folder — report.json that parses with every system's figures, each
# run's CSV and log, and PNG plots that load — and refuse to write over an existing folder.
#
#   bash tests/test_compare.sh BUILD_DIR      (BUILD_DIR holds both trainers and data_prep)
#
# Exits 77 (skipped) where python3-matplotlib is missing.
set -u
[ $# -eq 1 ] || { echo "usage: bash tests/test_compare.sh BUILD_DIR" >&2; exit 2; }
BUILD=$(cd "$1" 2>/dev/null && pwd) || { echo "test_compare: no build directory '$1'" >&2; exit 2; }
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/scripts/python_with.sh"
PY=$(python_with matplotlib) || { echo "skipped: no Python with matplotlib (python3-matplotlib)"; exit 77; }
TMP=$(mktemp -d "${TMPDIR:-/tmp}/lmoe_compare.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
FAILED=0
not_ok() { FAILED=$((FAILED + 1)); echo "not ok - $1"; }

for i in $(seq 1 300); do echo "verse $i: in the beginning the quick brown fox jumped over the lazy dog."; done >"$TMP/text.txt"
"$BUILD/data_prep" --out "$TMP/text" "$TMP/text.txt" >/dev/null || { echo "not ok - data_prep"; exit 1; }

# compare.sh ARGS...: the comparison on the test shards, on the CPU, into $TMP/report
compare() {
    env SETUP=0 BUILD_DIR="$BUILD" DATA="$TMP/text" REPORT="$TMP/report" SAMPLE=16 K_SWEEP= CUDA_VISIBLE_DEVICES= \
        bash "$ROOT/scripts/compare.sh" tiny --device cpu --steps 12 --batch 4 --eval-every 4 --eval-batches 2 \
        --log-every 4 "$@"
}
if compare >"$TMP/out.txt" 2>&1; then
    echo "ok - compare.sh ran"
else
    not_ok "compare.sh ran"
    tail -20 "$TMP/out.txt" | sed 's/^/#   /'
fi

"$PY" - "$TMP/report" <<'EOF' || FAILED=$((FAILED + 1))
import json, math, os, sys
import matplotlib.image
report = sys.argv[1]
bad = []
r = json.load(open(os.path.join(report, "report.json")))
for name in ("train_latentmoe", "moe_ep_baseline"):
    s = r["systems"].get(name)
    if not s:
        bad.append(f"{name} missing from report.json"); continue
    if s["steps"] != 12 or s["tokens"] != 12 * 4 * 32:
        bad.append(f"{name}: {s['steps']} steps, {s['tokens']} tokens (expected 12 and 1536)")
    if [p["step"] for p in s["val_loss_curve"]] != [4, 8, 12] or not all(math.isfinite(p["val_loss"]) for p in s["val_loss_curve"]):
        bad.append(f"{name}: validation curve {s['val_loss_curve']}")
    if not (s["sample"] and s["sample"]["text"].startswith("The")):
        bad.append(f"{name}: no sample starting with the default prompt: {s['sample']}")
    if len(s["expert_load_last_step"]) != 2:
        bad.append(f"{name}: expert loads of {len(s['expert_load_last_step'])} layers, expected 2")
    for f in (f"{name}.csv", f"{name}.log"):
        if not os.path.getsize(os.path.join(report, f)):
            bad.append(f"{f} is empty")
want = {"val_loss.png", "tokens_per_s.png", "expert_load.png"}
if not want <= set(r["plots"]):
    bad.append(f"plots {r['plots']} lack some of {sorted(want)}")
for p in r["plots"]:
    image = matplotlib.image.imread(os.path.join(report, p))
    if image.shape[0] < 200 or image.shape[1] < 200:
        bad.append(f"{p} is {image.shape}")
if not any("step breakdown" in n for n in r["notes"]):
    bad.append(f"no note on the missing step breakdown: {r['notes']}")
print("\n".join(f"not ok - {b}" for b in bad) or "ok - report.json and the plots")
sys.exit(1 if bad else 0)
EOF

before=$(ls -l --time-style=full-iso "$TMP/report" | md5sum)
compare >"$TMP/again.txt" 2>&1
status=$?
if [ "$status" -eq 2 ] && grep -q "the report folder .* exists" "$TMP/again.txt" &&
    [ "$(ls -l --time-style=full-iso "$TMP/report" | md5sum)" = "$before" ]; then
    echo "ok - an existing report folder is refused and left as it was"
else
    not_ok "an existing report folder is refused (status $status): $(tail -1 "$TMP/again.txt")"
fi
[ "$FAILED" -eq 0 ]
