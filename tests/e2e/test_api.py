#!/usr/bin/env python3
"""The server answers what ipc/api.json says (issue 9): every method of protocol 1 is called on
the real daemon, on its success paths and on the error paths each method documents, and
everything kvd sends back is checked against api.json by the connection itself (daemon.connect:
tests/ipc/api_check.py), so a missing, undeclared, nil or mistyped key fails the subtest that
read it. What api.json says only in words (state values, `default`) is checked here.
Usage: test_api.py KVD SHARED_DIR"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from daemon import Daemon, Tap, peer  # noqa: E402

KVD, SHARED = sys.argv[1], sys.argv[2]
MODEL = os.path.join(SHARED, 'models', 'stories260K.gguf')
STATES = ('queued', 'prefill', 'decode')  # status.requests[].state


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def fails_with(code, fn, *args, **kw):
    try:
        r = fn(*args, **kw)
    except peer.KvdError as e:
        check(e.code == code, f'wanted error {code}, got {e.code}: {e.message}')
        return
    raise AssertionError(f'wanted error {code}, got {r!r}')


def t_hello(d):
    with d.connect() as p:
        r = p.call('hello', protocol=1, client='test_api')
        check(r['protocol'] == 1 and r['model'] == 'stories260K', r)
        check(p.call('hello', protocol=7)['protocol'] == 1, 'a newer client gets protocol 1')


def t_models(d):
    with d.connect() as p:
        r = p.call('models.load', path=MODEL, name='second', timeout=120)
        try:
            check(r['name'] == 'second', r)
            models = p.call('models.list')['models']
            check(sorted(m['name'] for m in models) == ['second', 'stories260K'], models)
            # "The first model loaded becomes the default."
            check(p.call('hello', protocol=1).get('model') == 'stories260K', 'hello: default')
            gen = p.send_request('generate', dict(prompt='Once', max_tokens=200))
            with d.connect() as q:
                running = q.call('status')['requests']
            p.call('cancel', id=gen)
            p.wait(gen, timeout=60)
            check([x['model'] for x in running] == ['stories260K'],
                  f'a generate naming no model runs on the default: {running}')
            check([m['name'] for m in models if m.get('default')] == ['stories260K'],
                  f'models.list: exactly the first model loaded is the default: {models}')
            fails_with(peer.E_EXIST, p.call, 'models.load', path=MODEL, name='second',
                       timeout=120)
            fails_with(6, p.call, 'models.load', path='/nonexistent/x.gguf')
        finally:
            check(p.call('models.unload', name='second') == {'name': 'second'}, 'unload')
        fails_with(peer.E_NO_MODEL, p.call, 'models.unload', name='second')


def t_tokens(d):
    with d.connect() as p:
        toks = p.call('tokenize', text='Once upon a time', add_special=False,
                      parse_special=True)['tokens']
        check(p.call('detokenize', tokens=toks)['text'].strip() == 'Once upon a time', toks)
        fails_with(7, p.call, 'detokenize', tokens=[1 << 30])
        fails_with(peer.E_NO_MODEL, p.call, 'tokenize', text='x', model='nope')


def t_generate(d):
    with d.connect() as p:
        r = p.call('generate', prompt='Once upon a time', temperature=0, max_tokens=4,
                   logprobs=2, seed=1, stop=['zzz'], top_k=10, top_p=0.9, min_p=0.0,
                   repeat_penalty=1.1, frequency_penalty=0.1, presence_penalty=0.1)
        check(r['finish_reason'] == 'length' and len(r['logprobs']) == 4, r)
        r, chunks = p.generate(prompt='Once upon a time', temperature=0, max_tokens=4,
                               logprobs=2)
        check(r['text'] == '' and chunks, (r, chunks))
        try:
            r = p.call('generate', messages=[{'role': 'user', 'content': 'Hi'}], max_tokens=4)
            check(r['finish_reason'] in ('stop', 'length'), r)
        except peer.KvdError as e:  # a model without a chat template may refuse; the code is
            check(e.code in (110, 2), e)  # still checked against generate's errors
        fails_with(peer.E_CONTEXT, p.call, 'generate', prompt='Once upon a time ' * 600,
                   overflow='error')
        fails_with(peer.E_INVAL, p.call, 'generate', prompt='x', top_k=-1)


def t_cancel(d):
    with d.connect() as p:
        msgid = p.send_request('generate', dict(prompt='Once', max_tokens=500, stream=True))
        p.read_message(timeout=60)
        check(p.call('cancel', id=msgid)['cancelled'] is True, 'cancel')
        check(p.wait(msgid, timeout=60).result['finish_reason'] == 'cancelled', 'cancelled')
        check(p.call('cancel', id=msgid)['cancelled'] is False, 'cancel after the end')


def t_sessions(d):
    with d.connect() as p:
        s = p.call('session.open')['session']
        p.call('generate', session=s, prompt='Once upon a time', temperature=0, max_tokens=4)
        f = p.call('session.fork', session=s)['session']
        check(f != s, (s, f))
        r = p.call('generate', session=f, prompt=' Lily', temperature=0, max_tokens=4)
        check(r['cached_tokens'] > 0, r)
        check(p.call('session.close', session=f) == {'session': f}, 'close')
        check(p.call('session.close', session=s) == {'session': s}, 'close')
        fails_with(6, p.call, 'session.close', session=s)
        fails_with(6, p.call, 'session.fork', session=s)
        fails_with(peer.E_NO_MODEL, p.call, 'session.open', model='nope')


def t_status_while_busy(d):
    """With --max-seqs 1 a second generate waits: status must show it `queued` (not `prefill`:
    `running` counts prefill and decode), with every key api.json lists."""
    with d.connect() as p:
        ids = [p.send_request('generate', dict(prompt='Once upon a time', max_tokens=300,
                                                temperature=0)) for _ in range(3)]
        seen = set()
        wrong = []
        with d.connect() as q:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not ({'queued', 'decode'} <= seen):
                st = q.call('status')
                if not st['requests'] and seen:
                    break  # all three ran
                for r in st['requests']:
                    if r.get('state') not in STATES:
                        wrong.append(f'state {r.get("state")!r}: {r}')
                    seen.add(r.get('state'))
                    if r.get('state') == 'prefill' and st['running'] == 0:
                        wrong.append(f'a request in prefill while running is 0: {st}')
                time.sleep(0.01)
        for i in ids:
            p.wait(i, timeout=120)
        if 'queued' not in seen:
            wrong.insert(0, f'no request was ever shown queued (states seen: {sorted(seen)})')
        check(not wrong, f'{len(wrong)} problems: ' + '\n'.join(wrong[:2]))


def main():
    tap = Tap()
    if not os.path.exists(MODEL):
        tap.skip('api', 'models not found')
        return tap.done()
    d = Daemon(KVD, MODEL, '--max-seqs', '1')
    for name, fn in [('hello', t_hello), ('models.load, models.list, models.unload', t_models),
                     ('tokenize, detokenize', t_tokens), ('generate and generate.chunk',
                                                          t_generate),
                     ('cancel', t_cancel), ('session.open, session.fork, session.close',
                                            t_sessions),
                     ('status while requests run and wait', t_status_while_busy)]:
        tap.run(name, fn, d)
    tap.run('kvd exits 0', lambda: check(d.stop() == 0, d.read_log()[-3000:]))
    # KVD_CHECK_RESULTS (tests/meson.build): kvd itself checked every result it sent.
    tap.run('kvd found no drift in its own results',
            lambda: check('api drift' not in d.read_log(), d.read_log()[-3000:]))
    # Without a model: hello has no model, models.list is empty, generate names the error.
    e = Daemon(KVD, None)
    with e.connect() as p:
        def no_model():
            r = p.call('hello', protocol=1)
            check(r.get('model') is None, r)
            check(p.call('models.list')['models'] == [], 'no models')
            fails_with(peer.E_NO_MODEL, p.call, 'generate', prompt='x')
            st = p.call('status')
            check(st['models'] == [] and st['requests'] == [], st)
        tap.run('no model loaded', no_model)
    tap.run('kvd without a model exits 0', lambda: check(e.stop() == 0, e.read_log()[-3000:]))
    return tap.done()


sys.exit(main())
