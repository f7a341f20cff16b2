#!/usr/bin/env python3
"""Import circles between the modules of a Rust crate.

    scripts/layers.py server/src inference/src   # print each crate's circles
    scripts/layers.py --self-test                # the checker's own tests

A module is a file: `lib.rs` is the crate root, `a.rs` and `a/mod.rs` are
`crate::a`, `a/b.rs` is `crate::a::b`. A module depends on another when it
names it in a `use` (including `pub use` re-exports and paths relative to
the module, like `use child::X`) or in a `crate::`, `super::` or `self::`
path in its code. A path that stops at a module's re-export (`crate::x::Y`
where `x` has `pub use y::Y`) depends on where `Y` is defined. `#[cfg(test)]`
modules, comments and string literals are left out: tests may reach across
layers. `main.rs` is a crate of its own and is skipped.

A circle is a strongly connected set of two or more modules. For each one
the tool prints the modules and the imports that close it, and exits with 1
when it found any (`make layers` prints them; README.md, "Development").
"""

import re
import sys
import unittest
from pathlib import Path

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
PATH_RE = re.compile(rf"\b(crate|super|self)((?:\s*::\s*{IDENT})+)")


def strip_comments_and_strings(text):
    """The code with comments, string and char literals blanked out."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif c == "r" and re.match(r'r#*"', text[i:]) and (i == 0 or not re.match(r"\w", text[i - 1])):
            hashes = re.match(r'r(#*)"', text[i:]).group(1)
            end = text.find('"' + hashes, i + 2 + len(hashes))
            i = n if end < 0 else end + 1 + len(hashes)
            out.append('""')
        elif c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
            out.append('""')
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", text[i:]):
            i += len(re.match(r"'(\\.[^']*|[^\\'])'", text[i:]).group(0))
            out.append("' '")
        else:
            out.append(c)
            i += 1
    return "".join(out)


def strip_test_modules(code):
    """The code without `#[cfg(test)] mod NAME { ... }` blocks."""
    while True:
        m = re.search(rf"#\[cfg\(test\)\]\s*(pub(\([^)]*\))?\s+)?mod\s+{IDENT}\s*\{{", code)
        if not m:
            return code
        depth, i = 1, m.end()
        while i < len(code) and depth:
            depth += {"{": 1, "}": -1}.get(code[i], 0)
            i += 1
        code = code[: m.start()] + code[i:]


def expand_use_tree(tree):
    """`a::{b, c::{d, e as f}}` -> [['a','b'], ['a','c','d'], ['a','c','e']]."""
    tree = re.sub(rf"\s+as\s+{IDENT}", "", tree)
    tree = re.sub(r"\s+", "", tree)
    paths = []

    def walk(s, prefix):
        # Splits s at top-level commas.
        parts, depth, start = [], 0, 0
        for i, ch in enumerate(s):
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            elif ch == "," and depth == 0:
                parts.append(s[start:i])
                start = i + 1
        parts.append(s[start:])
        for p in filter(None, parts):
            brace = p.find("{")
            if brace >= 0:
                head = [x for x in p[:brace].split("::") if x]
                walk(p[brace + 1 : p.rfind("}")], prefix + head)
            else:
                path = prefix + [x for x in p.split("::") if x]
                paths.append(path[:-1] if path[-1:] == ["self"] else path)

    walk(tree, [])
    return paths


class Crate:
    """The modules of one crate and what each depends on."""

    def __init__(self, files):
        """`files`: {relative path: source text}, e.g. {'lib.rs': ..., 'a/mod.rs': ...}."""
        self.code = {}
        for rel, text in files.items():
            if rel == "main.rs" and "lib.rs" in files:
                continue
            self.code[self.module_of(rel)] = strip_test_modules(strip_comments_and_strings(text))
        self.uses = {m: self._use_paths(m, c) for m, c in self.code.items()}
        self.reexports = {
            m: {p[-1]: self._absolute(m, p) for p in paths if p}
            for m, paths in ((m, self._use_paths(m, c, public=True)) for m, c in self.code.items())
        }

    @staticmethod
    def module_of(rel):
        parts = rel[:-3].split("/")
        if parts[-1] in ("lib", "main", "mod"):
            parts = parts[:-1]
        return tuple(parts)

    def _use_paths(self, module, code, public=False):
        pattern = r"\bpub(?:\([^)]*\))?\s+use\s+([^;]+);" if public else r"\buse\s+([^;]+);"
        return [p for m in re.finditer(pattern, code) for p in expand_use_tree(m.group(1))]

    def _absolute(self, module, path):
        """A path as seen from `module`, from the crate root; None when external."""
        head, rest = path[0], path[1:]
        if head == "crate":
            return tuple(rest)
        if head == "self":
            return module + tuple(rest)
        if head == "super":
            base = module
            while path and path[0] == "super":
                base, path = base[:-1], path[1:]
            return base + tuple(path)
        if module + (head,) in self.code:
            return module + tuple(path)
        return None

    def target(self, path, seen=()):
        """The module a crate path depends on: its longest module prefix, or
        where that module's re-export of the next name points."""
        for k in range(len(path), -1, -1):
            if path[:k] in self.code:
                owner = path[:k]
                break
        else:
            return None
        if k < len(path) and path[k] in self.reexports.get(owner, {}) and (owner, path[k]) not in seen:
            to = self.reexports[owner][path[k]]
            if to is not None and to != owner + (path[k],):
                found = self.target(to + path[k + 1 :], seen + ((owner, path[k]),))
                if found is not None:
                    return found
        return owner

    def edges(self):
        """{module: {dependency: [the paths that name it]}}."""
        out = {m: {} for m in self.code}
        for m, code in self.code.items():
            paths = [self._absolute(m, p) for p in self.uses[m]]
            # A module re-exporting its own children is their facade, as
            # `mod child;` is their owner: that is not a dependency.
            facade = {p for p in self.reexports[m].values() if p is not None and p[: len(m)] == m}
            paths = [p for p in paths if p not in facade]
            without_uses = re.sub(r"\buse\s+[^;]+;", "", code)
            for found in PATH_RE.finditer(without_uses):
                p = [found.group(1)] + [x.strip() for x in found.group(2).split("::") if x.strip()]
                paths.append(self._absolute(m, p))
            # Paths through a child module, e.g. `images::plane_image(..)`.
            children = {c[-1] for c in self.code if c[:-1] == m and len(c) == len(m) + 1}
            for found in re.finditer(rf"(?<![:\w])({IDENT})((?:\s*::\s*{IDENT})+)", without_uses):
                if found.group(1) in children:
                    rest = [x.strip() for x in found.group(2).split("::") if x.strip()]
                    paths.append(m + (found.group(1),) + tuple(rest))
            for p in filter(lambda p: p is not None, paths):
                t = self.target(p)
                if t is not None and t != m:
                    out[m].setdefault(t, []).append("::".join(("crate",) + p))
        return out

    def circles(self):
        """Strongly connected sets of two or more modules (Tarjan), each sorted."""
        graph = {m: sorted(d) for m, d in self.edges().items()}
        index, low, stack, on, found = {}, {}, [], set(), []

        def visit(v):
            index[v] = low[v] = len(index)
            stack.append(v)
            on.add(v)
            for w in graph[v]:
                if w not in index:
                    visit(w)
                    low[v] = min(low[v], low[w])
                elif w in on:
                    low[v] = min(low[v], index[w])
            if low[v] == index[v]:
                scc = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    scc.append(w)
                    if w == v:
                        break
                if len(scc) > 1:
                    found.append(sorted(scc))

        sys.setrecursionlimit(10000)
        for v in sorted(graph):
            if v not in index:
                visit(v)
        return sorted(found)


