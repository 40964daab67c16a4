#!/usr/bin/env python3
"""systemd integration: the unit files pass `systemd-analyze verify` (with its man page check: the
pages Documentation= names are the ones this tree installs), the real daemon starts under
`systemd-socket-activate` on the socket it is handed, and it reports READY=1 and STOPPING=1 over
$NOTIFY_SOCKET (sd_notify). Usage: test_systemd.py KVD UNIT_BUILD_DIR SHARED_DIR"""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from daemon import Tap, connect  # noqa: E402

KVD, UNITS, SHARED = os.path.abspath(sys.argv[1]), sys.argv[2], sys.argv[3]
MODEL = os.path.join(SHARED, 'models', 'stories260K.gguf')
CI = os.environ.get('CI') == 'true'


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def verify(kind):
    tmp = tempfile.mkdtemp(prefix='kvd-units-')
    for unit in ('kvd.service', 'kvd.socket'):
        text = open(os.path.join(UNITS, kind, unit)).read()
        # verify checks that ExecStart exists: point it at the binary under test
        text = re.sub(r'^ExecStart=\S+', f'ExecStart={KVD}', text, flags=re.M)
        open(os.path.join(tmp, unit), 'w').write(text)
    args = ['systemd-analyze', 'verify']
    env = dict(os.environ)
    if shutil.which('man') or CI:
        # Documentation=man:kvd(1) must name a page: MANPATH holds the ones meson installs.
        src = os.environ.get('MESON_SOURCE_ROOT', os.path.join(os.path.dirname(__file__), '..', '..'))
        man1 = os.path.join(tmp, 'man', 'man1')
        os.makedirs(man1)
        for page in ('daemon/kvd.1', 'client/kvctl.1'):
            shutil.copy(os.path.join(src, page), man1)
        env['MANPATH'] = os.path.join(tmp, 'man')
    else:
        args.append('--man=no')  # no man(1) here (man-db): the pages are checked by tests/pkg
    if kind == 'user':
        args.insert(1, '--user')
    run_dir = tempfile.mkdtemp(prefix='kvd-run-')  # a user manager needs $XDG_RUNTIME_DIR
    out = subprocess.run(args + [os.path.join(tmp, 'kvd.socket'), os.path.join(tmp, 'kvd.service')],
                         capture_output=True, text=True, timeout=60,
                         env=dict(env, XDG_RUNTIME_DIR=run_dir))
    # Only findings about our files count: the host's own units may carry unrelated warnings.
    ours = [l for l in (out.stdout + out.stderr).splitlines() if tmp in l]
    check(out.returncode == 0 and not ours, f'rc {out.returncode}: {out.stdout}{out.stderr}')


def t_socket_activation_and_notify():
    tmp = tempfile.mkdtemp(prefix='kvd-sd-')
    sock_path = os.path.join(tmp, 'kvd.sock')
    notify_path = os.path.join(tmp, 'notify')
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(notify_path)
    ns.settimeout(60)
    env = dict(os.environ, NOTIFY_SOCKET=notify_path)
    log = open(os.path.join(tmp, 'log'), 'wb')
    # --socket names a path nobody listens on: kvd must use the descriptor it is handed instead.
    # systemd-socket-activate passes on only the variables it is told to.
    # The sanitizer settings and the test preload (tests/support/keep_loaded.c) must reach kvd too,
    # or an ASan build reports lavapipe's unloaded globals as leaks and exits non-zero.
    passed = []
    for var in ('LD_PRELOAD', 'ASAN_OPTIONS', 'UBSAN_OPTIONS', 'LSAN_OPTIONS', 'VK_ICD_FILENAMES',
                'VK_DRIVER_FILES', 'VK_INSTANCE_LAYERS', 'KVD_VALIDATE', 'CI'):
        if var in os.environ:
            passed += ['-E', f'{var}={os.environ[var]}']
    proc = subprocess.Popen(['systemd-socket-activate', '-l', sock_path, *passed,
                             '-E', f'NOTIFY_SOCKET={notify_path}', KVD, '--model', MODEL,
                             '--socket', os.path.join(tmp, 'unused.sock'), '--config', '/dev/null',
                             '--cache-dir', os.path.join(tmp, 'cache')],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 30
        while True:  # the path appears a moment before systemd-socket-activate listens on it
            try:
                p = connect(sock_path, timeout=120)  # checked against api.json
                break
            except OSError:
                check(time.monotonic() < deadline and proc.poll() is None, 'no activation socket')
                time.sleep(0.05)
        # That first connection started kvd (socket activation is lazy).
        with p:
            r = p.call('hello', protocol=1, client='systemd-test', timeout=120)
            check(r['model'] == 'stories260K', r)
            text = p.call('generate', prompt='Once upon a time', temperature=0, max_tokens=4)
            check(text['text'] == ', there was a', text)
        msgs = []
        while not any('READY=1' in m for m in msgs):
            msgs.append(ns.recv(4096).decode())
        check(not os.path.exists(os.path.join(tmp, 'unused.sock')), 'kvd bound its own socket')
        proc.send_signal(signal.SIGTERM)
        while not any('STOPPING=1' in m for m in msgs):
            msgs.append(ns.recv(4096).decode())
        check(proc.wait(60) == 0, f'exit status {proc.returncode}')
        out = open(os.path.join(tmp, 'log')).read()
        check('socket systemd passed' in out, out)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    tap = Tap()
    have_tools = shutil.which('systemd-analyze') and shutil.which('systemd-socket-activate')
    if not have_tools and not CI:
        tap.skip('systemd', 'systemd tools not installed')
        return tap.done()
    tap.run('system units pass systemd-analyze verify', verify, 'system')
    tap.run('user units pass systemd-analyze verify', verify, 'user')
    if not os.path.exists(MODEL):
        tap.skip('socket activation', 'model not found')
    else:
        tap.run('socket activation and sd_notify readiness', t_socket_activation_and_notify)
    return tap.done()


sys.exit(main())
