#!/usr/bin/env python3
"""Shrinks a corpus to a byte budget, keeping the most coverage per byte.

libFuzzer's merge keeps every input that adds a feature, which for the ELF target (inputs of
5-10 KiB) is far over the size we want to commit. This reads the per-input features from a
merge control file and picks inputs greedily by new features per byte until the budget is
spent; inputs named seed-* are always kept.

    target -merge=1 -merge_control_file=CF -max_len=N EMPTY_DIR CORPUS
    prune.py CF BUDGET_BYTES OUT_DIR [MAX_FILES]
"""
import os
import shutil
import sys

control, budget, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
max_files = int(sys.argv[4]) if len(sys.argv) > 4 else 1 << 30
lines = open(control).read().split("\n")
n = int(lines[0])
paths = lines[2 : 2 + n]
features = {}
for line in lines[2 + n :]:
    if line.startswith("FT "):
        parts = line.split()
        features[int(parts[1])] = set(parts[2:])
size = {i: os.path.getsize(p) for i, p in enumerate(paths)}
chosen, covered, used = [], set(), 0
for i, p in enumerate(paths):
    if os.path.basename(p).startswith("seed-"):
        chosen.append(i)
        covered |= features.get(i, set())
        used += size[i]
left = set(features) - set(chosen)
while left:
    best = max(left, key=lambda i: len(features[i] - covered) / (size[i] + 64))
    gain = len(features[best] - covered)
    left.discard(best)
    if gain == 0 or len(chosen) >= max_files:
        break
    if used + size[best] > budget:
        continue
    chosen.append(best)
    covered |= features[best]
    used += size[best]
total = set().union(*features.values()) if features else set()
os.makedirs(out, exist_ok=True)
for i in chosen:
    shutil.copy(paths[i], os.path.join(out, os.path.basename(paths[i])))
print(f"kept {len(chosen)}/{n} inputs, {used} bytes, {len(covered)}/{len(total)} features")
