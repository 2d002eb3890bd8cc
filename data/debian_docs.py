"""A second offline corpus: English technical manuals from Debian documentation packages, as challenge shards.

The offline sample (data/sample.py) is the standard library's docstrings; this is other text, over 10M
training tokens: the PostgreSQL, SQLite and Linux kernel manuals as Debian ships them. The network (plain
HTTP; no apt, so any OS) is needed once, and the build is deterministic:

1. the suite's Packages index (dists/<suite>/main/binary-<arch>/Packages.xz) gives each package's .deb
   path and SHA256; where it lists several versions of a package the newest (dpkg's order) wins;
2. each .deb is fetched once into --cache-dir, laid out like the mirror, and checked against that SHA256,
   so reruns are offline (--refresh-index fetches the index again). The index is not signature-checked:
   the hashes catch corruption, not a hostile mirror (pass an https --mirror for that);
3. each .deb (an `ar` archive holding data.tar.*) is read with the standard library: HTML pages become text
   with html.parser (the page's main region where it marks one, never scripts, styles or navigation; code
   blocks keep their layout), .txt/.rst files are used as they are. Sphinx's `_sources` copies,
   translations, generated index pages and texts under MIN_DOC_CHARS are skipped; identical texts are
   kept once (the first in package order, then path order);
4. a hash of "package:path" puts about VAL_FRACTION of the documents in validation and orders both
   splits, so topics are mixed and a new Debian revision does not move a page between splits;
5. a tokenizer with the challenge's settings is trained on the training documents only, and
   data/build_shards.py writes the val then train shards and manifest.json.

Not a default: python3.11-doc, whose language reference is the sample's pydoc_data/topics.py text and whose
library pages often repeat docstrings. Run (docs/CORPORA.md has the measured sizes and overlaps):
    python -m data.debian_docs --output-dir data/datasets/debdocs_sp1024
    DATA_PATH=./data/datasets/debdocs_sp1024 TOKENIZER_PATH=./data/tokenizers/debdocs_1024_bpe.model \\
        python train_gpt.py --preset smoke
"""

import argparse
import hashlib
import io
import lzma
import os
import re
import shutil
import tarfile
import time
import urllib.request
from html.parser import HTMLParser
from itertools import zip_longest
from pathlib import Path

from data.build_shards import SHARD_SIZE, build_dataset, train_tokenizer

DATA_DIR = Path(__file__).resolve().parent
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SUITE = "bookworm"
DEFAULT_ARCH = "all"  # documentation packages are Architecture: all
# Together well over 10M training tokens at vocab 1024 (measured on 2026-12-01, docs/CORPORA.md).
DEFAULT_PACKAGES = ("postgresql-doc-15", "sqlite3-doc", "linux-doc-6.1")
CORPUS_FORMAT = 1  # bump when the extraction recipe changes
MIN_DOC_CHARS = 200
VAL_FRACTION = 0.02
TEXT_SUFFIXES = (".txt", ".rst")
HTML_SUFFIXES = (".html", ".htm")
# Generated pages: lists of links, and sqlite's requirements.html (sentences copied from its other pages).
SKIP_PAGES = re.compile(r"^(genindex.*|.*modindex|bookindex|search|searchindex|.*_crossref|requirements)\.html?$")
# Folders never read: Sphinx's _sources/_static copies, and translations (the corpus is English, like the
# challenge's; the kernel ships zh_CN, zh_TW, it_IT, ... pages under translations/).
SKIP_DIRS = re.compile(r"^(_.*|translations|[a-z]{2,3}_[A-Z]{2})$")
# SentencePiece skips training "sentences" over 4192 bytes (its default, which the challenge kept); most
# manual pages are longer, so the tokenizer sees documents cut at line breaks into pieces below this.
TOKENIZER_PIECE_BYTES = 4000


class DebianDocsError(RuntimeError):
    """A download, checksum or archive problem; the message names the package or file."""


# ----------------------------------------------------------------------------- index and downloads

