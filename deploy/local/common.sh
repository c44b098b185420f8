# Shared by deploy/local/up and deploy/local/down: the run folder and the pid-file helpers.
# Sourced, not run; expects $root (the repository).

run="${LOCAL_RUN_DIR:-$root/.run/local}"
mkdir -p "$run"
run="$(cd "$run" && pwd)"

say() { echo "local: $*" >&2; }

# The pid of a piece when it still runs and is what its pid file says (a recycled pid is not ours).
piece_pid() {
    local name="$1" pid
    pid="$(cat "$run/$name.pid" 2>/dev/null)" || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    local expected=forecaster
    [[ "$name" == prometheus ]] && expected="$run/prometheus.yml"
    [[ "$name" == alertmanager ]] && expected="$run/alertmanager.yml"
    tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$expected" || return 1
    echo "$pid"
}

# Processes whose process group is $1 (each piece leads its own group: it was started with setsid).
group_members() {
    local group="$1" stat rest state pgrp
    for stat in /proc/[0-9]*/stat; do
        rest="$(cat "$stat" 2>/dev/null)" || continue
        rest="${rest##*) }"                    # after "pid (comm) ": state ppid pgrp ...
        read -r state _ pgrp _ <<< "$rest"
        # A zombie has finished; it only waits for its parent to collect it.
        [[ "$pgrp" == "$group" && "$state" != Z ]] && { stat="${stat#/proc/}"; echo "${stat%/stat}"; }
    done
    return 0
}

# TERM the piece's process group, wait up to $2 seconds, then KILL what is left; remove its pid file.
stop_piece() {
    local name="$1" grace="${2:-30}" pid deadline
    if ! pid="$(piece_pid "$name")"; then
        rm -f "$run/$name.pid"
        return 0
    fi
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + grace))
    while [[ -n "$(group_members "$pid")" ]] && ((SECONDS < deadline)); do
        sleep 0.2
    done
    if [[ -n "$(group_members "$pid")" ]]; then
        say "$name (pid $pid) did not stop within ${grace}s; killing it"
        kill -KILL -- "-$pid" 2>/dev/null || true
        deadline=$((SECONDS + 10))
        while [[ -n "$(group_members "$pid")" ]] && ((SECONDS < deadline)); do
            sleep 0.1
        done
    fi
    rm -f "$run/$name.pid"
    say "stopped $name (pid $pid)"
}
