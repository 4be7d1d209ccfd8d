-- The second malloc-heavy real program of the heap-profiling overhead benchmark
-- (bench/heap_overhead.py, part C): the sqlite3 shell on an in-memory database. sqlite's
-- page cache, cursors, records and strings all come from malloc (about 5 M allocations in
-- 2 s on the machine this was written on). The values are computed, not random, so that
-- every run does the same work. The shell's `.timer on` times each statement; their sum is
-- the work time, without the shell's start-up and exit.
.timer on
CREATE TABLE t(a INTEGER PRIMARY KEY, b TEXT, c TEXT);
CREATE INDEX tb ON t(b);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 600000)
  INSERT INTO t SELECT i, printf('%08x%08x', (i * 2654435761) % 4294967291, (i * 40503) % 65537),
    printf('%d-%x', i, (i * 97) % 65521) FROM n;
SELECT count(*), max(length(c)) FROM t WHERE b > '8';
SELECT count(*) FROM (SELECT substr(b, 1, 3) AS k, count(*) FROM t GROUP BY k);
UPDATE t SET c = c || 'x' WHERE a % 3 = 0;
DELETE FROM t WHERE a % 5 = 0;
SELECT sum(length(c)) FROM t;
