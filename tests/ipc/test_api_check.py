#!/usr/bin/env python3
"""test_api_check.py API_JSON PROTOCOL1_JSON: protocol 1 stays what it was, and the checker that
tests/e2e runs on everything kvd sends finds what it should. Prints TAP. Standard library only.

PROTOCOL1_JSON (tests/ipc/protocol1.json) is api.json's surface as protocol 1 was released,
written once by `api_check.py --freeze ipc/api.json` and never regenerated: api.json may add
methods and optional keys, never remove, retype or re-require what it holds (see
api_check.freeze_problems). The mutation tests make sure a broken api.json is caught, so this
cannot pass by comparing nothing."""
import copy
import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import api_check  # noqa: E402

API_PATH = sys.argv[1] if len(sys.argv) > 1 else None
FROZEN_PATH = sys.argv[2] if len(sys.argv) > 2 else None
TESTS = []


class Skip(Exception):
    pass


def test(fn):
    TESTS.append(fn)
    return fn


def api():
    with open(API_PATH, encoding='utf-8') as f:
        return json.load(f)


def frozen():
    with open(FROZEN_PATH, encoding='utf-8') as f:
        return json.load(f)


def method(a, name):
    return next(m for m in a['methods'] if m['name'] == name)


def key(fields, name):
    return next(f for f in fields if f['name'] == name)


@test
def api_json_keeps_protocol_1():
    problems = api_check.freeze_problems(frozen(), api())
    assert not problems, '\n'.join(problems)


@test
def the_freeze_holds_every_protocol_1_method():
    f = frozen()
    assert f['protocol'] == 1, f['protocol']
    names = set(f['methods'])
    for m in ('hello', 'status', 'models.list', 'models.load', 'models.unload', 'generate',
              'generate.chunk', 'cancel', 'tokenize', 'detokenize', 'session.open',
              'session.close', 'session.fork'):
        assert m in names, m
    assert f['methods']['status']['result']['requests']['fields']['queue_ms'] == \
        {'type': 'float', 'required': True}


# Each mutation of api.json, and a piece of the problem it must produce.
def _drop(fields, name):
    fields.remove(key(fields, name))


BREAKING = [
    ('method removed', lambda a: a['methods'].remove(method(a, 'session.fork')),
     'session.fork: method removed'),
    ('kind changed', lambda a: method(a, 'cancel').update(kind='notification'),
     'cancel: kind request became notification'),
    ('result key removed', lambda a: _drop(method(a, 'models.load')['result'], 'n_ctx'),
     'models.load result.n_ctx: removed'),
    ('result key retyped', lambda a: key(method(a, 'status')['result'], 'uptime_ms')
     .update(type='float'), 'status result.uptime_ms: type uint became float'),
    ('nested key removed',
     lambda a: _drop(key(method(a, 'status')['result'], 'requests')['fields'], 'queue_ms'),
     'status result.requests.queue_ms: removed'),
    ('nested key retyped',
     lambda a: key(key(method(a, 'status')['result'], 'memory')['fields'], 'kv')
     .update(type='str'), 'status result.memory.kv: type uint became str'),
    ('nested key made optional',
     lambda a: key(key(method(a, 'generate')['result'], 'timings')['fields'], 'ttft_ms')
     .update(required=False),
     'generate result.timings.ttft_ms: a result key that was always present became optional'),
    ('required result key made optional',
     lambda a: key(method(a, 'hello')['result'], 'version').pop('required'),
     'hello result.version: a result key that was always present became optional'),
    ('optional result key made required',
     lambda a: key(method(a, 'hello')['result'], 'model').update(required=True),
     'hello result.model: a result key that was optional became required'),
    ('required result key added',
     lambda a: method(a, 'tokenize')['result'].append(
         {'name': 'count', 'type': 'uint', 'required': True, 'doc': 'x'}),
     'tokenize result.count: a key added'),
    ('param removed', lambda a: _drop(method(a, 'generate')['params'], 'top_p'),
     'generate params.top_p: removed'),
    ('param retyped', lambda a: key(method(a, 'generate')['params'], 'seed').update(type='int'),
     'generate params.seed: type uint became int'),
    ('optional param made required',
     lambda a: key(method(a, 'tokenize')['params'], 'model').update(required=True),
     'tokenize params.model: an optional param became required'),
    ('required param added',
     lambda a: method(a, 'status')['params'].append(
         {'name': 'verbose', 'type': 'bool', 'required': True, 'doc': 'x'}),
     'status params.verbose: a key added'),
    ('one_of dropped', lambda a: key(method(a, 'generate')['params'], 'prompt').pop('one_of'),
     'generate params.prompt: one_of input became None'),
    ('notification key removed', lambda a: _drop(method(a, 'generate.chunk')['params'], 'text'),
     'generate.chunk params.text: removed'),
]

