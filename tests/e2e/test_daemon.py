#!/usr/bin/env python3
"""End-to-end: the real kvd daemon on lavapipe with the real stories260K model, driven through a
msgpack-rpc client written from ipc/PROTOCOL.md alone (python3-msgpack, independent of the C codec).
Usage: test_daemon.py KVD KVCTL SHARED_DIR"""
import json
import os
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
from daemon import Daemon, Tap, peer  # noqa: E402

KVD, KVCTL, SHARED = sys.argv[1], sys.argv[2], sys.argv[3]
MODEL = os.path.join(SHARED, 'models', 'stories260K.gguf')
REF = json.load(open(os.path.join(SHARED, 'models', 'stories260K.reference.json')))
CASE = next(c for c in REF['cases'] if c['prompt'] == 'Once upon a time')
WANT = CASE['text'][len(CASE['prompt']):]  # the reference continuation
N_WANT = len(CASE['generated_ids'])
GREEDY = dict(temperature=0, max_tokens=N_WANT)


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def t_hello(d):
    with d.connect() as p:
        r = p.call('hello', protocol=1, client='e2e')
        check(r['protocol'] == 1, r)
        check('stream' in r['capabilities'] and r['model'] == 'stories260K', r)


def t_reference_text(d):
    with d.connect() as p:
        r = p.call('generate', prompt='Once upon a time', timeout=120, **GREEDY)
        check(r['text'] == WANT, f'got {r["text"]!r}\nwant {WANT!r}')
        check(r['completion_tokens'] == N_WANT and r['prompt_tokens'] == 5, r)


def t_streaming_equals_whole(d):
    with d.connect() as p:
        r, chunks = p.generate(prompt='The cat sat on the mat. Tom', temperature=0, max_tokens=30)
        whole = p.call('generate', prompt='The cat sat on the mat. Tom', temperature=0,
                       max_tokens=30)
        check(r['text'] == '', r)
        check(''.join(c['text'] for c in chunks) == whole['text'], (chunks, whole))
        check(sum(len(c.get('tokens', [])) for c in chunks) == whole['completion_tokens'], chunks)


def t_kvctl_prints_reference(d):
    out = subprocess.run([KVCTL, '--socket', d.socket, '--temperature', '0', '--max-tokens',
                          str(N_WANT), 'Once upon a time'], capture_output=True, timeout=120)
    check(out.returncode == 0, out)
    text = out.stdout.decode()
    check(text.rstrip('\n') == WANT.rstrip('\n'), f'kvctl printed {text!r}')


def t_tokenize(d):
    with d.connect() as p:
        r = p.call('tokenize', text='The cat sat on the mat. Tom')
        check(r['tokens'] == [1, 291, 280, 294, 262, 294, 353, 265, 284, 294, 426, 274, 287], r)
        back = p.call('detokenize', tokens=r['tokens'][1:])
        check(back['text'].strip() == 'The cat sat on the mat. Tom', back)


def model_stats(p):
    return p.call('status')['models'][0]


def t_session_prefills_only_new_tokens(d):
    with d.connect() as p:
        s = p.call('session.open')['session']
        r1 = p.call('generate', session=s, prompt='Once upon a time', temperature=0, max_tokens=8)
        before = model_stats(p)['prefill_tokens']
        r2 = p.call('generate', session=s, prompt=' Lily', temperature=0, max_tokens=4)
        after = model_stats(p)['prefill_tokens']
        new = r2['prompt_tokens']
        # turn two runs its own prompt plus the one sampled-but-unrun token of turn one
        check(after - before == new + 1, (before, after, r2))
        check(r2['cached_tokens'] == r1['prompt_tokens'] + r1['completion_tokens'] - 1, (r1, r2))
        p.call('session.close', session=s)


def t_sixteen_clients(d):
    prompts = [f'Once upon a time there was a {w}' for w in
               ['cat', 'dog', 'bird', 'girl', 'boy', 'tree', 'ball', 'car', 'sun', 'moon',
                'fish', 'frog', 'king', 'cake', 'bear', 'duck']]
    solo = {}
    with d.connect() as p:
        for q in prompts:
            solo[q] = p.call('generate', prompt=q, temperature=0, max_tokens=12)['text']
    got = {}
    errors = []

    def client(q):
        try:
            with d.connect() as p:
                got[q] = p.call('generate', prompt=q, temperature=0, max_tokens=12,
                                timeout=300)['text']
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))
    ths = [threading.Thread(target=client, args=(q,)) for q in prompts]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    check(not errors, errors)
    for q in prompts:
        check(got[q] == solo[q], (q, got[q], solo[q]))
    with d.connect() as p:
        check(model_stats(p)['batch_tokens_max'] > 1, 'requests never shared a step')


def wait_idle(d, timeout=30):
    deadline = time.monotonic() + timeout
    with d.connect() as p:
        while True:
            st = p.call('status')
            if st['kv']['blocks_used'] == 0 and st['running'] == 0 and not st['requests']:
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f'blocks still held: {st["kv"]}')
            time.sleep(0.05)


def t_client_killed_mid_stream_frees_blocks(d):
    p = d.connect()
    msgid = p.send_request('generate', dict(prompt='Once upon a time', max_tokens=1500,
                                            temperature=0, stream=True))
    for _ in range(3):
        m = p.read_message(timeout=60)
        check(m.kind == peer.NOTIFICATION and m.params['id'] == msgid, m)
    with d.connect() as q:
        check(q.call('status')['kv']['blocks_used'] > 0, 'the stream holds no blocks?')
    p.sock.shutdown(socket.SHUT_RDWR)
    p.close()
    wait_idle(d)


