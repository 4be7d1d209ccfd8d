#!/usr/bin/env python3
"""Heap-profiling overhead: a malloc microbenchmark and two malloc-heavy real programs.

Called by bench/run.sh (section 3), which builds bench/programs/malloc_pairs.c and finds the
peers (heaptrack, gperftools' tcmalloc). Like bench/overhead.py: every configuration does the
same fixed work, configurations run interleaved round-robin (A B C ... A B C ...) after one
discarded warm-up round, and the tables show medians over rounds and min–max spreads.

Part A, malloc_pairs: a tight malloc(16..271) + touch + free loop. The measure is the
program's own ns per pair (CLOCK_MONOTONIC around the loop), so start-up and shutdown of a
profiler are not in it. Configurations that record every allocation are ~20-800x slower per
pair and run with fewer pairs (shown in the table); per-pair cost does not depend on the count
once the loop is past its first few thousand pairs.

Part B, CPython running bench/programs/alloc_heavy.py (the real interpreter, not a pyenv shim),
with PYTHONMALLOC=malloc (every object through malloc) and with the default pymalloc: wall,
work and CPU time as ratios to the unprofiled run, as in bench/overhead.py.

Part C, the sqlite3 shell running bench/programs/sqlite_heavy.sql on an in-memory database
(skipped without sqlite3), measured the same way; its work time is the sum of the shell's
`.timer on` statement times.

Every part also runs "forwarder", bench/programs/forward_malloc.c preloaded: an interposer that
only calls glibc's malloc. It is the floor under any profiler that interposes malloc, so what
anyprof adds above it is anyprof's own per-call work.

Exit status: 1 when anyprof fails, exits non-zero, writes no heap.pb.gz where heap profiling
is on, or its exact counters miss allocations; a peer that fails is reported as skipped.
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # no bench/__pycache__ from importing overhead.py
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import overhead  # noqa: E402  (the pprof reader and the ratio columns)
from overhead import BenchError, children_cpu, column  # noqa: E402

FAST_PATH_TARGET_NS = 5.0  # unsampled fast path: at most +5 ns per malloc/free pair
PROGRAM_TARGET = 1.03  # the malloc-heavy program: at most 3 % slower


# ---------------------------------------------------------------------------------------------
# Reading anyprof's heap profile.


def heap_profile(path):
    """(exact mallocs from the '# Mallocs = N' comment or None, estimated allocations = sum of
    alloc_objects over the samples, number of sample records) of a gzipped heap.pb.gz."""
    import gzip

    data = gzip.decompress(open(path, "rb").read())
    sample_types, samples, strings, comments = [], [], [], []
    for number, wire, value in overhead._fields(data):
        if number == 1:
            sample_types.append({n: v for n, _, v in overhead._fields(value)})
        elif number == 2:
            values = []
            for n, w, v in overhead._fields(value):
                if n == 2:
                    values.extend(overhead._ints(w, v))
            samples.append(values)
        elif number == 6:
            strings.append(value.decode("utf-8", "replace"))
        elif number == 13:
            comments.extend(overhead._ints(wire, value))
    index = next((i for i, st in enumerate(sample_types) if strings[st.get(1, 0)] == "alloc_objects"), 0)
    estimated = sum(v[index] for v in samples if len(v) > index)
    mallocs = None
    for c in comments:
        match = re.match(r"# Mallocs = (\d+)", strings[c] if c < len(strings) else "")
        if match:
            mallocs = int(match.group(1))
    return mallocs, estimated, len(samples)


def check_anyprof(out_dir, heap, cpu, min_mallocs):
    """Checks what anyprof wrote; returns a short note for the table."""
    if not heap:
        return "no profile (all off)"
    path = os.path.join(out_dir, "heap.pb.gz")
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise BenchError(f"anyprof wrote no heap profile: {path} is missing or empty")
    try:
        mallocs, estimated, _ = heap_profile(path)
    except Exception as err:
        raise BenchError(f"anyprof: cannot read {path}: {err}")
    if mallocs is not None and mallocs < min_mallocs:
        raise BenchError(f"anyprof's exact counters saw {mallocs} mallocs, the program made at least {min_mallocs}")
    if cpu:
        cpu_path = os.path.join(out_dir, "cpu.pb.gz")
        if not os.path.isfile(cpu_path) or overhead.pprof_samples(cpu_path)[0] == 0:
            raise BenchError(f"anyprof wrote no CPU samples: {cpu_path}")
    return (mallocs, estimated)


def fmt_count(n):
    if n is None:
        return "?"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


# ---------------------------------------------------------------------------------------------
# Configurations.


class Config:
    def __init__(self, name, describe, command, divisor=1, check=None, required=False, versus="baseline"):
        self.name = name
        self.describe = describe
        self.command = command  # (program argv, out dir) -> (argv, extra env)
        self.divisor = divisor  # runs with pairs // divisor
        self.check = check  # (out dir, min mallocs) -> note; raises BenchError
        self.required = required
        self.versus = versus  # the configuration its added cost is measured against
        self.skipped = None  # reason, once a peer has failed


def anyprof_config(args, name, describe, flags, heap, cpu, divisor=1):
    def command(prog, d):
        return [args.anyprof, "record", "-q", "-o", d] + flags + ["--"] + prog, {}

    return Config(
        name,
        describe,
        command,
        divisor,
        lambda d, n: check_anyprof(d, heap, cpu, n),
        required=True,
    )


def forwarder_config(args):
    """The floor: a preload whose malloc family only calls glibc's (bench/programs/forward_malloc.c)."""
    return Config(
        "forwarder",
        "LD_PRELOAD=forward_malloc.so PROG: an interposer that only forwards (no profiler; the floor)",
        lambda prog, d: (prog, {"LD_PRELOAD": args.forwarder}),
    )