def fetch(url: str, dest: Path) -> None:
    """Download `url` (http(s) or file://) to `dest` through a temporary file, so no partial file remains."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=120) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DebianDocsError(f"cannot download {url}: {exc}") from None
    os.replace(tmp, dest)


def _compare_part(a: str, b: str) -> int:
    """dpkg's order of one version part: alternating non-digit runs, compared character by character
    ('~' before anything, even the end of the run; letters before other symbols), and digit runs as numbers."""
    def key(run, digits):
        return [-1 if c == "~" else ord(c) + (0 if c.isalpha() else 256) for c in run] + [0], int(digits or 0)
    runs_a, runs_b = re.findall(r"(\D*)(\d*)", a), re.findall(r"(\D*)(\d*)", b)
    for run_a, run_b in zip_longest(runs_a, runs_b, fillvalue=("", "")):
        if key(*run_a) != key(*run_b):
            return -1 if key(*run_a) < key(*run_b) else 1
    return 0


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as Debian version `a` sorts before, with or after `b` ([epoch:]upstream[-revision])."""
    def parts(version):
        epoch, rest = version.split(":", 1) if ":" in version else ("0", version)
        upstream, revision = rest.rsplit("-", 1) if "-" in rest else (rest, "")
        return int(epoch), upstream, revision
    (epoch_a, up_a, rev_a), (epoch_b, up_b, rev_b) = parts(a), parts(b)
    return (epoch_a > epoch_b) - (epoch_a < epoch_b) or _compare_part(up_a, up_b) or _compare_part(rev_a, rev_b)


