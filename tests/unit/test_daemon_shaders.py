#!/usr/bin/env python3
"""kvd carries no test-only kernel: the SPIR-V of every test-only variant (shaders/meson.build,
test_shader_variants) must be absent from the daemon binary, and that of a daemon variant present
(so the search is known to work). Bytes are searched directly (no nm/strings, works on a stripped
binary): embed.py stores each module as uint32_t words, in the host's byte order.

Usage: test_daemon_shaders.py KVD --present NAME=FILE.spv ... --absent NAME=FILE.spv ..."""
import sys


def forms(data):
    """The module's bytes as a little- and a big-endian host stores the embedded words."""
    swapped = b''.join(data[i:i + 4][::-1] for i in range(0, len(data), 4))
    return (data, swapped)


def main():
    binary = open(sys.argv[1], 'rb').read()
    checks, want = [], None
    for a in sys.argv[2:]:
        if a in ('--present', '--absent'):
            want = a == '--present'
            continue
        name, path = a.split('=', 1)
        checks.append((name, open(path, 'rb').read(), want))
    print('TAP version 13')
    print(f'1..{len(checks)}')
    failed = 0
    for i, (name, data, want) in enumerate(checks, 1):
        found = any(f in binary for f in forms(data))
        ok = found == want
        failed += not ok
        what = 'embedded in kvd' if want else 'not in kvd'
        print(f'{"ok" if ok else "not ok"} {i} - {name} {what}')
        if not ok:
            print(f'# {name}: expected {"present" if want else "absent"}, found '
                  f'{"present" if found else "absent"} ({sys.argv[1]})')
    return 1 if failed else 0


sys.exit(main())
