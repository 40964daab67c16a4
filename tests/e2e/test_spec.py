#!/usr/bin/env python3
"""Speculative decoding through the daemon: stories260K drafted for by its own q4_0 quantization
(--draft-model). The text is that of decoding one token at a time under every mode, greedy and
seeded; the result's timings count the drafts; models.list and status sum them per model
(checked against api.json, status's models too); a bad mode, draft without a draft model and a
draft of another vocabulary are refused with their typed errors, and the daemon goes on serving.
kvctl --speculative draft prints the same text and, with -v, the counts.
Usage: test_spec.py KVD KVCTL SHARED_DIR"""
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from daemon import Daemon, Tap, api_checker, peer  # noqa: E402

KVD, KVCTL, SHARED = sys.argv[1], sys.argv[2], sys.argv[3]
MODEL = os.path.join(SHARED, 'models', 'stories260K.gguf')
DRAFT = os.path.join(SHARED, 'models', 'quant', 'stories260K-q4_0.gguf')
GEN_MODEL = os.path.join(os.path.dirname(os.path.abspath(KVD)), '..', 'tools', 'gen_model')
MODES = ('off', 'lookup', 'draft', 'auto')
PROMPT = 'Once upon a time'
KVD_E_UNSUPPORTED, KVD_E_MISMATCH = 109, 115  # wire codes (PROTOCOL.md)


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def fails_with(code, fn, *args, **kw):
    try:
        r = fn(*args, **kw)
    except peer.KvdError as e:
        check(e.code == code, f'wanted error {code}, got {e.code}: {e.message}')
        return e
    raise AssertionError(f'wanted error {code}, got {r!r}')


def generate(p, mode, **kw):
    args = dict(prompt=PROMPT, max_tokens=60, timeout=120)
    args.update(kw)
    if mode is not None:
        args['speculative'] = mode
    return p.call('generate', **args)


def t_greedy_same_text(d):
    with d.connect() as p:
        got = {m: generate(p, m, temperature=0) for m in MODES}
        texts = {m: r['text'] for m, r in got.items()}
        check(len(set(texts.values())) == 1 and texts['off'], texts)
        check(all(r['completion_tokens'] == got['off']['completion_tokens']
                  for r in got.values()), got)
        for m, r in got.items():
            t = r['timings']
            print(f"# {m}: drafted {t['draft_tokens']}, accepted {t['accepted_tokens']}",
                  flush=True)
        # the daemon's default (--speculative auto) gives that text too
        check(generate(p, None, temperature=0)['text'] == texts['off'], 'default mode')


def t_timings_count_drafts(d):
    with d.connect() as p:
        t = generate(p, 'draft', temperature=0)['timings']
        check(t['draft_tokens'] > 0 and 0 <= t['accepted_tokens'] <= t['draft_tokens'], t)
        t = generate(p, 'off', temperature=0)['timings']
        check(t['draft_tokens'] == 0 and t['accepted_tokens'] == 0, t)


def t_seeded_same_text(d):
    with d.connect() as p:
        texts = {m: generate(p, m, temperature=0.9, seed=7)['text']
                 for m in ('off', 'draft', 'lookup')}
        check(len(set(texts.values())) == 1 and texts['off'], texts)
        # and streamed: the chunks add up to the same text
        r, chunks = p.generate(prompt=PROMPT, max_tokens=60, temperature=0.9, seed=7,
                               speculative='draft')
        check(r['text'] == '' and r['timings']['draft_tokens'] > 0, r)
        chunks = [c['text'] for c in chunks]
        check(''.join(chunks) == texts['off'], (chunks, texts['off']))


def t_status_reports_speculation(d):
    with d.connect() as p:
        st = p.call('status')
        models = st['models']
        # status.models is declared as models.list describes it: check it that way
        problems = api_checker().result('models.list', {'models': models})
        check(not problems, problems)
        spec = models[0]['speculative']
        check(spec['drafted'] > 0 and 0 <= spec['accepted'] <= spec['drafted'], spec)
        check(spec['draft_drafted'] > 0 and spec['draft_model'] == 'stories260K-q4_0', spec)
        check(spec['drafted'] == spec['lookup_drafted'] + spec['draft_drafted'], spec)
        check(abs(spec['acceptance'] - spec['accepted'] / spec['drafted']) < 1e-9, spec)
        check(spec['steps'] > 0, spec)
        kv = models[0]['draft_kv']
        check(kv['blocks_total'] == st['kv']['blocks_total'] and kv['block_tokens'] == 16, kv)
        listed = p.call('models.list')['models'][0]
        check(listed['speculative']['draft_model'] == 'stories260K-q4_0', listed)


def t_bad_mode(d):
    with d.connect() as p:
        for bad in ('bogus', 'DRAFT', '', 'draft\x00'):
            e = fails_with(peer.E_INVAL, generate, p, bad)
            check("'speculative' must be auto, off, lookup or draft" in e.message, e)
            check('bogus' not in e.message and 'DRAFT' not in e.message, e)  # never echoed
        fails_with(peer.E_INVAL, p.call, 'generate', prompt=PROMPT, speculative=3)
        check(generate(p, 'auto', temperature=0, max_tokens=4)['completion_tokens'] == 4,
              'still serving')


