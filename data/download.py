"""Download the challenge's pre-tokenized FineWeb shards and tokenizer from Hugging Face.

Reproduces openai/parameter-golf `data/cached_challenge_fineweb.py` (docs/TECHNIQUES.md, "Shard
format and tokenizer"):
reads `<prefix>/manifest.json` from the dataset repo, finds the dataset
`fineweb10B_<variant>` and its tokenizer, then fetches every validation shard,
the first N training shards and the tokenizer files into

    <data-root>/datasets/fineweb10B_<variant>/fineweb_{val,train}_XXXXXX.bin
    <data-root>/tokenizers/...            (model_path / vocab_path / path of the tokenizer entry)
    <data-root>/manifest.json             (cached: delete it to pick up a new repo's manifest)

Files are hard-linked from the Hugging Face cache (copied where links fail).
Shards already present with a valid header and the matching length are skipped;
every fetched shard is validated. Training order is a prefix of a frozen shuffle,
so fewer shards give the same first batches.

Environment: MATCHED_FINEWEB_REPO_ID (default willdepueoai/parameter-golf),
MATCHED_FINEWEB_REMOTE_ROOT_PREFIX (default "datasets").

Run:
    python -m data.download --variant sp1024 --train-shards 10
    python -m data.download --variant sp1024 --train-shards 80 --with-docs
"""

import argparse
import json
import os
import re
import shutil
from pathlib import Path, PurePosixPath

from huggingface_hub import hf_hub_download
from tqdm import tqdm

from data.shards import ShardError, shard_token_count

DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
DEFAULT_REMOTE_PREFIX = "datasets"
DEFAULT_TRAIN_SHARDS = 80
DOCS_FILES = ("docs_selected.jsonl", "docs_selected.source_manifest.json")


def default_data_root() -> Path:
    """The repository's `data/` folder (this package), where the trainer looks by default."""
    return Path(__file__).resolve().parent


def dataset_name_for_variant(variant: str) -> str:
    """`sp1024` -> `fineweb10B_sp1024`; the challenge only publishes `byte260` and `sp<V>` variants."""
    if variant != "byte260" and not re.fullmatch(r"sp\d+", variant):
        raise ValueError(f"unknown variant {variant!r}: expected 'byte260' or 'sp<vocab>', e.g. 'sp1024'")
    return f"fineweb10B_{variant}"


def _repo_relative(path: str, what: str) -> PurePosixPath:
    """A manifest path as a safe relative path (a hostile manifest must not write outside data/)."""
    rel = PurePosixPath(path)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ValueError(f"manifest {what} path {path!r} must be relative and stay inside the data folder")
    return rel


def fetch_remote_file(remote_path: str, destination: Path, repo_id: str) -> Path:
    """Fetch one repo file through the Hugging Face cache and link (or copy) it to `destination`."""
    remote = PurePosixPath(remote_path)
    subfolder = None if str(remote.parent) == "." else str(remote.parent)
    try:
        cached = hf_hub_download(repo_id=repo_id, filename=remote.name, subfolder=subfolder, repo_type="dataset")
    except Exception as exc:  # network, auth or missing-file errors: add which file and repo
        raise RuntimeError(
            f"could not download {remote_path} from dataset repo {repo_id}: {exc}; check the network, "
            "MATCHED_FINEWEB_REPO_ID / MATCHED_FINEWEB_REMOTE_ROOT_PREFIX, or delete a stale local manifest.json"
        ) from exc
    # Cache entries are snapshot symlinks into blobs/; link the blob itself so
    # data/ never holds a relative symlink that breaks when moved.
    source = Path(cached).resolve(strict=True)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_name(destination.name + ".part")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # other filesystem, or links not allowed
        shutil.copy2(source, tmp)
    os.replace(tmp, destination)
    return destination


def load_challenge_manifest(data_root: Path, repo_id: str, remote_prefix: str, skip_manifest: bool) -> dict:
    """The cached `<data-root>/manifest.json`, fetched first unless --skip-manifest."""
    path = data_root / "manifest.json"
    if not path.is_file():
        if skip_manifest:
            raise FileNotFoundError(
                f"--skip-manifest needs a local manifest at {path}, which is missing; run without --skip-manifest"
            )
        fetch_remote_file(f"{remote_prefix}/manifest.json", path, repo_id)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); delete it and re-run to fetch it again") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} is not a manifest object; delete it and re-run to fetch it again")
    return manifest


def _present(path: Path, is_shard: bool) -> bool:
    """Whether a local file can be kept: shards must pass header + exact-length validation."""
    if not path.is_file():
        return False
    if not is_shard:
        return path.stat().st_size > 0
    try:
        shard_token_count(path)
        return True
    except ShardError as exc:
        print(f"re-fetching invalid local shard: {exc}")
        return False


