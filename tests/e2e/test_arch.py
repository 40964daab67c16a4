#!/usr/bin/env python3
"""Modern families through the real daemon: each synthetic model of ../shared/models/arch (random
weights in the converters' layout, references from llama.cpp, see its README.md) is loaded with
models.load, its prompts tokenize to the reference ids, and greedy generation gives the
reference ids up to the case's first near-tie (where the top-1/top-2 gap is under 0.05, random
weights make the choice a coin toss). Every family there must load: kvd runs them all.
Usage: test_arch.py KVD SHARED_DIR"""
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from daemon import Daemon, Tap, peer  # noqa: E402

KVD, SHARED = sys.argv[1], sys.argv[2]
ARCH = os.path.join(SHARED, 'models', 'arch')
# Reference caveat (README.md there): llama.cpp's Q8_0 path quantizes activations too, so its
# greedy ids hold only up to where that moves the choice; kvd computes on exact values, and from
# there on the float64 cross-check's choice is the one to match (see expected_ids).
CROSSCHECK = {'llama3_q8_0'}
SANITIZED = os.environ.get('KVD_SANITIZED') == '1'  # tests/meson.build: the ASan build


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def expected_ids(name, c):
    """The greedy ids kvd must produce, and how many of them are meaningful: up to the first
    near-tie; for a CROSSCHECK model, llama.cpp's ids up to the first step where the exact
    float64 pass chose differently, then that choice (the sequences part there)."""
    want = list(c['generated_ids'])
    upto = c.get('min_gap_step', len(want)) if c['min_top1_top2_gap'] < 0.05 else len(want)
    if name in CROSSCHECK:
        dis = c['float64_crosscheck']['argmax_disagreements']
        if dis:
            s = min(x['step'] for x in dis)
            first = next(x for x in dis if x['step'] == s)
            if s < upto and first['float64_gap'] >= 0.05:
                want[s] = first['float64_argmax']
                upto = s + 1
            else:
                upto = min(upto, s)
    return want, upto


def run_family(d, name):
    ref = json.load(open(os.path.join(ARCH, name + '.json')))
    with d.connect() as p:
        p.call('models.load', path=os.path.join(ARCH, name + '.gguf'), name=name, timeout=300)
        try:
            for k, c in enumerate(ref['cases']):
                toks = p.call('tokenize', text=c['prompt'], model=name)['tokens']
                check(toks == c['prompt_ids'], f'{name}: tokens {toks[:12]} vs {c["prompt_ids"][:12]}')
                # Every case's prompt tokenizes right; generation runs for the first one under
                # the sanitizers (their CPU cost on these vocabularies), for all otherwise.
                if SANITIZED and k > 0:
                    continue
                _, chunks = p.generate(prompt=c['prompt'], model=name, temperature=0,
                                       max_tokens=len(c['generated_ids']), timeout=300)
                ids = [i for ch in chunks for i in ch.get('tokens', [])]
                want, upto = expected_ids(name, c)
                check(upto > 0 and ids[:upto] == want[:upto],
                      f'{name}: {c["prompt"][:30]!r}: ids {ids[:upto]} vs {want[:upto]}')
        finally:
            p.call('models.unload', name=name)
    return None


