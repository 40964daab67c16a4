#!/usr/bin/env python3
"""gen_api.py: the protocol's methods are declared once, in ipc/api.json; this writes the rest.

  gen_api.py API.json --header ipc_api.h --source ipc_api.c
      the C method table: enum ipc_method, names, since-versions, param/result fields with their
      types for generic validation, the errors each method documents (meson runs this)
  gen_api.py API.json --doc PROTOCOL.md --errors kvd_error.h --limits ipc_limits.h --check
      fails unless PROTOCOL.md's generated regions (method reference, error codes, limits) match
      what this script writes, and every method in api.json is named in PROTOCOL.md (a test)
  gen_api.py API.json --doc PROTOCOL.md --errors kvd_error.h --limits ipc_limits.h --update
      rewrites those regions in place after api.json, kvd_error.h or ipc_limits.h changed

Only the standard library: it runs at build time on any python3.
"""

import argparse
import json
import re
import sys

# The value types a field may declare: C enum suffix, and the phrase for docs.
TYPES = {
    'any': ('ANY', 'any'),
    'str': ('STR', 'string'),
    'uint': ('UINT', 'unsigned integer'),
    'int': ('INT', 'integer'),
    'float': ('FLOAT', 'number'),
    'bool': ('BOOL', 'boolean'),
    'map': ('MAP', 'map'),
    'array': ('ARRAY', 'array'),
    'strs': ('STRS', 'array of strings'),
    'uints': ('UINTS', 'array of unsigned integers'),
    'maps': ('MAPS', 'array of maps'),
}
KINDS = {'request': 'IPC_MK_REQUEST', 'notification': 'IPC_MK_NOTIFICATION'}
NAME_RE = re.compile(r'^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$')
KEY_RE = re.compile(r'^[a-z][a-z0-9_]*$')


class ApiError(Exception):
    pass


def c_ident(name):
    return 'IPC_M_' + name.upper().replace('.', '_')


def c_str(s):
    return '"' + s.replace('\\', '\\\\').replace('"', '\\"') + '"'


def check_nested(where, f):
    """A field's nested fields, at any depth: named, typed, documented, only under maps."""
    if 'fields' in f and f['type'] not in ('map', 'maps'):
        raise ApiError(f'{where}: only map and maps fields have nested fields')
    for sub in f.get('fields', []):
        if sub.get('type') not in TYPES or not KEY_RE.match(sub.get('name', '')):
            raise ApiError(f'{where}: bad nested field {sub!r}')
        check_nested(f'{where}.{sub["name"]}', sub)


def check_fields(where, fields, protocol, is_params):
    seen = set()
    groups = {}
    for f in fields:
        name = f.get('name', '')
        if not KEY_RE.match(name):
            raise ApiError(f'{where}: bad field name {name!r}')
        if name in seen:
            raise ApiError(f'{where}: field {name!r} declared twice')
        seen.add(name)
        if f.get('type') not in TYPES:
            raise ApiError(f'{where}.{name}: unknown type {f.get("type")!r}')
        since = f.get('since', 1)
        if not isinstance(since, int) or since < 1 or since > protocol:
            raise ApiError(f'{where}.{name}: since must be 1..{protocol}')
        if 'one_of' in f:
            if not is_params or f.get('required'):
                raise ApiError(f'{where}.{name}: one_of is for optional params')
            groups.setdefault(f['one_of'], []).append(name)
        if not f.get('doc'):
            raise ApiError(f'{where}.{name}: needs a doc')
        check_nested(f'{where}.{name}', f)
    for g, names in groups.items():
        if len(names) < 2:
            raise ApiError(f'{where}: one_of group {g!r} has a single member')
    return list(groups)


