#!/usr/bin/env python3
"""What `meson install` lays down, checked in a DESTDIR (no root, nothing outside a temporary
folder): the programs, libkvd, the man pages, the systemd units and the sysusers.d file, each where
the configured prefix says; and the installed kvctl loads the libkvd installed beside it with no
LD_LIBRARY_PATH (its rpath; issue 9: a custom prefix left kvctl unable to find libkvd.so.0).
Usage: test_install.py MESON BUILDDIR PREFIX BINDIR LIBDIR MANDIR (MESON: the meson that
configured BUILDDIR, which meson.build's find_program('meson') names)"""
import os
import shutil
import subprocess
import sys
import tempfile

from tap import Tap, check

MESON, BUILD, PREFIX, BINDIR, LIBDIR, MANDIR = sys.argv[1:7]


def under(root, d):
    """root/PREFIX/d, or root/d when the option is an absolute path."""
    return os.path.join(root, os.path.join(PREFIX, d).lstrip('/'))


def clean_env():
    env = dict(os.environ)
    env.pop('LD_LIBRARY_PATH', None)
    env.pop('LD_PRELOAD', None)  # the test preload lives in the build tree: not part of the install
    return env


def install(root):
    out = subprocess.run([MESON, 'install', '-C', BUILD, '--destdir', root, '--no-rebuild',
                          '--quiet'], capture_output=True, text=True, timeout=300, env=clean_env())
    check(out.returncode == 0, f'meson install: rc {out.returncode}\n{out.stdout}{out.stderr}')


def t_layout(root):
    bindir, libdir, man1 = under(root, BINDIR), under(root, LIBDIR), under(root, MANDIR + '/man1')
    lib = under(root, 'lib')
    want = [os.path.join(bindir, 'kvd'), os.path.join(bindir, 'kvctl'),
            os.path.join(libdir, 'libkvd.so.0'), os.path.join(man1, 'kvd.1'),
            os.path.join(man1, 'kvctl.1'), os.path.join(lib, 'sysusers.d', 'kvd.conf')]
    for kind in ('system', 'user'):
        for unit in ('kvd.service', 'kvd.socket'):
            want.append(os.path.join(lib, 'systemd', kind, unit))
    missing = [p[len(root):] for p in want if not os.path.isfile(p)]
    check(not missing, 'not installed: ' + ' '.join(missing))


def t_kvctl_finds_libkvd(root):
    kvctl = os.path.join(under(root, BINDIR), 'kvctl')
    env = clean_env()
    out = subprocess.run([kvctl, '--version'], capture_output=True, text=True, timeout=60, env=env)
    check(out.returncode == 0 and out.stdout.startswith('kvctl '),
          f'installed kvctl --version: rc {out.returncode}\n{out.stdout}{out.stderr}')
    # ...and the libkvd it loaded is the one installed with it, not some other copy.
    ldd = subprocess.run(['ldd', kvctl], capture_output=True, text=True, timeout=60, env=env)
    line = [l for l in ldd.stdout.splitlines() if 'libkvd.so.0' in l]
    want = os.path.realpath(os.path.join(under(root, LIBDIR), 'libkvd.so.0'))
    got = line[0].split('=>')[1].split('(')[0].strip() if line and '=>' in line[0] else ''
    check(got and os.path.realpath(got) == want, f'libkvd.so.0 resolved to {got!r}, not {want}:\n'
          + ldd.stdout)


def t_kvd_runs(root):
    kvd = os.path.join(under(root, BINDIR), 'kvd')
    out = subprocess.run([kvd, '--version'], capture_output=True, text=True, timeout=60,
                         env=clean_env())
    check(out.returncode == 0 and out.stdout.startswith('kvd '),
          f'installed kvd --version: rc {out.returncode}\n{out.stdout}{out.stderr}')


def main():
    tap = Tap()
    root = tempfile.mkdtemp(prefix='kvd-destdir-')
    try:
        tap.run('meson install --destdir', install, root)
        tap.run('installed layout', t_layout, root)
        if PREFIX.rstrip('/') in ('', '/usr'):
            tap.skip('installed kvctl loads the installed libkvd',
                     'prefix /usr: libkvd is in the loader\'s own folders, no rpath wanted',
                     missing_tool=False)
        else:
            tap.run('installed kvctl loads the installed libkvd', t_kvctl_finds_libkvd, root)
        tap.run('installed kvd runs', t_kvd_runs, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return tap.done()


sys.exit(main())
