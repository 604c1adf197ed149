#!/usr/bin/env bash
# Nothing lost, nothing overwritten (SPEC §8.6), as a user meets it: bad output paths, signals, a kill -9
# and a resume, a broken stdout pipe, a failure inside the training loop, corrupted checkpoints, a resume
# with another batch shape, a full disk, and flags whose sizes cannot fit. One line of the table below
# per case; every case is run with a time limit and its memory capped (ulimit -v), and for every case
# the test asserts
#   - the exit status (0 done, 2 flags/configurations/output paths/sizes, 1 data and I/O errors and
#     failures inside the loop, 130/143/129 for SIGINT/SIGTERM/SIGHUP), and no crash;
#   - a message (an extended regex over stdout + stderr);
#   - that no input file changed (the shards, the checkpoints a case resumes from or must keep:
#     sha256sum before and after), and that no file appeared among the inputs;
#   - that the files the row names exist afterwards and that nothing else was left behind (no
#     temporary files); a refused configuration (exit 2) must write nothing and start no step;
#   - the row's own extra check, if any (CSV rows, the checkpoint resumes, ...).
#
#   bash tests/test_faults.sh BUILD_DIR     (BUILD_DIR holds train_latentmoe, moe_ep_baseline, data_prep)
#   FAULTS_DEVICE=gpu bash tests/test_faults.sh BUILD_DIR   on a machine where `nvidia-smi -L` works: the
#       rows marked "all" run with --device gpu, the CPU-memory rows ("cpu") are skipped
#   FAULTS_ONLY=REGEX   run only the rows whose name matches;  FAULTS_KEEP=1   keep the scratch folder
#   FAULTS_VMEM_KB      the ulimit -v of every case (default 4 GiB on the CPU, unlimited on the GPU,
#                       where CUDA reserves more address space than that)
#
# Prints "ok - ..." / "not ok - ..." / "skip - ..." per case, then "N passed, M failed, K skipped";
# exits non-zero if any case failed.
set -u