def load_api(path):
    with open(path, encoding='utf-8') as f:
        api = json.load(f)
    protocol = api.get('protocol')
    if not isinstance(protocol, int) or protocol < 1:
        raise ApiError('protocol must be a positive integer')
    names = set()
    for m in api['methods']:
        name = m.get('name', '')
        if not NAME_RE.match(name):
            raise ApiError(f'bad method name {name!r}')
        if name in names:
            raise ApiError(f'method {name!r} declared twice')
        names.add(name)
        if m.get('kind') not in KINDS:
            raise ApiError(f'{name}: kind must be one of {sorted(KINDS)}')
        if not isinstance(m.get('since'), int) or not 1 <= m['since'] <= protocol:
            raise ApiError(f'{name}: since must be 1..{protocol}')
        if not m.get('doc'):
            raise ApiError(f'{name}: needs a doc')
        m['groups'] = check_fields(name, m.get('params', []), protocol, True)
        check_fields(name + ' result', m.get('result', []), protocol, False)
        for e in m.get('errors', []):
            if not re.match(r'^KVD_E\w+$', e):
                raise ApiError(f'{name}: bad error name {e!r}')
    return api


def parse_errors(path):
    """The rows of kvd_error.h's X-macro table: (name, value, wire, message)."""
    text = open(path, encoding='utf-8').read()
    rows = re.findall(r'X\((KVD_\w+),\s*([^,]+),\s*(\d+),\s*"((?:[^"\\]|\\.)*)"\)', text)
    if not rows:
        raise ApiError(f'{path}: no error table rows found')
    return [(n, v.strip(), int(w), msg) for n, v, w, msg in rows]


def parse_limits(path):
    """(name, value, comment) for each #define in ipc_limits.h, value evaluated."""
    out = []
    comment = None
    lines = open(path, encoding='utf-8').read().split('\n')
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith('/*') and not line.startswith('/* The protocol'):
            buf = [line]
            while not buf[-1].endswith('*/'):
                i += 1
                buf.append(lines[i].strip())
            text = ' '.join(buf)
            comment = re.sub(r'\s+', ' ', text[2:-2].replace('*', ' ')).strip()
        m = re.match(r'#define\s+(IPC_\w+)\s+(.+)$', line)
        if m:
            expr = m.group(2).strip()
            if not re.match(r'^[0-9()<<\s*+u]+$', expr):
                raise ApiError(f'{path}: {m.group(1)} is not a plain integer expression')
            if not comment:
                raise ApiError(f'{path}: {m.group(1)} needs a comment above it')
            value = eval(expr.replace('u', ''), {'__builtins__': {}})  # digits and operators only
            out.append((m.group(1), value, comment))
            comment = None
        i += 1
    return out


def fmt_bytes(v):
    if v >= 1 << 20 and v % (1 << 20) == 0:
        return f'{v} ({v >> 20} MiB)'
    if v >= 1 << 10 and v % (1 << 10) == 0:
        return f'{v} ({v >> 10} KiB)'
    return str(v)


# ---- C ----

def gen_header(api):
    out = []
    w = out.append
    w('/* Generated by ipc/gen_api.py from ipc/api.json: do not edit. */')
    w('#ifndef KVD_IPC_API_H')
    w('#define KVD_IPC_API_H')
    w('')
    w('#include <stdbool.h>')
    w('#include <stddef.h>')
    w('#include <stdint.h>')
    w('')
    w(f'#define IPC_API_PROTOCOL {api["protocol"]}')
    w('')
    w('/* What a param or result field must hold (api.json "type"). */')
    w('enum ipc_type {')
    for t, (suffix, phrase) in TYPES.items():
        w(f'  IPC_T_{suffix}, /* {phrase} */')
    w('};')
    w('')
    w('/* Who sends a method: a client request, or a server-to-client notification. */')
    w('enum ipc_mkind { IPC_MK_REQUEST, IPC_MK_NOTIFICATION };')
    w('')
    w('/* Every method, in api.json order. */')
    w('enum ipc_method {')
    w('  IPC_M_UNKNOWN = -1,')
    for m in api['methods']:
        w(f'  {c_ident(m["name"])}, /* {m["name"]} */')
    w('  IPC_M_COUNT')
    w('};')
    w('')
    w('struct ipc_field {')
    w('  const char *name;')
    w('  enum ipc_type type;')
    w('  bool required;')
    w('  uint8_t one_of; /* 0, or a group number: exactly one param of the group must be present */')
    w('  uint8_t since;  /* protocol version that added the field */')
    w('};')
    w('')
    w('struct ipc_method_desc {')
    w('  const char *name;')
    w('  uint8_t name_len;')
    w('  uint8_t since;')
    w('  enum ipc_mkind kind;')
    w('  uint8_t n_params, n_result, n_errors, n_groups;')
    w('  const struct ipc_field *params;')
    w('  const struct ipc_field *result;')
    w('  const int *errors; /* kvd codes the method documents beyond the generic ones */')
    w('};')
    w('')
    w('extern const struct ipc_method_desc ipc_methods[IPC_M_COUNT];')
    w('')
    w('/* The method called name[0..len), or IPC_M_UNKNOWN. */')
    w('enum ipc_method ipc_method_lookup(const char *name, size_t len);')
    w('')
    w('#endif')
    return '\n'.join(out) + '\n'


