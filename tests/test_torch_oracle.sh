#!/usr/bin/env bash
# The CPU reference against an independent PyTorch oracle (SPEC §8.3): BUILD_DIR/dump_reference writes one
# forward + backward of ref::Model<double> for each FFN kind and router (LatentMoE, the top-k MoE, LocMoE
# dropless and LocMoE with copies over capacity), and tests/torch_oracle.py recomputes each with autograd
# through model.py (SPEC §2 in PyTorch, sharing no code with the C++). Then the oracle's teeth: each
# deliberate mistake it knows (--mutate) must make it fail on every dump where the mistake changes the
# result, and so must tampered dumps (one expert choice changed, one gradient element nudged; LocMoE: one
# kept copy marked dropped, the capacity one less, L_aux nudged, one gradient element of ε nudged).
#
#   bash tests/test_torch_oracle.sh BUILD_DIR
#
# Python: the first that can import torch (scripts/python_with.sh: $PYTHON, /usr/bin/python3, python3).
# If none can, the test is skipped (exit 77).
# Prints "ok - ..." / "not ok - ..." per case, then "N passed, M failed"; exits 1 if any failed.
set -u

if [ $# -ne 1 ]; then
    echo "usage: bash tests/test_torch_oracle.sh BUILD_DIR" >&2
    exit 2
fi
BUILD=$(cd "$1" 2>/dev/null && pwd) || { echo "test_torch_oracle: no build directory '$1'" >&2; exit 2; }
ORACLE="$(cd "$(dirname "$0")" && pwd)/torch_oracle.py"

source "$(dirname "$0")/../scripts/python_with.sh"
if ! PY=$(python_with torch); then
    echo "skipped: PyTorch is not installed (tried ${PYTHON:+$PYTHON, }/usr/bin/python3, python3)"
    exit 77
fi
echo "# python: $PY, torch $("$PY" -c 'import torch; print(torch.__version__)')"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/lmoe_oracle.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
PASSED=0
FAILED=0
ok() { PASSED=$((PASSED + 1)); echo "ok - $1"; }
not_ok() { FAILED=$((FAILED + 1)); echo "not ok - $1"; }

if ! "$BUILD/dump_reference" "$TMP/dumps" >"$TMP/dump.log" 2>&1; then
    not_ok "dump_reference writes the dumps"
    sed 's/^/#   /' "$TMP/dump.log"
    echo "$PASSED passed, $FAILED failed"
    exit 1
fi
ok "dump_reference writes the dumps"

# oracle EXPECTED_RC DESCRIPTION DIR [FLAGS...]: runs the oracle and requires its exit status and a
# proper summary line (an exception would exit 1 too, but without "N passed, M failed").
oracle() {
    local expected=$1 what=$2
    shift 2
    "$PY" "$ORACLE" "$@" >"$TMP/oracle.log" 2>&1
    local rc=$? summary
    summary=$(tail -n 1 "$TMP/oracle.log")
    if [ "$rc" -eq "$expected" ] && [[ "$summary" =~ ^[0-9]+\ passed,\ [0-9]+\ failed$ ]]; then
        ok "$what ($summary)"
    else
        not_ok "$what: exit status $rc, expected $expected"
        sed 's/^/#   /' "$TMP/oracle.log"
    fi
}

KINDS="latentmoe moe locmoe locmoe_capacity"
for kind in $KINDS; do
    oracle 0 "the oracle agrees with the CPU reference: $kind" "$TMP/dumps/$kind"
    grep -E '^(FAILED|info|worst)' "$TMP/oracle.log" | sed 's/^/#   /'
done

# The mistakes each dump can show: the top-k router's where it routes; LocMoE has no bias and no router
# matrix, a dropless capacity cannot drop in the wrong order, and one rank's D_l is uniform anyway.
DENSE="tanh-gelu rope-half-split padded-vocab-counts"
LOCMOE="gate-softmax-over-k grap-sum-pooling kl-reversed"
declare -A MUTATIONS=(
    [latentmoe]="selection-without-bias gates-with-bias transposed-router $DENSE"
    [moe]="selection-without-bias gates-with-bias transposed-router $DENSE"
    [locmoe]="$DENSE $LOCMOE"
    [locmoe_capacity]="$DENSE $LOCMOE capacity-drop-earliest locality-uniform"
)
for kind in $KINDS; do
    for mutation in ${MUTATIONS[$kind]}; do
        oracle 1 "a mutated oracle ($mutation) disagrees: $kind" "$TMP/dumps/$kind" --mutate "$mutation"
    done
done

# Tampered dumps: the code under test chose one wrong expert, or got one gradient element slightly wrong.
cp -r "$TMP/dumps/latentmoe" "$TMP/wrong_expert"
cp -r "$TMP/dumps/latentmoe" "$TMP/wrong_grad"
"$PY" - "$TMP/wrong_expert" "$TMP/wrong_grad" <<'EOF'
import struct, sys
wrong_expert, wrong_grad = sys.argv[1], sys.argv[2]
# sel is (L, H, N, k) int32 with k = 2: give row 0 of layer 0, head 0 an expert it did not choose.
with open(wrong_expert + "/sel.bin", "r+b") as f:
    a, b = struct.unpack("<2i", f.read(8))
    other = next(e for e in range(8) if e not in (a, b))
    f.seek(4)
    f.write(struct.pack("<i", other))
# grads is float64: make the largest-magnitude element 1e-6 relatively larger.
with open(wrong_grad + "/grads.bin", "r+b") as f:
    data = f.read()
    g = struct.unpack("<%dd" % (len(data) // 8), data)
    i = max(range(len(g)), key=lambda j: abs(g[j]))
    f.seek(8 * i)
    f.write(struct.pack("<d", g[i] * (1 + 1e-6)))
EOF
oracle 1 "a dump with one wrong expert choice fails" "$TMP/wrong_expert"
oracle 1 "a dump with one gradient element off by 1e-6 fails" "$TMP/wrong_grad"

# Tampered LocMoE dumps: the code under test dropped one copy the capacity keeps (its drop count raised
# to match), used a capacity one less, got L_aux or one element of dε slightly wrong.
for tamper in wrong_kept wrong_capacity wrong_aux wrong_eps_grad; do
    cp -r "$TMP/dumps/locmoe_capacity" "$TMP/$tamper"
done
"$PY" - "$TMP" <<'EOF'
import json, struct, sys
tmp = sys.argv[1]
def edit_meta(name, change):
    with open("%s/%s/meta.json" % (tmp, name)) as f:
        meta = json.load(f)
    change(meta["locmoe"])
    with open("%s/%s/meta.json" % (tmp, name), "w") as f:
        json.dump(meta, f)
with open(tmp + "/wrong_kept/meta.json") as f:
    meta = json.load(f)
# kept is (L, H, N, k) int32: the last kept copy of layer 0 marked dropped
L, H, N, k = meta["files"]["kept"]["shape"]
with open(tmp + "/wrong_kept/kept.bin", "r+b") as f:
    kept = struct.unpack("<%di" % (H * N * k), f.read(4 * H * N * k))
    last = max(i for i, flag in enumerate(kept) if flag)
    f.seek(4 * last)
    f.write(struct.pack("<i", 0))
edit_meta("wrong_kept", lambda loc: loc["dropped"].__setitem__(0, loc["dropped"][0] + 1))
edit_meta("wrong_capacity", lambda loc: loc.__setitem__("capacity", loc["capacity"] - 1))
edit_meta("wrong_aux", lambda loc: loc.__setitem__("aux_loss", loc["aux_loss"] * (1 + 1e-6)))
# grads is float64: layer0.router_eps's largest-magnitude element 1e-6 relatively larger
eps = next(t for t in meta["tensors"] if t["name"] == "layer0.router_eps")
with open(tmp + "/wrong_eps_grad/grads.bin", "r+b") as f:
    f.seek(8 * eps["offset"])
    g = struct.unpack("<%dd" % eps["numel"], f.read(8 * eps["numel"]))
    i = max(range(len(g)), key=lambda j: abs(g[j]))
    f.seek(8 * (eps["offset"] + i))
    f.write(struct.pack("<d", g[i] * (1 + 1e-6)))
EOF
oracle 1 "a LocMoE dump with one kept copy marked dropped fails" "$TMP/wrong_kept"
oracle 1 "a LocMoE dump with the capacity one less fails" "$TMP/wrong_capacity"
oracle 1 "a LocMoE dump with L_aux off by 1e-6 fails" "$TMP/wrong_aux"
oracle 1 "a LocMoE dump with one element of dε off by 1e-6 fails" "$TMP/wrong_eps_grad"

echo "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
