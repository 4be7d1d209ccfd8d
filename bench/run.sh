#!/usr/bin/env bash
# anyprof benchmarks: `make bench` builds the workspace, then runs this.
#
#   0. judge (the default, with symbolize): every figure issue 14 judges anyprof by, side by
#      side in one run, like with like (bench/judge.py): the malloc fast path over the
#      forwarding-only preload on 1 and 2 threads, a mixed-size (16..4096 B) malloc-bound
#      program next to jemalloc's and tcmalloc's sampling profilers, every-allocation recording
#      next to heaptrack and gperftools' HEAPPROFILE, instructions per pair (callgrind), and
#      CPython, gcc and a four-thread CPU-bound program on two cores as ratios. The README's
#      cost section quotes these figures.
#   1. Whole-program CPU-profiling overhead at 100 Hz, as ratios to an unprofiled run, next to
#      gperftools and perf when they are installed (bench/overhead.py does the runs and the
#      statistics; bench/programs/cpu_work.c is the program).
#   2. Symbolization throughput, cold and warm (symbolizer/examples/throughput.rs).
#   3. Heap-profiling overhead (bench/heap_overhead.py): a malloc/free microbenchmark
#      (bench/programs/malloc_pairs.c) in ns per pair next to heaptrack and gperftools' heap
#      profiler, and CPython running bench/programs/alloc_heavy.py and the sqlite3 shell
#      running bench/programs/sqlite_heavy.sql, as wall-time ratios.
#
# Environment:
#   BENCH_SECTIONS=judge,symbolize   which sections to run (judge, cpu, symbolize, heap; the
#                          detailed cpu and heap tables take about 20 minutes more)
#   BENCH_ROUNDS=7         rounds of the overhead benchmarks (medians are over rounds)
#   BENCH_JUDGE_ROUNDS=11  rounds of section 0
#   BENCH_JUDGE_PAIRS=10000000  malloc/free pairs per thread of section 0's malloc_pairs runs
#   BENCH_HZ=100           sampling rate given to every profiler
#   BENCH_SECONDS=2        CPU seconds of work per run (the 4-thread variant splits them)
#   BENCH_PERF_DWARF=1     also run `perf record --call-graph dwarf` (0 to leave it out)
#   BENCH_GPERFTOOLS_LIB   path of libprofiler.so (default: found with ldconfig)
#   BENCH_SYMBOLIZE_FILES  files for the symbolization benchmark (default: the anyprof binary
#                          and libc)
#   BENCH_HEAP_ROUNDS      rounds of section 3 (default: BENCH_ROUNDS)
#   BENCH_HEAP_PAIRS=50000000  malloc/free pairs per thread of malloc_pairs (every-allocation
#                          profilers run a 100th, gperftools' HEAPPROFILE a 1000th of them)
#   BENCH_HEAP_PARTS=malloc,python,sqlite  the parts of section 3
#   BENCH_PYTHON           the Python interpreter of section 3 (default: the real executable
#                          behind python3, resolved once so that a pyenv shim is not timed)
#   BENCH_PYTHON_SECONDS=2 seconds of work of the Python run
#   BENCH_TCMALLOC_LIB     path of libtcmalloc.so.4 (default: found with ldconfig)
#
# Exits non-zero when anyprof fails to run or to write a profile (section 3: heap.pb.gz), or
# when the symbolizer benchmark fails; a missing peer profiler is reported as "skipped: reason".
set -euo pipefail

cd "$(dirname "$0")/.."
ANYPROF=$PWD/target/release/anyprof
LIB=$PWD/target/release/libanyprof.so
ROUNDS=${BENCH_ROUNDS:-7}
HZ=${BENCH_HZ:-100}
SECONDS_OF_WORK=${BENCH_SECONDS:-2}
CC=${CC:-cc}
sections=${BENCH_SECTIONS:-judge,symbolize}
SECTIONS=",$sections,"
for section in ${sections//,/ }; do
    case $section in
        judge | cpu | symbolize | heap) ;;
        *) echo "error: BENCH_SECTIONS: unknown section '$section' (known: judge, cpu, symbolize, heap)" >&2; exit 2 ;;
    esac