def windowed_generation_is_bounded():
    """mistral_swa reads the last 64 positions in every layer: on a pool of 6 blocks (96 tokens)
    a generation runs far past 96 tokens, holding at most window / block + 2 blocks."""
    d = Daemon(KVD, os.path.join(ARCH, 'mistral_swa.gguf'), '--kv-budget', '96K')
    try:
        with d.connect() as p:
            kv = p.call('status')['kv']
            cap = kv['blocks_total'] * kv['block_tokens']
            check(kv['blocks_total'] <= 6, f'pool of {kv["blocks_total"]} blocks')
            res, _ = p.generate(prompt='Once upon a time', temperature=0, max_tokens=2 * cap,
                                timeout=600)
            kv = p.call('status')['kv']
            check(res['completion_tokens'] > cap,
                  f'{res["completion_tokens"]} tokens ({res["finish_reason"]}) on {cap} slots')
            check(kv['high_water'] <= 64 // kv['block_tokens'] + 2, f'high water {kv}')
            check(kv['alloc_failures'] == 0 and kv['preemptions'] == 0, f'{kv}')
    finally:
        check(d.stop() == 0, d.read_log()[-2000:])


KVD_EINVAL = 2  # wire code (PROTOCOL.md)


def chat_template_override_and_warning(d):
    """A file whose chat template kvd does not recognise loads with a warning in models.list and
    kvctl models; chat_template at load overrides what the file says; a bad name is refused."""
    build = os.path.join(os.path.dirname(os.path.abspath(KVD)), '..')
    tmp = tempfile.mkdtemp(prefix='kvd-chat-')
    path = os.path.join(tmp, 'odd.gguf')
    subprocess.run([os.path.join(build, 'tools', 'gen_model'), '--dim', '32', '--layers', '1',
                    '--heads', '4', '--kv-heads', '2', '--ffn', '64', '--chat-template',
                    "{% for m in messages %}USER SAYS: {{ m['content'] }}{% endfor %}",
                    '--out', path], check=True, timeout=60, capture_output=True)
    with d.connect() as p:
        p.call('models.load', path=path, name='odd', timeout=120)
        p.call('models.load', path=path, name='odd_chatml', chat_template='chatml', timeout=120)
        try:
            p.call('models.load', path=path, name='odd_bad', chat_template='jinja2', timeout=120)
            check(False, 'an unknown chat_template was accepted')
        except peer.KvdError as e:
            check(e.code == KVD_EINVAL and 'chatml' in e.message and 'jinja2' not in e.message,
                  f'{e}')
        models = {m['name']: m for m in p.call('models.list')['models']}
        odd, forced = models['odd'], models['odd_chatml']
        check(odd['chat_template'] == 'plain' and
              odd['chat_template_source'] == 'unrecognised chat template' and
              'not recognised' in odd.get('chat_template_warning', ''), f'{odd}')
        check(forced['chat_template'] == 'chatml' and forced['chat_template_source'] == 'override'
              and 'chat_template_warning' not in forced, f'{forced}')
        out = subprocess.run([os.path.join(build, 'client', 'kvctl'), '-s', d.socket, 'models'],
                             capture_output=True, text=True, timeout=60)
        check(out.returncode == 0 and 'odd: the model' in out.stderr, out.stderr)
        # The override is what messages go through: ChatML's markers are in the prompt.
        r = p.call('generate', model='odd_chatml', messages=[{'role': 'user', 'content': 'hi'}],
                   max_tokens=1, temperature=0, timeout=120)
        r0 = p.call('generate', model='odd', messages=[{'role': 'user', 'content': 'hi'}],
                    max_tokens=1, temperature=0, timeout=120)
        check(r['prompt_tokens'] > r0['prompt_tokens'], f'{r} vs {r0}')
        for n in ('odd', 'odd_chatml'):
            p.call('models.unload', name=n)


def qwen3_thinking_switch(d):
    """Qwen3's template (forced: the synthetic file has none) with thinking off opens the answer
    with an empty think block: the prompt grows by exactly those tokens."""
    with d.connect() as p:
        p.call('models.load', path=os.path.join(ARCH, 'qwen3.gguf'), name='q3', chat_template='qwen3',
               timeout=300)
        msgs = [{'role': 'user', 'content': 'Hello there'}]
        on = p.call('generate', model='q3', messages=msgs, max_tokens=1, temperature=0, timeout=300)
        off = p.call('generate', model='q3', messages=msgs, max_tokens=1, temperature=0,
                     thinking=False, timeout=300)
        block = p.call('tokenize', model='q3', text='<think>\n\n</think>\n\n', add_special=False,
                       parse_special=True)['tokens']
        check(off['prompt_tokens'] == on['prompt_tokens'] + len(block), f'{on} {off} {block}')
        p.call('models.unload', name='q3')


def kv_types_per_model(d):
    """models.load's kv_type: each model stores its KV as asked, models.list and status say so,
    a token costs 2x / ~3.8x / ~7x fewer bytes than f32 (head size 64), and a bad name is
    refused. The f16 default already ran every reference above; q8_0 keeps qwen3's first case
    to its first near-tie."""
    path = os.path.join(ARCH, 'qwen3.gguf')
    ref = json.load(open(os.path.join(ARCH, 'qwen3.json')))
    with d.connect() as p:
        for t in ('f32', 'f16', 'q8_0', 'q4_0'):
            p.call('models.load', path=path, name='kv_' + t, kv_type=t, timeout=300)
        try:
            p.call('models.load', path=path, name='kv_bad', kv_type='q2_k', timeout=300)
            check(False, 'kv_type q2_k was accepted')
        except peer.KvdError as e:
            check(e.code == KVD_EINVAL, f'{e}')
        models = {m['name']: m for m in p.call('models.list')['models']}
        bpt = {t: models['kv_' + t]['kv_bytes_per_token'] for t in ('f32', 'f16', 'q8_0', 'q4_0')}
        for t in bpt:
            check(models['kv_' + t]['kv_type'] == t, f'{models["kv_" + t]}')
        check(bpt['f32'] == 2 * bpt['f16'] and 3.7 < bpt['f32'] / bpt['q8_0'] < 3.8 and
              7.0 < bpt['f32'] / bpt['q4_0'] < 7.2, f'{bpt}')
        check(p.call('status')['kv']['kv_type'] == 'mixed', 'status kv_type')
        c = ref['cases'][0]
        _, chunks = p.generate(prompt=c['prompt'], model='kv_q8_0', temperature=0,
                               max_tokens=len(c['generated_ids']), timeout=300)
        ids = [i for ch in chunks for i in ch.get('tokens', [])]
        want, upto = expected_ids('qwen3', c)
        check(ids[:upto] == want[:upto], f'q8_0 KV: {ids[:upto]} vs {want[:upto]}')
        for t in bpt:
            p.call('models.unload', name='kv_' + t)


def main():
    tap = Tap()
    if not os.path.isdir(ARCH):
        tap.skip('arch', 'models/arch not found')
        return tap.done()
    d = Daemon(KVD, None)
    for f in sorted(os.listdir(ARCH)):
        if not f.endswith('.gguf'):
            continue
        name = f[:-5]
        tap.run(f'{name} loads and matches its reference', run_family, d, name)
    tap.run('chat_template: override at load, warning for an unrecognised one',
            chat_template_override_and_warning, d)
    tap.run('qwen3: thinking off opens the answer with an empty think block',
            qwen3_thinking_switch, d)
    tap.run('kv_type per model: stored, reported, priced, refused when unknown',
            kv_types_per_model, d)
    if not SANITIZED:
        tap.run('a windowed model gives back the blocks before its window',
                windowed_generation_is_bounded)
    rc = d.stop()
    tap.run('kvd exits 0 with no api drift', lambda: check(rc == 0 and 'api drift' not in
                                                           d.read_log(), d.read_log()[-2000:]))
    return tap.done()


sys.exit(main())
