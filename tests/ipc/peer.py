"""peer.py: a kvd protocol client for tests, written from ipc/PROTOCOL.md alone.

It shares no code with the C codec (only python3-msgpack), so a test that drives the daemon with
it checks the daemon against the document rather than against itself. It can also speak to any
byte stream, which is how test_peer.py checks it against the C decoder without a daemon.

    with Peer.connect() as p:               # the socket PROTOCOL.md names, or KVD_SOCKET
        p.call('hello', protocol=1, client='test')
        r = p.call('generate', prompt='Once', max_tokens=8, stream=True)
        text = ''.join(c['text'] for c in p.chunks_for(r.msgid))

With check=api_check.Checker('ipc/api.json') every response and notification that arrives is
also checked against api.json's declarations (tests/e2e do this); a problem raises ApiDrift.
Without it the peer needs nothing but PROTOCOL.md and msgpack.
"""
import os
import socket
import time

import msgpack

PROTOCOL_VERSION = 1
REQUEST, RESPONSE, NOTIFICATION = 0, 1, 2
MAX_FRAME_BYTES = 1 << 20   # what a client may send
MAX_REPLY_BYTES = 16 << 20  # what the server may send

# Wire codes a test is likely to look for (PROTOCOL.md, "Error codes").
E_NOMEM, E_INVAL, E_PROTO, E_RANGE, E_BUSY, E_2BIG, E_EXIST = 1, 2, 3, 7, 11, 12, 13
E_NO_METHOD, E_NO_MODEL, E_CONTEXT = 111, 112, 113


class KvdError(Exception):
    """An error response: code is the wire code, message the server's text."""

    def __init__(self, code, message, msgid=None):
        super().__init__(f'kvd error {code}: {message}')
        self.code = code
        self.message = message
        self.msgid = msgid


class ProtocolError(Exception):
    """The server sent something PROTOCOL.md does not allow."""


class ApiDrift(AssertionError):
    """The server sent something api.json does not declare; problems lists what (api_check)."""

    def __init__(self, problems):
        super().__init__('kvd answered what api.json does not say: ' + '; '.join(problems))
        self.problems = problems


def raise_drift(problems):
    raise ApiDrift(problems)


class Message:
    """One decoded message. kind is REQUEST, RESPONSE or NOTIFICATION; params is the named-argument
    map (requests, notifications); error and result belong to responses."""

    __slots__ = ('kind', 'msgid', 'method', 'params', 'error', 'result')

    def __init__(self, kind, msgid=None, method=None, params=None, error=None, result=None):
        self.kind, self.msgid, self.method = kind, msgid, method
        self.params, self.error, self.result = params, error, result

    def __eq__(self, other):
        return isinstance(other, Message) and all(
            getattr(self, k) == getattr(other, k) for k in self.__slots__)

    def __repr__(self):
        fields = ', '.join(f'{k}={getattr(self, k)!r}' for k in self.__slots__
                           if getattr(self, k) is not None)
        return f'Message({fields})'


def default_socket_path(env=None):
    """$KVD_SOCKET, else the first of the user and system sockets that exists (the user one when
    neither does)."""
    env = os.environ if env is None else env
    if env.get('KVD_SOCKET'):
        return env['KVD_SOCKET']
    candidates = []
    if env.get('XDG_RUNTIME_DIR'):
        candidates.append(os.path.join(env['XDG_RUNTIME_DIR'], 'kvd', 'kvd.sock'))
    candidates.append('/run/kvd/kvd.sock')
    for c in candidates:
        if os.path.exists(c):
            return c
    return candidates[0]


def _pack(obj):
    return msgpack.packb(obj, use_bin_type=True)


def encode_request(msgid, method, params=None):
    """[0, msgid, method, [params]]; params None sends an empty map."""
    return _pack([REQUEST, msgid, method, [params if params is not None else {}]])


def encode_notification(method, params=None):
    return _pack([NOTIFICATION, method, [params if params is not None else {}]])


def encode_response(msgid, result=None, error=None):
    """error: None, or (code, message) or a ready {code, message} map."""
    if isinstance(error, tuple):
        error = {'code': error[0], 'message': error[1]}
    return _pack([RESPONSE, msgid, error, None if error is not None else result])


def to_message(obj):
    """Checks one decoded msgpack value against PROTOCOL.md's message shapes."""
    if not isinstance(obj, list) or not obj or obj[0] not in (REQUEST, RESPONSE, NOTIFICATION):
        raise ProtocolError(f'not a msgpack-rpc message: {obj!r}')
    kind = obj[0]
    if kind == NOTIFICATION:
        if len(obj) != 3 or not isinstance(obj[1], str) or not isinstance(obj[2], list):
            raise ProtocolError(f'malformed notification: {obj!r}')
        return Message(kind, method=obj[1], params=_params(obj[2]))
    if len(obj) != 4 or not isinstance(obj[1], int) or not 0 <= obj[1] < 1 << 32:
        raise ProtocolError(f'malformed message: {obj!r}')
    if kind == REQUEST:
        if not isinstance(obj[2], str) or not isinstance(obj[3], list):
            raise ProtocolError(f'malformed request: {obj!r}')
        return Message(kind, msgid=obj[1], method=obj[2], params=_params(obj[3]))
    if obj[2] is not None and not (isinstance(obj[2], dict) and isinstance(obj[2].get('code'), int)
                                   and isinstance(obj[2].get('message'), str)):
        raise ProtocolError(f'malformed error object: {obj[2]!r}')
    return Message(kind, msgid=obj[1], error=obj[2], result=obj[3])