def resolve_variant(manifest: dict, manifest_path: Path, dataset: str, train_shards: int, repo_id: str):
    """(number of val shards, tokenizer file paths) for `dataset`, checking the request against the manifest."""
    entries = [d for d in manifest.get("datasets", []) if isinstance(d, dict)]
    entry = next((d for d in entries if d.get("name") == dataset), None)
    if entry is None:
        known = sorted(str(d.get("name")) for d in entries)
        raise ValueError(
            f"dataset {dataset} is not in {manifest_path} (it lists {known}); pick one of those variants, or "
            f"delete {manifest_path} if it came from another repo than {repo_id}"
        )
    stats = entry.get("stats") or {}
    try:
        files_val, files_train = int(stats["files_val"]), int(stats["files_train"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{manifest_path}: dataset {dataset} lacks stats.files_val / stats.files_train") from None
    if train_shards > files_train:
        raise ValueError(
            f"{dataset} has only {files_train} training shards on {repo_id}, but {train_shards} were requested; "
            f"pass --train-shards {files_train} or fewer"
        )
    name = entry.get("tokenizer_name")
    tok = next((t for t in manifest.get("tokenizers", []) if isinstance(t, dict) and t.get("name") == name), None)
    if tok is None:
        raise ValueError(f"{manifest_path}: tokenizer {name!r} of dataset {dataset} is not listed under 'tokenizers'")
    tok_files = [_repo_relative(str(tok[k]), "tokenizer") for k in ("model_path", "vocab_path", "path") if tok.get(k)]
    if not tok_files:
        raise ValueError(f"{manifest_path}: tokenizer {name!r} names no model_path / vocab_path / path to download")
    return files_val, tok_files


def download(variant: str = "sp1024", train_shards: int = DEFAULT_TRAIN_SHARDS, data_root=None,
             skip_manifest: bool = False, with_docs: bool = False, repo_id=None, remote_prefix=None) -> dict:
    """Fetch a challenge variant into `data_root`; return paths and counts of what was done."""
    data_root = Path(data_root) if data_root is not None else default_data_root()
    repo_id = repo_id or os.environ.get("MATCHED_FINEWEB_REPO_ID", DEFAULT_REPO_ID)
    remote_prefix = remote_prefix or os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", DEFAULT_REMOTE_PREFIX)
    remote_prefix = remote_prefix.strip("/")
    if train_shards < 0:
        raise ValueError(f"--train-shards must be >= 0, got {train_shards}")
    dataset = dataset_name_for_variant(variant)
    manifest = load_challenge_manifest(data_root, repo_id, remote_prefix, skip_manifest)
    files_val, tok_files = resolve_variant(manifest, data_root / "manifest.json", dataset, train_shards, repo_id)

    # Remote paths below the prefix mirror local paths below data_root; the flag marks shards.
    jobs = [(PurePosixPath("datasets", dataset, f"fineweb_val_{i:06d}.bin"), True) for i in range(files_val)]
    jobs += [(PurePosixPath("datasets", dataset, f"fineweb_train_{i:06d}.bin"), True) for i in range(train_shards)]
    jobs += [(rel, False) for rel in tok_files]
    jobs += [(PurePosixPath(name), False) for name in DOCS_FILES] if with_docs else []
    fetched = skipped = 0
    with tqdm(jobs, desc=f"download {dataset}", unit="file") as bar:
        for rel, is_shard in bar:
            local = data_root.joinpath(*rel.parts)
            bar.set_postfix_str(rel.name)
            if _present(local, is_shard):
                skipped += 1
                continue
            fetch_remote_file(f"{remote_prefix}/{rel.as_posix()}", local, repo_id)
            fetched += 1
            if is_shard:
                _check_fetched_shard(local, rel)
    return {
        "dataset_dir": data_root / "datasets" / dataset,
        "tokenizer_paths": [data_root.joinpath(*rel.parts) for rel in tok_files],
        "val_shards": files_val,
        "train_shards": train_shards,
        "fetched": fetched,
        "skipped": skipped,
    }


def _check_fetched_shard(local: Path, rel: PurePosixPath) -> None:
    try:
        shard_token_count(local)
    except ShardError as exc:
        local.unlink()
        raise ShardError(
            f"downloaded {rel.as_posix()} is not a valid shard and was removed: {exc}. The Hugging Face cache "
            f"copy is damaged: delete it (`hf cache delete` / `huggingface-cli delete-cache`) and re-run"
        ) from None


def download_main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.download", description=__doc__.split("\n")[0])
    parser.add_argument("train_shards_positional", nargs="?", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--train-shards", type=int, default=DEFAULT_TRAIN_SHARDS,
                        help=f"training shards to fetch, 10^8 tokens each (default {DEFAULT_TRAIN_SHARDS})")
    parser.add_argument("--variant", default="sp1024",
                        help="tokenizer family: sp1024 (default), sp4096, sp8192, byte260, ...")
    parser.add_argument("--skip-manifest", action="store_true", help="do not fetch manifest.json; use the local copy")
    parser.add_argument("--with-docs", action="store_true",
                        help="also fetch docs_selected.jsonl and its source manifest")
    parser.add_argument("--data-root", default=None,
                        help="where datasets/ and tokenizers/ go (default: this data/ folder)")
    args = parser.parse_args(argv)
    n = args.train_shards_positional if args.train_shards_positional is not None else args.train_shards
    result = download(args.variant, n, args.data_root, args.skip_manifest, args.with_docs)
    print(f"{result['dataset_dir']}: {result['val_shards']} val + {result['train_shards']} train shards "
          f"({result['fetched']} fetched, {result['skipped']} already present)")
    for path in result["tokenizer_paths"]:
        print(f"tokenizer: {path}")


if __name__ == "__main__":
    download_main()
