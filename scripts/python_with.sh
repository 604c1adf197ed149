# python_with MODULE: prints the first Python that imports MODULE, of $PYTHON (when set), Debian's
# /usr/bin/python3 (where apt installs python3-torch and python3-matplotlib; a pyenv or venv python3
# without them may come first on PATH) and python3 from PATH; returns 1 when none does. Sourced.
python_with() {
    local candidate
    for candidate in ${PYTHON:-} /usr/bin/python3 python3; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import $1" >/dev/null 2>&1; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}