ALLOWED = [
    ('method added', lambda a: a['methods'].append(
        {'name': 'models.info', 'kind': 'request', 'since': 1, 'doc': 'x', 'params': [],
         'result': [{'name': 'n', 'type': 'uint', 'required': True, 'doc': 'x'}]})),
    ('optional param added', lambda a: method(a, 'generate')['params'].append(
        {'name': 'typical_p', 'type': 'float', 'doc': 'x'})),
    ('optional result key added', lambda a: method(a, 'tokenize')['result'].append(
        {'name': 'count', 'type': 'uint', 'doc': 'x'})),
    ('required result key since protocol 2', lambda a: method(a, 'tokenize')['result'].append(
        {'name': 'count', 'type': 'uint', 'required': True, 'since': 2, 'doc': 'x'})),
    ('required param made optional',
     lambda a: key(method(a, 'tokenize')['params'], 'text').pop('required')),
    ('nested key added', lambda a: key(method(a, 'status')['result'], 'kv')['fields'].append(
        {'name': 'blocks_pinned', 'type': 'uint', 'required': False, 'doc': 'x'})),
    ('nested key said required explicitly',
     lambda a: key(key(method(a, 'status')['result'], 'memory')['fields'], 'host')
     .update(required=True)),
]


@test
def breaking_changes_are_caught():
    base = api()
    f = frozen()
    for what, mutate, want in BREAKING:
        a = copy.deepcopy(base)
        mutate(a)
        problems = api_check.freeze_problems(f, a)
        assert any(want in p for p in problems), (what, want, problems)


@test
def additions_are_allowed():
    base = api()
    f = frozen()
    for what, mutate in ALLOWED:
        a = copy.deepcopy(base)
        mutate(a)
        problems = api_check.freeze_problems(f, a)
        assert not problems, (what, problems)


@test
def every_declared_type_has_a_check():
    a = api()
    assert set(a['types']) == set(api_check.TYPE_CHECKS), set(a['types']) ^ set(
        api_check.TYPE_CHECKS)

    def walk(fields):
        for x in fields:
            assert x['type'] in a['types'], x
            walk(x.get('fields', []))
    for m in a['methods']:
        walk(m.get('params', []))
        walk(m.get('result', []))


# The checker, on results shaped like kvd's.

def good_status():
    req = {'id': 3, 'model': 'm', 'state': 'decode', 'prompt_tokens': 5, 'completion_tokens': 2,
           'cached_tokens': 0, 'queue_ms': 0.5, 'prefill_ms': 1, 'decode_ms': 2.5,
           'tokens_per_s': 100.0}
    return {'version': '0.1.0', 'uptime_ms': 10, 'connections': 1,
            'devices': [{'index': 0, 'name': 'llvmpipe', 'type': 'cpu', 'memory_total': 1 << 30,
                         'memory_used': 1 << 20}],
            'memory': {'host': 1, 'device': 2, 'weights': 1, 'kv': 1},
            'kv': {'block_tokens': 16, 'blocks_total': 8, 'blocks_used': 1, 'blocks_free': 7,
                   'blocks_cached': 0},
            'queue_depth': 0, 'running': 1, 'models': [{'name': 'm', 'anything': True}],
            'requests': [req]}


def checker():
    return api_check.Checker(API_PATH)


@test
def a_conforming_result_has_no_problems():
    c = checker()
    assert c.result('status', good_status()) == []
    assert c.result('hello', {'protocol': 1, 'version': '0.1.0', 'capabilities': ['stream'],
                              'model': None}) == []  # "absent or nil"
    assert c.result('hello', {'protocol': 1, 'version': '0.1.0', 'capabilities': []}) == []
    assert c.notification('generate.chunk', {'id': 1, 'text': '', 'tokens': [5]}) == []
    assert c.response('tokenize', None, {'tokens': [1, 2]}) == []
    assert c.response('generate', {'code': 113, 'message': 'too long'}, None) == []
    assert c.response(None, {'code': 3, 'message': 'bad'}, None) == []
    assert c.response('status', {'code': 999, 'message': 'odd'}, None) == []


