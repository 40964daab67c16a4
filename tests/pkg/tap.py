"""The TAP lines the packaging tests print (tools/test_summary.py totals them): one `ok`/`not ok`
per check, a failing check's reason as `#` comments, a plan at the end."""
import os

# Under CI=true a missing tool fails its check instead of skipping it (as in the other suites).
CI = os.environ.get('CI') == 'true'


class Tap:
    def __init__(self):
        self.n = 0
        self.failed = 0

    def run(self, name, fn, *args):
        self.n += 1
        try:
            fn(*args)
            print(f'ok {self.n} - {name}', flush=True)
        except Exception as e:  # noqa: BLE001 - any failure is the check's
            self.failed += 1
            for line in str(e).splitlines()[:40]:
                print(f'# {line}')
            print(f'not ok {self.n} - {name}', flush=True)

    def skip(self, name, why, missing_tool=True):
        self.n += 1
        if CI and missing_tool:
            self.failed += 1
            print(f'# {why} (CI=true: a missing tool is a failure)')
            print(f'not ok {self.n} - {name}', flush=True)
        else:
            print(f'ok {self.n} - {name} # SKIP {why}', flush=True)

    def done(self):
        print(f'1..{self.n}', flush=True)
        return 1 if self.failed else 0


def check(cond, what):
    if not cond:
        raise AssertionError(what)
