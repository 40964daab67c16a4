#!/usr/bin/env python3
"""test_peer.py ROUNDTRIP: the Python peer (written from PROTOCOL.md) against the C codec.

ROUNDTRIP is tests/ipc/ipc_roundtrip: it decodes what the peer encodes and writes it back
re-encoded, so every message must survive peer -> C -> peer unchanged, whatever the read sizes,
and malformed frames must come back as the errors PROTOCOL.md documents. Prints TAP."""
import os
import socket
import subprocess
import sys
import threading
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    import peer
except ImportError as e:  # python3-msgpack missing: tools/setup.sh installs it
    print(f'1..0 # SKIP {e}')
    sys.exit(1 if os.environ.get('CI') == 'true' else 77)

ROUNDTRIP = sys.argv[1] if len(sys.argv) > 1 else None
TESTS = []


def test(fn):
    TESTS.append(fn)
    return fn


def roundtrip(data, chunk=1):
    """Runs the C decoder over data; returns (messages, exit status)."""
    r = subprocess.run([ROUNDTRIP, str(chunk)], input=data, stdout=subprocess.PIPE, timeout=120,
                       check=False)
    return peer.Decoder().feed(r.stdout), r.returncode


MESSAGES = [
    (peer.encode_request(1, 'hello', {'protocol': 1, 'client': 'test_peer'}),
     peer.Message(peer.REQUEST, 1, 'hello', {'protocol': 1, 'client': 'test_peer'})),
    (peer.encode_request(2, 'status'), peer.Message(peer.REQUEST, 2, 'status', {})),
    (peer.encode_request(0xffffffff, 'generate', {
        'messages': [{'role': 'system', 'content': 'Be brief.'},
                     {'role': 'user', 'content': 'h\u00e9llo \U0001f600 \x00!'}],
        'temperature': 0.7, 'top_k': 40, 'seed': 2**64 - 1, 'stop': ['\n', 'User:'],
        'stream': True, 'model': None, 'bias': -3, 'blob': b'\x00\xff', 'nested': {'a': [[{}]]}}),
     None),
    (peer.encode_response(2, {'text': 'x' * 70000, 'finish_reason': 'length',
                              'timings': {'ttft_ms': 1.25}}), None),
    (peer.encode_response(3, error=(112, 'no such model loaded')),
     peer.Message(peer.RESPONSE, 3, error={'code': 112, 'message': 'no such model loaded'})),
    (peer.encode_notification('generate.chunk', {'id': 9, 'text': ' there', 'tokens': [727]}),
     peer.Message(peer.NOTIFICATION, method='generate.chunk',
                  params={'id': 9, 'text': ' there', 'tokens': [727]})),
]


@test
def every_message_kind_survives_the_c_decoder():
    stream = b''.join(b for b, _ in MESSAGES)
    want = peer.Decoder().feed(stream)
    assert len(want) == len(MESSAGES)
    for b, expect in MESSAGES:
        if expect is not None:
            assert peer.Decoder().feed(b) == [expect], (peer.Decoder().feed(b), expect)
    for chunk in (1, 3, 7, 4096, 1 << 20):
        got, rc = roundtrip(stream, chunk)
        assert rc == 0, rc
        assert got == want, (chunk, got, want)


@test
def decoder_resumes_over_any_split():
    stream = b''.join(b for b, _ in MESSAGES)
    d = peer.Decoder()
    got = []
    for i in range(len(stream)):
        got += d.feed(stream[i:i + 1])
    assert got == peer.Decoder().feed(stream)


def error_of(m):
    assert m.kind == peer.NOTIFICATION and m.method == 'ipc.error', m
    return m.params