if [ $# -ne 1 ]; then
    echo "usage: bash tests/test_faults.sh BUILD_DIR" >&2
    exit 2
fi
BUILD=$(cd "$1" 2>/dev/null && pwd) || { echo "test_faults: no build directory '$1'" >&2; exit 2; }
for program in train_latentmoe moe_ep_baseline data_prep; do
    if [ ! -x "$BUILD/$program" ]; then
        echo "not ok - $BUILD/$program exists (build it first)"
        echo "0 passed, 1 failed, 0 skipped"
        exit 1
    fi
done
command -v python3 >/dev/null || { echo "not ok - python3 is needed to corrupt files"; echo "0 passed, 1 failed, 0 skipped"; exit 1; }

DEV=cpu
if [ "${FAULTS_DEVICE:-cpu}" = gpu ]; then
    if nvidia-smi -L >/dev/null 2>&1; then DEV=gpu; else echo "# FAULTS_DEVICE=gpu but nvidia-smi -L fails: running on the CPU"; fi
fi
if [ "$DEV" = gpu ]; then VMEM=${FAULTS_VMEM_KB:-unlimited}; else VMEM=${FAULTS_VMEM_KB:-4194304}; fi
LIMIT=60          # seconds for one program run
ROOT=0; [ "$(id -u)" -eq 0 ] && ROOT=1
echo "# device $DEV, memory cap ulimit -v $VMEM, $LIMIT s per run, $([ $ROOT = 1 ] && echo root || echo 'not root')"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/lmoe_faults.XXXXXX")
MOUNTS=()
cleanup_all() {
    local m
    for m in "${MOUNTS[@]+"${MOUNTS[@]}"}"; do umount "$m" 2>/dev/null; done
    chmod -R u+w "$TMP" 2>/dev/null
    if [ "${FAULTS_KEEP:-0}" = 1 ]; then echo "# kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup_all EXIT
cd "$TMP" || exit 1
FIX=$TMP/fix
mkdir -p "$FIX" "$TMP/c"

TL=$BUILD/train_latentmoe
TM=$BUILD/moe_ep_baseline
# tl / tm ARGS...: a trainer on the chosen device, under the time limit
tl() { timeout -k 5 "$LIMIT" "$TL" --device "$DEV" "$@"; }
tm() { timeout -k 5 "$LIMIT" "$TM" --device "$DEV" "$@"; }
dp() { timeout -k 5 "$LIMIT" "$BUILD/data_prep" "$@"; }
tq() { timeout -k 2 15 "$TL" --device "$DEV" "$@"; }   # a configuration that must be refused at once
# the common flags of a short run: tiny preset, 2 x 32 tokens a step
R="--batch 2 --seq-len 32 --eval-batches 1 --eval-every 0 --log-every 1 --warmup 5"
D="--train-data $FIX/t_train.bin --val-data $FIX/t_val.bin"

# ---------------------------------------------------------------------------------------------
# Fixtures (inputs; hashed once, checked after every case, and left writable so that only the
# trainers' own checks, not the file permissions, keep them from being overwritten): shards made by
# data_prep from generated text, a shard with a bad token id, a small first shard for the glob, big shards for T = 30000, a
# checkpoint made by training, and a file name with glob characters.

for i in $(seq 1 300); do echo "verse $i: in the beginning the quick brown fox jumped over the lazy dog."; done >"$TMP/text.txt"
"$BUILD/data_prep" --out "$FIX/t" "$TMP/text.txt" >/dev/null || { echo "not ok - data_prep makes the fixtures"; exit 1; }
mkdir -p "$FIX/sh" "$FIX/big" "$FIX/br"
head -c 444 "$TMP/text.txt" >"$TMP/a.txt"                       # ~400 train tokens: 6 batches of 2 x 32 + 1
"$BUILD/data_prep" --out "$FIX/sh/a" --val-fraction 0.1 "$TMP/a.txt" >/dev/null
rm -f "$FIX/sh/a_val.bin"
for i in $(seq 1 1100); do echo "line $i: a longer text so that one sequence of thirty thousand tokens fits."; done >"$TMP/big.txt"
"$BUILD/data_prep" --out "$FIX/big/b" --val-fraction 0.5 "$TMP/big.txt" >/dev/null
python3 - "$FIX" <<'EOF'
import struct, sys
fix = sys.argv[1]
data = bytearray(open(fix + "/t_train.bin", "rb").read())
struct.pack_into("<H", data, 1024 + 2 * 5, 300)     # token id 300 >= V = 256 at position 5
open(fix + "/sh/b_train.bin", "wb").write(data)     # the second shard of sh/*_train.bin
open(fix + "/br/br1_train.bin", "wb").write(data)   # what the glob br[1]_train.bin would match
EOF
cp "$FIX/t_train.bin" "$FIX/br/br[1]_train.bin"      # the file that must be read literally
mkdir -p "$FIX/e" && cp "$FIX/t_train.bin" "$FIX/e/x.bin.emergency"   # a shard named like an emergency checkpoint
SHARD_A_BATCHES=$(( ($(wc -c <"$FIX/sh/a_train.bin") - 1024) / 2 - 1 ))
SHARD_A_BATCHES=$(( SHARD_A_BATCHES / 64 ))
mkdir -p "$TMP/mk" && (cd "$TMP/mk" && timeout -k 5 "$LIMIT" "$TL" --device "$DEV" $R $D --steps 2 --checkpoint "$FIX/good.ckpt" >"$TMP/mk.out" 2>&1) ||
    { echo "not ok - a 2-step run makes the fixture checkpoint"; sed 's/^/#   /' "$TMP/mk.out" | tail -5; echo "0 passed, 1 failed, 0 skipped"; exit 1; }
(cd "$TMP/mk" && timeout -k 5 "$LIMIT" "$TM" --device "$DEV" $R $D --steps 2 --checkpoint "$FIX/good_moe.ckpt" >"$TMP/mk.out" 2>&1) ||
    { echo "not ok - a 2-step run makes the MoE fixture checkpoint"; echo "0 passed, 1 failed, 0 skipped"; exit 1; }
rm -rf "$TMP/mk"
cp -a "$FIX" "$TMP/pristine"      # to restore the inputs after a case that damaged them
(cd "$FIX" && find . -type f | LC_ALL=C sort | xargs -d '\n' sha256sum) >"$TMP/fix.sha"
(cd "$FIX" && find . | LC_ALL=C sort) >"$TMP/fix.list"

# ---------------------------------------------------------------------------------------------
# Helpers for the prep, check and command columns. They run in the case's own folder ($CASE_DIR); the
# case's stdout and stderr are $OUTF and $ERRF.

PASSED=0 FAILED=0 SKIPPED=0
skip_because() { echo "$1"; return 77; }
keep() { local f; for f in "$@"; do echo "$f" >>"$CASE_DIR.keep"; done; }           # must not change
have_ckpt() { cp "$FIX/good.ckpt" "$1" && chmod u+w "$1" && keep "$1"; }             # an earlier checkpoint
need_root() { [ $ROOT = 1 ] || skip_because "needs root (mknod or mount)"; }
need_nonroot() { [ $ROOT = 0 ] || skip_because "root writes into any folder: no unwritable folder to test"; }
mk_dev() { need_root || return; mknod "$1" c 1 3 || skip_because "mknod $1 c 1 3 failed"; }
mk_ro_dir() { need_nonroot || return; mkdir -p "$1" && chmod 555 "$1"; }
mk_tmpfs() {  # mk_tmpfs DIR SIZE: a small file system of its own (a full disk)
    need_root || return
    mkdir -p "$1"
    mount -t tmpfs -o "size=$2" tmpfs "$1" 2>/dev/null || skip_because "cannot mount a tmpfs here (no CAP_SYS_ADMIN)"
    MOUNTS+=("$CASE_DIR/$1")
    CASE_MOUNTS+=("$CASE_DIR/$1")
}
mk_ro_fs() {  # mk_ro_fs DIR: a read-only file system (unwritable even for root)
    need_root || return
    mkdir -p "$1"
    mount -t tmpfs -o ro,size=64k tmpfs "$1" 2>/dev/null || skip_because "cannot mount a tmpfs here (no CAP_SYS_ADMIN)"
    MOUNTS+=("$CASE_DIR/$1")
    CASE_MOUNTS+=("$CASE_DIR/$1")
}
fill_up() { dd if=/dev/zero of="$1" bs=4096 >/dev/null 2>&1; sync; true; }         # fill a file system
# corrupt FILE OP [ARG]: a copy of the fixture checkpoint, broken
corrupt() {
    have_ckpt "$1" || return
    python3 - "$@" <<'EOF'
import sys
path, op = sys.argv[1], sys.argv[2]
arg = sys.argv[3] if len(sys.argv) > 3 else None
data = bytearray(open(path, "rb").read())
if op == "flip":            # flip every bit of one byte; arg: offset, "mid" or a negative offset from the end
    i = len(data) // 2 if arg == "mid" else int(arg)
    data[i] ^= 0xFF
elif op == "truncate":      # drop the last arg bytes
    data = data[: len(data) - int(arg)]
elif op == "append":
    data += b"\0" * int(arg)
elif op == "empty":
    data = bytearray()
open(path, "wb").write(data)
EOF
    sha256sum "$1" >/dev/null
}
# ckedit FILE OP...: a copy of the fixture checkpoint with a header field or a value changed and both
# checksums recomputed (the layout of train/checkpoint.h; FNV-1a 64 when the file then says version 2,
# LaneHash64 otherwise, as docs/checkpoint.md defines them), so that only the range and value checks can
# catch it.  OP: set FIELD VALUE (FIELD: version step P Nb F B T GA) | value ARRAY INDEX VALUE
# (ARRAY: params m v bias; VALUE: a float, nan, inf)
ckedit() {
    have_ckpt "$1" || return
    python3 - "$@" <<'EOF2'
import struct, sys
path, op = sys.argv[1], sys.argv[2]
data = bytearray(open(path, "rb").read())
M = 0xFFFFFFFFFFFFFFFF
def fnv(b):
    h = 14695981039346656037
    for x in b:
        h = ((h ^ x) * 1099511628211) & M
    return h
def mix(x):
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & M
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & M
    return x ^ (x >> 31)
def lane_hash(b):  # one word at a time: zero-padded little-endian words, word j into lane j mod 4
    lanes = [1, 2, 3, 4]
    for j, (w,) in enumerate(struct.iter_unpack("<Q", bytes(b) + bytes(-len(b) % 8))):
        lanes[j % 4] = (lanes[j % 4] * 0x9E3779B97F4A7C15 + mix(w)) & M
    h = len(b)
    for a in lanes:
        h = mix(h ^ a)
    return h
i64 = lambda i: struct.unpack_from("<q", data, 8 * i)[0]
F = i64(5)
P, Nb = i64(3), i64(4)
hdr_words = 6 + F + 3
payload = 8 * (hdr_words + 1)
if op == "set":
    idx = {"version": 1, "step": 2, "P": 3, "Nb": 4, "F": 5, "B": 6 + F, "T": 7 + F, "GA": 8 + F}[sys.argv[3]]
    struct.pack_into("<q", data, 8 * idx, int(sys.argv[4]))
elif op == "value":
    base = {"params": 0, "m": P, "v": 2 * P, "bias": 3 * P}[sys.argv[3]]
    struct.pack_into("<f", data, payload + 4 * (base + int(sys.argv[4])), float(sys.argv[5]))
checksum = fnv if i64(1) == 2 else lane_hash
struct.pack_into("<Q", data, 8 * hdr_words, checksum(data[: 8 * hdr_words]))
struct.pack_into("<Q", data, len(data) - 8, checksum(data[: len(data) - 8]))
open(path, "wb").write(data)
EOF2
    sha256sum "$1" >/dev/null
}
# ck_version FILE N: the checkpoint FILE says format version N
ck_version() {
    python3 - "$1" "$2" <<'EOF'
import struct, sys
version = struct.unpack_from("<q", open(sys.argv[1], "rb").read(16), 8)[0]
if version != int(sys.argv[2]):
    print("%s is version %d, expected %s" % (sys.argv[1], version, sys.argv[2]))
    sys.exit(1)
EOF
}
old_log() { printf '1,5.5,1.2,nan,3.0\n2,5.4,1.1,nan,3.0\n' >"$1" && keep "$1"; }  # an earlier run's log
need() { command -v "$1" >/dev/null || skip_because "$1 is not installed"; }

# capped CMD...: CMD under the memory cap (for the runs a check starts)
capped() { (ulimit -v "$VMEM" 2>/dev/null; "$@"); }

# wait_for_step PID: until the first progress line is on stdout (or PID ended, or the time limit)
wait_for_step() {
    local t0=$SECONDS
    while kill -0 "$1" 2>/dev/null && [ $((SECONDS - t0)) -lt "$LIMIT" ]; do
        grep -q '^step' "$OUTF" 2>/dev/null && return 0
        sleep 0.05
    done
}
# reap PID: wait for PID, killing it (-9) once past the time limit; its exit status
reap() {
    local t0=$SECONDS
    while kill -0 "$1" 2>/dev/null && [ $((SECONDS - t0)) -lt "$LIMIT" ]; do sleep 0.05; done
    kill -0 "$1" 2>/dev/null && { kill -9 "$1"; echo "test_faults: killed pid $1 after $LIMIT s" >&2; }
    wait "$1"
}
# signal_run SIG BINARY ARGS...: starts a long run, sends SIG after its first step; its exit status
signal_run() {
    local sig=$1 bin=$2 pid sig_env=()
    shift 2
    # as from a terminal: the signals at their defaults (bash makes a background job ignore SIGINT, and a
    # caller under nohup would make it ignore SIGHUP)
    env --default-signal=INT true 2>/dev/null && sig_env=(env --default-signal=INT,HUP,TERM,PIPE)
    "${sig_env[@]}" "$bin" --device "$DEV" "$@" &
    pid=$!
    wait_for_step "$pid"
    kill -s "$sig" "$pid" 2>/dev/null
    reap "$pid"
}
# pipe_head ARGS...: train_latentmoe with its stdout into `head -1`; the trainer's exit status
pipe_head() {
    local pipe_env=()
    env --default-signal=PIPE true 2>/dev/null && pipe_env=(env --default-signal=PIPE)  # as a shell would
    "${pipe_env[@]}" timeout -k 5 "$LIMIT" "$TL" --device "$DEV" "$@" | head -1
    return "${PIPESTATUS[0]}"
}
# kill9_resume ARGS...: a long run with a log and a checkpoint every 4 steps, killed with -9 (between
# two checkpoints when the timing allows), then resumed from its checkpoint for 3 more steps than the log
# had rows; the resumed run's exit status. The log before the kill is kept in $CASE_DIR.before.csv.
kill9_resume() {
    local pid t0=$SECONDS rows=0
    "$TL" --device "$DEV" "$@" --steps 100000 --checkpoint c.ckpt --checkpoint-every 4 --log-file l.csv &
    pid=$!
    while kill -0 "$pid" 2>/dev/null && [ $((SECONDS - t0)) -lt 20 ]; do   # a log not flushed stays short
        rows=$(cat l.csv 2>/dev/null | wc -l)
        { [ "$rows" -ge 10 ] && [ $((rows % 4)) -eq 2 ]; } || [ "$rows" -ge 40 ] && break
        sleep 0.02
    done
    kill -9 "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    cp l.csv "$CASE_DIR.before.csv" 2>/dev/null || : >"$CASE_DIR.before.csv"
    rows=$(wc -l <"$CASE_DIR.before.csv")
    echo "test_faults: killed with -9 after $rows log rows"
    timeout -k 5 "$LIMIT" "$TL" --device "$DEV" "$@" --steps $((rows + 3)) --resume c.ckpt --checkpoint c.ckpt --log-file l.csv
}
# fsize_limited KIB CMD...: CMD with files limited to KIB KiB (ulimit -f) and SIGXFSZ ignored, so that a
# write past the limit fails with EFBIG, like a full disk, without root
fsize_limited() { (trap '' XFSZ; ulimit -f "$1"; shift; "$@"); }
# two_writers ARGS...: two runs at once saving the same checkpoint; 0 when both succeed
two_writers() {
    local a b sa sb
    "$TL" --device "$DEV" "$@" & a=$!
    "$TL" --device "$DEV" "$@" & b=$!
    reap "$a"; sa=$?
    reap "$b"; sb=$?
    echo "test_faults: the two runs exited $sa and $sb"
    [ "$sa" -eq 0 ] && [ "$sb" -eq 0 ]
}
# traced ARGS...: train_latentmoe under strace (fsync and rename calls to $CASE_DIR.strace)
traced() {
    timeout -k 5 "$LIMIT" strace -f -qq -o "$CASE_DIR.strace" -e trace=fsync,fdatasync,rename,renameat,renameat2 \
        "$TL" --device "$DEV" "$@"
}

# --- checks (print why and return 1 on failure) ---
# csv_rows FILE N: exactly rows 1..N of the --log-file CSV (train/step_log.h), each once, in order (a header line
# starting with "step" is allowed)
csv_rows() {
    python3 - "$1" "$2" <<'EOF'
import sys
path, n = sys.argv[1], int(sys.argv[2])
try:
    text = open(path).read()
except OSError as e:
    print(f"{path}: {e}"); sys.exit(1)
if text and not text.endswith("\n"):
    print(f"{path}: the last row is cut off: {text.splitlines()[-1]!r}"); sys.exit(1)
lines = text.splitlines()
if lines and lines[0].startswith("step"):
    lines = lines[1:]
steps = []
for line in lines:
    f = line.split(",")
    # train/step_log.h: 15 columns, then 3 per layer
    if len(f) < 15 or (len(f) - 15) % 3 or len(f) != len(lines[0].split(",")):
        print(f"{path}: malformed row {line!r}"); sys.exit(1)
    try:
        steps.append(int(f[0])); [float(x) for x in f[1:]]
    except ValueError:
        print(f"{path}: malformed row {line!r}"); sys.exit(1)
if steps != list(range(1, n + 1)):
    print(f"{path}: steps {steps[:8]}...{steps[-8:]} ({len(steps)} rows), expected 1..{n}"); sys.exit(1)
EOF
}
# no_msg REGEX: neither stdout nor stderr matches
no_msg() { ! grep -qE -- "$1" "$OUTF" "$ERRF" || { echo "the output matches '$1': $(grep -hE -- "$1" "$OUTF" "$ERRF" | head -1)"; return 1; }; }
# resumes FILE [BINARY]: training resumes from FILE (its step read from "saved checkpoint FILE (step S)"
# or "... FILE ... step S" in this case's output) for one more step
resumes() {
    local file=$1 bin=${2:-$TL} s
    s=$(grep -hoE "$file[^0-9]*\(?step [0-9]+" "$OUTF" "$ERRF" | tail -1 | grep -oE '[0-9]+$')
    [ -n "$s" ] || { echo "no 'saved ... $file ... step N' line"; return 1; }
    capped timeout -k 5 "$LIMIT" "$bin" --device "$DEV" $R $D --steps $((s + 1)) --resume "$file" --checkpoint "$CASE_DIR.r.ckpt" \
        >"$CASE_DIR.r.out" 2>&1 || { echo "resuming from $file (step $s) failed: $(grep error "$CASE_DIR.r.out" | head -1)"; return 1; }
    grep -q "resumed from $file at step $s" "$CASE_DIR.r.out" || { echo "the resume did not say 'resumed from $file at step $s'"; return 1; }
}
# log_resumed: after kill9_resume, the log is rows 1..(rows before the kill + 3), rows 1..S unchanged
log_resumed() {
    local s k
    s=$(sed -n 's/^resumed from c.ckpt at step \([0-9]*\).*/\1/p' "$OUTF" | tail -1)
    k=$(wc -l <"$CASE_DIR.before.csv")
    [ -n "$s" ] || { echo "no 'resumed from c.ckpt at step S' line"; return 1; }
    [ "$s" -ge 4 ] && [ "$s" -le "$k" ] || { echo "resumed at step $s with $k log rows before the kill"; return 1; }
    csv_rows l.csv $((k + 3)) || return 1
    cmp -s <(head -n "$s" "$CASE_DIR.before.csv") <(head -n "$s" l.csv) || { echo "rows 1..$s changed on resume"; return 1; }
}
# fsynced: the checkpoint was fsync'ed and renamed into place from a temporary name of its own
fsynced() {
    grep -qE '(fsync|fdatasync)\(' "$CASE_DIR.strace" || { echo "no fsync or fdatasync call"; return 1; }
    local tmp
    tmp=$(grep -oE 'rename(at2?)?\(.*"[^"]*c\.ckpt"' "$CASE_DIR.strace" | grep -oE '"[^"]*"' | head -1 | tr -d '"')
    [ -n "$tmp" ] || { echo "no rename onto c.ckpt"; return 1; }
    [ "$tmp" != c.ckpt.tmp ] || { echo "the temporary name c.ckpt.tmp is the same for every run"; return 1; }
}
# lines_emergency: the emergency checkpoint resumes at the last good step (shard a's batches)
emergency_resumes() {
    capped timeout -k 5 "$LIMIT" "$TL" --device "$DEV" $R $D --steps $((SHARD_A_BATCHES + 1)) --resume c.ckpt.emergency \
        --checkpoint "$CASE_DIR.r.ckpt" >"$CASE_DIR.r.out" 2>&1 || { echo "resuming from c.ckpt.emergency failed: $(grep error "$CASE_DIR.r.out" | head -1)"; return 1; }
    grep -q "resumed from c.ckpt.emergency at step $SHARD_A_BATCHES" "$CASE_DIR.r.out" ||
        { echo "not 'resumed from c.ckpt.emergency at step $SHARD_A_BATCHES': $(grep resumed "$CASE_DIR.r.out")"; return 1; }
}

# ---------------------------------------------------------------------------------------------
# The cases. Columns, separated by " | ":
#   name | on: all (CPU and GPU path) or cpu (CPU-memory cases) | exit status | message (ERE over stdout and
#   stderr; - for none) | files that must exist afterwards (~GLOB: allowed, not required; - none) |
#   prep (run first in the case's folder; exit 77 skips the case) | check (run after) | command
# tl/tm: train_latentmoe/moe_ep_baseline on the device; $R: short-run flags; $D: the train/val shards.
CASES=$(cat <<'TABLE'
# --- a run that should work, as a control
ok_control            | all | 0   | done: train loss                                                  | c.ckpt l.csv              | -                                                | csv_rows l.csv 3                       | tl $R $D --steps 3 --checkpoint c.ckpt --log-file l.csv
ok_overwrite_old_ckpt | all | 0   | saved checkpoint c.ckpt                                           | c.ckpt                    | cp $FIX/good.ckpt c.ckpt                         | -                                      | tl $R $D --steps 2 --checkpoint c.ckpt
ok_missing_folder     | all | 0   | saved checkpoint new/dir/c.ckpt                                   | new/dir/c.ckpt log/l.csv  | -                                                | csv_rows log/l.csv 2                   | tl $R $D --steps 2 --checkpoint new/dir/c.ckpt --log-file log/l.csv
ok_resume_same_file   | all | 0   | resumed from c.ckpt at step 2                                     | c.ckpt                    | cp $FIX/good.ckpt c.ckpt                         | -                                      | tl $R $D --steps 3 --resume c.ckpt --checkpoint c.ckpt
# --- output paths, refused before the first step (exit 2, nothing written). Devices are made in the
#     case's folder (mknod) or linked to (/dev/null, /dev/full): a trainer that wrongly renamed a
#     checkpoint over one replaces the test's file, never the system's device.
path_ckpt_device      | all | 2   | nulldev.*not a regular file                                       | -                         | mk_dev nulldev                                   | -                                      | tl $R $D --steps 2 --checkpoint nulldev
path_log_device       | all | 2   | nulldev.*not a regular file                                       | -                         | mk_dev nulldev                                   | -                                      | tl $R $D --steps 2 --checkpoint c.ckpt --log-file nulldev
path_log_link_dev     | all | 2   | l.csv is not a regular file                                       | -                         | ln -s /dev/null l.csv                            | -                                      | tl $R $D --steps 2 --checkpoint c.ckpt --log-file l.csv
path_ckpt_link_dev    | all | 2   | full.ckpt is not a regular file                                   | -                         | ln -s /dev/full full.ckpt                        | -                                      | tl $R $D --steps 2 --checkpoint full.ckpt
path_ckpt_fifo        | all | 2   | f.ckpt is not a regular file                                      | -                         | mkfifo f.ckpt                                    | -                                      | tq $R $D --steps 2 --checkpoint f.ckpt
path_log_fifo         | all | 2   | l.csv is not a regular file                                       | -                         | mkfifo l.csv                                     | -                                      | tq $R $D --steps 2 --checkpoint c.ckpt --log-file l.csv
path_ckpt_directory   | all | 2   | checkpoint adir is a directory                                    | -                         | mkdir adir                                       | -                                      | tl $R $D --steps 2 --checkpoint adir
path_log_directory    | all | 2   | log file adir is a directory                                      | -                         | mkdir adir                                       | -                                      | tl $R $D --steps 2 --checkpoint c.ckpt --log-file adir
path_emergency_dir    | all | 2   | emergency checkpoint c.ckpt.emergency is a directory              | -                         | mkdir c.ckpt.emergency                           | -                                      | tl $R $D --steps 2 --checkpoint c.ckpt
path_ckpt_train_shard | all | 2   | checkpoint .*t_train.bin is the train shard                       | -                         | -                                                | -                                      | tl $R $D --steps 2 --checkpoint $FIX/t_train.bin
path_ckpt_val_shard   | all | 2   | checkpoint .*t_val.bin is the val shard                           | -                         | -                                                | -                                      | tl $R $D --steps 2 --checkpoint $FIX/t_val.bin
path_log_train_shard  | all | 2   | log file .*t_train.bin is the train shard                         | -                         | -                                                | -                                      | tl $R $D --steps 2 --checkpoint c.ckpt --log-file $FIX/t_train.bin
path_log_val_shard    | all | 2   | log file .*t_val.bin is the val shard                             | -                         | -                                                | -                                      | tl $R $D --steps 2 --checkpoint c.ckpt --log-file $FIX/t_val.bin
path_ckpt_shard_link  | all | 2   | checkpoint shard.ckpt is the train shard                          | -                         | ln -s $FIX/t_train.bin shard.ckpt                | -                                      | tl $R $D --steps 2 --checkpoint shard.ckpt
path_ckpt_shard_dots  | all | 2   | is the train shard                                                | -                         | -                                                | -                                      | tl $R $D --steps 2 --checkpoint $FIX/sh/../t_train.bin
path_ckpt_glob_shard  | all | 2   | b_train.bin is the train shard                                    | -                         | -                                                | -                                      | tl $R --train-data "$FIX/sh/*_train.bin" --val-data $FIX/t_val.bin --steps 2 --checkpoint $FIX/sh/b_train.bin
path_emergency_shard  | all | 2   | emergency checkpoint .*x.bin.emergency is the train shard         | -                         | -                                                | -                                      | tl $R --train-data $FIX/e/x.bin.emergency --val-data $FIX/t_val.bin --steps 2 --checkpoint $FIX/e/x.bin
path_log_is_resume    | all | 2   | log file c.ckpt is the checkpoint to resume from                  | -                         | have_ckpt c.ckpt                                 | -                                      | tl $R $D --steps 3 --resume c.ckpt --checkpoint d.ckpt --log-file c.ckpt
path_ckpt_is_log      | all | 2   | log file out.x is also the checkpoint                             | -                         | -                                                | -                                      | tl $R $D --steps 2 --checkpoint out.x --log-file out.x
path_ckpt_is_log_dots | all | 2   | is also the checkpoint                                            | -                         | -                                                | -                                      | tl $R $D --steps 2 --checkpoint out.x --log-file ./sub/../out.x
path_ckpt_is_log_dot  | all | 2   | is also the checkpoint                                            | -                         | -                                                | -                                      | tl $R $D --steps 2 --checkpoint out.x --log-file ./out.x
path_log_links_ckpt   | all | 2   | log file l.csv is also the checkpoint                             | -                         | have_ckpt c.ckpt && ln -s c.ckpt l.csv           | -                                      | tl $R $D --steps 2 --checkpoint c.ckpt --log-file l.csv
path_parent_is_file   | all | 2   | afile.*(not a folder|Not a directory)                             | -                         | echo x >afile && keep afile                      | -                                      | tl $R $D --steps 2 --checkpoint afile/c.ckpt
path_unwritable_proc  | all | 2   | /proc/lmoe_faults.*(not writable|cannot)                          | -                         | [ -d /proc/self ] || skip_because "no /proc"     | -                                      | tl $R $D --steps 2 --checkpoint /proc/lmoe_faults/c.ckpt
path_unwritable_dir   | all | 2   | ro/c.ckpt.*not writable                                           | -                         | mk_ro_dir ro                                     | -                                      | tl $R $D --steps 2 --checkpoint ro/c.ckpt
path_unwritable_log   | all | 2   | ro/l.csv.*not writable                                            | -                         | mk_ro_dir ro                                     | -                                      | tl $R $D --steps 2 --checkpoint c.ckpt --log-file ro/l.csv
path_readonly_fs      | all | 2   | m/c.ckpt.*(not writable|Read-only)                                | -                         | mk_ro_fs m                                       | -                                      | tl $R $D --steps 2 --checkpoint m/c.ckpt
path_log_readonly_fs  | all | 2   | m/l.csv.*(not writable|Read-only)                                 | -                         | mk_ro_fs m                                       | -                                      | tl $R $D --steps 2 --checkpoint c.ckpt --log-file m/l.csv
path_keeps_old_log    | all | 2   | checkpoint adir is a directory                                    | -                         | mkdir adir && old_log l.csv                      | -                                      | tl $R $D --steps 2 --checkpoint adir --log-file l.csv
path_val_glob_train   | all | 2   | val shard .*t_train.bin is also the train shard                   | -                         | -                                                | -                                      | tl $R --train-data $FIX/t_train.bin --val-data "$FIX/t_*.bin" --steps 2 --checkpoint c.ckpt
dp_out_is_input       | all | 2   | data_prep: error: .*x_train.bin.*input                            | -                         | cp $TMP/text.txt x_train.bin && keep x_train.bin | -                                      | dp --out x x_train.bin
dp_out_directory      | all | 2   | data_prep: error: .*x_val.bin is a directory                      | -                         | mkdir x_val.bin                                  | -                                      | dp --out x $TMP/text.txt
dp_out_device         | all | 2   | data_prep: error: .*x_train.bin is not a regular file             | -                         | mk_dev x_train.bin                               | -                                      | dp --out x $TMP/text.txt
path_ckpt_empty       | all | 2   | --checkpoint needs a non-empty value                              | -                         | -                                                | -                                      | tl $R $D --steps 2 --checkpoint ''
path_train_is_val     | all | 2   | val shard .* is also the train shard                              | -                         | -                                                | -                                      | tl $R --train-data $FIX/t_train.bin --val-data $FIX/t_train.bin --steps 2 --checkpoint c.ckpt
data_train_fifo       | all | 1   | f.bin.*(not a regular file|not a shard)                           | -                         | mkfifo f.bin                                     | -                                      | tq $R --train-data f.bin --val-data $FIX/t_val.bin --steps 2 --checkpoint c.ckpt
data_glob_literal     | all | 0   | done: train loss                                                  | c.ckpt                    | -                                                | -                                      | tl $R --train-data "$FIX/br/br[1]_train.bin" --val-data $FIX/t_val.bin --steps 2 --checkpoint c.ckpt
# --- signals: finish the step, save, exit 128 + the signal; SIGPIPE ignored
sig_int               | all | 130 | saved checkpoint c.ckpt                                           | c.ckpt l.csv              | -                                                | resumes c.ckpt                         | signal_run INT $TL $R $D --steps 100000 --warmup 100000 --checkpoint c.ckpt --log-file l.csv
sig_term              | all | 143 | saved checkpoint c.ckpt                                           | c.ckpt                    | -                                                | resumes c.ckpt                         | signal_run TERM $TL $R $D --steps 100000 --checkpoint c.ckpt
sig_hup               | all | 129 | saved checkpoint c.ckpt                                           | c.ckpt                    | -                                                | resumes c.ckpt                         | signal_run HUP $TL $R $D --steps 100000 --checkpoint c.ckpt
sig_term_moe          | all | 143 | saved checkpoint c.ckpt                                           | c.ckpt                    | -                                                | resumes c.ckpt $TM                     | signal_run TERM $TM $R $D --steps 100000 --checkpoint c.ckpt
sig_int_resumed       | all | 130 | saved checkpoint c.ckpt                                           | c.ckpt                    | cp $FIX/good.ckpt c.ckpt                         | resumes c.ckpt                         | signal_run INT $TL $R $D --steps 100000 --resume c.ckpt --checkpoint c.ckpt
sig_pipe              | all | 0   | -                                                                 | c.ckpt l.csv              | -                                                | csv_rows l.csv 40                      | pipe_head $R $D --steps 40 --checkpoint c.ckpt --log-file l.csv
# --- the log: flushed every step, cut back to the resumed step after a kill -9
log_kill9_resume      | all | 0   | resumed from c.ckpt at step [0-9]+                                | c.ckpt l.csv ~c.ckpt?*    | -                                                | log_resumed                            | kill9_resume $R $D --warmup 100000
log_full_disk         | all | 1   | m/l.csv: writing the log failed                                   | c.ckpt.emergency ~m/l.csv | mk_tmpfs m 64k && fill_up m/fill && keep m/fill  | -                                      | tl $R $D --steps 3 --checkpoint c.ckpt --log-file m/l.csv
log_too_large         | all | 1   | l.csv: writing the log failed: File too large                     | l.csv                     | -                                                | -                                      | fsize_limited 1 tl $R $D --steps 60 --checkpoint c.ckpt --log-file l.csv
# --- failures inside the loop: an emergency checkpoint beside the last good one, which stays as it was
loop_bad_token_shard2 | all | 1   | b_train.bin.*token id 300                                         | c.ckpt c.ckpt.emergency   | have_ckpt c.ckpt                                 | emergency_resumes                      | tl $R --train-data "$FIX/sh/*_train.bin" --val-data $FIX/t_val.bin --steps 40 --checkpoint c.ckpt
loop_keeps_periodic   | all | 1   | b_train.bin.*token id 300                                         | c.ckpt c.ckpt.emergency   | -                                                | resumes c.ckpt && emergency_resumes    | tl $R --train-data "$FIX/sh/*_train.bin" --val-data $FIX/t_val.bin --steps 40 --checkpoint-every 4 --checkpoint c.ckpt
loop_bad_token_moe    | all | 1   | b_train.bin.*token id 300                                         | c.ckpt c.ckpt.emergency   | have_ckpt c.ckpt                                 | -                                      | tm $R --train-data "$FIX/sh/*_train.bin" --val-data $FIX/t_val.bin --steps 40 --checkpoint c.ckpt
loop_bad_token_first  | all | 1   | b_train.bin.*token id 300                                         | c.ckpt                    | have_ckpt c.ckpt                                 | -                                      | tl $R --train-data $FIX/sh/b_train.bin --val-data $FIX/t_val.bin --steps 4 --checkpoint c.ckpt
loop_nan_loss         | all | 1   | not finite.*not overwritten                                       | c.ckpt                    | have_ckpt c.ckpt                                 | -                                      | tl $R $D --steps 5 --lr 1e30 --checkpoint c.ckpt
loop_ckpt_too_large   | all | 1   | c.ckpt: writing the checkpoint failed: File too large             | c.ckpt                    | have_ckpt c.ckpt                                 | -                                      | fsize_limited 100 tl $R $D --steps 2 --checkpoint c.ckpt
loop_ckpt_disk_full   | all | 1   | m/c.ckpt: writing the checkpoint failed                           | m/c.ckpt                  | mk_tmpfs m 3m && have_ckpt m/c.ckpt              | -                                      | tl $R $D --steps 2 --checkpoint m/c.ckpt
# --- checkpoints: written safely, every corruption refused (the file is left as it was)
ck_fsync_unique_tmp   | all | 0   | saved checkpoint c.ckpt                                           | c.ckpt                    | need strace                                      | fsynced                                | traced $R $D --steps 2 --checkpoint c.ckpt
ck_two_writers        | all | 0   | -                                                                 | c.ckpt                    | -                                                | resumes c.ckpt                         | two_writers $R $D --steps 3 --checkpoint c.ckpt
ck_flip_payload       | all | 1   | c.ckpt.*(checksum|corrupt)                                        | -                         | corrupt c.ckpt flip mid                          | -                                      | tl $R $D --steps 4 --resume c.ckpt --checkpoint c.ckpt
ck_flip_last_byte     | all | 1   | c.ckpt.*(checksum|corrupt)                                        | -                         | corrupt c.ckpt flip -1                           | -                                      | tl $R $D --steps 4 --resume c.ckpt --checkpoint c.ckpt
ck_flip_header_step   | all | 1   | c.ckpt: checkpoint is corrupt \(checksum mismatch\) in its header | -                         | corrupt c.ckpt flip 23                           | -                                      | tl $R $D --steps 4 --resume c.ckpt --checkpoint c.ckpt
ck_edit_control       | all | 0   | resumed from c.ckpt at step 2                                     | d.ckpt                    | ckedit c.ckpt set step 2                         | ck_version d.ckpt 3                    | tl $R $D --steps 3 --resume c.ckpt --checkpoint d.ckpt
ck_resume_version_2   | all | 0   | resumed from c.ckpt at step 2                                     | d.ckpt                    | ckedit c.ckpt set version 2                      | ck_version d.ckpt 3                    | tl $R $D --steps 3 --resume c.ckpt --checkpoint d.ckpt
ck_step_negative      | all | 1   | c.ckpt: checkpoint holds step -5, outside                         | -                         | ckedit c.ckpt set step -5                        | -                                      | tl $R $D --steps 4 --resume c.ckpt --checkpoint c.ckpt
ck_step_huge          | all | 1   | holds step 4294967296, outside                                    | -                         | ckedit c.ckpt set step 4294967296                | -                                      | tl $R $D --steps 4 --resume c.ckpt --checkpoint c.ckpt
ck_param_count_huge   | all | 1   | holds 1099511627776 parameters                                    | -                         | ckedit c.ckpt set P 1099511627776                | -                                      | tl $R $D --steps 4 --resume c.ckpt --checkpoint c.ckpt
ck_param_count_neg    | all | 1   | c.ckpt: .*(negative|parameters)                                   | -                         | ckedit c.ckpt set P -7                           | -                                      | tl $R $D --steps 4 --resume c.ckpt --checkpoint c.ckpt
ck_field_count        | all | 1   | 1000000 model fields                                              | -                         | ckedit c.ckpt set F 1000000                      | -                                      | tl $R $D --steps 4 --resume c.ckpt --checkpoint c.ckpt
ck_version_1          | all | 1   | checkpoint version 1 .*not supported                              | -                         | ckedit c.ckpt set version 1                      | -                                      | tl $R $D --steps 4 --resume c.ckpt --checkpoint c.ckpt
ck_version_99         | all | 1   | checkpoint version 99 is not supported                            | -                         | ckedit c.ckpt set version 99                     | -                                      | tl $R $D --steps 4 --resume c.ckpt --checkpoint c.ckpt
ck_nan_weight         | all | 1   | non-finite value .* in its parameters                             | -                         | ckedit c.ckpt value params 7 nan                 | -                                      | tl $R $D --steps 4 --resume c.ckpt --checkpoint c.ckpt
ck_inf_moment         | all | 1   | non-finite value .* first moment                                  | -                         | ckedit c.ckpt value m 5 inf                      | -                                      | tl $R $D --steps 4 --resume c.ckpt --checkpoint c.ckpt
ck_inf_bias           | all | 1   | non-finite value .* routing biases                                | -                         | ckedit c.ckpt value bias 0 -inf                  | -                                      | tl $R $D --steps 4 --resume c.ckpt --checkpoint c.ckpt
ck_negative_v         | all | 1   | negative value .* second moment                                   | -                         | ckedit c.ckpt value v 3 -1                       | -                                      | tl $R $D --steps 4 --resume c.ckpt --checkpoint c.ckpt
ck_truncated          | all | 1   | c.ckpt.*(truncated|size|short)                                    | -                         | corrupt c.ckpt truncate 1000                     | -                                      | tl $R $D --steps 4 --resume c.ckpt --checkpoint c.ckpt
ck_trailing_bytes     | all | 1   | c.ckpt.*(trailing|size)                                           | -                         | corrupt c.ckpt append 8                          | -                                      | tl $R $D --steps 4 --resume c.ckpt --checkpoint c.ckpt
ck_empty              | all | 1   | c.ckpt                                                            | -                         | corrupt c.ckpt empty                             | -                                      | tl $R $D --steps 4 --resume c.ckpt --checkpoint c.ckpt
ck_resume_fifo        | all | 1   | f.ckpt.*not a regular file                                        | -                         | mkfifo f.ckpt                                    | -                                      | tq $R $D --steps 3 --resume f.ckpt --checkpoint c.ckpt
ck_shard_as_ckpt      | all | 1   | t_train.bin.*not a checkpoint                                     | -                         | -                                                | -                                      | tl $R $D --steps 4 --resume $FIX/t_train.bin --checkpoint c.ckpt
ck_missing            | all | 1   | nothere.ckpt                                                      | -                         | -                                                | -                                      | tl $R $D --steps 4 --resume nothere.ckpt --checkpoint c.ckpt
ck_other_model        | all | 1   | another model.*experts                                            | -                         | have_ckpt c.ckpt                                 | -                                      | tl $R $D --steps 4 --experts 16 --resume c.ckpt --checkpoint c.ckpt
ck_moe_ckpt_to_hp     | all | 1   | another model                                                     | -                         | cp $FIX/good_moe.ckpt c.ckpt && keep c.ckpt      | -                                      | tl $R $D --steps 4 --resume c.ckpt --checkpoint c.ckpt
ck_other_batch        | all | 2   | written with --batch 2, this run has --batch 3                    | -                         | have_ckpt c.ckpt                                 | -                                      | tl $R $D --steps 4 --batch 3 --resume c.ckpt --checkpoint c.ckpt
ck_other_seq_len      | all | 2   | written with --seq-len 32, this run has --seq-len 16              | -                         | have_ckpt c.ckpt                                 | -                                      | tl $R $D --steps 4 --seq-len 16 --resume c.ckpt --checkpoint c.ckpt
ck_other_grad_accum   | all | 2   | written with --grad-accum 1, this run has --grad-accum 2          | -                         | have_ckpt c.ckpt                                 | -                                      | tl $R $D --steps 4 --grad-accum 2 --resume c.ckpt --checkpoint c.ckpt
# --- limits: every size bounded, the memory estimated before allocating
lim_layers            | all | 2   | --layers 2000000000 is above its bound                            | -                         | -                                                | -                                      | tq $R $D --steps 2 --layers 2000000000 --checkpoint c.ckpt
lim_batch             | all | 2   | --batch 2000000000 is above its bound                             | -                         | -                                                | -                                      | tq $R $D --steps 2 --batch 2000000000 --checkpoint c.ckpt
lim_seq_len_huge      | all | 2   | --seq-len 2000000000 is above its bound                           | -                         | -                                                | -                                      | tq $R $D --steps 2 --seq-len 2000000000 --checkpoint c.ckpt
lim_experts           | all | 2   | --experts 2000000000 is above its bound                           | -                         | -                                                | -                                      | tq $R $D --steps 2 --experts 2000000000 --checkpoint c.ckpt
lim_grad_accum        | all | 2   | --grad-accum 2147483647 is above its bound                        | -                         | -                                                | -                                      | tq $R $D --steps 2 --grad-accum 2147483647 --checkpoint c.ckpt
lim_seq_len_30000_cpu | cpu | 2   | T.T = 3600000000 is above the bound|[0-9.]+ GiB                   | -                         | -                                                | -                                      | tq --batch 1 --seq-len 30000 --eval-batches 1 --steps 1 --train-data $FIX/big/b_train.bin --val-data $FIX/big/b_val.bin --checkpoint c.ckpt
lim_memory_cpu        | cpu | 2   | [0-9.]+ GiB.*available                                            | -                         | -                                                | -                                      | tq --batch 1 --seq-len 20000 --eval-batches 1 --steps 1 --train-data $FIX/big/b_train.bin --val-data $FIX/big/b_val.bin --checkpoint c.ckpt
lim_p1_on_cpu         | cpu | 2   | use --preset tiny or small                                        | -                         | -                                                | -                                      | tq --preset p1 --device cpu $D --steps 1 --checkpoint c.ckpt
lim_lr_tiny           | all | 2   | --lr 1e-50 is out of range                                        | -                         | -                                                | no_msg 'not a number|expects a number' | tq $R $D --steps 2 --lr 1e-50 --checkpoint c.ckpt
TABLE
)

# ---------------------------------------------------------------------------------------------
# The runner.

trim() { local s=$1; s=${s#"${s%%[![:space:]]*}"}; s=${s%"${s##*[![:space:]]}"}; printf '%s' "$s"; }
listing() { (cd "$1" && find . -mindepth 1 -not -type d 2>/dev/null | sed 's|^\./||' | LC_ALL=C sort); }

result() {  # result NAME WHY
    if [ -z "$2" ]; then
        PASSED=$((PASSED + 1)); echo "ok - $1"
    else
        FAILED=$((FAILED + 1)); echo "not ok - $1: $2"
        sed -n '1,5s/^/#   stderr: /p' "$ERRF"
        grep -vE '^(step|    )' "$OUTF" | sed -n '1,4s/^/#   stdout: /p'
    fi
}

run_case() {
    local name=$1 on=$2 want=$3 regex=$4 files=$5 prep=$6 check=$7 cmd=$8
    local got why="" before after f leftover t0=$SECONDS
    CASE_DIR=$TMP/c/$name
    OUTF=$CASE_DIR.out ERRF=$CASE_DIR.err
    CASE_MOUNTS=()
    if [ "$on" = cpu ] && [ "$DEV" = gpu ]; then
        SKIPPED=$((SKIPPED + 1)); echo "skip - $name: a CPU-memory case (the GPU path is not asked to refuse it)"; return
    fi
    mkdir -p "$CASE_DIR" && cd "$CASE_DIR" || return
    : >"$CASE_DIR.keep" ; : >"$OUTF" ; : >"$ERRF"
    if [ "$prep" != - ]; then
        eval "$prep" >"$CASE_DIR.prep" 2>&1
        got=$?
        if [ "$got" -eq 77 ]; then
            SKIPPED=$((SKIPPED + 1)); echo "skip - $name: $(tail -n 1 "$CASE_DIR.prep")"; finish_case; return
        elif [ "$got" -ne 0 ]; then
            result "$name" "the prep '$prep' failed: $(tail -n 1 "$CASE_DIR.prep")"; finish_case; return
        fi
    fi
    (while read -r f; do sha256sum "$f"; done <"$CASE_DIR.keep") >"$CASE_DIR.keep.sha"
    before=$(listing "$CASE_DIR")

    (ulimit -v "$VMEM" 2>/dev/null; eval "$cmd") >"$OUTF" 2>"$ERRF" </dev/null
    got=$?

    # the exit status, and no crash
    if [ "$got" -ne "$want" ]; then
        if [ "$got" -eq 124 ] || [ "$got" -eq 137 ]; then why="exit status $got: timed out or killed (a hang? out of memory?)"
        elif [ "$got" -gt 128 ] && [ "$got" -ne 130 ] && [ "$got" -ne 143 ] && [ "$got" -ne 129 ]; then
            why="killed by signal $((got - 128))"
        else why="exit status $got, expected $want"; fi
    fi
    grep -qE 'Segmentation fault|core dumped|terminate called|Aborted|AddressSanitizer|double free|std::bad_alloc' \
        "$OUTF" "$ERRF" && why="${why:+$why; }crash message in the output"
    # the message
    if [ "$regex" != - ] && ! grep -qE -- "$regex" "$OUTF" "$ERRF"; then why="${why:+$why; }no message matching '$regex'"; fi
    if [ "$want" -eq 2 ] && grep -q '^step' "$OUTF"; then why="${why:+$why; }it started training anyway"; fi
    if [ "$want" -eq 2 ] && ! grep -qE 'error: ' "$ERRF"; then why="${why:+$why; }no 'PROGRAM: error: ...' on stderr"; fi
    # inputs and kept files unchanged, nothing new among the inputs
    local damaged=0
    cd "$FIX" || exit 1
    sha256sum --quiet -c "$TMP/fix.sha" >/dev/null 2>&1 ||
        { damaged=1; why="${why:+$why; }an input file changed: $(sha256sum --quiet -c "$TMP/fix.sha" 2>&1 | head -2 | tr '\n' ' ')"; }
    cmp -s <(find . | LC_ALL=C sort) "$TMP/fix.list" ||
        { damaged=1; why="${why:+$why; }files appeared among the inputs: $(comm -13 "$TMP/fix.list" <(find . | LC_ALL=C sort) | tr '\n' ' ')"; }
    if [ $damaged = 1 ]; then  # put the inputs back, so that one failure does not spoil the cases after it
        cd "$TMP" && rm -rf "$FIX" && cp -a "$TMP/pristine" "$FIX"
    fi
    cd "$CASE_DIR" || return
    if [ -s "$CASE_DIR.keep.sha" ] && ! sha256sum --quiet -c "$CASE_DIR.keep.sha" >/dev/null 2>&1; then
        why="${why:+$why; }a file that must be kept changed: $(sha256sum --quiet -c "$CASE_DIR.keep.sha" 2>&1 | head -2 | tr '\n' ' ')"
    fi
    # the files the row names, and nothing else left behind
    local required=() allowed=()
    for f in $files; do
        [ "$f" = - ] && continue
        if [ "${f#\~}" != "$f" ]; then allowed+=("${f#\~}"); else required+=("$f"); fi
    done
    for f in "${required[@]+"${required[@]}"}"; do
        [ -e "$f" ] || why="${why:+$why; }$f was not written"
    done
    after=$(listing "$CASE_DIR")
    leftover=""
    while read -r f; do
        [ -z "$f" ] && continue
        local ok=0 p
        for p in "${required[@]+"${required[@]}"}" "${allowed[@]+"${allowed[@]}"}"; do
            # shellcheck disable=SC2053
            [[ $f == $p ]] && ok=1
        done
        [ $ok = 1 ] || leftover="$leftover $f"
    done < <(comm -13 <(printf '%s\n' "$before") <(printf '%s\n' "$after"))
    [ -z "$leftover" ] || why="${why:+$why; }left behind:$leftover"
    # the row's own check
    if [ "$check" != - ]; then
        local says
        says=$(eval "$check" 2>&1) || why="${why:+$why; }check '$check': $(printf '%s' "$says" | tail -n 3 | tr '\n' ' ')"
    fi
    result "$name ($((SECONDS - t0)) s)" "$why"
    finish_case
}
finish_case() {
    local m
    for m in "${CASE_MOUNTS[@]+"${CASE_MOUNTS[@]}"}"; do umount "$m" 2>/dev/null; done
    cd "$TMP" || exit 1
}

T_START=$SECONDS
SEP=$'\x1f'
while IFS= read -r line; do
    case "$line" in ''|'#'*) continue ;; esac
    line=${line// | /$SEP}
    IFS=$SEP read -r c_name c_on c_exit c_regex c_files c_prep c_check c_cmd <<<"$line"
    c_cmd=${c_cmd//$SEP/ | }
    c_name=$(trim "$c_name")
    if [ -n "${FAULTS_ONLY:-}" ] && ! [[ $c_name =~ $FAULTS_ONLY ]]; then continue; fi
    run_case "$c_name" "$(trim "$c_on")" "$(trim "$c_exit")" "$(trim "$c_regex")" "$(trim "$c_files")" \
        "$(trim "$c_prep")" "$(trim "$c_check")" "$(trim "$c_cmd")"
done <<<"$CASES"

echo "# $((SECONDS - T_START)) s for the cases"
echo "$PASSED passed, $FAILED failed, $SKIPPED skipped"
[ "$FAILED" -eq 0 ]
