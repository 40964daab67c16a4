#!/usr/bin/env python3
"""Sessions that last (issue 13) through the daemon: session.save writes a session, a daemon
restarted after SIGTERM and, separately, after SIGKILL restores it on a new connection and its
next turn gives the same greedy text as the unbroken session; session.list / session.delete;
files of another model or KV type, truncated or tampered ones are refused with their codes and
the daemon keeps serving; idle sessions go to the host tier when the pool is short and come back
exactly; `kvctl chat --session NAME` resumes a conversation. Every reply is checked against
api.json by the connection.
Usage: test_sessions.py KVD KVCTL SHARED_DIR"""
import os
import shutil
import signal
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from daemon import Daemon, Tap, peer  # noqa: E402

KVD, KVCTL, SHARED = sys.argv[1], sys.argv[2], sys.argv[3]
MODEL = os.path.join(SHARED, 'models', 'stories260K.gguf')
OTHER = os.path.join(SHARED, 'models', 'stories260K-f16.gguf')
KVD_EINVAL, KVD_ENOENT, KVD_E_MISMATCH, KVD_E_CORRUPT = 2, 6, 115, 116
SESS = tempfile.mkdtemp(prefix='kvd-sessions-')
TURN1 = 'Once upon a time there was a little girl named Lily. She liked to play'
TURN2 = ' One day her mother said'


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def start(*extra, model=MODEL):
    return Daemon(KVD, model, '--sessions-dir', SESS, *extra)


def gen(p, s, prompt, n=40):
    return p.call('generate', session=s, prompt=prompt, temperature=0, max_tokens=n,
                  timeout=120)


def expect_error(code, fn, *args, **kw):
    try:
        fn(*args, **kw)
    except peer.KvdError as e:
        check(e.code == code, f'wanted code {code}, got {e.code}: {e.message}')
        return e
    raise AssertionError(f'no error (wanted {code})')


def saved_conversation(name, stop):
    """Turn 1, save, turn 2 on the same (unbroken) session; the daemon then ends by `stop`.
    Returns turn 2's text."""
    d = start()
    try:
        with d.connect() as p:
            s = p.call('session.open')['session']
            gen(p, s, TURN1)
            r = p.call('session.save', session=s, name=name)
            check(r['name'] == name and r['tokens'] > 40 and r['kv_bytes'] > 0, r)
            check(os.path.getsize(os.path.join(SESS, name + '.kvs')) == r['bytes'], r)
            want = gen(p, s, TURN2)['text']
            if stop == 'kill':
                d.proc.send_signal(signal.SIGKILL)
                d.proc.wait()
    finally:
        d.stop()
    return want


def restored_turn(name):
    d = start()
    try:
        with d.connect() as p:
            r = p.call('session.restore', name=name)
            check(r['tokens'] > 40 and r['model'] == 'stories260K', r)
            got = gen(p, r['session'], TURN2)
            # its history came back from the file: nothing of turn 1 was recomputed
            check(got['cached_tokens'] >= r['tokens'] - 1, got)
            return got['text']
    finally:
        check(d.stop() == 0, 'kvd did not exit cleanly')


def t_restart_after_sigterm():
    want = saved_conversation('term', 'term')
    check(restored_turn('term') == want, 'restored session diverged')


def t_restart_after_sigkill():
    want = saved_conversation('kill', 'kill')
    check(restored_turn('kill') == want, 'restored session diverged')