@test
def malformed_requests_are_answered_and_the_stream_goes_on():
    bad = peer._pack([0, 5, 'tokenize', [1]])           # params not [map]
    short = peer._pack([0, 6, 'tokenize'])               # too short
    dup = b'\x94\x00\x07\xa1m\x91\x82\xa1a\x01\xa1a\x02'  # a key given twice
    good = peer.encode_request(8, 'status')
    got, rc = roundtrip(bad + short + dup + good)
    assert rc == 0
    assert [error_of(m)['code'] for m in got[:3]] == [peer.E_INVAL, peer.E_PROTO, peer.E_INVAL]
    assert [error_of(m)['id'] for m in got[:3]] == [5, 6, 7]
    assert not any(error_of(m)['fatal'] for m in got[:3])
    assert "param 'a' given twice" in error_of(got[2])['message']
    assert got[3] == peer.Message(peer.REQUEST, 8, 'status', {})


@test
def garbage_and_oversize_frames_are_fatal():
    got, _ = roundtrip(b'\xc1' + peer.encode_request(1, 'status'))
    assert len(got) == 1 and error_of(got[0])['fatal'] and error_of(got[0])['code'] == peer.E_PROTO
    huge = peer.encode_request(2, 'generate', {'prompt': 'x' * (peer.MAX_FRAME_BYTES + 1)})
    got, _ = roundtrip(huge + peer.encode_request(3, 'status'), 65536)
    assert len(got) == 1 and error_of(got[0])['fatal'] and error_of(got[0])['code'] == peer.E_2BIG
    deep = peer._pack([0, 4, 'm', [{'a': [[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]}]])
    got, _ = roundtrip(deep + peer.encode_request(5, 'status'))
    assert error_of(got[0])['code'] == peer.E_2BIG and error_of(got[0])['id'] == 4
    assert got[1].msgid == 5


@test
def socket_path_follows_protocol_md():
    assert peer.default_socket_path({'KVD_SOCKET': '/x.sock'}) == '/x.sock'
    assert peer.default_socket_path({'XDG_RUNTIME_DIR': '/nonexistent'}) == \
        '/nonexistent/kvd/kvd.sock'
    assert peer.default_socket_path({}) == '/run/kvd/kvd.sock'


@test
def peer_streams_a_generate_from_a_fake_server():
    """A thread plays the server over a socketpair: chunks, then the result."""
    a, b = socket.socketpair()

    def server():
        d = peer.Decoder()
        reqs = []
        while len(reqs) < 2:
            reqs += d.feed(b.recv(65536))
        gen, bad = reqs
        assert gen.method == 'generate' and gen.params['stream'] is True
        out = b''
        for t in ('Once', ' upon', ''):
            out += peer.encode_notification('generate.chunk', {'id': gen.msgid, 'text': t})
        out += peer.encode_response(gen.msgid, {'text': '', 'finish_reason': 'length'})
        out += peer.encode_response(bad.msgid, error=(peer.E_NO_METHOD, 'unknown method'))
        for i in range(0, len(out), 5):  # in small pieces, to exercise the peer's resuming
            b.sendall(out[i:i + 5])

    t = threading.Thread(target=server)
    t.start()
    p = peer.Peer(a)
    gen_id = p.send_request('generate', {'prompt': 'x', 'stream': True})
    bad_id = p.send_request('nope')
    r = p.wait(gen_id)
    assert r.result['finish_reason'] == 'length'
    assert ''.join(c['text'] for c in p.chunks_for(gen_id)) == 'Once upon'
    try:
        m = p.wait(bad_id)
        raise peer.KvdError(m.error['code'], m.error['message'])
    except peer.KvdError as e:
        assert e.code == peer.E_NO_METHOD
    t.join()
    p.close()
    b.close()


def main():
    if not ROUNDTRIP:
        print('usage: test_peer.py IPC_ROUNDTRIP', file=sys.stderr)
        return 2
    print(f'1..{len(TESTS)}')
    failed = 0
    for i, fn in enumerate(TESTS, 1):
        try:
            fn()
            print(f'ok {i} - {fn.__name__}')
        except Exception:  # report every failure as TAP, then go on
            failed += 1
            for line in traceback.format_exc().splitlines():
                print(f'# {line[:400]}')
            print(f'not ok {i} - {fn.__name__}')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