def c_fields(var, fields, groups):
    lines = [f'static const struct ipc_field {var}[] = {{']
    for f in fields:
        g = groups.index(f['one_of']) + 1 if 'one_of' in f else 0
        req = 'true' if f.get('required') else 'false'
        lines.append(f'    {{{c_str(f["name"])}, IPC_T_{TYPES[f["type"]][0]}, {req}, {g}, '
                     f'{f.get("since", 1)}}},')
    lines.append('};')
    return lines


def gen_source(api):
    out = ['/* Generated by ipc/gen_api.py from ipc/api.json: do not edit. */',
           '#include "ipc_api.h"', '', '#include "kvd_error.h"', '', '#include <string.h>', '']
    for m in api['methods']:
        base = c_ident(m['name']).lower()
        if m.get('params'):
            out += c_fields(base + '_params', m['params'], m['groups'])
        if m.get('result'):
            out += c_fields(base + '_result', m['result'], [])
        if m.get('errors'):
            out.append(f'static const int {base}_errors[] = {{{", ".join(m["errors"])}}};')
    out.append('')
    out.append('const struct ipc_method_desc ipc_methods[IPC_M_COUNT] = {')
    for m in api['methods']:
        base = c_ident(m['name']).lower()
        np, nr, ne = len(m.get('params', [])), len(m.get('result', [])), len(m.get('errors', []))
        out.append(f'    [{c_ident(m["name"])}] = {{')
        out.append(f'        .name = {c_str(m["name"])},')
        out.append(f'        .name_len = {len(m["name"])},')
        out.append(f'        .since = {m["since"]},')
        out.append(f'        .kind = {KINDS[m["kind"]]},')
        out.append(f'        .n_params = {np},')
        out.append(f'        .n_result = {nr},')
        out.append(f'        .n_errors = {ne},')
        out.append(f'        .n_groups = {len(m["groups"])},')
        out.append(f'        .params = {base + "_params" if np else "NULL"},')
        out.append(f'        .result = {base + "_result" if nr else "NULL"},')
        out.append(f'        .errors = {base + "_errors" if ne else "NULL"},')
        out.append('    },')
    out.append('};')
    out.append('')
    out.append('enum ipc_method ipc_method_lookup(const char *name, size_t len) {')
    out.append('  /* A dozen names: a linear scan on length then bytes beats hashing them. */')
    out.append('  for (int i = 0; i < IPC_M_COUNT; i++)')
    out.append('    if (ipc_methods[i].name_len == len && memcmp(ipc_methods[i].name, name, len) == 0)')
    out.append('      return (enum ipc_method)i;')
    out.append('  return IPC_M_UNKNOWN;')
    out.append('}')
    return '\n'.join(out) + '\n'


# ---- PROTOCOL.md regions ----

def handler_name(m):
    return 'srv_h_' + m['name'].replace('.', '_')