done
bench_started=$(date +%s)
want() { [[ $SECTIONS == *",$1,"* ]]; }

if [[ ! -x $ANYPROF || ! -f $LIB ]]; then
    echo "error: $ANYPROF or $LIB is missing; run \`cargo build --release --workspace\` (make bench does)" >&2
    exit 1
fi

scratch=$(mktemp -d "${TMPDIR:-/tmp}/anyprof-bench.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

# The work programs: -O2 -g, and no frame pointers (explicitly, whatever the compiler's default).
if want cpu || want judge; then "$CC" -O2 -g -fomit-frame-pointer -pthread bench/programs/cpu_work.c -o "$scratch/cpu_work"; fi
if want judge; then "$CC" -O2 -g -pthread bench/programs/thread_start.c -o "$scratch/thread_start"; fi
if want heap || want judge; then
    "$CC" -O2 -g -fomit-frame-pointer -pthread bench/programs/malloc_pairs.c -o "$scratch/malloc_pairs"
    "$CC" -O2 -shared -fPIC bench/programs/forward_malloc.c -o "$scratch/forward_malloc.so"
    "$CC" -O2 -shared -fPIC -pthread -DIDLE_THREAD bench/programs/forward_malloc.c \
        -o "$scratch/forward_malloc_thread.so"
fi

# --- the machine -------------------------------------------------------------------------------
config_hz() {
    local config=/boot/config-$(uname -r)
    if [[ -r $config ]]; then
        grep -m1 '^CONFIG_HZ=' "$config" | cut -d= -f2
    elif [[ -r /proc/config.gz ]]; then
        zcat /proc/config.gz 2>/dev/null | grep -m1 '^CONFIG_HZ=' | cut -d= -f2
    fi
}
hz_kernel=$(config_hz || true)
cpu_model=$(grep -m1 '^model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//' || true)
governor=$(cat /sys/devices/system/cpu/cpu0/cpufreq/scaling_governor 2>/dev/null || echo "not exposed")
revision=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git status --porcelain 2>/dev/null | head -1) ]]; then revision+=" + uncommitted changes"; fi

echo "anyprof benchmarks — $(date -u '+%Y-%m-%d %H:%M UTC'), revision $revision"
echo "machine: $(nproc) CPUs (${cpu_model:-unknown model}), kernel $(uname -r)," \
    "CONFIG_HZ=${hz_kernel:-unknown (no readable kernel config)}, cpufreq governor: $governor"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine widens the spread)"

# --- peers -------------------------------------------------------------------------------------
notes=()
gperftools=${BENCH_GPERFTOOLS_LIB:-}
if [[ -z $gperftools ]]; then
    gperftools=$(ldconfig -p 2>/dev/null | awk '/libprofiler\.so\.0 .*x86-64/ {print $NF; exit}' || true)
    for candidate in /usr/lib/x86_64-linux-gnu/libprofiler.so.0 /usr/lib64/libprofiler.so.0 /usr/lib/libprofiler.so.0; do
        [[ -z $gperftools && -f $candidate ]] && gperftools=$candidate
    done
fi
if [[ -z $gperftools || ! -f $gperftools ]]; then
    notes+=("gperftools  skipped: libprofiler.so.0 not found (Debian: apt-get install libgoogle-perftools4)")
    gperftools=""
fi

perf_args=()
if ! command -v perf >/dev/null; then
    notes+=("perf        skipped: no perf command (Debian: apt-get install linux-perf)")
elif ! perf_error=$(perf record -F "$HZ" -g -o "$scratch/probe.data" -q -- true 2>&1 >/dev/null); then
    reason=$(printf '%s\n' "$perf_error" | grep -m1 -v '^ *$' || true)
    notes+=("perf        skipped: \`perf record\` refuses (${reason:-no message}; kernel.perf_event_paranoid=$(cat /proc/sys/kernel/perf_event_paranoid 2>/dev/null || echo '?'))")
