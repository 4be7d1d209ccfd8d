"""The malloc-heavy real program of the heap-profiling overhead benchmark (bench/heap_overhead.py).

Plain CPython doing what allocation-heavy Python code does: building and dropping dicts,
lists, tuples, strings and small objects, with a few longer-lived structures that grow and are
cleared, so that the heap both churns and holds some live data. Run with PYTHONMALLOC=malloc
every object goes through the C malloc family (and so through an interposing profiler); with
the default allocator (pymalloc) only objects over 512 bytes and the arenas do.

  alloc_heavy.py UNITS             do UNITS units of work and print
                                   "work_seconds=S units=U checksum=X"
  alloc_heavy.py --calibrate SECS  do units for about SECS and print "units_per_second=R"

work_seconds is time.perf_counter() (CLOCK_MONOTONIC) around the work only, interpreter
start-up and shutdown excluded.
"""

import sys
import time


class Node:
    __slots__ = ("key", "value", "children")

    def __init__(self, key, value):
        self.key = key
        self.value = value
        self.children = []


def unit(seed, keep):
    """One unit: about 2,000 allocations of 16 bytes to a few KiB, nearly all freed at once."""
    total = 0
    # A dict of strings to lists, dropped at the end of the unit.
    table = {}
    for i in range(64):
        key = f"key-{seed}-{i}"
        table[key] = [i, seed, key * (1 + i % 5)]
    total += sum(len(v[2]) for v in table.values())
    # Tuples and a sorted list of them.
    pairs = sorted((i * 7919 % 257, str(i)) for i in range(128))
    total += pairs[0][0] + len(pairs)
    # String building.
    parts = [str(seed * j) for j in range(96)]
    text = ",".join(parts)
    total += len(text.split(","))
    # A small tree of objects.
    root = Node(seed, None)
    for i in range(48):
        child = Node(i, bytearray(16 + (i * 37 + seed) % 480))
        child.children.append(Node(-i, (i, seed)))
        root.children.append(child)
    total += sum(len(c.value) for c in root.children)
    # Set and dict comprehensions.
    squares = {x * x for x in range(seed % 17, seed % 17 + 80)}
    inverse = {v[2]: k for k, v in table.items() if v[0] % 3}
    total += len(squares) + len(inverse)
    # Something lives on for a while: a growing list, cleared every 256 units.
    keep.append((seed, text[:64], pairs[:8]))
    if len(keep) >= 256:
        keep.clear()
    return total


def main():
    args = sys.argv[1:]
    keep = []
    if len(args) == 2 and args[0] == "--calibrate":
        seconds = float(args[1])
        units = checksum = 0
        start = time.perf_counter()
        while True:
            for _ in range(16):
                checksum ^= unit(units, keep)
                units += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        print(f"units_per_second={units / elapsed:.1f} checksum={checksum}")
        return 0
    if len(args) != 1 or not args[0].isdigit() or int(args[0]) == 0:
        print(f"usage: {sys.argv[0]} UNITS | --calibrate SECONDS", file=sys.stderr)
        return 2
    units = int(args[0])
    checksum = 0
    start = time.perf_counter()
    for u in range(units):
        checksum ^= unit(u, keep)
    elapsed = time.perf_counter() - start
    print(f"work_seconds={elapsed:.6f} units={units} checksum={checksum}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
