#!/usr/bin/env python
"""Build a Pile-format jsonl corpus from text already on this machine (no downloads).

Documents are the docstrings of every module, class and function in the Python standard library
and the installed site-packages, plus .rst/.md/.txt documentation files shipped with them. Each
line is ``{"text": ..., "meta": {"pile_set_name": "stdlib-docstrings" | "package-docstrings" |
"package-docs"}}`` so the corpus exercises the same path as the real Pile.

Example:
  python tools/build_demo_corpus.py --output demo_output/corpus.jsonl --max-mb 8
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import random
import sys
import sysconfig

from tqdm import tqdm


def _docstrings(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError, RecursionError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= 200:
                yield doc


def _files(root: str, suffixes):
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for name in sorted(files):
            if name.endswith(suffixes):
                yield os.path.join(directory, name)


def iter_documents(roots):
    """(set name, text) pairs from every root, in a deterministic order."""
    for set_name, root in roots:
        for path in _files(root, (".py",)):
            for doc in _docstrings(path):
                yield set_name, doc
        for path in _files(root, (".rst", ".md", ".txt")):
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except (UnicodeDecodeError, OSError):
                continue
            if len(text) >= 500 and "LICENSE" not in os.path.basename(path).upper():
                yield "package-docs", text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="output .jsonl file (documents shuffled; "
                        "hold out validation with pretrain_spiral.py --split)")
    parser.add_argument("--max-mb", type=float, default=8.0, help="stop after this much text (MB)")
    parser.add_argument("--seed", type=int, default=1234, help="shuffle seed")
    args = parser.parse_args(argv)

    stdlib = sysconfig.get_paths()["stdlib"]
    site = sysconfig.get_paths()["purelib"]
    roots = [("stdlib-docstrings", stdlib), ("package-docstrings", site)]
    seen, documents, size = set(), [], 0
    limit = int(args.max_mb * 1e6)
    with tqdm(total=limit, unit="B", unit_scale=True, desc="collecting text", mininterval=2.0) as bar:
        for set_name, text in iter_documents(roots):
            digest = hashlib.sha1(text.encode()).digest()
            if digest in seen:
                continue
            seen.add(digest)
            documents.append({"text": text, "meta": {"pile_set_name": set_name}})
            size += len(text)
            bar.update(len(text))
            if size >= limit:
                break
    if not documents:
        print("build_demo_corpus.py: error: found no documentation text under "
              f"{stdlib} or {site}", file=sys.stderr)
        return 1
    random.Random(args.seed).shuffle(documents)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp = args.output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in documents:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    os.replace(tmp, args.output)  # never leave a half-written corpus under the final name
    print(f"wrote {len(documents)} documents ({size / 1e6:.1f} MB of text) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