else
    perf_args+=(--perf)
    event=$(perf report -i "$scratch/probe.data" --header-only 2>/dev/null | grep -m1 -o 'name = [^,]*' | cut -d' ' -f3 || true)
    [[ -n $event ]] && notes+=("perf        samples on the ${event} event")
    if [[ ${BENCH_PERF_DWARF:-1} != 0 ]]; then perf_args+=(--perf-dwarf); fi
fi

find_lib() { # find_lib NAME OVERRIDE: the library's path, or nothing
    local found=${2:-}
    if [[ -z $found ]]; then
        found=$(ldconfig -p 2>/dev/null | awk -v n="$1" '$1 == n && /x86-64/ {print $NF; exit}' || true)
        for candidate in /usr/lib/x86_64-linux-gnu/$1 /usr/lib64/$1 /usr/lib/$1; do
            [[ -z $found && -f $candidate ]] && found=$candidate
        done
    fi
    [[ -n $found && -f $found ]] && echo "$found"
    return 0
}

# --- 0. the issue's figures, side by side ------------------------------------------------------
if want judge; then
    echo
    echo "== 0. The figures issue 14 judges by, side by side (bench/judge.py) =="
    judge_notes=()
    jtcmalloc=$(find_lib libtcmalloc.so.4 "${BENCH_TCMALLOC_LIB:-}")
    [[ -z $jtcmalloc ]] && judge_notes+=("tcmalloc, tcmalloc-sample, gperf-heap  skipped: libtcmalloc.so.4 not found (Debian: apt-get install libgoogle-perftools4)")
    jjemalloc=$(find_lib libjemalloc.so.2 "${BENCH_JEMALLOC_LIB:-}")
    [[ -z $jjemalloc ]] && judge_notes+=("jemalloc, jemalloc-prof  skipped: libjemalloc.so.2 not found (Debian: apt-get install libjemalloc2)")
    if [[ -n $jjemalloc ]] && ! MALLOC_CONF=stats_print:true LD_PRELOAD=$jjemalloc /bin/true 2>&1 | grep -q 'config.prof: true'; then
        judge_notes+=("jemalloc-prof  note: this jemalloc was built without profiling (config.prof: false); its row measures nothing")
    fi
    jheaptrack=$(command -v heaptrack || true)
    [[ -z $jheaptrack ]] && judge_notes+=("heaptrack  skipped: no heaptrack command (Debian: apt-get install heaptrack)")
    python3 bench/programs/gen_large_c.py "$scratch/large.c"
    jpython=${BENCH_PYTHON:-$(python3 -c 'import sys; print(sys.executable)')}
    judge_args=()
    for line in "${judge_notes[@]+"${judge_notes[@]}"}"; do judge_args+=(--note "$line"); done
    python3 bench/judge.py \
        --anyprof "$ANYPROF" \
        --malloc-program "$scratch/malloc_pairs" \
        --forwarder "$scratch/forward_malloc.so" \
        --forwarder-thread "$scratch/forward_malloc_thread.so" \
        --cpu-program "$scratch/cpu_work" \
        --thread-program "$scratch/thread_start" \
        --large-c "$scratch/large.c" \
        --gcc "${CC_FOR_BENCH:-gcc}" \
        --python "$jpython" \
        --python-script bench/programs/alloc_heavy.py \
        --heaptrack "$jheaptrack" \
        --tcmalloc "$jtcmalloc" \
        --jemalloc "$jjemalloc" \
        --rounds "${BENCH_JUDGE_ROUNDS:-11}" \
        --pairs "${BENCH_JUDGE_PAIRS:-10000000}" \
        "${judge_args[@]+"${judge_args[@]}"}"
fi

