#!/usr/bin/env python3
"""Totals the TAP subtests of one or more meson build directories into the closing line
`N passed, N failed` (plus skipped). A test binary that crashed or timed out without printing
`not ok` still counts as one failure, so a crash can never pass silently.
Usage: test_summary.py BUILDDIR [BUILDDIR ...]; exits 1 when anything failed."""
import json
import os
import re
import sys

OK = re.compile(r'^ok \d+')
NOT_OK = re.compile(r'^not ok \d+')


def main():
    passed = failed = skipped = 0
    for build in sys.argv[1:]:
        log = os.path.join(build, 'meson-logs', 'testlog.json')
        if not os.path.exists(log):
            print(f'{build}: no test log (did the build fail?)')
            failed += 1
            continue
        for line in open(log):
            t = json.loads(line)
            out = t.get('stdout') or ''
            p = f = s = 0
            for l in out.splitlines():
                if NOT_OK.match(l):
                    f += 1
                elif OK.match(l):
                    if '# SKIP' in l:
                        s += 1
                    else:
                        p += 1
            # meson's log does not say which tests speak TAP: any `ok`/`not ok` line means it did.
            if (p + f + s) == 0:
                p, f, s = (1, 0, 0) if t['result'] == 'OK' else (0, 0, 1) if t['result'] == 'SKIP' else (0, 1, 0)
            elif t['result'] not in ('OK', 'SKIP') and f == 0:
                f = 1  # crashed after its last `ok`
            print(f"{os.path.basename(build.rstrip('/'))}: {t['name']}: {p} passed, {f} failed"
                  + (f', {s} skipped' if s else ''))
            passed, failed, skipped = passed + p, failed + f, skipped + s
    print(f'{passed} passed, {failed} failed' + (f', {skipped} skipped' if skipped else ''))
    return 1 if failed else 0


sys.exit(main())