def malloc_configs(args):
    out = [Config("baseline", "no profiler (glibc malloc)", lambda prog, d: (prog, {}))]
    if args.forwarder:
        out.append(forwarder_config(args))
    out.append(
        anyprof_config(
            args, "anyprof-count", "anyprof record -q --cpu-hz 0 --mem-rate 0: interposition + exact counters only",
            ["--cpu-hz", "0", "--mem-rate", "0"], heap=False, cpu=False,
        )
    )
    out.append(
        anyprof_config(
            args, "anyprof", "anyprof record -q --cpu-hz 0: heap sampling at the default 512 KiB mean",
            ["--cpu-hz", "0"], heap=True, cpu=False,
        )
    )
    out.append(
        anyprof_config(
            args, "anyprof-rate1",
            f"anyprof record -q --cpu-hz 0 --mem-rate 1: every allocation sampled (pairs / {args.slow_divisor})",
            ["--cpu-hz", "0", "--mem-rate", "1"], heap=True, cpu=False, divisor=args.slow_divisor,
        )
    )
    if args.heaptrack:

        def heaptrack_check(d, _n):
            if not any(f.startswith("heaptrack.") for f in os.listdir(d)):
                raise BenchError("heaptrack wrote no output file")
            return None

        out.append(
            Config(
                "heaptrack",
                f"heaptrack -o DIR/heaptrack PROG: every allocation, to a pipe (pairs / {args.slow_divisor})",
                lambda prog, d: ([args.heaptrack, "-o", os.path.join(d, "heaptrack")] + prog, {}),
                args.slow_divisor,
                heaptrack_check,
            )
        )
    if args.tcmalloc:

        def gperf_check(d, _n):
            if not any(f.endswith(".heap") for f in os.listdir(d)):
                raise BenchError("HEAPPROFILE wrote no .heap file")
            return None

        out.append(
            Config(
                "tcmalloc",
                f"LD_PRELOAD={args.tcmalloc} PROG: tcmalloc, no profiling (the baseline of gperf-heap)",
                lambda prog, d: (prog, {"LD_PRELOAD": args.tcmalloc}),
            )
        )
        out.append(
            Config(
                "gperf-heap",
                f"LD_PRELOAD={args.tcmalloc} HEAPPROFILE=DIR/hp PROG: gperftools' heap profiler, which"
                f" records every allocation's stack (pairs / {args.gperf_divisor})",
                lambda prog, d: (prog, {"LD_PRELOAD": args.tcmalloc, "HEAPPROFILE": os.path.join(d, "hp")}),
                args.gperf_divisor,
                gperf_check,
                versus="tcmalloc",
            )
        )
    return out


