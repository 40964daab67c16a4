#!/usr/bin/env python3
"""The man pages (daemon/kvd.1, client/kvctl.1) cannot drift from the programs: every option,
environment variable, command and exit status that `kvd --help` and `kvctl --help` print is in
the page; groff formats both without a warning; the units' Documentation= names them; README's
list of kvctl's exit codes is complete. Usage: test_man.py KVD KVCTL SOURCE_ROOT"""
import os
import re
import shutil
import subprocess
import sys

from tap import Tap, check

KVD, KVCTL, SRC = sys.argv[1:4]
PAGES = {'kvd': os.path.join(SRC, 'daemon', 'kvd.1'), 'kvctl': os.path.join(SRC, 'client', 'kvctl.1')}


def help_of(prog):
    out = subprocess.run([prog, '--help'], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, XDG_RUNTIME_DIR=os.environ.get('XDG_RUNTIME_DIR', '/tmp')))
    check(out.returncode == 0, f'{prog} --help: rc {out.returncode}\n{out.stderr}')
    return out.stdout


def page_text(name):
    """The page's source with roff's escapes for - and fonts taken out, so --model reads as is."""
    text = open(PAGES[name]).read()
    text = re.sub(r'\\f[BIRP]|\\f\[[A-Z]*\]|\\&', '', text)
    return text.replace('\\-', '-').replace('\\e', '\\')


def has(text, word):
    return re.search(r'(?<![\w-])' + re.escape(word) + r'(?![\w-])', text) is not None


def section(text, title):
    m = re.search(r'^\.SH "?' + title + r'"?\s*$(.*?)(?=^\.SH|\Z)', text, re.M | re.S)
    check(m, f'no {title} section')
    return m.group(1)


def t_kvd_options():
    h, page = help_of(KVD), page_text('kvd')
    opts = re.findall(r'^  --([a-z][a-z-]*)', h, re.M)
    envs = re.findall(r'\[env (KVD_[A-Z_]+)\]', h)
    check(len(opts) > 10, f'too few options parsed from kvd --help:\n{h}')
    missing = [f'--{o}' for o in opts if not has(page, f'--{o}')]
    missing += [e for e in envs if not has(page, e)]
    check(not missing, 'kvd.1 lacks ' + ' '.join(missing))
    # ...and the page documents no option kvd does not have.
    extra = sorted({o for o in re.findall(r'(?<![\w-])--([a-z][a-z-]*)', section(page, 'OPTIONS'))
                    if o not in opts})
    check(not extra, 'kvd.1 names options kvd --help does not: ' + ' '.join(extra))
    for title in ('SYNOPSIS', 'OPTIONS', 'ENVIRONMENT', 'FILES', 'SIGNALS', 'EXIT STATUS', 'SEE ALSO'):
        section(page, title)
    sig = section(page, 'SIGNALS')
    for s in ('SIGTERM', 'SIGINT', 'SIGHUP'):
        check(has(sig, s), f'SIGNALS does not name {s}')


def t_kvctl_options():
    h, page = help_of(KVCTL), page_text('kvctl')
    longs = re.findall(r'^  (?:-\w, |    )--([a-z][a-z-]*)', h, re.M)
    shorts = re.findall(r'^  (-\w), --', h, re.M)
    cmds = re.findall(r'^(?:Usage:|      ) kvctl \[OPTION\]\.\.\. ([a-z]+) ', h, re.M)
    check(len(longs) > 10 and len(shorts) > 5 and len(cmds) >= 8,
          f'kvctl --help parsed as {longs} {shorts} {cmds}:\n{h}')
    opts = section(page, 'OPTIONS')
    missing = [f'--{o}' for o in longs if not has(opts, f'--{o}')]
    missing += [s for s in shorts if not has(opts, s)]
    cmd_text = section(page, 'COMMANDS')
    missing += [c for c in cmds if not re.search(r'^\.BI? "?' + c + r'\b', cmd_text, re.M)]
    check(not missing, 'kvctl.1 lacks ' + ' '.join(missing))
    extra = sorted({o for o in re.findall(r'(?<![\w-])--([a-z][a-z-]*)', opts) if o not in longs})
    check(not extra, 'kvctl.1 names options kvctl --help does not: ' + ' '.join(extra))
    for title in ('SYNOPSIS', 'ENVIRONMENT', 'FILES', 'SEE ALSO'):
        section(page, title)


def exit_codes_of_kvctl():
    h = help_of(KVCTL)
    codes = re.findall(r'^  (\d)  ', h.split('Exit status:')[1], re.M)
    check(len(codes) >= 5, f'exit codes parsed from kvctl --help: {codes}')
    return codes


def t_kvctl_exit_status():
    codes = exit_codes_of_kvctl()
    ex = section(page_text('kvctl'), 'EXIT STATUS')
    listed = re.findall(r'^\.TP\s*\n\.B\s+(\d+)\s*$', ex, re.M)
    check(listed == codes, f'kvctl.1 EXIT STATUS lists {listed}, kvctl --help {codes}')


def t_readme_exit_codes():
    codes = exit_codes_of_kvctl()
    readme = open(os.path.join(SRC, 'README.md')).read()
    m = re.search(r'`kvctl` exit codes:(.*?)\.(?:\s|$)', readme, re.S)
    check(m, 'README.md has no "`kvctl` exit codes:" sentence')
    listed = re.findall(r'(?<![\w.])(\d)(?![\w.])', m.group(1))
    check(listed == codes, f'README lists kvctl exit codes {listed}, kvctl --help {codes}')


def t_groff(name):
    # -ww: every warning; -z: format, print nothing. Warnings go to stderr.
    out = subprocess.run(['groff', '-man', '-Tutf8', '-ww', '-z', PAGES[name]],
                         capture_output=True, text=True, timeout=60)
    check(out.returncode == 0 and not out.stderr.strip(),
          f'groff: rc {out.returncode}\n{out.stderr}')


def t_units_documentation():
    for kind in ('system', 'user'):
        path = os.path.join(SRC, 'daemon', 'systemd', kind, 'kvd.service.in')
        doc = ' '.join(re.findall(r'^Documentation=(.*)$', open(path).read(), re.M))
        for ref in ('man:kvd(1)', 'man:kvctl(1)'):
            check(ref in doc.split(), f'{kind} kvd.service: Documentation= does not name {ref}')


def main():
    tap = Tap()
    tap.run('kvd.1 documents every option of kvd --help', t_kvd_options)
    tap.run('kvctl.1 documents every command and option of kvctl --help', t_kvctl_options)
    tap.run('kvctl.1 lists the exit codes of kvctl --help', t_kvctl_exit_status)
    tap.run('README lists every kvctl exit code', t_readme_exit_codes)
    for name in PAGES:
        if shutil.which('groff'):
            tap.run(f'{name}.1 formats without groff warnings', t_groff, name)
        else:
            tap.skip(f'{name}.1 formats without groff warnings', 'groff not installed (groff-base)')
    tap.run('the services\' Documentation= names both pages', t_units_documentation)
    return tap.done()


sys.exit(main())