def t_list_delete_and_bad_names(d):
    with d.connect() as p:
        s = p.call('session.open')['session']
        gen(p, s, TURN1, 8)
        p.call('session.save', session=s, name='listed')
        got = {x['name']: x for x in p.call('session.list')['sessions']}
        check('listed' in got and got['listed']['loadable'] and got['listed']['kv_type'] == 'f16',
              got)
        check(got['listed']['model'] == 'stories260K' and got['listed']['tokens'] > 8, got)
        for bad in ('', '.hidden', '../escape', 'a/b', 'x' * 65, 'sp ace'):
            expect_error(KVD_EINVAL, p.call, 'session.save', session=s, name=bad)
            expect_error(KVD_EINVAL, p.call, 'session.restore', name=bad)
        expect_error(KVD_ENOENT, p.call, 'session.save', session=999, name='nope')
        expect_error(KVD_ENOENT, p.call, 'session.restore', name='never-saved')
        check(p.call('session.delete', name='listed')['name'] == 'listed', 'delete')
        expect_error(KVD_ENOENT, p.call, 'session.delete', name='listed')
        expect_error(KVD_ENOENT, p.call, 'session.restore', name='listed')
        # a restored session on another connection of the same daemon, then saved over
        s2 = p.call('session.open')['session']
        gen(p, s2, TURN1, 8)
        p.call('session.save', session=s2, name='again')
        p.call('session.save', session=s2, name='again')
        with d.connect() as q:
            r = q.call('session.restore', name='again')
            check(gen(q, r['session'], TURN2, 4)['finish_reason'] == 'length', r)