def t_cancel(d):
    with d.connect() as p:
        msgid = p.send_request('generate', dict(prompt='Once', max_tokens=1500, stream=True,
                                                temperature=0))
        p.read_message(timeout=60)
        check(p.call('cancel', id=msgid)['cancelled'] is True, 'cancel')
        m = p.wait(msgid, timeout=60)
        check(m.error is None and m.result['finish_reason'] == 'cancelled', m)
        check(m.result['completion_tokens'] < 1500, m)
    wait_idle(d)


def t_stop_strings_never_sent(d):
    with d.connect() as p:
        r, chunks = p.generate(prompt='Once upon a time', temperature=0, max_tokens=60,
                               stop=['girl'])
        text = ''.join(c['text'] for c in chunks)
        check(r['finish_reason'] == 'stop', r)
        check(text == WANT[:WANT.index('girl')], text)


def t_logprobs(d):
    with d.connect() as p:
        r = p.call('generate', prompt='Once upon a time', temperature=0, max_tokens=6,
                   logprobs=3)
        lps = r['logprobs']
        check(len(lps) == 6, lps)
        for lp, want_id in zip(lps, CASE['generated_ids']):
            check(lp['id'] == want_id and len(lp['top']) == 3, lp)
            check(lp['top'][0]['id'] == lp['id'] and lp['logprob'] <= 0, lp)
            check(abs(lp['top'][0]['logprob'] - lp['logprob']) < 1e-6, lp)


def t_bad_input_keeps_serving(d):
    def still_ok():
        with d.connect() as p:
            check(p.call('tokenize', text='a')['tokens'][0] == 1, 'daemon stopped answering')
    # not msgpack at all: the connection is closed, the daemon carries on
    with d.connect() as p:
        p.send_raw(b'\xc1\xc1\xc1')
        try:
            p.read_message(timeout=10)
            raise AssertionError('expected the connection to close')
        except ConnectionError:
            pass
    still_ok()
    # a request-shaped array with a bad method: an error response, and the connection goes on
    with d.connect() as p:
        p.send_raw(peer._pack([0, 7, 5, []]))
        m = p.wait(7, timeout=10)
        check(m.error is not None and m.error['code'] == 3, m)
        check(p.call('tokenize', text='a')['tokens'][0] == 1, 'same connection still works')
        try:
            p.call('no.such.method')
            raise AssertionError('unknown method accepted')
        except peer.KvdError as e:
            check(e.code == 111, e)
        try:
            p.call('generate', prompt='x', max_tokens='ten')
            raise AssertionError('bad param accepted')
        except peer.KvdError as e:
            check(e.code == 2 and 'max_tokens' in e.message, e)
        try:
            p.call('generate', prompt='x' * (800 * 1024))
            raise AssertionError('oversized prompt accepted')
        except peer.KvdError as e:
            check(e.code == 12, e)
        try:
            p.call('generate', prompt='Once upon a time ' * 600, max_tokens=4, overflow='error')
            raise AssertionError('prompt past the context accepted')
        except peer.KvdError as e:
            check(e.code == 113, e)
    # a truncated frame and a vanished client
    with d.connect() as p:
        p.send_raw(peer._pack([0, 9, 'generate', [{'prompt': 'hello there'}]])[:-4])
    # a frame over the 1 MiB limit, announced by its header: the connection is closed
    with d.connect() as p:
        p.send_raw(b'\x94\x00\x01\xa8generate\x91\x81\xa6prompt\xdb' + (4 << 20).to_bytes(4, 'big'))
        try:
            p.read_message(timeout=10)
            raise AssertionError('expected the connection to close')
        except ConnectionError:
            pass
    still_ok()
    wait_idle(d)


def t_drain_on_sigterm(d):
    p = d.connect()
    msgid = p.send_request('generate', dict(prompt='Once upon a time', max_tokens=20,
                                            temperature=0))
    time.sleep(0.2)
    rc = d.stop()
    m = p.wait(msgid, timeout=60)
    check(m.error is None and m.result['text'] == WANT[:len(m.result['text'])], m)
    check(rc == 0, f'kvd exited with {rc}')


def main():
    tap = Tap()
    if not os.path.exists(MODEL):
        tap.skip('daemon', 'models not found')
        return tap.done()
    d = Daemon(KVD, MODEL)
    for name, fn in [('hello', t_hello), ('reference text', t_reference_text),
                     ('streaming equals whole', t_streaming_equals_whole),
                     ('kvctl prints the reference', t_kvctl_prints_reference),
                     ('tokenize', t_tokenize),
                     ('session prefills only new tokens', t_session_prefills_only_new_tokens),
                     ('16 clients equal solo', t_sixteen_clients),
                     ('killed client frees its blocks', t_client_killed_mid_stream_frees_blocks),
                     ('cancel', t_cancel), ('stop strings', t_stop_strings_never_sent),
                     ('logprobs', t_logprobs), ('bad input keeps serving', t_bad_input_keeps_serving),
                     ('drain on SIGTERM', t_drain_on_sigterm)]:
        tap.run(name, fn, d)
    d.stop()
    log = d.read_log()
    tap.run('no validation errors or sanitizer reports in the daemon log',
            lambda: check('validation error' not in log and 'ERROR: AddressSanitizer' not in log
                          and 'runtime error' not in log and 'LeakSanitizer' not in log
                          and 'api drift' not in log  # kvd checks its own results (tests)
                          and 'handles still open' not in log  # uv_loop_close() must return 0
                          and '<6>kvd: stopped' in log, log[-3000:]))
    return tap.done()


sys.exit(main())
