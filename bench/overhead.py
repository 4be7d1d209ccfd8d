#!/usr/bin/env python3
"""Whole-program CPU-profiling overhead, as ratios to an unprofiled baseline.

Called by bench/run.sh, which builds the work program and finds the peer profilers. Every
configuration runs the same program with the same fixed amount of work; the configurations
are interleaved round-robin (A B C D A B C D ...) so that drift (other load, frequency, cache
state) affects all of them alike. One discarded warm-up round comes first.

Two times per run:
  wall  perf_counter() around subprocess.run, from outside: includes the profiler's start-up
        (anyprof: collector, socket, library load) and shutdown (writing the profile).
  work  what the program itself measured with CLOCK_MONOTONIC around its work loop: the cost
        while the program runs (signal handling, unwinding, sending samples).
And the CPU time (user + system) of the run and all its waited-for descendants (the collector,
perf), which other load on the machine disturbs far less than wall time.

Exit status: 1 when anyprof fails to run or to write a profile with samples in it; the peer
profilers (gperftools, perf) are only reported on.
"""

import argparse
import gzip
import os
import re
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Sample counts, read from each profiler's output so the table shows they all did the work.


def _varint(buf, pos):
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf):
    """(field number, wire type, value) of a protobuf message; value is int or bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"wire type {wire}")
        yield number, wire, value


def _ints(wire, value):
    """A repeated int64 field's values, packed or not."""
    if wire == 0:
        return [value]
    out, pos = [], 0
    while pos < len(value):
        v, pos = _varint(value, pos)
        out.append(v)
    return out


def pprof_samples(path):
    """Sum of the 'samples' value over a gzipped pprof profile's samples, and its comments."""
    data = gzip.decompress(open(path, "rb").read())
    sample_types, samples, strings, comments = [], [], [], []
    for number, wire, value in _fields(data):
        if number == 1:
            sample_types.append({n: v for n, _, v in _fields(value)})
        elif number == 2:
            values = []
            for n, w, v in _fields(value):
                if n == 2:
                    values.extend(_ints(w, v))
            samples.append(values)
        elif number == 6:
            strings.append(value.decode("utf-8", "replace"))
        elif number == 13:
            comments.extend(_ints(wire, value))
    index = 0
    for i, st in enumerate(sample_types):
        if strings[st.get(1, 0)] == "samples":
            index = i
    total = sum(v[index] for v in samples if len(v) > index)
    return total, [strings[c] for c in comments if c < len(strings)]


