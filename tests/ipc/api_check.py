"""api_check.py: checks what a kvd server sends against ipc/api.json (issue 9: "the server answers
what api.json says"). Only the standard library, so it runs without msgpack.

    c = Checker('ipc/api.json')
    c.result('status', result)          # -> ['status.requests[0].queue_ms: missing', ...]
    c.notification('generate.chunk', params)
    c.response('generate', error, result)   # either slot of [1, msgid, error, result]

The rules, read from api.json and ipc/PROTOCOL.md:
- every key a declaration makes required is present; nil counts as absent (PROTOCOL.md, "Named
  arguments and results"), so a required key must not be nil, and an optional one may be;
- every key present is declared: an unknown key is drift between the server and the document;
- every value has its declared type (api.json's `types`); `float` is "number (float or integer)";
- map and maps values are checked against their nested `fields`, recursively. api.json's nested
  fields carry no `required` flag and PROTOCOL.md lists them as the map's keys with no "always"
  column, so a nested key counts as required unless it says `"required": false`. Top-level
  params and results are required only with `"required": true`. is_required() is that rule, the
  one place it is written, and the protocol-1 freeze (protocol1.json) uses it too;
- a map or maps without `fields` (status.models, generate.error) is only type-checked;
- an error object is `{code, message}` (PROTOCOL.md, "Errors"): code an unsigned integer that
  ipc/kvd_error.h defines (or 999) and that is generic or listed in the method's `errors`,
  message a string, nothing else; a response with an error carries a nil result.

Problems come back as a list of strings, `method.path: what`, empty when all is well.
"""
import json
import math
import os
import re
import sys

# PROTOCOL.md, "Errors": every request may fail with these besides the errors it lists.
GENERIC_ERRORS = ('KVD_EINVAL', 'KVD_ERANGE', 'KVD_E2BIG', 'KVD_EPROTO', 'KVD_E_NO_METHOD',
                  'KVD_EBUSY', 'KVD_EEXIST', 'KVD_ENOMEM', 'KVD_E_DEVICE_LOST')
OTHER_FAILURE = 999  # "999 is sent for anything without a code of its own"


def is_required(field, nested):
    """Whether a declared key must be present (see the module comment)."""
    if nested:
        return field.get('required', True) is not False
    return field.get('required') is True


