#!/usr/bin/env bash
# scripts/checkpoint.py against the trainers: each trainer trains the tiny preset on the CPU for a few
# steps and saves a checkpoint; the reader loads it into model.py and must reproduce the trainer's final
# validation loss (same batches, from the checkpoint's B and T) to 1e-4 relative, and write a state dict
# with model.py's tensor names and shapes. A version-2 copy (FNV-1a checksums)
# must read to the same arrays. Damaged copies (a payload byte, a header byte, a truncated file, either
# version), an unknown version and a checkpoint of another preset must be refused with a message naming
# the problem.
#
#   bash tests/test_checkpoint_reader.sh BUILD_DIR      (BUILD_DIR holds both trainers and data_prep)
#
# Python: the first that imports torch and numpy (scripts/python_with.sh); none: skipped (exit 77).
# Prints "ok - ..." / "not ok - ..." per case, then "N passed, M failed"; exits 1 if any failed.
set -u

[ $# -eq 1 ] || { echo "usage: bash tests/test_checkpoint_reader.sh BUILD_DIR" >&2; exit 2; }
BUILD=$(cd "$1" 2>/dev/null && pwd) || { echo "test_checkpoint_reader: no build directory '$1'" >&2; exit 2; }
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
READER="$ROOT/scripts/checkpoint.py"
source "$ROOT/scripts/python_with.sh"
if ! PY=$(python_with torch) || ! "$PY" -c "import numpy" >/dev/null 2>&1; then
    echo "skipped: no Python with torch and numpy (tried ${PYTHON:+$PYTHON, }/usr/bin/python3, python3)"
    exit 77
fi
export OMP_NUM_THREADS=1  # the tiny model gains nothing from more threads, and CI shares its cores

TMP=$(mktemp -d "${TMPDIR:-/tmp}/lmoe_ckpt_reader.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
PASSED=0
FAILED=0
ok() { PASSED=$((PASSED + 1)); echo "ok - $1"; }
not_ok() { FAILED=$((FAILED + 1)); echo "not ok - $1"; [ -n "${2:-}" ] && sed 's/^/#   /' "$2"; }

for i in $(seq 1 600); do echo "verse $i: in the beginning the quick brown fox jumped over the lazy dog $((i * 7 % 13))."; done >"$TMP/text.txt"
"$BUILD/data_prep" --out "$TMP/text" "$TMP/text.txt" >"$TMP/prep.log" 2>&1 || { not_ok "data_prep" "$TMP/prep.log"; exit 1; }

# reader_matches NAME CKPT LOG CSV BATCHES: the reader's val loss against the trainer's, from its CSV's last
# row (%.9g) and its closing "done:" line (%.4f).
reader_matches() {
    local name=$1 ckpt=$2 log=$3 csv=$4 batches=$5
    if ! "$PY" "$READER" "$ckpt" --preset tiny --val-data "$TMP/text_val.bin" --batches "$batches" \
        --state-dict "$TMP/$name.pt" >"$TMP/$name.reader" 2>&1; then
        not_ok "$name: the reader evaluates the checkpoint" "$TMP/$name.reader"
        return
    fi
    local ours csv_loss done_loss
    ours=$(sed -n 's/^val loss \([^ ]*\) .*/\1/p' "$TMP/$name.reader")
    csv_loss=$(tail -n 1 "$csv" | cut -d, -f4)
    done_loss=$(sed -n 's/^done: .*, val loss \([0-9.]*\) .*/\1/p' "$log")
    if "$PY" -c "
import sys
ours, csv_loss, done_loss = map(float, sys.argv[1:])
sys.exit(not (abs(ours - csv_loss) <= 1e-4 * abs(csv_loss) and abs(ours - done_loss) <= 5e-5 + 1e-4 * abs(done_loss)))
" "$ours" "$csv_loss" "$done_loss" 2>/dev/null; then
        ok "$name: the reader's val loss $ours equals the trainer's $csv_loss (printed $done_loss)"
    else
        not_ok "$name: the reader's val loss '$ours' differs from the trainer's '$csv_loss' (printed '$done_loss')" \
            "$TMP/$name.reader"
    fi
    if "$PY" - "$ROOT" "$TMP/$name.pt" "$ckpt" >"$TMP/$name.sd" 2>&1 <<'EOF'; then
import sys
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[1] + "/scripts")
import torch
import checkpoint
from model import param_shapes
state = torch.load(sys.argv[2])
ckpt = checkpoint.read_checkpoint(sys.argv[3])
cfg = checkpoint.model_config(ckpt)
want = dict(param_shapes(cfg), routing_bias=[cfg.L, cfg.H, cfg.E])
assert set(state) == set(want), sorted(set(state) ^ set(want))
for name, shape in want.items():
    assert list(state[name].shape) == shape and state[name].dtype == torch.float32, name
flat = torch.cat([state[name].reshape(-1) for name, _ in checkpoint.param_layout(ckpt["fingerprint"])])
assert torch.equal(flat, torch.from_numpy(ckpt["params"].copy())), "the tensors are not the flat parameters in order"
EOF
        ok "$name: the state dict holds model.py's tensors, float32, in the layout's order"
    else
        not_ok "$name: the state dict" "$TMP/$name.sd"
    fi
}

# train NAME PROGRAM FLAGS...: 20 tiny steps on the CPU, validation only at the end, a checkpoint and a CSV.
train() {
    local name=$1 program=$2
    shift 2
    if "$BUILD/$program" --device cpu --preset tiny --steps 20 --eval-every 0 --log-every 100 \
        --train-data "$TMP/text_train.bin" --val-data "$TMP/text_val.bin" \
        --checkpoint "$TMP/$name.ckpt" --log-file "$TMP/$name.csv" "$@" >"$TMP/$name.log" 2>&1; then
        ok "$name: $program trains 20 steps and saves a checkpoint"
        return 0
    fi
    not_ok "$name: $program trains 20 steps and saves a checkpoint" "$TMP/$name.log"
    return 1
}

train latentmoe train_latentmoe --eval-batches 3 && reader_matches latentmoe "$TMP/latentmoe.ckpt" \
    "$TMP/latentmoe.log" "$TMP/latentmoe.csv" 3
# another B and T than the preset's: the reader must take them from the checkpoint
train moe moe_ep_baseline --eval-batches 5 --batch 8 --seq-len 24 && reader_matches moe "$TMP/moe.ckpt" \
    "$TMP/moe.log" "$TMP/moe.csv" 5

# refused EXPECTED_MESSAGE FILE [FLAGS...]: the reader exits 1 and says why
refused() {
    local why=$1 file=$2
    shift 2
    "$PY" "$READER" "$file" "$@" >"$TMP/refused.log" 2>&1
    local rc=$?
    if [ "$rc" -eq 1 ] && grep -qF -- "$why" "$TMP/refused.log"; then
        ok "refused ($(basename "$file")${*:+ $*}): $why"
    else
        not_ok "refused ($(basename "$file")${*:+ $*}): exit $rc, expected 1 and '$why'" "$TMP/refused.log"
    fi
}

if [ -f "$TMP/latentmoe.ckpt" ]; then
    # corrupt COPY OFFSET: COPY is the checkpoint with the byte at OFFSET (negative: from the end) flipped
    corrupt() {
        "$PY" - "$TMP/latentmoe.ckpt" "$TMP/$1" "$2" <<'EOF'
import sys
data = bytearray(open(sys.argv[1], "rb").read())
data[int(sys.argv[3])] ^= 0x01
open(sys.argv[2], "wb").write(bytes(data))
EOF
    }
    corrupt payload.ckpt -4000  # a float of the AdamW second moment: only the checksum can tell
    corrupt header.ckpt 32      # the routing-bias count, which only the header's checksum covers
    head -c 1000 "$TMP/latentmoe.ckpt" >"$TMP/truncated.ckpt"
    # what rank 0 of two would hold: a valid file (both checksums right) with fewer parameters than a
    # one-rank model of its shape
    "$PY" - "$ROOT/scripts" "$TMP/latentmoe.ckpt" "$TMP/shard.ckpt" <<'EOF'
import sys
sys.path.insert(0, sys.argv[1])
import numpy as np
import checkpoint
c = checkpoint.read_checkpoint(sys.argv[2])
P, cut = c["num_params"], c["params"].size // 8
header = np.frombuffer(open(sys.argv[2], "rb").read(152), "<i8").copy()
header[3] = P - cut
body = header.tobytes()
body += checkpoint.checksum(c["version"], body).to_bytes(8, "little")
for part in (c["params"], c["m"], c["v"]):
    body += part[:P - cut].tobytes()
body += c["routing_bias"].tobytes()
open(sys.argv[3], "wb").write(body + checkpoint.checksum(c["version"], body).to_bytes(8, "little"))
EOF
    # the same checkpoint as version 2 (FNV-1a 64 checksums, each of every byte before it), that copy
    # with one payload byte flipped, and version 4, which no trainer writes
    "$PY" - "$TMP/latentmoe.ckpt" "$TMP" <<'EOF'
import struct, sys
data = bytearray(open(sys.argv[1], "rb").read())
def fnv(b):
    h = 14695981039346656037
    for x in b:
        h = ((h ^ x) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h
assert struct.unpack_from("<q", data, 8)[0] == 3, "the trainer wrote another version than 3"
struct.pack_into("<q", data, 8, 2)
struct.pack_into("<Q", data, 152, fnv(data[:152]))
struct.pack_into("<Q", data, len(data) - 8, fnv(data[:-8]))
open(sys.argv[2] + "/v2.ckpt", "wb").write(data)
data[-4000] ^= 0x01
open(sys.argv[2] + "/v2_payload.ckpt", "wb").write(data)
struct.pack_into("<q", data, 8, 4)
open(sys.argv[2] + "/v4.ckpt", "wb").write(data)
EOF
    if "$PY" - "$ROOT/scripts" "$TMP/latentmoe.ckpt" "$TMP/v2.ckpt" >"$TMP/v2.log" 2>&1 <<'EOF'; then
import sys
sys.path.insert(0, sys.argv[1])
import numpy as np
import checkpoint
new, old = checkpoint.read_checkpoint(sys.argv[2]), checkpoint.read_checkpoint(sys.argv[3])
assert (new["version"], old["version"]) == (3, 2), (new["version"], old["version"])
for key in ("params", "m", "v", "routing_bias"):
    assert np.array_equal(new[key], old[key]), key
assert all(new[key] == old[key] for key in ("step", "num_params", "bias_size", "fingerprint", "B", "T", "grad_accum"))
EOF
        ok "version 2 (FNV-1a checksums) reads to the same header and arrays as the trainer's version 3"
    else
        not_ok "version 2 (FNV-1a checksums) reads to the same header and arrays" "$TMP/v2.log"
    fi
    refused "checkpoint is corrupt (checksum mismatch)" "$TMP/payload.ckpt"
    refused "checkpoint is corrupt (checksum mismatch) in its header" "$TMP/header.ckpt"
    refused "checkpoint is truncated" "$TMP/truncated.ckpt"
    refused "checkpoint is corrupt (checksum mismatch)" "$TMP/v2_payload.ckpt"
    refused "checkpoint version 4 is not supported (this reader reads versions 2 and 3)" "$TMP/v4.ckpt"
    refused "not a checkpoint of this trainer" "$TMP/text_val.bin"
    refused "a shard of a multi-rank run" "$TMP/shard.ckpt"
    refused "checkpoint was written for another model: d 64 there, 512 here" "$TMP/latentmoe.ckpt" --preset small
fi

echo "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