# --- 1. overhead -------------------------------------------------------------------------------
if want cpu; then
    echo
    echo "== 1. CPU-profiling overhead at $HZ Hz (whole program, ratios to no profiler) =="
    note_args=()
    for line in "${notes[@]+"${notes[@]}"}"; do note_args+=(--note "$line"); done
    python3 bench/overhead.py \
        --program "$scratch/cpu_work" \
        --anyprof "$ANYPROF" \
        --gperftools "$gperftools" \
        --rounds "$ROUNDS" --hz "$HZ" --seconds "$SECONDS_OF_WORK" \
        "${perf_args[@]+"${perf_args[@]}"}" \
        "${note_args[@]+"${note_args[@]}"}"
fi

# --- 2. symbolization --------------------------------------------------------------------------
if want symbolize; then
    echo
    echo "== 2. Symbolization throughput (anyprof_symbolizer, file virtual addresses in function symbols) =="
    read -r -a files <<<"${BENCH_SYMBOLIZE_FILES:-$ANYPROF /lib/x86_64-linux-gnu/libc.so.6}"
    for file in "${files[@]}"; do
        if [[ ! -f $file ]]; then
            echo "$file  skipped: no such file"
            continue
        fi
        echo
        cargo run --release -q -p anyprof-symbolizer --example throughput -- "$file"
    done
fi

# --- 3. heap profiling -------------------------------------------------------------------------
if want heap; then
    echo
    echo "== 3. Heap-profiling overhead (malloc microbenchmark in ns per pair; malloc-heavy CPython, ratios) =="
    heap_notes=()
    heaptrack_cmd=$(command -v heaptrack || true)
    if [[ -z $heaptrack_cmd ]]; then
        heap_notes+=("heaptrack     skipped: no heaptrack command (Debian: apt-get install heaptrack)")
    fi
    tcmalloc=${BENCH_TCMALLOC_LIB:-}
    if [[ -z $tcmalloc ]]; then
        tcmalloc=$(ldconfig -p 2>/dev/null | awk '/libtcmalloc\.so\.4 .*x86-64/ {print $NF; exit}' || true)
        for candidate in /usr/lib/x86_64-linux-gnu/libtcmalloc.so.4 /usr/lib64/libtcmalloc.so.4 /usr/lib/libtcmalloc.so.4; do
            [[ -z $tcmalloc && -f $candidate ]] && tcmalloc=$candidate
        done
    fi
    if [[ -z $tcmalloc || ! -f $tcmalloc ]]; then
        heap_notes+=("tcmalloc, gperf-heap  skipped: libtcmalloc.so.4 not found (Debian: apt-get install libgoogle-perftools4)")
        tcmalloc=""
    fi
    # The real interpreter: python3 may be a pyenv shim (a bash script) whose own processes
    # would be timed with every run.
    python=${BENCH_PYTHON:-$(python3 -c 'import sys; print(sys.executable)')}
    heap_note_args=()
    for line in "${heap_notes[@]+"${heap_notes[@]}"}"; do heap_note_args+=(--note "$line"); done
    python3 bench/heap_overhead.py \
        --malloc-program "$scratch/malloc_pairs" \
        --forwarder "$scratch/forward_malloc.so" \
        --anyprof "$ANYPROF" \
        --heaptrack "$heaptrack_cmd" \
        --tcmalloc "$tcmalloc" \
        --python "$python" \
        --python-script bench/programs/alloc_heavy.py \
        --python-seconds "${BENCH_PYTHON_SECONDS:-2}" \
        --rounds "${BENCH_HEAP_ROUNDS:-$ROUNDS}" \
        --pairs "${BENCH_HEAP_PAIRS:-50000000}" \
        --parts "${BENCH_HEAP_PARTS:-malloc,python,sqlite}" \
        "${heap_note_args[@]+"${heap_note_args[@]}"}"
fi

echo
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "make bench took $(( $(date +%s) - bench_started )) s (sections: $sections)"
