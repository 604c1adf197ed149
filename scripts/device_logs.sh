# Sourced by the device scripts. The device returns at most 8 files from $OUT, and of a command cut
# off by its time limit only what is already there. So the logs go to a private folder ($logs) and
# pack_logs, called after every phase, refreshes $OUT/logs.tgz from it: a run cut short still brings
# back everything up to its last finished phase.
out=${OUT:-out}
mkdir -p "$out"
logs=$(mktemp -d "${TMPDIR:-/tmp}/lmoe_logs.XXXXXX")
pack_logs() {
    tar -czf "$out/logs.tgz.part" -C "$logs" . && mv "$out/logs.tgz.part" "$out/logs.tgz"
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