def parse_packages_index(text: str) -> dict:
    """{package: stanza fields} of a Packages file, keeping the newest version of each package."""
    newest = {}
    for stanza in re.split(r"\n\s*\n", text):
        fields = dict(line.split(":", 1) for line in stanza.splitlines() if line[:1].strip() and ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        name = fields.get("Package")
        if name and (name not in newest or compare_versions(fields["Version"], newest[name]["Version"]) > 0):
            newest[name] = fields
    return newest


def load_index(mirror: str, suite: str, arch: str, cache_dir: Path, refresh: bool = False) -> dict:
    """The suite's main/binary-<arch> Packages index, fetched once into the cache."""
    rel = f"dists/{suite}/main/binary-{arch}/Packages.xz"
    path = Path(cache_dir) / rel
    if refresh or not path.is_file():
        fetch(f"{mirror.rstrip('/')}/{rel}", path)
    try:
        return parse_packages_index(lzma.decompress(path.read_bytes()).decode("utf-8"))
    except lzma.LZMAError as exc:
        raise DebianDocsError(f"{path}: not an xz file ({exc}); delete it and rerun") from None


def fetch_deb(entry: dict, mirror: str, cache_dir: Path) -> Path:
    """The package's .deb in the cache, downloaded if absent or damaged, and checked against the index."""
    path = Path(cache_dir) / entry["Filename"]
    if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == entry["SHA256"]:
        return path
    fetch(f"{mirror.rstrip('/')}/{entry['Filename']}", path)
    got = hashlib.sha256(path.read_bytes()).hexdigest()  # .debs are tens of MB: fine in memory
    if got != entry["SHA256"]:
        path.unlink()  # never leave a file that a rerun could mistake for the real package
        raise DebianDocsError(f"{entry['Package']} {entry['Version']}: SHA256 mismatch for {entry['Filename']} "
                              f"(index says {entry['SHA256']}, download has {got}); refused. Retry, use "
                              f"another --mirror, or --refresh-index if the index is stale")
    return path


# ----------------------------------------------------------------------------- reading a .deb

def deb_data_tar(deb: bytes, name: str = "package") -> tarfile.TarFile:
    """The data.tar.* member of a .deb (an `ar` archive: 8-byte magic, then 60-byte member headers)."""
    if not deb.startswith(b"!<arch>\n"):
        raise DebianDocsError(f"{name}: not a .deb (no ar magic)")
    pos = 8
    while pos + 60 <= len(deb):
        header = deb[pos:pos + 60]
        member, size = header[:16].decode("ascii").strip().rstrip("/"), int(header[48:58])
        body = deb[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)  # members are padded to even offsets
        if member.startswith("data.tar"):
            if member.endswith(".zst"):
                import zstandard  # only needed for zstd-compressed packages
                return tarfile.open(fileobj=zstandard.ZstdDecompressor().stream_reader(body), mode="r|")
            return tarfile.open(fileobj=io.BytesIO(body), mode="r|*")  # gz, bz2, xz or plain
    raise DebianDocsError(f"{name}: .deb has no data.tar member")


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # older pages are ISO-8859-1; every byte decodes


def deb_documents(deb_path: Path, package: str) -> list:
    """[(key, text)] of the documentation files in a .deb, sorted by path."""
    docs = []
    with deb_data_tar(Path(deb_path).read_bytes(), package) as tar:
        for member in tar:
            parts = member.name.removeprefix("./").split("/")
            name = parts[-1].lower()
            if not member.isfile() or any(SKIP_DIRS.match(p) for p in parts[:-1]) or SKIP_PAGES.match(name):
                continue
            if name.endswith(HTML_SUFFIXES + TEXT_SUFFIXES):
                raw = _decode(tar.extractfile(member).read())
                text = html_to_text(raw) if name.endswith(HTML_SUFFIXES) else raw.strip()
                docs.append((f"{package}:{'/'.join(parts)}", text))
    return sorted(docs)


# ----------------------------------------------------------------------------- HTML to text

BLOCK_TAGS = frozenset("address article aside blockquote caption dd div dl dt figcaption figure h1 h2 h3 h4 h5 h6 "
                       "li main ol p pre section table tbody tfoot thead tr ul".split())
VOID_TAGS = frozenset("area base br col embed hr img input link meta param source track wbr".split())
SKIP_TAGS = frozenset("head script style nav header footer noscript template svg form button select".split())
SKIP_ROLES = frozenset({"navigation", "search", "banner", "contentinfo"})
# Sphinx, DocBook and sqlite.org navigation bars, menus and footers, and Sphinx's "¶" anchors.
SKIP_CLASSES = frozenset({"navheader", "navfooter", "footer", "related", "sphinxsidebar", "headerlink",
                          "mobile-nav", "breadcrumbs", "menu", "tagline"})


class _TextExtractor(HTMLParser):
    """Collects the page's text twice: all of it, and only what lies inside <main> / role="main"."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack = []  # open elements: (tag, skip, main, pre)
        self.skip = self.main = self.pre = 0
        self.all_parts, self.main_parts = [], []

    def _add(self, text: str, verbatim: bool = False) -> None:
        if self.skip:
            return
        for parts in (self.all_parts, self.main_parts) if self.main else (self.all_parts,):
            # Outside <pre> a line never starts with the space left by collapsed markup indentation.
            piece = text if verbatim or (parts and not parts[-1].endswith("\n")) else text.lstrip(" ")
            if piece:
                parts.append(piece)

    def handle_starttag(self, tag, attrs):
        if tag == "body":
            self.handle_endtag("head")  # a <head> left open would otherwise hide the whole page
        attrs = dict(attrs)
        if tag in ("br", "hr") or tag in BLOCK_TAGS:
            self._add("\n", verbatim=True)
        elif tag in ("td", "th"):
            self._add(" ")
        if tag in VOID_TAGS:
            return
        classes = set((attrs.get("class") or "").split())
        skip = tag in SKIP_TAGS or attrs.get("role") in SKIP_ROLES or bool(classes & SKIP_CLASSES)
        main = tag == "main" or attrs.get("role") == "main"
        flags = (tag, int(skip), int(main), int(tag == "pre"))
        self.stack.append(flags)
        self.skip, self.main, self.pre = self.skip + flags[1], self.main + flags[2], self.pre + flags[3]

    def handle_endtag(self, tag):
        if not any(open_tag == tag for open_tag, *_ in self.stack):
            return  # a stray end tag
        while self.stack:  # close elements left open inside it (<p>, <li> without end tags)
            open_tag, skip, main, pre = self.stack.pop()
            self.skip, self.main, self.pre = self.skip - skip, self.main - main, self.pre - pre
            if open_tag == tag:
                break
        if tag in BLOCK_TAGS:
            self._add("\n", verbatim=True)

    def handle_data(self, data):
        self._add(data if self.pre else re.sub(r"\s+", " ", data), verbatim=bool(self.pre))


def html_to_text(html: str) -> str:
    """Plain text of an HTML page: its main content if marked, paragraphs on their own lines, code as is."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    text = "".join(parser.main_parts or parser.all_parts)
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# ----------------------------------------------------------------------------- corpus and build

def _hash_unit(key: str) -> float:
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:12], 16) / 16**12


