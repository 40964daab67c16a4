#!/usr/bin/env python3
"""The SIGTERM drain against clients that leave: every request the engine still runs is waited
for and freed, attached to a connection or not, and kvd exits 0 with a clean log (under the ASan
build LeakSanitizer would report a leaked request, and the loop would hold handles)."""
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from daemon import Daemon, Tap  # noqa: E402

KVD, SHARED = sys.argv[1], sys.argv[2]
MODEL = os.path.join(SHARED, 'models', 'stories260K.gguf')


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def clean_log(d):
    log = d.read_log()
    check('ERROR: AddressSanitizer' not in log and 'LeakSanitizer' not in log
          and 'runtime error' not in log and 'handles still open' not in log
          and '<6>kvd: stopped' in log, log[-3000:])


def t_client_leaves_during_drain():
    d = Daemon(KVD, MODEL)
    p = d.connect()
    q = d.connect()
    ids = [p.send_request('generate', dict(prompt='Once upon a time', max_tokens=400,
                                           temperature=0, stream=True)) for _ in range(3)]
    q.send_request('generate', dict(prompt='One day', max_tokens=300, temperature=0))
    time.sleep(0.3)
    d.proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    p.close()  # leaves while the drain waits for its three requests
    q.close()
    try:
        rc = d.proc.wait(120)
    except Exception:
        d.proc.kill()
        rc = None
    check(rc == 0, f'kvd exited with {rc}: {d.read_log()[-3000:]}')
    clean_log(d)
    check(len(ids) == 3, ids)


def t_client_leaves_before_drain_with_session():
    d = Daemon(KVD, MODEL)
    p = d.connect()
    sid = p.call("session.open")['session']
    p.send_request('generate', dict(prompt='Once upon a time', max_tokens=400, temperature=0,
                                    session=sid))
    time.sleep(0.3)
    p.close()
    d.proc.send_signal(signal.SIGTERM)
    try:
        rc = d.proc.wait(120)
    except Exception:
        d.proc.kill()
        rc = None
    check(rc == 0, f'kvd exited with {rc}: {d.read_log()[-3000:]}')
    clean_log(d)


def main():
    tap = Tap()
    if not os.path.exists(MODEL):
        tap.skip('drain', 'models not found')
        return tap.done()
    tap.run('a client leaving during the drain: kvd waits, frees, exits 0',
            t_client_leaves_during_drain)
    tap.run('a busy session whose client left, then SIGTERM: exits 0',
            t_client_leaves_before_drain_with_session)
    return tap.done()


sys.exit(main())