def gen_handlers_h(api):
    """The server's handler declarations: one per request method, named after it."""
    out = ['/* Generated by ipc/gen_api.py from ipc/api.json: do not edit. */',
           '#ifndef KVD_SRV_HANDLERS_H', '#define KVD_SRV_HANDLERS_H', '',
           '#include "ipc.h"', '', 'struct srv_conn;', '',
           '/* Each answers its request exactly once (now, or later for generate and models.load). */',
           'typedef void (*srv_handler_fn)(struct srv_conn *c, const struct ipc_msg *msg);', '']
    for m in api['methods']:
        if m['kind'] == 'request':
            out.append(f'void {handler_name(m)}(struct srv_conn *c, const struct ipc_msg *msg);'
                       f' /* {m["name"]} */')
    out += ['', '/* Indexed by enum ipc_method; NULL for server-to-client notifications. */',
            'extern const srv_handler_fn srv_handlers[IPC_M_COUNT];', '', '#endif', '']
    return '\n'.join(out)


def gen_handlers_c(api):
    """The dispatch table: a request method of api.json without its srv_h_ function fails to
    link, so the server cannot silently lack one."""
    out = ['/* Generated by ipc/gen_api.py from ipc/api.json: do not edit. */',
           '#include "srv_handlers.h"', '', 'const srv_handler_fn srv_handlers[IPC_M_COUNT] = {']
    for m in api['methods']:
        if m['kind'] == 'request':
            out.append(f'    [{c_ident(m["name"])}] = {handler_name(m)},')
    out += ['};', '']
    return '\n'.join(out)


def md_cell(s):
    return s.replace('|', '\\|').replace('\n', ' ')


def md_fields_table(fields, is_params, groups_members):
    if is_params:
        rows = ['| param | type | required | default | meaning |', '|---|---|---|---|---|']
    else:
        rows = ['| key | type | always | meaning |', '|---|---|---|---|']
    nested = []
    for f in fields:
        ty = TYPES[f['type']][1]
        doc = f['doc']
        if f.get('since', 1) > 1:
            doc += f' (since {f["since"]})'
        if is_params:
            if f.get('required'):
                req = 'yes'
            elif 'one_of' in f:
                req = 'one of ' + ', '.join(f'`{n}`' for n in groups_members[f['one_of']])
            else:
                req = 'no'
            dflt = f'`{f["default"]}`' if 'default' in f else ''
            rows.append(f'| `{f["name"]}` | {ty} | {req} | {md_cell(dflt)} | {md_cell(doc)} |')
        else:
            req = 'yes' if f.get('required') else 'no'
            rows.append(f'| `{f["name"]}` | {ty} | {req} | {md_cell(doc)} |')
        nested += md_nested(f['name'], f)
    return rows, nested


def md_nested(path, f):
    """'Keys of the map `path`: ...' for f's nested fields, then for theirs (path.key)."""
    if not f.get('fields'):
        return []
    items = '; '.join(f'`{s["name"]}` ({TYPES[s["type"]][1]}): {s["doc"]}' for s in f['fields'])
    what = 'each map in' if f['type'] == 'maps' else 'the map'
    out = [f'Keys of {what} `{path}`: {items}.']
    for s in f['fields']:
        out += md_nested(f'{path}.{s["name"]}', s)
    return out


def gen_methods_md(api, errors):
    wire = {n: w for n, _, w, _ in errors}
    out = []
    for m in api['methods']:
        kind = 'Request' if m['kind'] == 'request' else 'Notification (server to client)'
        out.append(f'### `{m["name"]}`')
        out.append('')
        out.append(f'{kind}, since {m["since"]}. {m["doc"]}')
        out.append('')
        groups = {}
        for f in m.get('params', []):
            if 'one_of' in f:
                groups.setdefault(f['one_of'], []).append(f['name'])
        if m.get('params'):
            rows, nested = md_fields_table(m['params'], True, groups)
            out += rows + [''] + [n + '\n' for n in nested]
        elif m['kind'] == 'request':
            out.append('Params: none (`[]` or `[{}]`).')
            out.append('')
        if m['kind'] == 'request':
            if m.get('result'):
                out.append('Result:')
                out.append('')
                rows, nested = md_fields_table(m['result'], False, {})
                out += rows + [''] + [n + '\n' for n in nested]
            errs = m.get('errors', [])
            if errs:
                for e in errs:
                    if e not in wire:
                        raise ApiError(f'{m["name"]}: error {e} is not in kvd_error.h')
                out.append('Errors besides the generic ones: ' +
                           ', '.join(f'{wire[e]} `{e}`' for e in errs) + '.')
            else:
                out.append('Errors: only the generic ones.')
            out.append('')
    return '\n'.join(out).rstrip('\n') + '\n'