def split_keyed(keyed_docs, val_fraction: float = VAL_FRACTION):
    """(val, train) (key, text) pairs: the split and the order inside each come from a hash of each key."""
    ordered = sorted(((_hash_unit(key), key, text) for key, text in keyed_docs), key=lambda hkt: hkt[:2])
    return ([(key, text) for h, key, text in ordered if h < val_fraction],
            [(key, text) for h, key, text in ordered if h >= val_fraction])


def split_documents(keyed_docs, val_fraction: float = VAL_FRACTION):
    """(val, train) texts of `split_keyed`."""
    return tuple([text for _, text in part] for part in split_keyed(keyed_docs, val_fraction))


def tokenizer_pieces(docs, limit: int = TOKENIZER_PIECE_BYTES):
    """Documents cut at line breaks into pieces of at most `limit` UTF-8 bytes (longer lines stay whole)."""
    for doc in docs:
        piece, size = [], 0
        for line in doc.split("\n"):
            n = len(line.encode("utf-8")) + 1
            if piece and size + n > limit:
                yield "\n".join(piece)
                piece, size = [], 0
            piece.append(line)
            size += n
        if piece:
            yield "\n".join(piece)


def cut_documents(keyed_docs, limit: int):
    """Each (key, text) cut at line breaks into pieces of at most `limit` bytes, keyed "key#i"."""
    for key, text in keyed_docs:
        for i, piece in enumerate(tokenizer_pieces([text], limit)):
            yield f"{key}#{i}", piece


def collect_documents(packages, mirror=DEFAULT_MIRROR, suite=DEFAULT_SUITE, arch=DEFAULT_ARCH,
                      cache_dir=DATA_DIR / "downloads" / "debian", refresh_index=False):
    """([(key, text)] deduplicated, [per-package info]) for `packages`, in the order given."""
    index = load_index(mirror, suite, arch, cache_dir, refresh_index)
    missing = [p for p in packages if p not in index]
    if missing:
        raise DebianDocsError(f"not in {suite}/main/binary-{arch}: {', '.join(missing)} (check the names, "
                              f"or --refresh-index if the cached index is old)")
    docs, seen, info = [], set(), []
    for name in packages:
        entry = index[name]
        deb = fetch_deb(entry, mirror, cache_dir)
        kept = 0
        for key, text in deb_documents(deb, name):
            digest = hashlib.sha256(text.encode("utf-8")).digest()
            if len(text) >= MIN_DOC_CHARS and digest not in seen:
                seen.add(digest)
                docs.append((key, text))
                kept += 1
        info.append({"package": name, "version": entry["Version"], "filename": entry["Filename"],
                     "size": int(entry["Size"]), "sha256": entry["SHA256"], "docs": kept})
        print(f"{name} {entry['Version']}: {int(entry['Size']) / 1e6:.1f} MB .deb, {kept} documents")
    return docs, info


