#!/usr/bin/env bash
# The CPU reference against an independent PyTorch oracle (SPEC §8.3): BUILD_DIR/dump_reference writes one
# forward + backward of ref::Model<double> for each FFN kind, and tests/torch_oracle.py recomputes both
# with autograd through model.py (SPEC §2 in PyTorch, sharing no code with the C++). Then the oracle's
# teeth: each deliberate mistake it knows (--mutate) and two tampered dumps (one expert choice changed,
# one gradient element nudged) must make it fail.
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

for kind in latentmoe moe; do
    oracle 0 "the oracle agrees with the CPU reference: $kind" "$TMP/dumps/$kind"
    grep -E '^(FAILED|info|worst)' "$TMP/oracle.log" | sed 's/^/#   /'
done

for kind in latentmoe moe; do
    for mutation in selection-without-bias gates-with-bias tanh-gelu transposed-router rope-half-split \
        padded-vocab-counts; do
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

echo "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