def _params(arr):
    if len(arr) == 0:
        return {}
    if len(arr) != 1 or not isinstance(arr[0], dict):
        raise ProtocolError(f'params must be [map]: {arr!r}')
    return arr[0]


class Decoder:
    """Bytes in, Messages out; resumable over any split of the stream."""

    def __init__(self, max_bytes=MAX_REPLY_BYTES):
        self._u = msgpack.Unpacker(raw=False, max_buffer_size=max_bytes, strict_map_key=False)

    def feed(self, data):
        """Returns the messages the bytes complete."""
        self._u.feed(data)
        return [to_message(obj) for obj in self._u]


class Peer:
    """One connection to kvd (or any socket-like object with sendall/recv).

    check: None, or an object with response(method, error, result) and notification(method,
    params) returning lists of problems (tests/ipc/api_check.py's Checker); each message is
    checked as it arrives and on_drift(problems) is called for any (default: raise ApiDrift, so
    the call or wait that read it fails)."""

    def __init__(self, sock, check=None, on_drift=raise_drift):
        self.sock = sock
        self.check = check
        self.on_drift = on_drift
        self.methods = {}        # msgid -> method of requests in flight (only with check)
        self.decoder = Decoder()
        self.next_id = 1
        self.notifications = []  # notifications not yet claimed, in arrival order
        self.responses = {}      # msgid -> Message, responses not yet claimed

    @classmethod
    def connect(cls, path=None, timeout=30.0, check=None, on_drift=raise_drift):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(path or default_socket_path())
        except OSError:
            s.close()
            raise
        return cls(s, check, on_drift)

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send_raw(self, data):
        self.sock.sendall(data)

    def send_request(self, method, params=None, msgid=None):
        """Sends a request without waiting; returns its msgid."""
        if msgid is None:
            msgid = self.next_id
            self.next_id = (self.next_id + 1) & 0xffffffff or 1
        if self.check is not None:
            self.methods[msgid] = method
        self.send_raw(encode_request(msgid, method, params))
        return msgid

    def _read_more(self, deadline):
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError('no message from kvd in time')
            self.sock.settimeout(left)
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError('kvd closed the connection')
        problems = []
        for m in self.decoder.feed(data):
            if m.kind == RESPONSE:
                self.responses[m.msgid] = m
                if self.check is not None:
                    problems += self.check.response(self.methods.pop(m.msgid, None), m.error,
                                                    m.result)
            elif m.kind == NOTIFICATION:
                self.notifications.append(m)
                if self.check is not None:
                    problems += self.check.notification(m.method, m.params)
            else:
                raise ProtocolError(f'the server sent a request: {m!r}')
        if problems:  # after every message is stored, so the peer stays usable
            self.on_drift(problems)

    def read_message(self, timeout=30.0):
        """The next message that arrives (a response or a notification), for tests that check
        ordering; responses it returns are not kept for wait()."""
        deadline = time.monotonic() + timeout if timeout is not None else None
        while True:
            if self.notifications:
                return self.notifications.pop(0)
            if self.responses:
                k = next(iter(self.responses))
                return self.responses.pop(k)
            self._read_more(deadline)

    def wait(self, msgid, timeout=30.0):
        """The response to msgid (raw Message, error or not); notifications are kept meanwhile."""
        deadline = time.monotonic() + timeout if timeout is not None else None
        while msgid not in self.responses:
            self._read_more(deadline)
        return self.responses.pop(msgid)

    def call(self, method, timeout=30.0, **params):
        """Sends a request and returns its result; raises KvdError for an error response."""
        msgid = self.send_request(method, params)
        m = self.wait(msgid, timeout)
        if m.error is not None:
            raise KvdError(m.error['code'], m.error['message'], msgid)
        return m.result

    def chunks_for(self, msgid):
        """Claims the generate.chunk params received so far for one request, in order."""
        mine = [n for n in self.notifications
                if n.method == 'generate.chunk' and n.params.get('id') == msgid]
        self.notifications = [n for n in self.notifications if n not in mine]
        return [n.params for n in mine]

    def generate(self, timeout=120.0, **params):
        """A streaming generate: returns (result, chunks), checking that the chunks' text adds up
        to what a streaming result implies (it carries none of its own)."""
        params['stream'] = True
        msgid = self.send_request('generate', params)
        m = self.wait(msgid, timeout)
        chunks = self.chunks_for(msgid)
        if m.error is not None:
            raise KvdError(m.error['code'], m.error['message'], msgid)
        return m.result, chunks