def gperftools_samples(path):
    """Sum of the counts in a gperftools CPU profile (legacy binary format, native words)."""
    data = open(path, "rb").read()
    words = struct.unpack(f"={len(data) // 8}Q", data[: len(data) // 8 * 8])
    if len(words) < 5 or words[0] != 0 or words[1] != 3:
        raise ValueError("not a gperftools CPU profile")
    pos, total = 2 + words[1], 0  # header: 0, its length (3), version, period, padding
    while pos + 2 <= len(words):
        count, depth = words[pos], words[pos + 1]
        if count == 0 and depth == 1:  # the trailer
            break
        total += count
        pos += 2 + depth
    return total


def perf_samples(path):
    out = subprocess.run(
        ["perf", "report", "-i", path, "--stats"], capture_output=True, text=True, timeout=60
    ).stdout
    match = re.search(r"SAMPLE events:\s+(\d+)", out)
    if not match:
        raise ValueError("no SAMPLE events line in perf report --stats")
    return int(match.group(1))


# ---------------------------------------------------------------------------------------------
# Configurations.


class Config:
    def __init__(self, name, describe, command, count=None, required=False):
        self.name = name
        self.describe = describe
        self.command = command  # (program argv, out dir) -> (argv, extra env)
        self.count = count  # out dir -> samples
        self.required = required


def configs(args):
    hz = str(args.hz)
    out = [Config("baseline", "no profiler", lambda prog, d: (prog, {}))]

    def anyprof_count(d):
        path = os.path.join(d, "cpu.pb.gz")
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            raise BenchError(f"anyprof wrote no profile: {path} is missing or empty")
        total, comments = pprof_samples(path)
        if total == 0:
            raise BenchError(f"anyprof wrote a profile without samples: {'; '.join(comments)}")
        return total

    out.append(
        Config(
            "anyprof",
            f"anyprof record -q -o DIR --cpu-hz {hz} --mem-rate 0 -- PROG (CPU only, like the peers)",
            lambda prog, d: ([args.anyprof, "record", "-q", "-o", d, "--cpu-hz", hz, "--mem-rate", "0", "--"] + prog, {}),
            anyprof_count,
            required=True,
        )
    )
    if args.gperftools:
        out.append(
            Config(
                "gperftools",
                f"LD_PRELOAD={args.gperftools} CPUPROFILE=DIR/prof.out CPUPROFILE_FREQUENCY={hz} PROG"
                " (setitimer ITIMER_PROF: one process-wide CPU timer)",
                lambda prog, d: (
                    prog,
                    {
                        "LD_PRELOAD": args.gperftools,
                        "CPUPROFILE": os.path.join(d, "prof.out"),
                        "CPUPROFILE_FREQUENCY": hz,
                    },
                ),
                lambda d: gperftools_samples(os.path.join(d, "prof.out")),
            )
        )
    if args.perf:
        out.append(
            Config(
                "perf",
                f"perf record -F {hz} -g -o DIR/perf.data -q -- PROG"
                " (-g: frame-pointer call chains, truncated without frame pointers)",
                lambda prog, d: (
                    ["perf", "record", "-F", hz, "-g", "-o", os.path.join(d, "perf.data"), "-q", "--"] + prog,
                    {},
                ),
                lambda d: perf_samples(os.path.join(d, "perf.data")),
            )
        )
        if args.perf_dwarf:
            out.append(
                Config(
                    "perf-dwarf",
                    f"perf record -F {hz} --call-graph dwarf -o DIR/perf.data -q -- PROG"
                    " (copies 8 KiB of stack per sample; unwinds later, in perf report)",
                    lambda prog, d: (
                        ["perf", "record", "-F", hz, "--call-graph", "dwarf", "-o",
                         os.path.join(d, "perf.data"), "-q", "--"] + prog,
                        {},
                    ),
                    lambda d: perf_samples(os.path.join(d, "perf.data")),
                )
            )
    return out


# ---------------------------------------------------------------------------------------------
# Running.


def children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(config, program, scratch):
    """One run: (wall seconds, work seconds, CPU seconds, samples or None)."""
    out_dir = tempfile.mkdtemp(prefix=f"{config.name}-", dir=scratch)
    argv, extra = config.command(program, out_dir)
    env = dict(os.environ, **extra)
    try:
        cpu_before = children_cpu()
        start = time.perf_counter()
        proc = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - start
        cpu = children_cpu() - cpu_before
        match = re.search(r"work_seconds=([0-9.]+)", proc.stdout)
        if proc.returncode != 0 or not match:
            message = (
                f"{config.name}: `{' '.join(argv)}` exited with {proc.returncode}"
                f"{'' if match else ' without printing its work time'}\n"
                f"stderr:\n{proc.stderr.strip()}"
            )
            raise BenchError(message)
        samples = None
        if config.count:
            try:
                samples = config.count(out_dir)
            except BenchError:
                raise
            except Exception as err:  # a peer's format we misread: report, don't fail
                if config.required:
                    raise BenchError(f"{config.name}: cannot read its profile: {err}")
                samples = None
        return wall, float(match.group(1)), cpu, samples
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def calibrate(program, seconds):
    rates = []
    for _ in range(3):
        out = subprocess.run([program, "--calibrate", "0.3"], capture_output=True, text=True, check=True)
        rates.append(float(re.search(r"units_per_second=([0-9.]+)", out.stdout).group(1)))
    return int(statistics.median(rates) * seconds)


def column(values, base):
    """'median ratio [min–max]' of one measure, as ratios to the baseline median."""
    return (
        f"{statistics.median(values):6.3f}s {statistics.median(values) / base:5.3f}x"
        f" [{min(values) / base:5.3f}–{max(values) / base:5.3f}]"
    )


def table(variant, results, cfgs):
    base = results["baseline"]
    base_wall, base_work, base_cpu = (statistics.median(r[k] for r in base) for k in range(3))
    base_outside = statistics.median(r[0] - r[1] for r in base)
    width = len(column([1.0], 1.0))
    lines = [
        f"{variant}",
        f"  {'config':<11} {'wall: median, ratio [spread]':<{width}}   {'work: median, ratio [spread]':<{width}}"
        f"   {'cpu: median, ratio [spread]':<{width}}   {'outside work':>12} {'samples':>7}",
    ]
    for c in cfgs:
        runs = results[c.name]
        outside = statistics.median(r[0] - r[1] for r in runs) - base_outside
        samples = [r[3] for r in runs if r[3] is not None]
        lines.append(
            f"  {c.name:<11} {column([r[0] for r in runs], base_wall)}"
            f"   {column([r[1] for r in runs], base_work)}"
            f"   {column([r[2] for r in runs], base_cpu)}"
            f"   {'' if c.name == 'baseline' else f'{outside * 1000:+9.1f} ms':>12}"
            f" {'-' if not samples else f'{statistics.median(samples):.0f}':>7}"
        )
    walls = [r[0] for r in base]
    noise = max(max(walls) / base_wall - 1, 1 - min(walls) / base_wall)
    if noise > 0.02:
        lines.append(
            f"  (the baseline's wall time alone varies by up to {noise * 100:.1f} % between rounds: wall and"
            " work ratios closer to 1 than that are noise;\n   the cpu column is disturbed far less by other load)"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--program", required=True, help="the built bench/programs/cpu_work")
    parser.add_argument("--anyprof", required=True)
    parser.add_argument("--gperftools", default="", help="path of libprofiler.so; empty: skipped")
    parser.add_argument("--perf", action="store_true")
    parser.add_argument("--perf-dwarf", action="store_true")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--hz", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=2.0, help="CPU seconds of work per run")
    parser.add_argument("--threads", type=int, default=4, help="threads of the multi-threaded variant")
    parser.add_argument("--note", action="append", default=[], help="a line to print, e.g. 'skipped: reason'")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    units = calibrate(args.program, args.seconds)
    variants = [
        (f"1 thread, {args.seconds:g} s of work", [args.program, str(units)]),
        (
            f"{args.threads} threads, {args.seconds / args.threads:g} s of work each",
            [args.program, str(units), str(args.threads)],
        ),
    ]
    cfgs = configs(args)
    print(f"  work program: {os.path.basename(args.program)} {units} units (calibrated to {args.seconds:g} s"
          " of CPU on this machine), built with cc -O2 -g, no frame pointers")
    for c in cfgs:
        print(f"  {c.name:<11} {c.describe}")
    for line in args.note:
        print(f"  {line}")
    print(
        f"  {args.rounds} rounds after 1 discarded warm-up round, configurations interleaved round-robin;"
        " medians over rounds.\n"
        "  wall = measured outside the process (start-up and shutdown included); work = the program's own\n"
        "  CLOCK_MONOTONIC around its work loop; cpu = user + system time of the run and its descendants\n"
        "  (collector, perf included). Ratios are to the baseline median (1.004x = +0.4 %); spread = min–max\n"
        "  of single runs over the baseline median (the baseline's own spread is the noise floor).\n"
        "  outside work = median (wall − work) minus the baseline's: start-up plus shutdown cost;\n"
        "  samples = median samples in the written profile (gperftools: process-wide timer)."
    )
    sys.stdout.flush()

    scratch = tempfile.mkdtemp(prefix="anyprof-bench-")
    results = {(v, c.name): [] for v, _ in variants for c in cfgs}
    try:
        started = time.perf_counter()
        for rnd in range(args.rounds + 1):
            for variant, program in variants:
                for c in cfgs:
                    run = run_once(c, program, scratch)
                    if rnd > 0:
                        results[(variant, c.name)].append(run)
            if rnd == 0:
                per_round = time.perf_counter() - started
                print(f"  (warm-up round took {per_round:.1f} s; about {per_round * args.rounds:.0f} s to go)",
                      file=sys.stderr)
    except BenchError as err:
        print(f"\nerror: {err}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    for variant, _ in variants:
        print()
        print(table(variant, {c.name: results[(variant, c.name)] for c in cfgs}, cfgs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