def t_corrupt_and_foreign_files_are_refused(d):
    base = os.path.join(SESS, 'good.kvs')
    with d.connect() as p:
        s = p.call('session.open')['session']
        gen(p, s, TURN1, 8)
        p.call('session.save', session=s, name='good')
    data = open(base, 'rb').read()
    cases = {'truncated': data[:len(data) // 2], 'tampered': bytearray(data),
             'empty': b'', 'garbage': os.urandom(400), 'short-header': data[:100],
             'long': data + b'\0'}
    cases['tampered'][len(data) // 2] ^= 0x40
    for name, blob in cases.items():
        with open(os.path.join(SESS, name + '.kvs'), 'wb') as f:
            f.write(bytes(blob))
    with d.connect() as p:
        for name in cases:
            e = expect_error(KVD_E_CORRUPT, p.call, 'session.restore', name=name)
            check('\x00' not in e.message, e.message)
        # nothing was opened, the daemon serves on
        r = p.call('session.restore', name='good')
        check(gen(p, r['session'], TURN2, 4)['completion_tokens'] == 4, r)
    # another model file, another KV type: refused with the reason
    other = Daemon(KVD, OTHER, '--sessions-dir', SESS)
    try:
        with other.connect() as p:
            e = expect_error(KVD_E_MISMATCH, p.call, 'session.restore', name='good')
            check('another model' in e.message, e.message)
            listed = {x['name']: x for x in p.call('session.list')['sessions']}
            check(not listed['good']['loadable'], listed)
    finally:
        other.stop()
    q8 = start('--kv-type', 'q8_0')
    try:
        with q8.connect() as p:
            e = expect_error(KVD_E_MISMATCH, p.call, 'session.restore', name='good')
            check('KV type' in e.message, e.message)
            check(p.call('generate', prompt='Once', max_tokens=2)['completion_tokens'] == 2, 'q8')
    finally:
        q8.stop()


def t_kvctl_chat_resumes():
    d = start()
    try:
        env = dict(os.environ, KVD_SOCKET=d.socket)
        run = lambda inp, *a: subprocess.run(  # noqa: E731
            [KVCTL, '--socket', d.socket, 'chat', '--max-tokens', '12', '--temperature', '0',
             *a], input=inp, capture_output=True, text=True, timeout=120, env=env)
        first = run('Hello\n', '--session', 'desk')
        check(first.returncode == 0, first.stderr)
        check(os.path.exists(os.path.join(SESS, 'desk.kvs')), 'kvctl chat did not save')
        again = run('Tell me more\n', '--session', 'desk')
        check(again.returncode == 0 and 'resumed' in again.stderr, again.stderr)
        ls = subprocess.run([KVCTL, '--socket', d.socket, 'sessions'], capture_output=True,
                            text=True, timeout=60)
        check(ls.returncode == 0 and 'desk' in ls.stdout and 'stories260K' in ls.stdout, ls)
        rm = subprocess.run([KVCTL, '--socket', d.socket, 'sessions', 'rm', 'desk'],
                            capture_output=True, text=True, timeout=60)
        check(rm.returncode == 0 and not os.path.exists(os.path.join(SESS, 'desk.kvs')), rm)
        rm = subprocess.run([KVCTL, '--socket', d.socket, 'sessions', 'rm', 'desk'],
                            capture_output=True, text=True, timeout=60)
        check(rm.returncode == 1 and 'no saved session' in rm.stderr, rm)
    finally:
        d.stop()


def t_disk_tier_serves_a_prompt_after_restart():
    """A 400-token prompt, the daemon stopped (SIGTERM: the prefix cache goes to the disk tier)
    and started again on the same cache folder: the prompt starts from the disk tier, with the
    same output and a far shorter time to first token; a torn block file is dropped, not used."""
    cache = tempfile.mkdtemp(prefix='kvd-disk-')
    story = ('Once upon a time there was a little girl named Lily. She liked to play in the '
             'park with her dog. ')

    def one(extra=()):
        d = Daemon(KVD, MODEL, '--cache-dir', cache, '--sessions-dir', SESS, *extra)
        try:
            with d.connect() as p:
                text = story
                while len(p.call('tokenize', text=text)['tokens']) < 400:
                    text += story
                r = p.call('generate', prompt=text, temperature=0, max_tokens=24, timeout=120)
                st = p.call('status')['kv']
        finally:
            check(d.stop() == 0, 'kvd did not exit cleanly')
        return r, st

    try:
        cold, _ = one()
        check(cold['cached_tokens'] == 0, cold)
        warm, st = one()
        print(f"# cold ttft {cold['timings']['ttft_ms']:.0f} ms, from disk "
              f"{warm['timings']['ttft_ms']:.0f} ms ({warm['cached_tokens']} tokens, "
              f"{st['disk_hits']} blocks)", flush=True)
        check(warm['text'] == cold['text'], (warm['text'], cold['text']))
        check(warm['cached_tokens'] >= 384 and st['disk_hits'] >= 24, (warm, st))
        check(warm['timings']['ttft_ms'] < cold['timings']['ttft_ms'] / 2, (warm, cold))
        # torn files: every block file cut short; all are dropped, the output is unchanged
        n = 0
        for root, _, files in os.walk(os.path.join(cache, 'kv')):
            for f in files:
                if f.endswith('.kvb'):
                    path = os.path.join(root, f)
                    data = open(path, 'rb').read()
                    with open(path, 'r+b') as fh:
                        fh.seek(len(data) // 2)
                        fh.write(bytes([data[len(data) // 2] ^ 0xff]))
                    n += 1
        check(n >= 24, f'{n} block files')
        again, st = one()
        check(again['text'] == cold['text'] and st['disk_hits'] == 0, (again, st))
        # another KV type never reads them
        other, st = one(('--kv-type', 'q8_0'))
        check(other['cached_tokens'] == 0 and st['disk_hits'] == 0, (other, st))
    finally:
        shutil.rmtree(cache, ignore_errors=True)


tap = Tap()
if not os.path.exists(MODEL):
    tap.skip('sessions', 'stories260K.gguf not found')
    sys.exit(tap.done())
tap.run('save, SIGTERM, restart, restore: the next turn is the unbroken one', t_restart_after_sigterm)
tap.run('save, SIGKILL, restart, restore: the next turn is the unbroken one', t_restart_after_sigkill)
d = start()
try:
    tap.run('session.list, session.delete, bad names', t_list_delete_and_bad_names, d)
    tap.run('corrupt and foreign session files are refused', t_corrupt_and_foreign_files_are_refused,
            d)
finally:
    d.stop()
tap.run('kvctl chat --session resumes a conversation', t_kvctl_chat_resumes)
tap.run('a restarted daemon serves a prompt seen before from the disk tier',
        t_disk_tier_serves_a_prompt_after_restart)
shutil.rmtree(SESS, ignore_errors=True)
sys.exit(tap.done())
