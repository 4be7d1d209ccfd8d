#!/usr/bin/env python3
"""Share of CPU samples whose leaf frame has a function name: anyprof's cpu.pb.gz vs perf.

Usage: names_vs_perf.py FILE...  where each FILE is an anyprof CPU profile (*.pb.gz) or a
perf.data file recorded with `perf record -e cpu-clock -F 999 -g -o X.data -- PROGRAM`.

For perf, each sample counts at its first user-space frame (kernel frames are skipped: anyprof
charges time in the kernel to the user instruction that entered it). A leaf is named when it
has a function name: not perf's [unknown], not anyprof's MODULE+0xADDR or a bare [module].
Used for issue 15's "named at least as well as perf report" (sort, xz -9, sqlite3).
"""
import collections, gzip, os, re, subprocess, sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import _fields, _ints  # noqa: E402


def fields(b):
    """The protobuf fields of `b` as a list (read twice below); see overhead._fields."""
    return list(_fields(b))


def packed(v, t):
    """A repeated int field's values, packed or not; see overhead._ints."""
    return _ints(t, v)


def anyprof(path):
    p = fields(gzip.open(path).read())
    strings = [v.decode('utf8', 'replace') for f, t, v in p if f == 6]
    funcs = {}; locs = {}; maps = {}; samples = []
    for f, t, v in p:
        if f == 5:
            d = dict((ff, vv) for ff, tt, vv in fields(v)); funcs[d.get(1, 0)] = strings[d.get(2, 0)]
        elif f == 4:
            fl = fields(v); d = dict((ff, vv) for ff, tt, vv in fl if ff != 4)
            lines = [dict((a, b) for a, _, b in fields(vv)).get(1, 0) for ff, tt, vv in fl if ff == 4]
            locs[d.get(1, 0)] = (d.get(2, 0), [funcs.get(x) for x in lines], lines)
        elif f == 3:
            d = dict((ff, vv) for ff, tt, vv in fields(v)); maps[d.get(1, 0)] = strings[d.get(5, 0)]
        elif f == 2:
            ids = []; vals = []
            for ff, tt, vv in fields(v):
                if ff == 1: ids += packed(vv, tt)
                if ff == 2: vals += packed(vv, tt)
            samples.append((ids, vals))
    total = named = 0; by = collections.Counter()
    for ids, vals in samples:
        if not ids: continue
        m, _, lines = locs[ids[0]]
        names = [funcs.get(x, '') for x in lines]
        n = vals[0]; total += n
        nm = names[0] if names else ''
        ok = bool(nm) and not nm.startswith('[') and '+0x' not in nm
        if ok: named += n
        else: by[maps.get(m, '?').rsplit('/', 1)[-1]] += n
    return total, named, by
def perf(path):
    """Each sample's first user-space frame (anyprof's leaf is the user PC, kernel time included)."""
    out = subprocess.run(['perf', 'script', '-i', path, '-F', 'comm,ip,sym,dso'], capture_output=True, text=True).stdout
    total = named = 0; by = collections.Counter()
    for block in out.split('\n\n'):
        for line in block.splitlines()[1:]:
            m = re.match(r'\s*([0-9a-f]+) (.*) \((.*)\)$', line)
            if not m or m.group(3) == '[kernel.kallsyms]': continue
            total += 1
            if m.group(2) == '[unknown]': by[m.group(3).rsplit('/', 1)[-1]] += 1
            else: named += 1
            break
    return total, named, by
for arg in sys.argv[1:]:
    t, n, by = (perf if arg.endswith('.data') else anyprof)(arg)
    print(f'{arg}: user samples {t}, leaf named {100*n/max(t,1):.1f}%, unnamed by module {dict(by.most_common(4))}')
