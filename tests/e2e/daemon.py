"""Starts the real kvd on a temporary socket for end-to-end tests and stops it again."""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'ipc'))
import api_check  # noqa: E402  (what api.json declares, checked on everything kvd sends)
import peer  # noqa: E402  (the spec-only msgpack-rpc client)

API_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'ipc', 'api.json')
_checker = None


def api_checker():
    """One Checker for ipc/api.json, shared by every connection of the test."""
    global _checker
    if _checker is None:
        _checker = api_check.Checker(API_JSON)
    return _checker


def _warn_drift(problems):
    """KVD_API_CHECK=warn: report drift on stderr (and append it to $KVD_API_CHECK_LOG) instead of
    failing, to see all of it in one run."""
    for p in problems:
        print(f'api drift: {p}', file=sys.stderr, flush=True)
    if os.environ.get('KVD_API_CHECK_LOG'):
        with open(os.environ['KVD_API_CHECK_LOG'], 'a', encoding='utf-8') as f:
            f.writelines(f'{p}\n' for p in problems)


def connect(path, timeout=60.0):
    """A peer on path whose every response and notification is checked against api.json: drift
    fails the call that read it (peer.ApiDrift), unless KVD_API_CHECK=warn."""
    warn = os.environ.get('KVD_API_CHECK') == 'warn'
    return peer.Peer.connect(path, timeout=timeout, check=api_checker(),
                             on_drift=_warn_drift if warn else peer.raise_drift)


class Daemon:
    def __init__(self, kvd, model, *extra, env=None, socket_path=None):
        self.dir = tempfile.mkdtemp(prefix='kvd-e2e-')
        self.socket = socket_path or os.path.join(self.dir, 'kvd.sock')
        self.log_path = os.path.join(self.dir, 'kvd.log')
        args = [kvd, '--socket', self.socket, '--cache-dir', os.path.join(self.dir, 'cache'),
                '--config', '/dev/null']
        if model:
            args += ['--model', model]
        args += list(extra)
        self.log = open(self.log_path, 'wb')
        e = dict(os.environ if env is None else env)
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=e)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f'kvd exited with {self.proc.returncode}:\n{self.read_log()}')
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(self.socket)
                s.close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError('kvd did not start listening in time')
                time.sleep(0.05)

    def connect(self, timeout=60.0):
        return connect(self.socket, timeout)

    def read_log(self):
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path, 'rb') as f:
            return f.read().decode(errors='replace')

    def stop(self, timeout=60):
        """SIGTERM, then the exit status (the drain must end on its own)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        return self.proc.returncode


class Tap:
    """Minimal TAP producer: each check is one test line; a crash in one is its failure."""

    def __init__(self):
        self.n = 0
        self.failed = 0

    def run(self, name, fn, *args):
        self.n += 1
        t0 = time.monotonic()
        try:
            fn(*args)
            print(f'# {time.monotonic() - t0:.1f} s', flush=True)
            print(f'ok {self.n} - {name}', flush=True)
        except Exception as e:  # noqa: BLE001 - report any failure as the test's
            self.failed += 1
            for line in repr(e).splitlines()[:20]:
                print(f'# {line}')
            print(f'not ok {self.n} - {name}', flush=True)

    def run_or_skip(self, name, fn, *args):
        """Like run, but fn may return a reason string: then the test is reported skipped."""
        why = []
        self.run(name, lambda: why.append(fn(*args)))
        if why and why[0]:
            print(f'# {why[0]}', flush=True)
        return bool(why and why[0])

    def skip(self, name, why):
        self.n += 1
        print(f'ok {self.n} - {name} # SKIP {why}', flush=True)

    def done(self):
        print(f'1..{self.n}', flush=True)
        return 1 if self.failed else 0
