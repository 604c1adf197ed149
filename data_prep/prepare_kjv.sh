#!/usr/bin/env bash
# Prepares the offline default corpus: the King James Bible (~4.4 MB of text) from Debian's bible-kjv
# package, turned into byte-level llm.c shards PREFIX_train.bin and PREFIX_val.bin by data_prep.
# It needs no network once bible-kjv is installed, which is why it is the default real-text corpus.
#
# usage: data_prep/prepare_kjv.sh [DATA_PREP_BINARY] [OUTPUT_PREFIX]
#        defaults: build/data_prep data/kjv  (writes data/kjv.txt, data/kjv_train.bin, data/kjv_val.bin)
set -euo pipefail

data_prep=${1:-build/data_prep}
prefix=${2:-data/kjv}
text="${prefix}.txt"

if [[ -f "${prefix}_train.bin" && -f "${prefix}_val.bin" ]]; then
    echo "prepare_kjv: ${prefix}_train.bin and ${prefix}_val.bin already exist; nothing to do"
    exit 0
fi

if [[ ! -x "$data_prep" ]]; then
    echo "prepare_kjv: error: data_prep binary '$data_prep' not found or not executable (build it first)" >&2
    exit 1
fi

# The bible program comes with bible-kjv; install it with apt when missing (sudo only when not root).
if ! command -v bible >/dev/null 2>&1; then
    echo "prepare_kjv: 'bible' not found; installing Debian package bible-kjv"
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "prepare_kjv: error: apt-get is not available; install bible-kjv (it provides 'bible') by hand" >&2
        exit 1
    fi
    sudo=""
    if [[ $(id -u) -ne 0 ]]; then
        if ! command -v sudo >/dev/null 2>&1; then
            echo "prepare_kjv: error: not root and sudo is missing; run: apt-get install bible-kjv" >&2
            exit 1
        fi
        sudo=sudo
    fi
    $sudo apt-get update
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y bible-kjv
fi

mkdir -p "$(dirname "$prefix")"
echo "prepare_kjv: writing the text to $text"
# Write to a temporary name first so an interrupted dump never leaves a partial text behind.
bible -f "Gen1:1-Rev22:21" > "$text.tmp"
if [[ ! -s "$text.tmp" ]]; then
    rm -f "$text.tmp"
    echo "prepare_kjv: error: 'bible -f Gen1:1-Rev22:21' printed nothing" >&2
    exit 1
fi
mv "$text.tmp" "$text"
"$data_prep" --out "$prefix" "$text"
