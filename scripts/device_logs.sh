# Sourced by the device scripts. The device returns at most 8 files from $OUT and nothing at all of a
# command that ran out of time but what is already there, so logs are written to a private folder
# ($logs) and pack_logs, called after every phase, refreshes $OUT/logs.tgz from it: a run cut short
# still brings back everything up to its last finished phase.
out=${OUT:-out}
mkdir -p "$out"
logs=$(mktemp -d "${TMPDIR:-/tmp}/lmoe_logs.XXXXXX")
pack_logs() {
    tar -czf "$out/logs.tgz.part" -C "$logs" . && mv "$out/logs.tgz.part" "$out/logs.tgz"
}