def name(module):
    return "::".join(("crate",) + module)


def report(src):
    """Prints the circles of the crate under `src`; returns how many."""
    files = {str(p.relative_to(src)): p.read_text() for p in sorted(Path(src).rglob("*.rs"))}
    crate = Crate(files)
    edges = crate.edges()
    circles = crate.circles()
    if not circles:
        print(f"{src}: no import circles ({len(crate.code)} modules)")
    for c in circles:
        print(f"{src}: circle of {len(c)} modules: {', '.join(name(m) for m in c)}")
        members = set(c)
        for m in c:
            for t in sorted(set(edges[m]) & members):
                shown = sorted(set(edges[m][t]))
                more = f" (+{len(shown) - 3} more)" if len(shown) > 3 else ""
                print(f"    {name(m)} -> {name(t)}: {', '.join(shown[:3])}{more}")
    return len(circles)


class SelfTest(unittest.TestCase):
    def circles(self, files):
        return [[name(m) for m in c] for c in Crate(files).circles()]

    def test_a_straight_line_has_no_circle(self):
        files = {"lib.rs": "pub mod a; pub mod b;", "a.rs": "use crate::b::B;", "b.rs": "pub struct B;"}
        self.assertEqual(self.circles(files), [])

    def test_two_modules_naming_each_other_are_a_circle(self):
        files = {"lib.rs": "", "a.rs": "use crate::b::B; pub struct A;", "b.rs": "fn f() -> crate::a::A { todo!() }"}
        self.assertEqual(self.circles(files), [["crate::a", "crate::b"]])

    def test_nested_use_trees_super_and_relative_paths(self):
        files = {
            "lib.rs": "",
            "x/mod.rs": "mod y; use y::{Y, z::{self as zz}};",
            "x/y.rs": "use super::super::w::W; pub struct Y;",
            "w.rs": "use crate::{x::{X}};",
        }
        self.assertEqual(self.circles(files), [["crate::w", "crate::x", "crate::x::y"]])

    def test_comments_strings_and_tests_do_not_count(self):
        files = {
            "lib.rs": "",
            "a.rs": 'use crate::b::B; // crate::c\nconst S: &str = "crate::b";',
            "b.rs": "/* use crate::a::A; */ pub struct B;\n#[cfg(test)]\nmod tests {\n use crate::a::*;\n}",
        }
        self.assertEqual(self.circles(files), [])

    def test_a_path_to_a_reexport_depends_on_its_definition(self):
        # a uses store::Blob, which store/mod.rs re-exports from store/fs.rs;
        # fs.rs uses a: a circle a <-> store::fs, not through store.
        files = {
            "lib.rs": "",
            "store/mod.rs": "mod fs; pub use fs::Blob;",
            "store/fs.rs": "pub struct Blob; fn f() { crate::a::g(); }",
            "a.rs": "use crate::store::Blob; pub fn g() {}",
        }
        self.assertEqual(self.circles(files), [["crate::a", "crate::store::fs"]])

    def test_a_facade_reexporting_its_children_is_no_circle(self):
        files = {
            "lib.rs": "",
            "store/mod.rs": "mod fs; pub use fs::Blob; pub trait Store {}",
            "store/fs.rs": "use super::Store; pub struct Blob;",
        }
        self.assertEqual(self.circles(files), [])

    def test_code_paths_through_a_child_module_count(self):
        files = {
            "lib.rs": "",
            "x/mod.rs": "mod y; pub struct X; fn f() { y::g(); }",
            "x/y.rs": "pub fn g() -> super::X { super::X }",
        }
        self.assertEqual(self.circles(files), [["crate::x", "crate::x::y"]])

    def test_external_crates_and_main_are_ignored(self):
        files = {"lib.rs": "use std::io; use serde::Serialize;", "main.rs": "use niix::a;", "a.rs": "use tokio::sync;"}
        self.assertEqual(self.circles(files), [])


if __name__ == "__main__":
    if sys.argv[1:] == ["--self-test"]:
        sys.argv = sys.argv[:1]
        unittest.main(verbosity=1)
    if not sys.argv[1:]:
        sys.exit(__doc__)
    sys.exit(1 if sum(report(src) for src in sys.argv[1:]) else 0)