def t_no_draft_model(d):
    e = Daemon(KVD, MODEL)
    try:
        with e.connect() as p:
            err = fails_with(KVD_E_UNSUPPORTED, generate, p, 'draft')
            check('stories260K has no draft model' in err.message, err)
            r = generate(p, 'auto', temperature=0)
            check(r['timings']['draft_tokens'] >= 0 and r['completion_tokens'] == 60, r)
            st = p.call('models.list')['models'][0]
            check('draft_model' not in st['speculative'] and 'draft_kv' not in st, st)
    finally:
        check(e.stop() == 0, e.read_log()[-2000:])


def t_draft_of_another_vocabulary(d, tmp):
    """Refused whole: the model named is not loaded either, and the daemon goes on."""
    v600 = os.path.join(tmp, 'v600.gguf')
    v512 = os.path.join(tmp, 'v512.gguf')  # stories260K's count, other strings
    subprocess.run([GEN_MODEL, '--vocab', '600', '--out', v600], check=True, timeout=60,
                   capture_output=True)
    subprocess.run([GEN_MODEL, '--vocab', '512', '--out', v512], check=True, timeout=60,
                   capture_output=True)
    with d.connect() as p:
        for path, what in ((v600, 'vocabulary of 600 tokens'), (v512, 'differs')):
            err = fails_with(KVD_E_MISMATCH, p.call, 'models.load', path=MODEL, name='spec2',
                             draft=path, timeout=120)
            check(what in err.message, err)
        check([m['name'] for m in p.call('models.list')['models']] == ['stories260K'],
              'nothing loaded')
        fails_with(peer.E_INVAL, p.call, 'models.load', path=MODEL, name='spec2',
                   draft='relative.gguf')
        fails_with(peer.E_INVAL, p.call, 'models.load', path=MODEL, name='spec2', draft=7)
        # a good one loads, and says what drafts for it
        r = p.call('models.load', path=MODEL, name='spec2', draft=DRAFT, timeout=120)
        check(r.get('draft_model') == 'stories260K-q4_0', r)
        want = generate(p, 'off', temperature=0)['text']
        got = generate(p, 'draft', temperature=0, model='spec2')
        check(got['text'] == want and got['timings']['draft_tokens'] > 0, got)
        p.call('models.unload', name='spec2')


def t_kvctl(d):
    want = None
    with d.connect() as p:
        want = generate(p, 'off', temperature=0)['text']
    out = subprocess.run([KVCTL, '--socket', d.socket, '--raw', '-t', '0', '-n', '60',
                          '--speculative', 'draft', '-v', PROMPT],
                         capture_output=True, text=True, timeout=120)
    check(out.returncode == 0, out.stderr)
    check(out.stdout.rstrip('\n') == want.rstrip('\n'), (out.stdout, want))
    check('drafted ' in out.stderr and 'accepted ' in out.stderr, out.stderr)
    out = subprocess.run([KVCTL, '--socket', d.socket, '--speculative', 'sometimes', PROMPT],
                         capture_output=True, text=True, timeout=60)
    check(out.returncode == 2 and 'auto, off, lookup or draft' in out.stderr, out)
    out = subprocess.run([KVCTL, '--socket', d.socket, 'status'], capture_output=True, text=True,
                         timeout=60)
    check(out.returncode == 0 and 'draft stories260K-q4_0' in out.stdout, out.stdout)


def main():
    tap = Tap()
    if not (os.path.exists(MODEL) and os.path.exists(DRAFT)):
        tap.skip('spec', 'models not found')
        return tap.done()
    tmp = tempfile.mkdtemp(prefix='kvd-spec-')
    d = Daemon(KVD, MODEL, '--draft-model', DRAFT)
    for name, fn in [('greedy text is the same under off, lookup, draft, auto', t_greedy_same_text),
                     ('timings count drafted and accepted tokens', t_timings_count_drafts),
                     ('seeded sampling gives the same text under off, draft, lookup',
                      t_seeded_same_text),
                     ('status and models.list report speculation', t_status_reports_speculation),
                     ('a bad speculative mode is invalid params', t_bad_mode),
                     ('draft without a draft model is unsupported', t_no_draft_model),
                     ('kvctl --speculative draft', t_kvctl)]:
        tap.run(name, fn, d)
    tap.run('a draft of another vocabulary is refused', t_draft_of_another_vocabulary, d, tmp)
    tap.run('kvd exits 0', lambda: check(d.stop() == 0, d.read_log()[-3000:]))
    # KVD_CHECK_RESULTS (tests/meson.build): kvd itself checked every result it sent.
    tap.run('kvd found no drift in its own results',
            lambda: check('api drift' not in d.read_log(), d.read_log()[-3000:]))
    return tap.done()


sys.exit(main())
