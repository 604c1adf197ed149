# Sourced by the device scripts. The device returns at most 8 files from $OUT, and of a command cut
# off by its time limit only what is already there. So the logs go to a private folder ($logs) and
# pack_logs, called after every phase, refreshes $OUT/logs.tgz from it: a run cut short still brings
# back everything up to its last finished phase.
out=${OUT:-out}
mkdir -p "$out"
logs=$(mktemp -d "${TMPDIR:-/tmp}/lmoe_logs.XXXXXX")
pack_logs() {  # a private part file: builds running side by side may pack at once
    tar -czf "$out/logs.tgz.part.$BASHPID" -C "$logs" . && mv "$out/logs.tgz.part.$BASHPID" "$out/logs.tgz"
}

# layer_bench_rounds ROUNDS: the layer benchmark (`--bench-layer 1`, p1 and p2, both trainers) of
# ./build and ./build_other, alternating, ROUNDS times, into $logs/layer_bench.txt, a line
# "trainer preset tree round ms" each; layer_bench_medians prints each median, this tree | the other.
layer_bench_rounds() {
    local round trainer preset tree ms
    for round in $(seq "$1"); do
        for trainer in train_latentmoe moe_ep_baseline; do
            for preset in p1 p2; do
                for tree in build build_other; do
                    ms=$(./$tree/$trainer --preset $preset --bench-layer 1 2>&1 | grep "layer bench" |
                        sed -E 's/.*forward\+backward ([0-9.]+) ms.*/\1/')
                    echo "$trainer $preset $tree $round ${ms:-failed}"
                done
            done
        done
    done >"$logs/layer_bench.txt"
}
layer_bench_medians() {
    local trainer preset tree line
    for trainer in train_latentmoe moe_ep_baseline; do
        for preset in p1 p2; do
            line="$trainer $preset:"
            for tree in build build_other; do
                line+=" $(awk -v t="$trainer" -v p="$preset" -v b="$tree" '$1 == t && $2 == p && $3 == b { print $5 }' \
                    "$logs/layer_bench.txt" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')"
                [[ $tree == build ]] && line+=" |"
            done
            echo "$line"
        done
    done
}

# cmake_build DIR "CONFIGURE FLAGS" [TARGET...]: configure and build DIR (every target when none is
# named), logging to $logs/DIR.log; on failure print the log's tail, pack the logs and stop.
cmake_build() {
    local dir=$1 flags=$2 targets=()
    shift 2
    [ $# -gt 0 ] && targets=(--target "$@")
    # shellcheck disable=SC2086  # the flags are whitespace-separated
    (cmake -B "$dir" -G Ninja $flags >/dev/null && cmake --build "$dir" "${targets[@]}") >"$logs/$dir.log" 2>&1 ||
        { tail -30 "$logs/$dir.log"; pack_logs; exit 1; }
}