def gen_errors_md(errors):
    out = ['| wire code | name | meaning |', '|---|---|---|']
    for n, v, w, msg in errors:
        out.append(f'| {w} | `{n}` | {md_cell(msg)} |')
    out.append('| 999 | | any other failure |')
    return '\n'.join(out) + '\n'


def gen_limits_md(limits):
    out = ['| constant | value | meaning |', '|---|---|---|']
    for n, v, c in limits:
        val = fmt_bytes(v) if 'BYTES' in n else str(v)
        out.append(f'| `{n}` | {val} | {md_cell(c)} |')
    return '\n'.join(out) + '\n'


def region_re(tag):
    return re.compile(r'(<!-- gen_api:' + tag + r' begin[^>]*-->\n)(.*?)(<!-- gen_api:' + tag +
                      r' end -->)', re.S)


def doc_regions(api, errors, limits):
    return {'methods': gen_methods_md(api, errors), 'errors': gen_errors_md(errors),
            'limits': gen_limits_md(limits)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('api')
    ap.add_argument('--header')
    ap.add_argument('--source')
    ap.add_argument('--doc')
    ap.add_argument('--errors')
    ap.add_argument('--limits')
    ap.add_argument('--handlers-header')
    ap.add_argument('--handlers-source')
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument('--check', action='store_true')
    mode.add_argument('--update', action='store_true')
    args = ap.parse_args()
    try:
        api = load_api(args.api)
        if args.header:
            with open(args.header, 'w', encoding='utf-8') as f:
                f.write(gen_header(api))
        if args.source:
            with open(args.source, 'w', encoding='utf-8') as f:
                f.write(gen_source(api))
        if args.handlers_header:
            with open(args.handlers_header, 'w', encoding='utf-8') as f:
                f.write(gen_handlers_h(api))
        if args.handlers_source:
            with open(args.handlers_source, 'w', encoding='utf-8') as f:
                f.write(gen_handlers_c(api))
        if args.doc:
            if not (args.errors and args.limits and (args.check or args.update)):
                raise ApiError('--doc needs --errors, --limits and --check or --update')
            errors = parse_errors(args.errors)
            limits = parse_limits(args.limits)
            lim = dict((n, v) for n, v, _ in limits)
            if lim.get('IPC_PROTOCOL_VERSION') != api['protocol']:
                raise ApiError('IPC_PROTOCOL_VERSION in ipc_limits.h differs from api.json')
            text = open(args.doc, encoding='utf-8').read()
            new = text
            for tag, body in doc_regions(api, errors, limits).items():
                rx = region_re(tag)
                if not rx.search(new):
                    raise ApiError(f'{args.doc}: no <!-- gen_api:{tag} begin/end --> region')
                new = rx.sub(lambda mt, b=body: mt.group(1) + b + mt.group(3), new)
            for m in api['methods']:
                if f'`{m["name"]}`' not in new:
                    raise ApiError(f'{args.doc} never names method `{m["name"]}`')
            if args.update:
                if new != text:
                    with open(args.doc, 'w', encoding='utf-8') as f:
                        f.write(new)
            elif new != text:
                raise ApiError(f'{args.doc} is out of date with api.json, kvd_error.h or '
                               'ipc_limits.h: run ipc/gen_api.py ... --update (see its --help)')
            print(f'{args.doc}: {len(api["methods"])} methods, {len(errors)} error codes, '
                  f'{len(limits)} limits: ' + ('updated' if args.update else 'up to date'))
    except (ApiError, OSError, KeyError, ValueError) as e:
        print(f'gen_api.py: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