def build_corpus(output_dir, packages=DEFAULT_PACKAGES, vocab_size=1024, tokenizer_prefix=None,
                 val_fraction=VAL_FRACTION, shard_size=SHARD_SIZE, threads=0, max_train_doc_bytes=0, **source):
    """Collect, split, train the tokenizer, write shards + manifest; return (stats, tokenizer_path, info).

    max_train_doc_bytes > 0 cuts training documents into pieces of at most that many bytes, each placed in
    the stream by the hash of its own key: a long manual then no longer fills many consecutive steps of one
    run. Validation documents, the split and the tokenizer are those of the uncut build. A single line longer
    than the limit stays whole."""
    if max_train_doc_bytes < 0:
        raise DebianDocsError(f"--max-train-doc-bytes must be >= 0 (0 keeps documents whole), got {max_train_doc_bytes}")
    threads = threads or min(8, os.cpu_count() or 1)
    t0 = time.perf_counter()
    keyed, info = collect_documents(packages, **source)
    val_keyed, train_keyed = split_keyed(keyed, val_fraction)
    val, train = [text for _, text in val_keyed], [text for _, text in train_keyed]
    if not val or not train:
        raise DebianDocsError(f"{len(keyed)} documents gave {len(val)} validation and {len(train)} training "
                              f"documents; add packages or change --val-fraction")
    utf8_bytes = sum(len(text.encode("utf-8")) for _, text in keyed)
    print(f"{len(keyed)} documents, {utf8_bytes / 1e6:.1f} MB of text ({time.perf_counter() - t0:.0f}s); "
          f"training the tokenizer")
    prefix = Path(tokenizer_prefix) if tokenizer_prefix else DATA_DIR / "tokenizers" / f"debdocs_{vocab_size}_bpe"
    # Only training documents shape the tokenizer, so validation stays unseen.
    model_path = train_tokenizer(tokenizer_pieces(train), prefix, vocab_size, num_threads=threads)
    if max_train_doc_bytes:
        train = split_documents(cut_documents(train_keyed, max_train_doc_bytes), 0.0)[1]
        print(f"{len(train_keyed)} training documents cut into {len(train)} pieces of at most "
              f"{max_train_doc_bytes} bytes")
    stats, model_path = build_dataset(
        lambda: val + train, output_dir, vocab_size, len(val), tokenizer=model_path, shard_size=shard_size,
        num_threads=threads, manifest_extra={
            "source": "Debian documentation packages", "corpus_format": CORPUS_FORMAT,
            "suite": source.get("suite", DEFAULT_SUITE), "packages": info, "utf8_bytes": utf8_bytes,
            "val_fraction": val_fraction, "max_train_doc_bytes": max_train_doc_bytes})
    return stats, model_path, info


def debian_docs_main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.debian_docs", description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default=str(DATA_DIR / "datasets" / "debdocs_sp1024"))
    parser.add_argument("--packages", nargs="+", default=list(DEFAULT_PACKAGES), help="binary package names")
    parser.add_argument("--mirror", default=DEFAULT_MIRROR)
    parser.add_argument("--suite", default=DEFAULT_SUITE)
    parser.add_argument("--arch", default=DEFAULT_ARCH, help="index to read: binary-<arch> (all, amd64, ...)")
    parser.add_argument("--cache-dir", default=str(DATA_DIR / "downloads" / "debian"),
                        help="downloaded index and .debs (reruns read them offline)")
    parser.add_argument("--refresh-index", action="store_true", help="fetch the Packages index again")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--tokenizer-out", help="tokenizer prefix (default data/tokenizers/debdocs_<V>_bpe)")
    parser.add_argument("--val-fraction", type=float, default=VAL_FRACTION)
    parser.add_argument("--threads", type=int, default=0, help="tokenizer threads (default min(8, CPUs))")
    parser.add_argument("--max-train-doc-bytes", type=int, default=0,
                        help="cut training documents into pieces of at most this many bytes, each placed by its "
                             "own hash (default 0: whole documents)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    stats, model_path, _ = build_corpus(
        args.output_dir, args.packages, args.vocab_size, args.tokenizer_out, args.val_fraction,
        threads=args.threads, max_train_doc_bytes=args.max_train_doc_bytes, mirror=args.mirror, suite=args.suite,
        arch=args.arch, cache_dir=Path(args.cache_dir), refresh_index=args.refresh_index)
    print(f"wrote {args.output_dir}: val {stats['docs_val']} docs / {stats['tokens_val']:,} tokens, "
          f"train {stats['docs_train']} docs / {stats['tokens_train']:,} tokens; tokenizer {model_path}; "
          f"{time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    debian_docs_main()
