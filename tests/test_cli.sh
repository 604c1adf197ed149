#!/usr/bin/env bash
# The built programs as a user meets them (SPEC §8.5): --help, bad flags, broken constraints, missing,
# foreign, truncated and out-of-vocabulary data files, data_prep's own mistakes, and one tiny successful
# training run of each trainer. Every failure must exit with the documented status (2 usage error, 1 data
# or I/O error), name the problem on stderr, and never crash or hang.
#
#   bash tests/test_cli.sh BUILD_DIR      (BUILD_DIR holds train_latentmoe, moe_ep_baseline, data_prep)
#
# Prints "ok - ..." / "not ok - ..." per case, then "N passed, M failed"; exits non-zero if any failed.
set -u

if [ $# -ne 1 ]; then
    echo "usage: bash tests/test_cli.sh BUILD_DIR" >&2
    exit 2
fi
BUILD=$(cd "$1" 2>/dev/null && pwd) || { echo "test_cli: no build directory '$1'" >&2; exit 2; }
TRAINERS=(train_latentmoe moe_ep_baseline)
for program in "${TRAINERS[@]}" data_prep; do
    if [ ! -x "$BUILD/$program" ]; then
        echo "not ok - $BUILD/$program exists (build it first)"
        echo "0 passed, 1 failed"
        exit 1
    fi
done
command -v python3 >/dev/null || { echo "not ok - python3 is needed to corrupt test shards"; echo "0 passed, 1 failed"; exit 1; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/lmoe_cli.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
cd "$TMP" || exit 1
PASSED=0
FAILED=0
OUT="$TMP/stdout"
ERR="$TMP/stderr"

ok() { PASSED=$((PASSED + 1)); echo "ok - $1"; }
not_ok() {
    FAILED=$((FAILED + 1))
    echo "not ok - $1: $2"
    # a little context: what the program said
    sed -n '1,6s/^/#   stderr: /p' "$ERR"
    sed -n '1,4s/^/#   stdout: /p' "$OUT"
}

# run STATUS CMD...: runs CMD with a time limit, stdout/stderr to $OUT/$ERR; sets STATUS_GOT and WHY
# (empty when the status is as expected and nothing crashed or hung).
run() {
    local want=$1
    shift
    timeout 300 "$@" >"$OUT" 2>"$ERR" </dev/null
    STATUS_GOT=$?
    WHY=""
    if [ "$STATUS_GOT" -eq 124 ]; then
        WHY="timed out (a hang?)"
    elif [ "$STATUS_GOT" -ge 128 ]; then
        WHY="killed by signal $((STATUS_GOT - 128)) (a crash)"
    elif [ "$STATUS_GOT" -ne "$want" ]; then
        WHY="exit status $STATUS_GOT, expected $want"
    fi
    if grep -qE 'Segmentation fault|core dumped|terminate called|Aborted|AddressSanitizer|double free' "$OUT" "$ERR"; then
        WHY="${WHY:+$WHY; }crash message in the output"
    fi
}

# expect_error NAME STATUS NEEDLES CMD...: CMD must exit with STATUS, print every NEEDLE (separated by
# ';;') on stderr, and not have started training (no line starting with "step").
expect_error() {
    local name=$1 want=$2 needles=$3
    shift 3
    run "$want" "$@"
    local needle rest=$needles
    while [ -n "$rest" ]; do
        needle=${rest%%;;*}
        if [ "$needle" = "$rest" ]; then rest=""; else rest=${rest#*;;}; fi
        grep -qF -- "$needle" "$ERR" || WHY="${WHY:+$WHY; }stderr lacks '$needle'"
    done
    if grep -q '^step' "$OUT"; then WHY="${WHY:+$WHY; }it started training anyway"; fi
    if [ -z "$WHY" ]; then ok "$name"; else not_ok "$name" "$WHY"; fi
}

# expect_success NAME NEEDLES CMD...: CMD must exit 0 and print every NEEDLE (';;'-separated) on stdout.
expect_success() {
    local name=$1 needles=$2
    shift 2
    run 0 "$@"
    local needle rest=$needles
    while [ -n "$rest" ]; do
        needle=${rest%%;;*}
        if [ "$needle" = "$rest" ]; then rest=""; else rest=${rest#*;;}; fi
        grep -qF -- "$needle" "$OUT" || WHY="${WHY:+$WHY; }stdout lacks '$needle'"
    done
    if [ -z "$WHY" ]; then ok "$name"; else not_ok "$name" "$WHY"; fi
}

# ---------------------------------------------------------------------------------------------
# Test data: ~20 KB of generated text made into shards by the built data_prep, then broken copies.

for i in $(seq 1 300); do echo "verse $i: in the beginning the quick brown fox jumped over the lazy dog."; done >text.txt
TEXT_BYTES=$(wc -c <text.txt)
expect_success "data_prep makes train and val shards from $TEXT_BYTES bytes of text" "wrote data/text_train.bin" \
    "$BUILD/data_prep" --out data/text text.txt
TRAIN=data/text_train.bin
VAL=data/text_val.bin
# Shard sizes: a 1024-byte header each, then 2 bytes per token; together every byte of the text is a token.
if [ -f "$TRAIN" ] && [ -f "$VAL" ] &&
    [ $(($(wc -c <"$TRAIN") + $(wc -c <"$VAL"))) -eq $((2048 + 2 * TEXT_BYTES)) ]; then
    ok "data_prep's shards hold one token per input byte"
else
    not_ok "data_prep's shards hold one token per input byte" "missing shards or wrong sizes"
fi

# A shard too short for one batch of B=2 x T=32 (+1 target): 50 bytes split in half give 25 tokens per
# side, fewer than the 65 one batch needs.
head -c 50 text.txt >short.txt
printf 'abc' >three_bytes.txt
"$BUILD/data_prep" --out data/short --val-fraction 0.5 short.txt >/dev/null 2>&1

[ -f "$TRAIN" ] && python3 - "$TRAIN" <<'EOF'
import struct, sys
train = sys.argv[1]
data = open(train, "rb").read()
# truncated: the header promises more tokens than the file holds
open("truncated.bin", "wb").write(data[: len(data) - 100])
# an out-of-vocabulary id (300 >= V = 256) at token position 5, header otherwise intact
bad = bytearray(data)
struct.pack_into("<H", bad, 1024 + 2 * 5, 300)
open("token300.bin", "wb").write(bytes(bad))
# the same in an llm.c-style shard that records no vocabulary size (header[3] = 0)
struct.pack_into("<i", bad, 12, 0)
open("token300_llmc.bin", "wb").write(bytes(bad))
# a foreign file: plain text longer than the header, and one shorter than the header
open("foreign.bin", "wb").write(open("text.txt", "rb").read()[:4096])
open("tiny_foreign.bin", "wb").write(b"hello, I am not a shard\n")
# a header with the wrong version
v2 = bytearray(data)
struct.pack_into("<i", v2, 4, 2)
open("version2.bin", "wb").write(bytes(v2))
EOF
: >empty.txt
mkdir -p a_directory

# ---------------------------------------------------------------------------------------------
# --help

for program in "${TRAINERS[@]}"; do
    expect_success "$program --help exits 0 and lists its flags" "usage:;;--topk;;--steps;;--train-data;;--preset" \
        "$BUILD/$program" --help
done
expect_success "data_prep --help exits 0 and lists its flags" "usage:;;--out;;--val-fraction" "$BUILD/data_prep" --help
expect_success "data_prep -h exits 0" "--val-fraction" "$BUILD/data_prep" -h
if "$BUILD/train_latentmoe" --help 2>/dev/null | grep -q -- '--latent-heads'; then
    ok "train_latentmoe --help lists --latent-heads"
else
    not_ok "train_latentmoe --help lists --latent-heads" "missing"
fi
if "$BUILD/moe_ep_baseline" --help 2>/dev/null | grep -q -- '--latent-heads'; then
    not_ok "moe_ep_baseline --help does not list --latent-heads" "it does (the MoE has no latent heads)"
else
    ok "moe_ep_baseline --help does not list --latent-heads"
fi

# ---------------------------------------------------------------------------------------------
# Usage errors of the trainers: exit 2, before any data is touched.

DATA=(--train-data "$TRAIN" --val-data "$VAL")
for program in "${TRAINERS[@]}"; do
    P="$BUILD/$program"
    expect_error "$program --topk 1 (k < 2)" 2 "k = 1;;k >= 2" "$P" --topk 1 "${DATA[@]}"
    expect_error "$program --topk 9 (k > E = 8)" 2 "k = 9 exceeds the number of experts E = 8" "$P" --topk 9 "${DATA[@]}"
    expect_error "$program --experts 4 --topk 5 (k > E)" 2 "exceeds the number of experts E = 4" \
        "$P" --experts 4 --topk 5 "${DATA[@]}"
    expect_error "$program --attn-heads 5 (d % n_head)" 2 "divisible by n_head" "$P" --attn-heads 5 "${DATA[@]}"
    expect_error "$program --attn-heads 64 (odd attention head size)" 2 "must be even" "$P" --attn-heads 64 "${DATA[@]}"
    expect_error "$program unknown flag" 2 "unknown flag --bogus" "$P" --bogus 3 "${DATA[@]}"
    expect_error "$program --steps abc (non-numeric)" 2 "--steps expects an integer, got 'abc'" "$P" --steps abc "${DATA[@]}"
    expect_error "$program --lr 1e-3x (non-numeric)" 2 "--lr expects a number, got '1e-3x'" "$P" --lr 1e-3x "${DATA[@]}"
    expect_error "$program --steps with no value" 2 "--steps needs a value" "$P" "${DATA[@]}" --steps
    expect_error "$program --steps 0 without --sample" 2 "--steps 0 trains nothing" "$P" --steps 0 "${DATA[@]}"
    expect_error "$program --temperature -1" 2 "--temperature must be a finite number >= 0" \
        "$P" --sample 5 --temperature -1 "${DATA[@]}"
    expect_error "$program --top-k 257 (> V)" 2 "--top-k 257 must be in [0, V = 256]" "$P" --sample 5 --top-k 257 "${DATA[@]}"
    expect_error "$program --top-k -1" 2 "--top-k -1 must be in [0, V = 256]" "$P" --sample 5 --top-k -1 "${DATA[@]}"
    expect_error "$program --prompt ''" 2 "--prompt needs a non-empty value" "$P" --sample 5 --prompt '' "${DATA[@]}"
    expect_error "$program --prompt longer than --seq-len" 2 "--prompt has 40 tokens, more than the context --seq-len 32" \
        "$P" --sample 5 --prompt "$(printf '%040d' 0)" "${DATA[@]}"
    expect_error "$program --sample-every without --sample" 2 "--sample-every needs --sample N" \
        "$P" --sample-every 5 "${DATA[@]}"
    expect_error "$program --preset huge (unknown preset)" 2 "unknown preset 'huge'" "$P" --preset huge "${DATA[@]}"
    expect_error "$program stray positional argument" 2 "unexpected argument 'train.bin'" "$P" train.bin
    # without a GPU (CI), --device gpu must refuse rather than fall back silently
    if ! nvidia-smi -L >/dev/null 2>&1; then
        expect_error "$program --device gpu refuses without a GPU" 2 "--device gpu;;no GPU" \
            "$P" --device gpu --steps 3 --batch 2 "${DATA[@]}"
    fi
    expect_error "$program --device cuda (not a device)" 2 "device must be auto, cpu or gpu" "$P" --device cuda "${DATA[@]}"
    expect_error "$program usage error wins over missing data" 2 "k = 1" "$P" --topk 1 --train-data "$TMP/none.bin"
done
expect_error "moe_ep_baseline --latent-heads is an unknown flag" 2 "unknown flag --latent-heads" \
    "$BUILD/moe_ep_baseline" --latent-heads 4 "${DATA[@]}"
expect_error "moe_ep_baseline --head-dim is an unknown flag" 2 "unknown flag --head-dim" \
    "$BUILD/moe_ep_baseline" --head-dim 16 "${DATA[@]}"

expect_error "train_latentmoe --expert-shards 2 on one rank" 2 "--expert-shards 2 does not divide the R = 1 ranks" \
    "$BUILD/train_latentmoe" --expert-shards 2 "${DATA[@]}"
expect_error "train_latentmoe --latent-init-scale 0" 2 "--latent-init-scale must be a finite number > 0" \
    "$BUILD/train_latentmoe" --latent-init-scale 0 "${DATA[@]}"
expect_error "moe_ep_baseline --latent-init-scale is an unknown flag" 2 "unknown flag --latent-init-scale" \
    "$BUILD/moe_ep_baseline" --latent-init-scale 2 "${DATA[@]}"
expect_error "moe_ep_baseline --expert-shards is an unknown flag" 2 "unknown flag --expert-shards" \
    "$BUILD/moe_ep_baseline" --expert-shards 2 "${DATA[@]}"

# LocMoE's constraints (SPEC §2.6): exit 2, each named.
LOC=("$BUILD/moe_ep_baseline" --router locmoe "${DATA[@]}")
expect_error "locmoe --experts 6 (d % E != 0)" 2 "d % E == 0" "${LOC[@]}" --experts 6
expect_error "locmoe --capacity-factor -1" 2 "capacity factor must be >= 0" "${LOC[@]}" --capacity-factor -1
expect_error "locmoe --capacity-delta 0" 2 "capacity delta must be in (0, 1)" "${LOC[@]}" --capacity-delta 0
expect_error "locmoe --capacity-delta 1" 2 "capacity delta must be in (0, 1)" "${LOC[@]}" --capacity-delta 1
expect_error "locmoe --node-size 2 on one rank" 2 "node size 2 does not divide the R = 1 ranks" "${LOC[@]}" --node-size 2
expect_error "locmoe --topk 9 (k > E)" 2 "exceeds the number of experts E = 8" "${LOC[@]}" --topk 9
expect_error "locmoe --bias-rate 0.01" 2 "LocMoE has no aux-free bias" "${LOC[@]}" --bias-rate 0.01
expect_error "--router hash" 2 "router must be topk or locmoe" "$BUILD/moe_ep_baseline" --router hash "${DATA[@]}"
expect_error "--capacity-factor without --router locmoe" 2 "applies to --router locmoe only" \
    "$BUILD/moe_ep_baseline" --capacity-factor 1 "${DATA[@]}"
expect_error "train_latentmoe --router is an unknown flag" 2 "unknown flag --router" \
    "$BUILD/train_latentmoe" --router locmoe "${DATA[@]}"

# ---------------------------------------------------------------------------------------------
# Data errors of the trainers: exit 1, naming the file and what is wrong with it.

RUN=(--steps 3 --batch 2 --eval-batches 1 --log-every 1)
for program in "${TRAINERS[@]}"; do
    P="$BUILD/$program"
    expect_error "$program missing train file" 1 "no shard files match;;missing_train.bin" \
        "$P" "${RUN[@]}" --train-data "$TMP/missing_train.bin" --val-data "$VAL"
    expect_error "$program missing val file" 1 "no shard files match;;missing_val.bin" \
        "$P" "${RUN[@]}" --train-data "$TRAIN" --val-data "$TMP/missing_val.bin"
    expect_error "$program a directory as train data" 1 "a_directory;;is a directory" \
        "$P" "${RUN[@]}" --train-data a_directory --val-data "$VAL"
    expect_error "$program foreign file (text, not a shard)" 1 "foreign.bin;;not an llm.c token shard" \
        "$P" "${RUN[@]}" --train-data foreign.bin --val-data "$VAL"
    expect_error "$program foreign file shorter than the header" 1 "tiny_foreign.bin;;shorter than the 1024-byte" \
        "$P" "${RUN[@]}" --train-data tiny_foreign.bin --val-data "$VAL"
    expect_error "$program shard of another version" 1 "version2.bin;;unsupported shard version 2" \
        "$P" "${RUN[@]}" --train-data version2.bin --val-data "$VAL"
    expect_error "$program truncated shard" 1 "truncated.bin;;truncated: header says" \
        "$P" "${RUN[@]}" --train-data truncated.bin --val-data "$VAL"
    expect_error "$program token id 300 >= V = 256" 1 "token300.bin;;token id 300 at position 5 is >= vocabulary size 256" \
        "$P" "${RUN[@]}" --train-data token300.bin --val-data "$VAL"
    expect_error "$program token id >= V in an llm.c shard (no vocab in header)" 1 \
        "token300_llmc.bin;;token id 300 at position 5 is >= vocabulary size 256" \
        "$P" "${RUN[@]}" --train-data token300_llmc.bin --val-data "$VAL"
    expect_error "$program token id >= V in the val shard" 1 "token300.bin;;token id 300 at position 5" \
        "$P" "${RUN[@]}" --train-data "$TRAIN" --val-data token300.bin
    expect_error "$program byte shard with --vocab 128" 1 "shard was made for a vocabulary of 256" \
        "$P" "${RUN[@]}" --vocab 128 "${DATA[@]}"
    expect_error "$program val shard too short for one batch" 1 "short_val.bin;;one global batch needs 65" \
        "$P" "${RUN[@]}" --train-data "$TRAIN" --val-data data/short_val.bin
done

# ---------------------------------------------------------------------------------------------
# data_prep's own mistakes: usage errors 2, data errors 1.

DP="$BUILD/data_prep"
expect_error "data_prep with no input files" 2 "no input files" "$DP" --out data/x
expect_error "data_prep missing input file" 1 "no_such_file.txt;;cannot open" "$DP" --out data/x no_such_file.txt
expect_error "data_prep empty input file" 1 "input is empty" "$DP" --out data/x empty.txt
expect_error "data_prep input too short to split" 1 "each side needs at least 2" "$DP" --out data/x three_bytes.txt
expect_error "data_prep a directory as input" 1 "a_directory" "$DP" --out data/x a_directory
expect_error "data_prep --val-fraction abc" 2 "--val-fraction: 'abc' is not a number" "$DP" --val-fraction abc text.txt
expect_error "data_prep --val-fraction 0.1x" 2 "is not a number" "$DP" --val-fraction 0.1x text.txt
expect_error "data_prep --val-fraction 1.5" 2 "between 0 and 1" "$DP" --val-fraction 1.5 text.txt
expect_error "data_prep --val-fraction 0" 2 "between 0 and 1" "$DP" --val-fraction 0 text.txt
expect_error "data_prep --val-fraction with no value" 2 "--val-fraction needs a value" "$DP" text.txt --val-fraction
expect_error "data_prep unknown flag" 2 "unknown flag '--bogus'" "$DP" --bogus text.txt
if [ -e data/x_train.bin ] || [ -e data/x_val.bin ]; then
    not_ok "data_prep writes no shard when it fails" "data/x_*.bin exists"
else
    ok "data_prep writes no shard when it fails"
fi

# ---------------------------------------------------------------------------------------------
# One tiny successful run of each trainer (tiny preset, 3 steps of 2 x 32 tokens).

for program in "${TRAINERS[@]}"; do
    name="$program trains 3 steps end to end, with the --log-file CSV"
    rm -f steps.csv
    run 0 "$BUILD/$program" "${RUN[@]}" "${DATA[@]}" --log-file steps.csv
    steps=$(grep -cE '^step +[0-9]+/3 \| loss [0-9]+\.[0-9]+' "$OUT")
    [ "$steps" -eq 3 ] || WHY="${WHY:+$WHY; }$steps of 3 'step N/3 | loss X' lines"
    grep -qE '^step .*val loss [0-9]+\.[0-9]+' "$OUT" || WHY="${WHY:+$WHY; }no validation loss line"
    grep '^step' "$OUT" | grep -qiwE 'nan|inf' && WHY="${WHY:+$WHY; }a non-finite number in a step line"
    # step,loss,norm,val_loss,ms,lr,tokens,... (train/step_log.h): three rows of 18 + 3·L = 24 fields,
    # the validation loss on the last only (the tiny preset evaluates every 50 steps), 64 tokens a step
    rows=$(grep -cE '^[12],[0-9.]+,[0-9.]+,nan,[0-9.]+,' steps.csv 2>/dev/null)
    [ "$rows" -eq 2 ] && grep -qE '^3,[0-9.]+,[0-9.]+,[0-9.]+,[0-9.]+,[0-9.e+-]+,192,' steps.csv &&
        [ "$(wc -l <steps.csv)" -eq 3 ] && ! awk -F, 'NF != 24 { bad = 1 } END { exit !bad }' steps.csv ||
        WHY="${WHY:+$WHY; }the --log-file CSV is not 3 rows of step,loss,norm,val_loss,ms,...: $(tr '\n' ' ' <steps.csv 2>/dev/null)"
    grep -qE '^step +3/3 .*\| eta 0s$' "$OUT" || WHY="${WHY:+$WHY; }the last progress line does not end in 'eta 0s'"
    if [ -z "$WHY" ]; then ok "$name"; else not_ok "$name" "$WHY"; fi
done

# ---------------------------------------------------------------------------------------------
# Text generation (SPEC §2.7): a sample every --sample-every steps and at the end; the same sample from
# the checkpoint the run wrote, with --steps 0 (which reads no data and writes no file).

# sample_of FILE STEP: the sample printed after step STEP, between its marker lines
sample_of() { sed -n "/^--- sample at step $2 /,/^---\$/p" "$1"; }
for program in "${TRAINERS[@]}"; do
    name="$program samples during and after training, and again from its checkpoint"
    SAMPLE=(--sample 40 --prompt "verse 1" --temperature 0.8 --top-k 20 --sample-seed 5)
    run 0 "$BUILD/$program" "${RUN[@]}" "${DATA[@]}" "${SAMPLE[@]}" --sample-every 2 --checkpoint s.ckpt
    cp "$OUT" trained.txt
    for step in 2 3; do
        [ "$(sample_of trained.txt $step | wc -l)" -ge 3 ] || WHY="${WHY:+$WHY; }no sample after step $step"
    done
    sample_of trained.txt 3 | sed -n 2p | grep -q '^verse 1' || WHY="${WHY:+$WHY; }the sample does not start with the prompt"
    cp s.ckpt s.before
    trained_why=$WHY
    run 0 "$BUILD/$program" --steps 0 --resume s.ckpt --batch 2 "${SAMPLE[@]}" --train-data "$TMP/none.bin" \
        --checkpoint s.ckpt
    WHY="${trained_why:+$trained_why${WHY:+; }}$WHY"
    cmp -s <(sample_of trained.txt 3) <(sample_of "$OUT" 3) ||
        WHY="${WHY:+$WHY; }the sample from the checkpoint differs: $(sample_of "$OUT" 3 | tr '\n' ' ')"
    grep -q '^step' "$OUT" && WHY="${WHY:+$WHY; }--steps 0 trained"
    # generation reads no data, so another batch shape (the preset's 16, not the run's 2) is accepted
    shape_why=$WHY
    run 0 "$BUILD/$program" --steps 0 --resume s.ckpt "${SAMPLE[@]}" --train-data "$TMP/none.bin" --checkpoint s.ckpt
    WHY="${shape_why:+$shape_why${WHY:+; }}$WHY"
    [ "$(sample_of "$OUT" 3 | wc -l)" -ge 3 ] || WHY="${WHY:+$WHY; }no sample from the checkpoint with --batch 16"
    cmp -s s.ckpt s.before || WHY="${WHY:+$WHY; }--steps 0 changed the checkpoint"
    rm -f s.ckpt s.before trained.txt
    if [ -z "$WHY" ]; then ok "$name"; else not_ok "$name" "$WHY"; fi
done

# --checkpoint none: a run nobody resumes writes no file at all; checkpoints every N steps with it are refused.
for program in "${TRAINERS[@]}"; do
    name="$program --checkpoint none trains and writes nothing"
    mkdir -p "$TMP/no_checkpoint" && cd "$TMP/no_checkpoint" || exit 1
    run 0 "$BUILD/$program" "${RUN[@]}" --train-data "$TMP/$TRAIN" --val-data "$TMP/$VAL" --checkpoint none
    grep -q '^saved checkpoint' "$OUT" && WHY="${WHY:+$WHY; }it says it saved a checkpoint"
    [ -z "$(ls -A)" ] || WHY="${WHY:+$WHY; }it wrote $(ls -A | tr '\n' ' ')"
    cd "$TMP" && rm -rf "$TMP/no_checkpoint"
    if [ -z "$WHY" ]; then ok "$name"; else not_ok "$name" "$WHY"; fi
    expect_error "$program --checkpoint none --checkpoint-every 2" 2 "--checkpoint-every 2 asks for checkpoints" \
        "$BUILD/$program" "${RUN[@]}" "${DATA[@]}" --checkpoint none --checkpoint-every 2
done

# LocMoE on the CPU reference, top-1 with a capacity: the start-up prints C, ec_min and p_delta, every
# progress line the cross-entropy, L_aux, L_loc and the rows dropped, the CSV their three columns too,
# and the loss falls.
name="moe_ep_baseline --router locmoe trains on the CPU: capacity printed, losses apart, loss falls"
rm -f steps.csv
run 0 "$BUILD/moe_ep_baseline" --router locmoe --topk 1 --capacity-factor 1 --device cpu --steps 40 --batch 4 \
    --log-every 1 --eval-every 0 --eval-batches 1 "${DATA[@]}" --log-file steps.csv
grep -qE '^LocMoE capacity: p_delta 0\.81[0-9]* \(delta 0\.03, d 64\), ec_min 1, C 16 rows' "$OUT" ||
    WHY="${WHY:+$WHY; }no 'LocMoE capacity: p_delta 0.81.., ec_min 1, C 16' line"
steps=$(grep -cE '^step +[0-9]+/40 \| loss [0-9.]+ \| L_aux [0-9.]+ \| L_loc [0-9.]+ \| dropped [0-9]+ \|' "$OUT")
[ "$steps" -eq 40 ] || WHY="${WHY:+$WHY; }$steps of 40 'loss | L_aux | L_loc | dropped' lines"
grep -qE '^    rows dropped over capacity: L0 [0-9]+ L1 [0-9]+$' "$OUT" || WHY="${WHY:+$WHY; }no per-layer dropped line"
# columns 16-18 of train/step_log.h's rows: aux_loss, loc_loss, dropped; 3 loads per layer after them (L = 2)
rows=$(awk -F, 'NF == 24 && $16 ~ /^[0-9.e-]+$/ && $16 > 0 && $17 ~ /^[0-9.e-]+$/ && $18 ~ /^[0-9]+$/' steps.csv 2>/dev/null |
    wc -l)
[ "$rows" -eq 40 ] || WHY="${WHY:+$WHY; }the CSV has $rows of 40 rows with aux_loss, loc_loss, dropped in columns 16-18"
read -r first last < <(sed -n 's/^done: train loss \([0-9.]*\) -> \([0-9.]*\),.*/\1 \2/p' "$OUT")
if [ -z "$first" ] || ! awk -v a="$first" -v b="$last" 'BEGIN { exit !(b < a - 1) }'; then
    WHY="${WHY:+$WHY; }the train loss did not fall by more than 1 nat ($first -> $last)"
fi
if [ -z "$WHY" ]; then ok "$name ($first -> $last)"; else not_ok "$name" "$WHY"; fi

# LocMoE's ε stands where the top-k router's (d, E) matrix is: its checkpoint resumed with the other
# router is refused, the message naming the router as a cause.
run 0 "$BUILD/moe_ep_baseline" --router locmoe --device cpu "${RUN[@]}" "${DATA[@]}" --checkpoint loc.ckpt
expect_error "moe_ep_baseline resumes a LocMoE checkpoint with the top-k router" 1 "or the other --router?" \
    "$BUILD/moe_ep_baseline" --device cpu "${RUN[@]}" --steps 4 "${DATA[@]}" --resume loc.ckpt --checkpoint loc2.ckpt
rm -f loc.ckpt loc2.ckpt

# ---------------------------------------------------------------------------------------------
# Nothing lost on interruption: Ctrl-C saves a checkpoint and exits 130; resuming from it continues
# exactly as a run that was never interrupted (same losses, learning rates and gradient norms). The
# long warm-up makes the learning rate independent of --steps, so the two runs share a schedule.

for program in "${TRAINERS[@]}"; do
    name="$program resumes after Ctrl-C exactly where it stopped"
    LONG=(--batch 2 --log-every 1 --eval-every 0 --eval-batches 1 --warmup 20000 "${DATA[@]}")
    "$BUILD/$program" "${LONG[@]}" --steps 1000000 --checkpoint int.ckpt >"$OUT" 2>"$ERR" </dev/null &
    pid=$!
    sleep 2
    kill -INT "$pid"
    wait "$pid"
    status=$?
    WHY=""
    [ "$status" -eq 130 ] || WHY="exit status $status after Ctrl-C, expected 130"
    stopped=$(sed -n 's/^interrupted after step \([0-9]*\).*/\1/p' "$OUT")
    if [ -z "$stopped" ] || [ ! -s int.ckpt ]; then
        WHY="${WHY:+$WHY; }no 'interrupted after step N' line or no checkpoint"
    else
        total=$((stopped + 3))
        timeout 300 "$BUILD/$program" "${LONG[@]}" --steps "$total" --checkpoint res.ckpt --resume int.ckpt \
            >resumed.txt 2>>"$ERR" </dev/null || WHY="${WHY:+$WHY; }the resumed run failed"
        timeout 300 "$BUILD/$program" "${LONG[@]}" --steps "$total" --checkpoint straight.ckpt \
            >straight.txt 2>>"$ERR" </dev/null || WHY="${WHY:+$WHY; }the uninterrupted run failed"
        # "step S/T | loss L | lr R | norm N": everything but the timing must match
        grep -oE '^step +[0-9]+/[0-9]+ \| loss [^|]+\| lr [^|]+\| norm [^|]+' resumed.txt >resumed.steps
        grep -oE '^step +[0-9]+/[0-9]+ \| loss [^|]+\| lr [^|]+\| norm [^|]+' straight.txt | tail -n 3 >straight.steps
        [ "$(wc -l <resumed.steps)" -eq 3 ] || WHY="${WHY:+$WHY; }the resumed run printed $(wc -l <resumed.steps) of 3 steps"
        cmp -s resumed.steps straight.steps || WHY="${WHY:+$WHY; }resumed steps differ: $(tr '\n' ' ' <resumed.steps) vs $(tr '\n' ' ' <straight.steps)"
    fi
    rm -f int.ckpt res.ckpt straight.ckpt
    if [ -z "$WHY" ]; then ok "$name (stopped after step $stopped)"; else not_ok "$name" "$WHY"; fi
done

echo "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
