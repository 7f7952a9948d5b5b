"""
What the GPT-2 BPE preparation scripts share (data/shakespeare, data/openwebtext, data/fineweb): the
<|endoftext|> id, the one-line error for bad input, and the list of local files that --files and
--folder name. tiktoken's offline GPT-2 vocabulary is data/tiktoken_offline.py.
"""

import fnmatch
import glob
import os
import sys

EOT = 50256  # <|endoftext|> in GPT-2


def die(msg):
    """Bad input: one line on stderr, exit code 2."""
    print(f"prepare.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def collect_files(files, folder, patterns, exclude=()):
    """The local files to read: `files`, then those of `folder` that match one of the glob `patterns` and
    none of the file-name patterns `exclude` (sorted); absolute, de-duplicated. A missing file or folder, or
    a folder with no match, is die()."""
    found = []
    for f in files or []:
        if not os.path.isfile(f):
            die(f"input file not found: {f}")
        found.append(os.path.abspath(f))
    if folder is not None:
        if not os.path.isdir(folder):
            die(f"input folder not found: {folder}")
        matches = sorted({m for p in patterns for m in glob.glob(os.path.join(folder, p), recursive=True)})
        matches = [m for m in matches if os.path.isfile(m)
                   and not any(fnmatch.fnmatch(os.path.basename(m), pat) for pat in exclude or [])]
        if not matches:
            die(f"no files matching {', '.join(map(repr, patterns))} in folder {folder}")
        found.extend(os.path.abspath(m) for m in matches)
    return list(dict.fromkeys(found))
