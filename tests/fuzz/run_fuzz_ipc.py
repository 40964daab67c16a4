#!/usr/bin/env python3
"""run_fuzz_ipc.py FUZZER: runs the ipc decoder fuzzer for $FUZZ_TIME seconds (default 30) over a
seed corpus of well-formed msgpack-rpc streams written into a temporary folder. Crash inputs stay
in that folder (the fuzzer's output says where); it is removed on success.

The seeds are encoded by the few lines below rather than python3-msgpack, so this runs on any
python3. Each seed starts with the fuzz target's control byte (how to split the stream)."""
import os
import shutil
import struct
import subprocess
import sys
import tempfile


def pack(v):
    """Canonical msgpack for the types the seeds use."""
    if v is None:
        return b'\xc0'
    if v is True or v is False:
        return b'\xc3' if v else b'\xc2'
    if isinstance(v, int):
        if 0 <= v < 128:
            return bytes([v])
        if -32 <= v < 0:
            return struct.pack('b', v)
        if 0 <= v < 1 << 32:
            return b'\xce' + struct.pack('>I', v)
        return b'\xd3' + struct.pack('>q', v)
    if isinstance(v, float):
        return b'\xcb' + struct.pack('>d', v)
    if isinstance(v, str):
        b = v.encode()
        head = bytes([0xa0 | len(b)]) if len(b) < 32 else b'\xda' + struct.pack('>H', len(b))
        return head + b
    if isinstance(v, list):
        head = bytes([0x90 | len(v)]) if len(v) < 16 else b'\xdc' + struct.pack('>H', len(v))
        return head + b''.join(pack(x) for x in v)
    if isinstance(v, dict):
        head = bytes([0x80 | len(v)]) if len(v) < 16 else b'\xde' + struct.pack('>H', len(v))
        return head + b''.join(pack(k) + pack(x) for k, x in v.items())
    raise TypeError(type(v))


SEEDS = {
    'hello': [0, 1, 'hello', [{'protocol': 1, 'client': 'kvctl 0.1'}]],
    'generate': [0, 2, 'generate', [{
        'messages': [{'role': 'user', 'content': 'Hi!'}], 'max_tokens': 16, 'temperature': 0.5,
        'stop': ['\n'], 'stream': True, 'seed': 7, 'session': 3, 'logprobs': 2}]],
    'status': [0, 3, 'status', []],
    'detokenize': [0, 4, 'detokenize', [{'tokens': [1, 15043, 70000], 'model': None}]],
    'result': [1, 2, None, {'text': 'Hello', 'finish_reason': 'stop', 'prompt_tokens': 3,
                            'completion_tokens': 1, 'cached_tokens': 0,
                            'timings': {'ttft_ms': 1.5, 'tokens_per_s': -2}}],
    'error': [1, 4, {'code': 112, 'message': 'no such model'}, None],
    'chunk': [2, 'generate.chunk', [{'id': 2, 'text': ' there', 'tokens': [727, 471]}]],
}


def main():
    fuzzer = os.path.abspath(sys.argv[1])
    secs = os.environ.get('FUZZ_TIME', '30')
    d = tempfile.mkdtemp(prefix='kvd-fuzz-ipc-', dir=os.environ.get('TMPDIR'))
    corpus = os.path.join(d, 'corpus')
    os.mkdir(corpus)
    for name, msg in SEEDS.items():
        with open(os.path.join(corpus, name), 'wb') as f:
            f.write(b'\x00' + pack(msg))
    with open(os.path.join(corpus, 'stream'), 'wb') as f:  # all of them, read in small pieces
        f.write(b'\x05' + b''.join(pack(m) for m in SEEDS.values()))
    print(f'fuzz: {len(os.listdir(corpus))} seeds in {corpus}, {secs} s', flush=True)
    rc = subprocess.call([fuzzer, f'-max_total_time={secs}', '-timeout=30', '-rss_limit_mb=4096',
                          '-max_len=8192', '-print_final_stats=1', corpus], cwd=d)
    if rc == 0:
        shutil.rmtree(d)
    else:
        print(f'fuzz: failed ({rc}); crash inputs kept in {d}', file=sys.stderr)
    return rc


if __name__ == '__main__':
    sys.exit(main())