def python_configs(args):
    return [
        Config("baseline", "no profiler", lambda prog, d: (prog, {})),
        *([forwarder_config(args)] if args.forwarder else []),
        anyprof_config(
            args, "anyprof-heap", "anyprof record -q --cpu-hz 0: heap only, default 512 KiB rate",
            ["--cpu-hz", "0"], heap=True, cpu=False,
        ),
        anyprof_config(
            args, "anyprof", "anyprof record -q: defaults, CPU at 100 Hz + heap at 512 KiB",
            [], heap=True, cpu=True,
        ),
    ]


# ---------------------------------------------------------------------------------------------
# Running.


def python_work(stdout):
    """alloc_heavy.py's own work time (its perf_counter() around the work), or None."""
    match = re.search(r"work_seconds=([0-9.]+)", stdout)
    return float(match.group(1)) if match else None


def sqlite_work(stdout):
    """The sum of the sqlite3 shell's `.timer on` lines (`Run Time: real S ...`), or None."""
    times = [float(t) for t in re.findall(r"^Run Time: real ([0-9.]+)", stdout, re.M)]
    return sum(times) if times else None


def run_once(config, argv_prog, env_extra, scratch, min_mallocs, work_of=python_work):
    """One run: (wall s, work s, cpu s, program stdout, check note)."""
    out_dir = tempfile.mkdtemp(prefix=f"{config.name}-", dir=scratch)
    argv, extra = config.command(argv_prog, out_dir)
    env = dict(os.environ, **env_extra, **extra)
    try:
        cpu_before = children_cpu()
        start = time.perf_counter()
        proc = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - start
        cpu = children_cpu() - cpu_before
        work = work_of(proc.stdout)
        if proc.returncode != 0 or work is None:
            raise BenchError(
                f"{config.name}: `{' '.join(argv)}` exited with {proc.returncode}"
                f"{'' if work is not None else ' without printing its work time'}\n"
                f"stderr:\n{proc.stderr.strip()[-2000:]}"
            )
        note = config.check(out_dir, min_mallocs) if config.check else None
        return wall, work, cpu, proc.stdout, note
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def interleave(jobs, rounds, label):
    """jobs: [(key, config, run function)]. Runs them round-robin, rounds + 1 times, the first
    discarded; a failing peer is dropped with its reason, a failing anyprof raises."""
    results = {key: [] for key, _, _ in jobs}
    started = time.perf_counter()
    for rnd in range(rounds + 1):
        for key, config, run in jobs:
            if config.skipped:
                continue
            try:
                result = run()
            except BenchError as err:
                if config.required:
                    raise
                config.skipped = f"failed: {str(err).splitlines()[0]}"
                continue
            if rnd > 0:
                results[key].append(result)
        if rnd == 0:
            per_round = time.perf_counter() - started
            sys.stdout.flush()
            print(f"  ({label}: warm-up round took {per_round:.1f} s; about {per_round * rounds:.0f} s to go)",
                  file=sys.stderr)
    return results


def signed(v):
    return f"{v:+.2f}" if abs(v) < 100 else f"{v:+.0f}"


def spread(values, center):
    """'[min–max]' of single runs minus center."""
    return f"[{signed(min(values) - center)}–{signed(max(values) - center)}]"


def verdict(added, target, noise, unit):
    """'met' / 'NOT met', or 'inconclusive' when the baseline's own spread could flip it."""
    if abs(added - target) < noise:
        return f"inconclusive (the baseline alone varies by ±{noise:.2f}{unit})"
    return "met" if added <= target else "NOT met"


def paired_quartiles(runs, base_runs):
    """Quartiles (q1, median, q3) of run / baseline run of the same round."""
    ratios = sorted(r / b for r, b in zip(runs, base_runs))
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q1, q2, q3 = statistics.quantiles(ratios, n=4)
    return q1, q2, q3


