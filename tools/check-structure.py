#!/usr/bin/env python3
"""Checks the shape rules of clip's library code (issue 25), as CI runs them:
- no import circle between the files of a crate (`crate::`/`super::` paths and a module's own
  children named as `child::`; comments and test modules are not imports);
- no struct with more than 12 fields, except plain data records and metric families (EXEMPT);
- no library source file over 600 lines (binaries, tests and benchmarks are not library code).
Prints what breaks a rule and exits 1, else prints a summary line and exits 0."""
import collections
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRATES = ["fsutil", "config", "index", "registry", "trust", "readpath", "layerfs", "cri-proxy", "kube-keychain", "unpack", "pull",
          "snapshotter", "builder", "integration", "bench"]
MAX_FIELDS = 12
MAX_LINES = 600
# Plain data records and metric families (the rule's exemptions), by file and name.
EXEMPT = {
    ("index/src/format/view.rs", "Entry"),        # a decoded index entry
    ("index/src/format/view.rs", "Index"),        # the decoded header's values beside the bytes
    ("index/src/format/records.rs", "EntryRecord"),
    ("index/src/format/header.rs", "Header"),
    ("snapshotter/src/metrics.rs", "Metrics"),    # Prometheus families
    ("readpath/src/metrics.rs", "LayerMetrics"),  # one layer's metric handles
    ("config/src/model.rs", "LazyConfig"),        # a config section: plain data, its keys are the file's
}


def strip(text):
    text = re.sub(r"//[^\n]*", "", text)
    return re.sub(r"#\[cfg\(test\)\]\s*mod tests\s*\{.*", "", text, flags=re.S)


def library_files(crate):
    src = os.path.join(ROOT, crate, "src")
    for d, _, files in os.walk(src):
        if os.sep + "bin" in d:
            continue
        for f in files:
            if f.endswith(".rs"):
                yield src, os.path.join(d, f)


def module_of(src, path):
    parts = os.path.relpath(path, src)[:-3].split(os.sep)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return tuple(parts)


def circles(crate):
    files = {module_of(src, p): p for src, p in library_files(crate)}
    graph = collections.defaultdict(set)
    for m, p in files.items():
        text = strip(open(p, encoding="utf-8").read())
        for hit in re.finditer(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)+)", text):
            base = () if hit.group(1) == "crate" else m[:-1]
            path, best = base, None
            for part in hit.group(2).split("::")[1:]:
                path = path + (part,)
                if path in files:
                    best = path
            if best is None and base in files:
                best = base
            if best and best != m:
                graph[m].add(best)
        for hit in re.finditer(r"(?<![:\w])([a-z_][a-z0-9_]*)::", text):
            child = m + (hit.group(1),)
            if child in files:
                graph[m].add(child)
        for hit in re.finditer(r"use crate::\{([^}]*)\}", text):
            for name in hit.group(1).split(","):
                top = (name.strip().split("::")[0],)
                if top in files and top != m:
                    graph[m].add(top)
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted("/".join(c) or "lib" for c in comp))

    sys.setrecursionlimit(10000)
    for v in list(files):
        if v not in index:
            visit(v)
    return found


def big_structs(crate):
    for src, p in library_files(crate):
        text = open(p, encoding="utf-8").read()
        rel = os.path.relpath(p, ROOT)
        for m in re.finditer(r"\n\s*(?:pub(?:\([^)]*\))?\s+)?struct\s+(\w+)[^;{(]*\{", text):
            depth, j = 1, m.end()
            while depth and j < len(text):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                j += 1
            body = re.sub(r"//[^\n]*", "", text[m.end():j - 1])
            fields = len(re.findall(r"^\s*(?:pub(?:\([^)]*\))?\s+)?\w+\s*:", body, flags=re.M))
            if fields > MAX_FIELDS and (rel, m.group(1)) not in EXEMPT:
                yield rel, m.group(1), fields


def long_files(crate):
    for _, p in library_files(crate):
        n = sum(1 for _ in open(p, encoding="utf-8"))
        if n > MAX_LINES:
            yield os.path.relpath(p, ROOT), n


def main():
    problems = []
    for crate in CRATES:
        for comp in circles(crate):
            problems.append(f"{crate}: import circle between {', '.join(comp)}")
        for rel, name, n in big_structs(crate):
            problems.append(f"{rel}: struct {name} has {n} fields (at most {MAX_FIELDS})")
        for rel, n in long_files(crate):
            problems.append(f"{rel}: {n} lines (at most {MAX_LINES} in library code)")
    for p in problems:
        print(p)
    if problems:
        return 1
    print(f"structure: {len(CRATES)} crates, no import circle, no struct over {MAX_FIELDS} fields "
          f"(records and metric families exempt), no library file over {MAX_LINES} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
