#!/usr/bin/env bash
# Rebuilds the ELF seeds of the symbolizer_elf target (fuzz/corpus/symbolizer_elf/seed-*) and
# the program the stream_session target symbolizes against (fuzz/seeds/elf/c-cxx). Small on
# purpose (-Os, -z noseparate-code: ~6-10 KiB each): libFuzzer mutates small inputs faster.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/../../corpus/symbolizer_elf"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out"
cd "$tmp"
L="-Wl,-z,noseparate-code"
cc -g -Os $L "$here/a.c" -o a-g                                   # DWARF 5
cc -g -gdwarf-4 -O2 $L "$here/a.c" -o a-dwarf4                    # DWARF 4
cc -gsplit-dwarf -g -O2 $L "$here/a.c" -o a-split                 # skeleton unit, .dwo missing
cc -g -O2 $L "$here/b.c" -o b-g                                   # inlined function
cc -g -O2 -gz=zlib -Wl,--compress-debug-sections=zlib $L "$here/b.c" -o b-gz  # SHF_COMPRESSED
cc -Os $L "$here/b.c" -o b-stripped && strip b-stripped           # .dynsym only
cc -g -gdwarf-4 -O2 -c "$here/b.c" -o b-dwarf4.o                  # ET_REL with relocations
cc -g -O2 -shared -fPIC $L "$here/b.c" -o libb.so                 # shared object
c++ -g -Os $L "$here/c.cpp" -o c-cxx                              # C++ mangled names
for f in a-g a-dwarf4 a-split b-g b-gz b-stripped b-dwarf4.o libb.so c-cxx; do
  cp "$f" "$out/seed-$f"
done
cp c-cxx "$here/c-cxx"
ls -l "$out"/seed-*