@test
def the_checker_names_each_problem():
    c = checker()
    s = good_status()
    del s['requests'][0]['queue_ms']
    del s['memory']['host']
    s['requests'][0]['state'] = 7
    s['kv']['blocks_free'] = -1
    s['devices'][0]['extra'] = 'x'
    s['uptime_ms'] = None
    del s['running']
    s['future'] = 1
    got = c.result('status', s)
    want = ['status.uptime_ms: nil, but it is always present', 'status.running: missing',
            'status.memory.host: missing', 'status.kv.blocks_free: expected uint, got int -1',
            'status.devices[0].extra: not declared in api.json',
            'status.requests[0].state: expected str, got int 7',
            'status.requests[0].queue_ms: missing', 'status.future: not declared in api.json']
    for w in want:
        assert any(p.startswith(w) for p in got), (w, got)
    assert len(got) == len(want), got
    bad = c.result('generate', {'text': 'x', 'finish_reason': 'stop', 'prompt_tokens': 1,
                                'completion_tokens': True, 'cached_tokens': 0,
                                'timings': {'queue_ms': float('nan'), 'prefill_ms': 1,
                                            'decode_ms': 1, 'ttft_ms': 1, 'tokens_per_s': '1'},
                                'logprobs': [{'id': 1, 'text': 'a', 'logprob': 0.0,
                                              'top': [{'id': 1, 'logprob': 0.0}, 3]}]})
    assert bad == ['generate.completion_tokens: expected uint, got bool True',
                   'generate.timings.queue_ms: expected a finite number, got nan',
                   "generate.timings.tokens_per_s: expected float, got str '1'",
                   'generate.logprobs[0].top[1]: expected map, got int 3'], bad
    assert c.notification('generate.chunk', {'id': 1, 'tokens': [1, 'a']}) == \
        ['generate.chunk.text: missing', "generate.chunk.tokens[1]: expected uint, got str 'a'"]
    assert c.notification('generate', {}) != []
    assert c.notification('nope', {}) != []
    assert c.result('generate.chunk', {}) != []
    assert c.result('no.such.method', {}) != []
    assert c.result('cancel', ['x']) == ["cancel: expected a map, got array of 1"]


@test
def error_objects_are_checked():
    c = checker()
    assert c.response('status', {'code': 2}, None) == ['status error.message: missing']
    assert c.response('status', {'code': 2, 'message': 'x', 'detail': 1}, None) == \
        ['status error.detail: not declared in api.json (int 1)']
    assert c.response('status', {'code': 0, 'message': 'x'}, None) == \
        ['status error.code: 0 is KVD_OK, not an error']
    assert c.response('status', {'code': 555, 'message': 'x'}, None) == \
        ['status error.code: 555 is not in ipc/kvd_error.h']
    got = c.response('tokenize', {'code': 113, 'message': 'x'}, None)
    assert got == ["tokenize error.code: 113 KVD_E_CONTEXT is neither generic nor in "
                   "tokenize's errors in api.json"], got
    assert c.response('status', {'code': 2, 'message': 'x'}, {'a': 1}) == \
        ['status: an error response with a non-nil result']
    assert c.response('status', 'oops', None) != []


@test
def the_peer_reports_drift_through_its_checker():
    """peer.Peer(check=...) runs the checker on what arrives (needs python3-msgpack)."""
    try:
        import peer
        import socket
    except ImportError as e:  # python3-msgpack missing: the rest needs only the standard library
        raise Skip(str(e))
    a, b = socket.socketpair()
    p = peer.Peer(a, check=checker())
    msgid = p.send_request('tokenize', {'text': 'x'})
    b.sendall(peer.encode_notification('generate.chunk', {'id': 9, 'text': 'a'}) +
              peer.encode_response(msgid, {'tokens': [1], 'count': 1}))
    try:
        p.wait(msgid, timeout=10)
        raise AssertionError('drift not reported')
    except peer.ApiDrift as e:
        assert e.problems == ['tokenize.count: not declared in api.json (int 1)'], e.problems
    assert p.wait(msgid, timeout=1).result == {'tokens': [1], 'count': 1}  # still kept
    assert p.chunks_for(9) == [{'id': 9, 'text': 'a'}]
    p.close()
    b.close()


def main():
    if not API_PATH or not FROZEN_PATH:
        print('usage: test_api_check.py API_JSON PROTOCOL1_JSON', file=sys.stderr)
        return 2
    print(f'1..{len(TESTS)}')
    failed = 0
    for i, fn in enumerate(TESTS, 1):
        try:
            fn()
            print(f'ok {i} - {fn.__name__}')
        except Skip as e:
            print(f'ok {i} - {fn.__name__} # SKIP {e}')
        except Exception:  # report every failure as TAP, then go on
            failed += 1
            for line in traceback.format_exc().splitlines():
                print(f'# {line[:400]}')
            print(f'not ok {i} - {fn.__name__}')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