def paired_verdict(q1, q3, target):
    """'met' when even the upper quartile of the paired ratios is within the target, 'NOT met'
    when even the lower quartile is over it, else 'inconclusive'."""
    if q3 <= target:
        return "met"
    if q1 > target:
        return "NOT met"
    return f"inconclusive (the paired ratios' middle half spans {(q1 - 1) * 100:+.1f} to {(q3 - 1) * 100:+.1f} %)"


def malloc_part(args, scratch):
    cfgs = malloc_configs(args)
    variants = [(1, "1 thread"), (args.threads, f"{args.threads} threads, each")]
    print(f"\n-- A. malloc microbenchmark: malloc_pairs, {fmt_count(args.pairs)} pairs of malloc(16..271) + touch"
          " + free per thread --")
    for c in cfgs:
        print(f"  {c.name:<13} {c.describe}")
    for line in args.note:
        print(f"  {line}")
    print(
        f"  {args.rounds} rounds after 1 discarded warm-up round, all configurations and both thread counts\n"
        "  interleaved round-robin; medians over rounds. ns/pair = the program's own CLOCK_MONOTONIC time\n"
        "  around each thread's loop / pairs (per thread: with threads that scale perfectly it equals the\n"
        "  1-thread figure). added = median ns/pair minus the median of the configuration it is measured\n"
        "  against (vs); spread = min–max of single runs minus that median. cpu added = the same in thread\n"
        "  CPU time (CLOCK_THREAD_CPUTIME_ID), which time spent descheduled by other load does not disturb\n"
        "  but which also leaves out time a thread spends blocked (heaptrack's threads wait on the pipe to\n"
        "  heaptrack_interpret) and work done in other processes: for the peers, read the ns/pair columns.\n"
        "  mallocs = what anyprof's exact counters saw / what its sampled profile estimates (alloc_objects)."
    )
    sys.stdout.flush()

    def job(threads, c):
        pairs = max(1, args.pairs // c.divisor)
        prog = [args.malloc_program, str(pairs)] + ([str(threads)] if threads > 1 else [])

        def run():
            _wall, _work, _cpu, stdout, note = run_once(c, prog, {}, scratch, pairs * threads)
            ns = float(re.search(r"\bns_per_pair=([0-9.]+)", stdout).group(1))
            cpu_ns = float(re.search(r"\bcpu_ns_per_pair=([0-9.]+)", stdout).group(1))
            return ns, cpu_ns, note, pairs

        return ((threads, c.name), c, run)

    results = interleave([job(t, c) for t, _ in variants for c in cfgs], args.rounds, "malloc_pairs")

    medians = {}  # (threads, config) -> (ns, cpu ns)
    verdicts = []
    for threads, title in variants:
        print(f"\n{title}" if threads == 1 else f"\n{title} (per-thread ns/pair; scaling = over the 1-thread median)")
        print(f"  {'config':<13} {'pairs':>5}  {'ns/pair [spread]':<23} {'vs':<8} {'added [spread]':<25}"
              f" {'ratio':>7}  {'cpu added':>9}  {'scaling' if threads > 1 else 'mallocs exact / est.'}")
        base_runs = results[(threads, "baseline")]
        noise = cpu_noise = 0.0
        if base_runs:
            b, bc = (statistics.median(r[k] for r in base_runs) for k in (0, 1))
            noise = max(max(r[0] for r in base_runs) - b, b - min(r[0] for r in base_runs))
            cpu_noise = max(max(r[1] for r in base_runs) - bc, bc - min(r[1] for r in base_runs))
        for c in cfgs:
            runs = results[(threads, c.name)]
            if c.skipped or not runs:
                print(f"  {c.name:<13} skipped: {c.skipped or 'no runs'}")
                continue
            ns, cpu_ns = [r[0] for r in runs], [r[1] for r in runs]
            med, cpu_med = statistics.median(ns), statistics.median(cpu_ns)
            medians[(threads, c.name)] = (med, cpu_med)
            line = f"  {c.name:<13} {fmt_count(runs[0][3]):>5}  {med:8.2f} {spread(ns, med):<14}"
            base = medians.get((threads, c.versus)) if c.name != c.versus else None
            if base is None:
                line += f" {'':<8} {'':<25} {'':>7}  {'':>9}"
            else:
                added, cpu_added = med - base[0], cpu_med - base[1]
                line += (f" {c.versus:<8} {signed(added):>7} {spread(ns, base[0]):<17}"
                         f" {med / base[0]:6.2f}x  {signed(cpu_added):>9}")
                if c.name in ("anyprof-count", "anyprof"):
                    # At the default rate one allocation in ~3,650 here is sampled (mean size
                    # 143.5 B), so the default configuration's added cost is the unsampled path's
                    # plus a sample's cost (anyprof-rate1's added) / 3,650: ~0.05 ns.
                    what = "no sampling" if c.name == "anyprof-count" else "default 512 KiB sampling"
                    verdicts.append(
                        f"{title}, {c.name} ({what}): {added:+.2f} ns/pair, {cpu_added:+.2f} in thread CPU time"
                        f" — target ≤ {FAST_PATH_TARGET_NS:g} ns: "
                        f"{verdict(added, FAST_PATH_TARGET_NS, noise, ' ns')}; in CPU time: "
                        f"{verdict(cpu_added, FAST_PATH_TARGET_NS, cpu_noise, ' ns')}"
                    )
            if threads > 1:
                one = medians.get((1, c.name))
                line += f"  {med / one[0]:5.2f}x (cpu {cpu_med / one[1]:4.2f}x)" if one else ""
            else:
                notes = [r[2] for r in runs if isinstance(r[2], tuple)]
                if notes:
                    exacts = [n[0] for n in notes if n[0] is not None]
                    exact = statistics.median(exacts) if exacts else None
                    est = statistics.median(n[1] for n in notes)
                    line += f"  {fmt_count(exact)} / {fmt_count(est)}"
                elif isinstance(runs[0][2], str):
                    line += f"  {runs[0][2]}"
            print(line.rstrip())
        if base_runs:
            print(f"  (noise floor: the baseline's own runs lie within ±{noise:.2f} ns/pair of its median,"
                  f" ±{cpu_noise:.2f} in thread CPU time)")
    if verdicts:
        print("\n  the issue's target: the unsampled fast path adds at most"
              f" {FAST_PATH_TARGET_NS:g} ns per malloc/free pair")
        for v in verdicts:
            print(f"  {v}")
    return 0


def python_part(args, scratch):
    units = calibrate_python(args)
    prog = [args.python, args.python_script, str(units)]
    # (title, argv, environment, mallocs the exact counters must at least see: a unit makes
    # ~2,000 through malloc with PYTHONMALLOC=malloc, and only a few with pymalloc, work time)
    variants = [
        ("PYTHONMALLOC=malloc", prog, {"PYTHONMALLOC": "malloc"}, units * 1000, python_work),
        ("default allocator (pymalloc)", prog, {}, 1, python_work),
    ]
    version = subprocess.run([args.python, "-c", "import platform; print(platform.python_version())"],
                             capture_output=True, text=True).stdout.strip()
    print(f"\n-- B. malloc-heavy program: Python {version or '?'}"
          f" running alloc_heavy.py {units} units --")
    print(f"  interpreter: {args.python} (run directly, not through a shim); {units} units calibrated to"
          f" {args.python_seconds:g} s with PYTHONMALLOC=malloc")
    return compare_programs(args, scratch, variants, "the script's own perf_counter() around its work",
                            "alloc_heavy.py")


def sqlite_part(args, scratch):
    if not args.sqlite:
        print("\n-- C. malloc-heavy program: sqlite3 -- skipped: no sqlite3 (Debian: apt-get install sqlite3)")
        return 0
    version = subprocess.run([args.sqlite, "--version"], capture_output=True, text=True).stdout.split()
    print(f"\n-- C. malloc-heavy program: sqlite3 {version[0] if version else '?'}"
          f" running {os.path.basename(args.sqlite_script)} on an in-memory database --")
    print("  (inserts, an index, scans, group by, updates and deletes over 600,000 rows: about 3.4 M\n"
          "  mallocs in 2-3 s, sqlite's own page cache and row objects, every one through malloc)")
    variants = [("sqlite3", [args.sqlite, ":memory:", f".read {args.sqlite_script}"], {}, 1_000_000, sqlite_work)]
    return compare_programs(args, scratch, variants, "the sum of the shell's `.timer on` real times",
                            "sqlite_heavy.sql")


def compare_programs(args, scratch, variants, work_means, label):
    """Runs each variant (title, argv, env, min_mallocs, work_of) under every configuration of
    python_configs, interleaved, and prints the tables and the verdicts against the target."""
    cfgs = python_configs(args)
    for c in cfgs:
        print(f"  {c.name:<13} {c.describe}")
    print(
        f"  {args.rounds} rounds after 1 discarded warm-up round, configurations and variants interleaved;\n"
        "  medians over rounds. wall = measured outside the process (program and profiler start-up and\n"
        f"  shutdown included); work = {work_means}; cpu = user + system\n"
        "  of the run and its descendants (the collector). Ratios are to the baseline median; spread = min–max\n"
        "  of single runs over the baseline median. outside work = median (wall − work) minus the baseline's:\n"
        "  start-up plus shutdown cost (writing the profiles). mallocs = anyprof's exact count (median);\n"
        "  per malloc = the work time added divided by mallocs (one malloc with its free, in this program;\n"
        "  'in noise' when the work added is within the baseline's own min–max spread).\n"
        "  Verdicts: paired wall = each run over the baseline run of its own round (the two shared the\n"
        "  machine's state of the moment), median and quartiles over rounds; met when the upper quartile\n"
        "  is within the target, NOT met when the lower quartile is over it."
    )
    sys.stdout.flush()

    def job(variant, prog, env, min_mallocs, work_of, c):
        def run():
            wall, work, cpu, _stdout, note = run_once(c, prog, env, scratch, min_mallocs, work_of)
            return wall, work, cpu, note

        return ((variant, c.name), c, run)

    results = interleave([job(v, p, e, m, w, c) for v, p, e, m, w in variants for c in cfgs], args.rounds, label)
    width = len(column([1.0], 1.0))
    verdicts = []
    for variant, *_ in variants:
        runs_of = {c.name: results[(variant, c.name)] for c in cfgs}
        base = runs_of["baseline"]
        base_wall, base_work, base_cpu = (statistics.median(r[k] for r in base) for k in range(3))
        print(f"\n{variant}")
        print(f"  {'config':<13} {'wall: median, ratio [spread]':<{width}}   {'work: median, ratio [spread]':<{width}}"
              f"   {'cpu: median, ratio [spread]':<{width}}   {'outside work':>12} {'mallocs':>8}"
              f" {'per malloc':>10}")
        base_outside = statistics.median(r[0] - r[1] for r in base)
        for c in cfgs:
            runs = runs_of[c.name]
            notes = [r[3] for r in runs if isinstance(r[3], tuple) and r[3][0] is not None]
            count = statistics.median(n[0] for n in notes) if notes else None
            mallocs = fmt_count(count) if count else "-"
            # The work time anyprof added, spread over the allocations it saw: what one
            # malloc (with its free) costs inside this program, cache effects included.
            per_malloc = "-"
            if count:
                added = statistics.median(r[1] for r in runs) - base_work
                # Below the baseline's own spread the quotient is noise over few mallocs.
                base_works = [r[1] for r in base]
                if abs(added) <= max(base_works) - min(base_works):
                    per_malloc = "in noise"
                else:
                    per_malloc = f"{added / count * 1e9:+.1f} ns"
            outside = statistics.median(r[0] - r[1] for r in runs) - base_outside
            print(f"  {c.name:<13} {column([r[0] for r in runs], base_wall)}"
                  f"   {column([r[1] for r in runs], base_work)}"
                  f"   {column([r[2] for r in runs], base_cpu)}"
                  f"   {'' if c.name == 'baseline' else f'{outside * 1000:+9.1f} ms':>12} {mallocs:>8}"
                  f" {per_malloc:>10}")
        walls, cpus = [r[0] for r in base], [r[2] for r in base]
        noise = max(max(walls) / base_wall - 1, 1 - min(walls) / base_wall)
        cpu_noise = max(max(cpus) / base_cpu - 1, 1 - min(cpus) / base_cpu)
        for c in cfgs[1:]:
            if not c.required:
                continue  # the forwarder is a reference, not a profiler held to the target
            runs = runs_of[c.name]
            wall, work, cpu = (statistics.median(r[k] for r in runs) for k in range(3))
            # Paired: each run against the baseline run of its own round, which shared the
            # machine's state of the moment; the quartiles of these ratios decide the verdict.
            q1, paired, q3 = paired_quartiles([r[0] for r in runs], [r[0] for r in base])
            verdicts.append(
                f"{variant}, {c.name}: wall {(wall / base_wall - 1) * 100:+.1f} %"
                f" (work alone {(work / base_work - 1) * 100:+.1f} %, cpu {(cpu / base_cpu - 1) * 100:+.1f} %);"
                f" paired wall {(paired - 1) * 100:+.1f} % [quartiles {(q1 - 1) * 100:+.1f}, {(q3 - 1) * 100:+.1f}]"
                f" — target ≤ +{(PROGRAM_TARGET - 1) * 100:.0f} %: {paired_verdict(q1, q3, PROGRAM_TARGET)}"
            )
        print(f"  (noise floor: the baseline's wall time varies by up to {noise * 100:.1f} % between rounds,"
              f" its cpu time by {cpu_noise * 100:.1f} %)")
    print()
    for v in verdicts:
        print(f"  {v}")
    return 0


def calibrate_python(args):
    rates = []
    env = dict(os.environ, PYTHONMALLOC="malloc")
    for _ in range(3):
        out = subprocess.run([args.python, args.python_script, "--calibrate", "0.3"], capture_output=True,
                             text=True, check=True, env=env)
        rates.append(float(re.search(r"units_per_second=([0-9.]+)", out.stdout).group(1)))
    return max(1, int(statistics.median(rates) * args.python_seconds))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--malloc-program", required=True, help="the built bench/programs/malloc_pairs")
    parser.add_argument("--anyprof", required=True)
    parser.add_argument("--heaptrack", default="", help="the heaptrack command; empty: skipped")
    parser.add_argument("--forwarder", default="",
                        help="the built bench/programs/forward_malloc.c (a preload that only forwards); empty: skipped")
    parser.add_argument("--tcmalloc", default="", help="path of libtcmalloc.so.4; empty: skipped")
    parser.add_argument("--python", default=sys.executable, help="the real interpreter (not a shim)")
    parser.add_argument("--python-script", required=True, help="bench/programs/alloc_heavy.py")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--pairs", type=int, default=50_000_000, help="malloc/free pairs per thread")
    parser.add_argument("--threads", type=int, default=2, help="threads of the multi-threaded variant")
    parser.add_argument("--slow-divisor", type=int, default=100,
                        help="--mem-rate 1 and heaptrack run pairs / this")
    parser.add_argument("--gperf-divisor", type=int, default=1000, help="HEAPPROFILE runs pairs / this")
    parser.add_argument("--python-seconds", type=float, default=2.0, help="seconds of work of the Python run")
    parser.add_argument("--sqlite", default=shutil.which("sqlite3") or "", help="the sqlite3 shell; empty: skipped")
    parser.add_argument("--sqlite-script", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                "programs", "sqlite_heavy.sql"))
    parser.add_argument("--parts", default="malloc,python,sqlite", help="comma-separated: malloc, python, sqlite")
    parser.add_argument("--note", action="append", default=[], help="a line to print, e.g. 'skipped: reason'")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    parts = set(args.parts.split(","))

    scratch = tempfile.mkdtemp(prefix="anyprof-heap-bench-")
    try:
        if "malloc" in parts:
            malloc_part(args, scratch)
        if "python" in parts:
            python_part(args, scratch)
        if "sqlite" in parts:
            sqlite_part(args, scratch)
    except BenchError as err:
        print(f"\nerror: {err}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
