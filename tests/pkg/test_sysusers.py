#!/usr/bin/env python3
"""The system service's user, group and folders exist: the sysusers.d file declares the User=,
Group= and SocketGroup= the system units name (systemd-sysusers accepts it and would create
them), and each folder the service writes is one systemd makes for it. Usage:
test_sysusers.py SOURCE_ROOT UNIT_BUILD_DIR"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

from tap import Tap, check

SRC, UNITS = sys.argv[1:3]
CONF = os.path.join(SRC, 'daemon', 'systemd', 'system', 'kvd.sysusers.conf')


def unit(name):
    return open(os.path.join(UNITS, 'system', name)).read()


def key(text, k):
    return [v.strip() for v in re.findall(r'^' + k + r'=(.*)$', text, re.M)]


def declared():
    users, groups = {}, set()
    for line in open(CONF):
        f = re.findall(r'"[^"]*"|\S+', line.split('#')[0] if not line.lstrip().startswith('#') else '')
        if not f:
            continue
        if f[0] == 'g':
            groups.add(f[1])
        elif f[0] == 'u':
            gid = f[2].split(':')[1] if ':' in f[2] else f[1]  # `u name -` makes group name too
            users[f[1]] = gid
            groups.add(gid)
    return users, groups


def t_declares_unit_accounts():
    users, groups = declared()
    svc, sock = unit('kvd.service'), unit('kvd.socket')
    for u in key(svc, 'User'):
        check(u in users, f'User={u}: not declared in {CONF}')
    for g in key(svc, 'Group') + key(sock, 'SocketGroup'):
        check(g in groups, f'group {g}: not declared in {CONF}')
    for u in key(svc, 'User'):
        for g in key(svc, 'Group'):
            check(users[u] == g, f'user {u}\'s primary group is {users[u]}, the unit says {g}')


def t_sysusers_dry_run():
    root = tempfile.mkdtemp(prefix='kvd-sysusers-')
    try:
        os.makedirs(os.path.join(root, 'etc'))
        # The file on stdin: with --root a path would be looked up inside the root.
        out = subprocess.run(['systemd-sysusers', '--dry-run', f'--root={root}', '-'],
                             input=open(CONF).read(), capture_output=True, text=True, timeout=60)
        text = out.stdout + out.stderr
        check(out.returncode == 0, f'systemd-sysusers: rc {out.returncode}\n{text}')
        check(re.search(r"Creating group '?kvd'?", text) and re.search(r"Creating user '?kvd'?", text),
              f'systemd-sysusers would not create user and group kvd:\n{text}')
        check('ignoring' not in text.lower() and 'failed' not in text.lower(), text)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def t_folders():
    svc, sock = unit('kvd.service'), unit('kvd.socket')
    # The socket's folder is the service's RuntimeDirectory: without Preserve, systemd deletes it
    # (and the socket kvd.socket still listens on) every time the service stops.
    runtime = key(svc, 'RuntimeDirectory')
    for path in key(sock, 'ListenStream'):
        d = os.path.dirname(path)
        if d.startswith('/run/') and d[5:] in runtime:
            check(key(svc, 'RuntimeDirectoryPreserve') == ['yes'],
                  f'RuntimeDirectory={d[5:]} holds {path}: it needs RuntimeDirectoryPreserve=yes')
    # kvd's pipeline cache goes where CacheDirectory= makes a folder the service may write
    # (ProtectSystem=strict leaves the kvd user's home unwritable).
    exec_start = ' '.join(key(svc, 'ExecStart'))
    for c in key(svc, 'CacheDirectory'):
        check(re.search(r'--cache-dir[ =](%C|/var/cache)/' + re.escape(c) + r'(\s|$)', exec_start),
              f'CacheDirectory={c} but ExecStart does not pass --cache-dir %C/{c}: {exec_start}')


def main():
    tap = Tap()
    tap.run('sysusers.d declares the system units\' user and groups', t_declares_unit_accounts)
    if shutil.which('systemd-sysusers'):
        tap.run('systemd-sysusers --dry-run accepts it', t_sysusers_dry_run)
    else:
        tap.skip('systemd-sysusers --dry-run accepts it', 'systemd-sysusers not installed')
    tap.run('the system service\'s folders are systemd\'s', t_folders)
    return tap.done()


sys.exit(main())
