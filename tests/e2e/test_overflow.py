#!/usr/bin/env python3
"""Past the context through the daemon (issue 12), on stories260K-f16.gguf (context 512): a
450-token prompt with max_tokens 300 runs to the model's end of text or to 300 tokens, never cut
by the context; a prompt over the context runs under shift and window and is refused with the
numbers under error; a 30-turn session never errors, nor does `kvctl chat` (which says once that
old turns are forgotten); models.list reports the policy and the shifts. Every reply is checked
against api.json by the connection.
Usage: test_overflow.py KVD KVCTL SHARED_DIR"""
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from daemon import Daemon, Tap, peer  # noqa: E402

KVD, KVCTL, SHARED = sys.argv[1], sys.argv[2], sys.argv[3]
MODEL = os.path.join(SHARED, 'models', 'stories260K-f16.gguf')
N_CTX = 512
KVD_E_CONTEXT = 113
STORY = ('Once upon a time there was a little girl named Lily. She liked to play in the park '
         'with her dog. One day the sun was hot and they sat under a big tree. ')


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def prompt_of(p, n):
    """A text of about n tokens (BOS included)."""
    text = ''
    while len(p.call('tokenize', text=text)['tokens']) < n:
        text += STORY
    return text


def model_stats(p):
    return p.call('models.list')['models'][0]


def t_450_prompt_runs_past_the_context(d):
    with d.connect() as p:
        text = prompt_of(p, 450)
        # both at once (batched in the same steps); sanitizer builds generate less, still past
        # the context
        want = 100 if os.environ.get('KVD_SANITIZED') else 300
        ids = {pol: p.send_request('generate', dict(prompt=text, temperature=0, max_tokens=want,
                                                    overflow=pol))
               for pol in ('shift', 'window')}
        for pol, msgid in ids.items():
            m = p.wait(msgid, timeout=300)
            check(m.error is None, m)
            r = m.result
            n = r['prompt_tokens'] + r['completion_tokens']
            print(f"# {pol}: {r['prompt_tokens']} + {r['completion_tokens']} tokens, "
                  f"{r['finish_reason']}, {r.get('context_shifts', 0)} shifts", flush=True)
            check(r['finish_reason'] in ('stop', 'length'), r)
            # to 300 tokens, or the model's own end of text; past the context either way
            check(r['completion_tokens'] == want or r['finish_reason'] == 'stop', r)
            if n > N_CTX + 1:
                check(r.get('context_shifts', 0) >= 1, r)
        # the wall, asked for: cut at the context
        r = p.call('generate', prompt=text, temperature=0, max_tokens=300, overflow='error',
                   timeout=300)
        check(r['prompt_tokens'] + r['completion_tokens'] <= N_CTX and 'context_shifts' not in r, r)
        st = model_stats(p)
        check(st['overflow'] == 'shift' and st['context_shifts'] >= 1, st)


def t_prompt_over_the_context(d):
    with d.connect() as p:
        text = prompt_of(p, 1300)
        for pol in ('shift', 'window'):
            r = p.call('generate', prompt=text, temperature=0, max_tokens=20, overflow=pol,
                       timeout=300)
            check(r['prompt_tokens'] >= 1300 and r['context_shifts'] >= 1, r)
            check(r['finish_reason'] in ('stop', 'length'), r)
        try:
            p.call('generate', prompt=text, max_tokens=4, overflow='error')
            raise AssertionError('prompt past the context accepted under error')
        except peer.KvdError as e:
            check(e.code == KVD_E_CONTEXT and 'exceeds the context of 512' in e.message, e)
        for bad in ({'overflow': 'wrap'}, {'overflow': 7}, {'keep': -1}, {'sinks': 'x'}):
            try:
                p.call('generate', prompt='Once', max_tokens=2, **bad)
                raise AssertionError(f'{bad} accepted')
            except peer.KvdError as e:
                check(e.code == 2, e)


def t_thirty_turn_session(d):
    with d.connect() as p:
        s = p.call('session.open')['session']
        shifts = 0
        for turn in range(30):
            r = p.call('generate', session=s, prompt=f' Turn {turn}. ' + STORY, max_tokens=12,
                       temperature=0.8, seed=turn, timeout=120)
            check(r['finish_reason'] in ('stop', 'length'), (turn, r))
            shifts += r.get('context_shifts', 0)
        print(f'# 30 turns, {shifts} shifts', flush=True)
        check(shifts >= 2, shifts)
        p.call('session.close', session=s)


def t_kvctl_chat_never_stops(d):
    lines = ''.join(f'Tell me about day {i}. {STORY}\n' for i in range(30))
    out = subprocess.run([KVCTL, '--socket', d.socket, '-n', '10', '--seed', '1', 'chat'],
                         input=lines, capture_output=True, text=True, timeout=600)
    check(out.returncode == 0, out.stderr[-2000:])
    check(out.stderr.count('oldest turns are being forgotten') == 1, out.stderr[-2000:])
    check('exceeds the context' not in out.stderr, out.stderr[-2000:])


def main():
    tap = Tap()
    if not os.path.exists(MODEL):
        tap.skip('overflow', 'models not found')
        return tap.done()
    d = Daemon(KVD, MODEL)
    for name, fn in [('a 450-token prompt with max_tokens 300 runs past the context',
                      t_450_prompt_runs_past_the_context),
                     ('a prompt over the context: chunks under shift/window, refused under error',
                      t_prompt_over_the_context),
                     ('a 30-turn session never errors', t_thirty_turn_session),
                     ('kvctl chat never stops for a full context', t_kvctl_chat_never_stops)]:
        tap.run(name, fn, d)
    d.stop()
    log = d.read_log()
    tap.run('no validation errors or sanitizer reports in the daemon log',
            lambda: check('validation error' not in log and 'ERROR: AddressSanitizer' not in log
                          and 'runtime error' not in log and 'LeakSanitizer' not in log
                          and 'api drift' not in log and '<6>kvd: stopped' in log, log[-3000:]))
    return tap.done()


sys.exit(main())