def _is_uint(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _is_map(v):
    return isinstance(v, dict) and all(isinstance(k, str) for k in v)


# api.json `types`: a predicate for each, and for arrays one for each element.
TYPE_CHECKS = {
    'any': lambda v: True,
    'str': lambda v: isinstance(v, str),
    'uint': _is_uint,
    'int': _is_int,
    'float': _is_number,
    'bool': lambda v: isinstance(v, bool),
    'map': _is_map,
    'array': lambda v: isinstance(v, list),
    'strs': lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    'uints': lambda v: isinstance(v, list) and all(_is_uint(x) for x in v),
    'maps': lambda v: isinstance(v, list) and all(_is_map(x) for x in v),
}
ELEMENT = {'strs': 'str', 'uints': 'uint', 'maps': 'map'}


def _describe(v):
    if v is None:
        return 'nil'
    if isinstance(v, bool):
        return f'bool {v}'
    if isinstance(v, int):
        return f'int {v}'
    if isinstance(v, float):
        return f'float {v}'
    if isinstance(v, str):
        return f'str {v[:40]!r}'
    if isinstance(v, bytes):
        return f'bin ({len(v)} bytes)'
    if isinstance(v, dict):
        return f'map with keys {sorted(map(str, v))[:8]}'
    if isinstance(v, list):
        return f'array of {len(v)}'
    return type(v).__name__


def check_value(path, decl, value, out):
    """Appends to out the problems of one present, non-nil value against its declaration."""
    t = decl['type']
    if t not in TYPE_CHECKS:
        out.append(f'{path}: api.json declares unknown type {t!r}')
        return
    if not TYPE_CHECKS[t](value):
        if t in ELEMENT and isinstance(value, list):  # name the first bad element
            for i, x in enumerate(value):
                if not TYPE_CHECKS[ELEMENT[t]](x):
                    out.append(f'{path}[{i}]: expected {ELEMENT[t]}, got {_describe(x)}')
                    break
        elif t == 'float' and isinstance(value, float):
            out.append(f'{path}: expected a finite number, got {value}')
        else:
            out.append(f'{path}: expected {t}, got {_describe(value)}')
        return
    if 'fields' in decl:
        if t == 'map':
            check_map(path, decl['fields'], value, True, out)
        elif t == 'maps':
            for i, m in enumerate(value):
                check_map(f'{path}[{i}]', decl['fields'], m, True, out)


def check_map(path, fields, value, nested, out):
    """Appends to out the problems of a map against its declared fields."""
    if not _is_map(value):
        out.append(f'{path}: expected a map, got {_describe(value)}')
        return
    declared = {f['name']: f for f in fields}
    for f in fields:
        v = value.get(f['name'])
        where = f'{path}.{f["name"]}'
        if v is None:
            if is_required(f, nested):
                out.append(f'{where}: missing' if f['name'] not in value
                           else f'{where}: nil, but it is always present')
            continue
        check_value(where, f, v, out)
    for k in value:
        if k not in declared:
            out.append(f'{path}.{k}: not declared in api.json ({_describe(value[k])})')


def parse_error_table(path):
    """{wire code: name} from kvd_error.h's X-macro table (the pattern gen_api.py reads)."""
    with open(path, encoding='utf-8') as f:
        rows = re.findall(r'X\((KVD_\w+),\s*[^,]+,\s*(\d+),', f.read())
    return {int(w): n for n, w in rows}


class Checker:
    """The declarations of one api.json; errors_h (default: kvd_error.h beside it, when there)
    adds the check that error codes are ones the method may send."""

    def __init__(self, api_path, errors_h=None):
        with open(api_path, encoding='utf-8') as f:
            self.api = json.load(f)
        self.path = api_path
        self.methods = {m['name']: m for m in self.api['methods']}
        if errors_h is None:
            cand = os.path.join(os.path.dirname(os.path.abspath(api_path)), 'kvd_error.h')
            errors_h = cand if os.path.exists(cand) else None
        self.codes = parse_error_table(errors_h) if errors_h else None
        if self.codes is not None:
            self.wire = {n: w for w, n in self.codes.items()}

    def result(self, method, result):
        """Problems of a success result of a request method."""
        m = self.methods.get(method)
        if m is None:
            return [f'{method}: a result for a method api.json does not declare']
        if m['kind'] != 'request':
            return [f'{method}: a result for a {m["kind"]}']
        out = []
        check_map(method, m.get('result', []), result, False, out)
        return out

    def notification(self, method, params):
        """Problems of a server notification's params."""
        m = self.methods.get(method)
        if m is None:
            return [f'{method}: a notification api.json does not declare']
        if m['kind'] != 'notification':
            return [f'{method}: sent as a notification but declared a {m["kind"]}']
        out = []
        check_map(method, m.get('params', []), params, False, out)
        return out

    def error(self, method, error):
        """Problems of an error object; method None when the request's method is not known
        (then only the generic errors are documented)."""
        where = f'{method or "response"} error'
        if not _is_map(error):
            return [f'{where}: expected a map {{code, message}}, got {_describe(error)}']
        out = []
        check_map(where, [{'name': 'code', 'type': 'uint'}, {'name': 'message', 'type': 'str'}],
                  error, True, out)
        code = error.get('code')
        if out or self.codes is None or not _is_uint(code):
            return out
        if code == 0:
            out.append(f'{where}.code: 0 is KVD_OK, not an error')
        elif code != OTHER_FAILURE and code not in self.codes:
            out.append(f'{where}.code: {code} is not in ipc/kvd_error.h')
        elif code != OTHER_FAILURE:
            m = self.methods.get(method) if method else None
            allowed = set(GENERIC_ERRORS) | set(m.get('errors', []) if m else [])
            if self.codes[code] not in allowed:
                out.append(f'{where}.code: {code} {self.codes[code]} is neither generic nor in '
                           f'{method}\'s errors in api.json')
        return out

    def response(self, method, error, result):
        """Problems of the error and result slots of a response; method None when unknown."""
        if error is not None:
            out = self.error(method, error)
            if result is not None:
                out.append(f'{method or "response"}: an error response with a non-nil result')
            return out
        if method is None:
            return []  # a reply to bytes sent raw: nothing says what its result should be
        return self.result(method, result)


# The protocol-1 freeze: the surface a client of protocol 1 may rely on, and what may change.

def surface(api):
    """The frozen form of an api.json: per method its kind, since, and params and result as
    {name: {type, required[, one_of][, fields]}} with effective requiredness (is_required)."""
    def keys(fields, nested):
        out = {}
        for f in fields:
            k = {'type': f['type'], 'required': is_required(f, nested)}
            if 'one_of' in f:
                k['one_of'] = f['one_of']
            if 'fields' in f:
                k['fields'] = keys(f['fields'], True)
            out[f['name']] = k
        return out
    return {'protocol': api['protocol'],
            'methods': {m['name']: {'kind': m['kind'], 'since': m['since'],
                                    'params': keys(m.get('params', []), False),
                                    'result': keys(m.get('result', []), False)}
                        for m in api['methods']}}


def freeze_problems(frozen, api):
    """What an api.json changed in a frozen surface. Additions are allowed (new methods, new
    optional keys); nothing frozen may go or change type, kind or one_of group. A param may stop
    being required, never start; a result key's requiredness never changes either way (a key
    made optional breaks the clients that rely on it; one made required promises what servers of
    the same protocol never sent); a key added to a frozen map is optional unless it is since a
    later protocol (STYLE.md: "extend maps only with optional keys")."""
    now = surface(api)['methods']
    version = frozen['protocol']
    decl = {m['name']: m for m in api['methods']}
    out = []

    def compare(where, old, new, new_decl, is_params):
        for name, o in old.items():
            w = f'{where}.{name}'
            if name not in new:
                out.append(f'{w}: removed')
                continue
            n = new[name]
            if n['type'] != o['type']:
                out.append(f'{w}: type {o["type"]} became {n["type"]}')
            if n.get('one_of') != o.get('one_of'):
                out.append(f'{w}: one_of {o.get("one_of")} became {n.get("one_of")}')
            if is_params and n['required'] and not o['required']:
                out.append(f'{w}: an optional param became required')
            if not is_params and n['required'] != o['required']:
                out.append(f'{w}: a result key that was ' +
                           ('always present became optional' if o['required']
                            else 'optional became required'))
            if 'fields' in o:
                sub = {f['name']: f for f in new_decl[name].get('fields', [])}
                compare(w, o['fields'], n.get('fields', {}), sub, is_params)
        for name, n in new.items():
            if name not in old and n['required'] and new_decl[name].get('since', 1) <= version:
                out.append(f'{where}.{name}: a key added to a frozen protocol-{version} map is '
                           f'required')

    for name, o in frozen['methods'].items():
        if name not in now:
            out.append(f'{name}: method removed')
            continue
        n = now[name]
        for k in ('kind', 'since'):
            if n[k] != o[k]:
                out.append(f'{name}: {k} {o[k]} became {n[k]}')
        d = decl[name]
        compare(f'{name} params', o['params'], n['params'],
                {f['name']: f for f in d.get('params', [])}, True)
        compare(f'{name} result', o['result'], n['result'],
                {f['name']: f for f in d.get('result', [])}, False)
    return out


def dump_surface(s):
    """surface() as JSON text with one line per key that has no nested fields (easy to diff)."""
    def obj(v, ind):
        if not isinstance(v, dict) or not any(isinstance(x, dict) for x in v.values()):
            return json.dumps(v)
        pad = ' ' * (ind + 2)
        items = [f'{pad}{json.dumps(k)}: {obj(x, ind + 2)}' for k, x in v.items()]
        return '{\n' + ',\n'.join(items) + '\n' + ' ' * ind + '}'
    return obj(s, 0) + '\n'


def main(argv):
    """api_check.py --freeze API.json: prints the frozen surface (how protocol1.json was made)."""
    if len(argv) == 3 and argv[1] == '--freeze':
        with open(argv[2], encoding='utf-8') as f:
            sys.stdout.write(dump_surface(surface(json.load(f))))
        return 0
    print(main.__doc__, file=sys.stderr)
    return 2


if __name__ == '__main__':
    sys.exit(main(sys.argv))
