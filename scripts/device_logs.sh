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
