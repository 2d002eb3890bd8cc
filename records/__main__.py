"""python -m records {bundle,verify,new,compare,merge} … (see records/README.md)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python -m records` from elsewhere still finds the packages
    sys.path.insert(0, str(REPO))


def _losses(spec: list[str]) -> tuple[list[float], str]:
    """val_loss per seed from a record folder (submission.json seed_results, else its logs) or log files."""
    from records.logs import parse_log

    if len(spec) == 1 and Path(spec[0]).is_dir():
        folder = Path(spec[0])
        sub = folder / "submission.json"
        if sub.is_file():
            res = json.loads(sub.read_text(encoding="utf-8")).get("seed_results") or {}
            if res:
                return [float(v["val_loss"]) for _, v in sorted(res.items())], f"{sub} seed_results"
        logs = sorted(folder.glob("*.log")) + sorted(folder.glob("*.txt"))
        return [parse_log(p).score_loss for p in logs], f"{len(logs)} logs in {folder}"
    paths = [p for s in spec for p in s.split(",") if p]
    return [parse_log(p).score_loss for p in paths], f"{len(paths)} logs"


def cmd_bundle(a) -> int:
    from records.bundle import LINE_LIMIT, write_bundle

    info = write_bundle(Path(a.out), pack=a.pack, arch=a.arch,
                        extra=tuple(m for m in a.with_modules.split(",") if m))
    print(f"readable: {info['readable']} lines:{info['readable_lines']} bytes:{info['readable_bytes']} "
          f"(challenge readability limit {LINE_LIMIT} lines: {'ok' if info['readable_lines'] <= LINE_LIMIT else 'over'})")
    if "packed" in info:
        print(f"lean:     {info['lean_lines']} lines {info['lean_bytes']} bytes "
              f"(no comments, docstrings, unreached code)")
        print(f"packed:   {info['packed']} lines:{info['packed_lines']} bytes:{info['packed_bytes']} "
              f"({info['packer']}; the counted file)")
    print(f"modules: {', '.join(info['modules'])}")
    return 0


def cmd_verify(a) -> int:
    from records.verify import verify_folder

    failures = verify_folder(a.folder, a.data_path, a.tokenizer_path, a.val_max_tokens, a.max_train_seconds,
                             a.rel_tol, evaluate_val=not a.no_eval)
    if failures:
        print(f"verify: FAILED ({len(failures)}): " + "; ".join(failures), file=sys.stderr)
        return 1
    print("verify: OK")
    return 0


def cmd_new(a) -> int:
    from records.folder import new_record

    folder = new_record(a.name, a.logs, a.artifact, track=a.track, author=a.author, github_id=a.github_id,
                        blurb=a.blurb, changes=a.changes, date=a.date, records_dir=a.records_dir,
                        artifact_seed=a.artifact_seed, pack=a.pack, force=a.force)
    print(f"record folder: {folder}")
    for p in sorted(folder.iterdir()):
        print(f"  {p.name} {p.stat().st_size}")
    return 0


def cmd_compare(a) -> int:
    from records.stats import compare_losses

    new, src_new = _losses(a.new)
    base, src_base = _losses(a.base)
    print(f"new: {src_new}\nbase: {src_base}")
    c = compare_losses(new, base, margin=a.margin)
    print("\n".join(c.lines()))
    return 0 if c.significant else 1


def cmd_merge(a) -> int:
    from records.merge import merge_checkpoints, pack_merged, save_merged

    ckpt = merge_checkpoints(a.checkpoints, a.weights, normalize=not a.no_normalize)
    out = save_merged(ckpt, a.out)
    print(f"merged {len(a.checkpoints)} checkpoints with weights {a.weights} -> {out}")
    if a.pack:
        n = pack_merged(ckpt, a.pack, a.compressor)
        print(f"artifact: {a.pack} {n} bytes ({a.compressor})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m records", description="Record folders: bundle, verify, new, compare, merge.")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bundle", help="write the self-contained train_gpt.py")
    b.add_argument("--out", default="bundle", help="output folder (default ./bundle)")
    b.add_argument("--pack", default="auto", choices=["auto", "lzma", "brotli", "none"],
                   help="auto (default): the smaller stub of lzma and brotli; none: the readable file alone")
    b.add_argument("--arch", default="hybrid", choices=["hybrid", "gpt", "rwkv7", "moe"],
                   help="also bundle the modules this architecture imports lazily (rwkv7, moe)")
    b.add_argument("--with", dest="with_modules", default="",
                   help="comma list of further lazily imported modules, e.g. quant.gptq,hybrid.kernels.fused_mlp")
    b.set_defaults(fn=cmd_bundle)
    v = sub.add_parser("verify", help="recompute a record folder's bytes and val_bpb")
    v.add_argument("folder")
    v.add_argument("--data-path", default=None, help="validation shards folder (default DATA_PATH, then config.json)")
    v.add_argument("--tokenizer-path", default=None)
    v.add_argument("--val-max-tokens", type=int, default=None, help="evaluate only N tokens (a partial check)")
    v.add_argument("--max-train-seconds", type=float, default=None, help="default 600 for the 10min track, else off")
    v.add_argument("--rel-tol", type=float, default=1e-6)
    v.add_argument("--no-eval", action="store_true", help="skip the re-evaluation")
    v.set_defaults(fn=cmd_verify)
    n = sub.add_parser("new", help="make records/track_*/YYYY-MM-DD_Name/ from logs and an artifact")
    n.add_argument("--name", required=True)
    n.add_argument("--logs", nargs="+", required=True)
    n.add_argument("--artifact", required=True)
    n.add_argument("--artifact-seed", type=int, default=None)
    n.add_argument("--track", default="10min_16mb", choices=["10min_16mb", "non_record_16mb"])
    n.add_argument("--author", default="")
    n.add_argument("--github-id", default="")
    n.add_argument("--blurb", default="")
    n.add_argument("--changes", default="", help="the README's 'What changed' text")
    n.add_argument("--date", default=None, help="YYYY-MM-DD (default today, UTC)")
    n.add_argument("--records-dir", default=None, help="default records/ of this repo")
    n.add_argument("--pack", default="auto", choices=["auto", "lzma", "brotli", "none"])
    n.add_argument("--force", action="store_true")
    n.set_defaults(fn=cmd_new)
    c = sub.add_parser("compare", help="significance of NEW over BASE (>= 0.005 nats at p < 0.01)")
    c.add_argument("new", nargs=1, help="record folder or comma-separated logs")
    c.add_argument("base", nargs=1, help="record folder or comma-separated logs")
    c.add_argument("--margin", type=float, default=0.005)
    c.set_defaults(fn=cmd_compare)
    m = sub.add_parser("merge", help="linear merge of checkpoints of one architecture")
    m.add_argument("checkpoints", nargs="+")
    m.add_argument("--weights", nargs="+", type=float, required=True)
    m.add_argument("--no-normalize", action="store_true")
    m.add_argument("--out", required=True)
    m.add_argument("--pack", default="", help="also write an artifact here")
    m.add_argument("--compressor", default="zlib")
    m.set_defaults(fn=cmd_merge)
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return a.fn(a)
    except (ValueError, OSError, RuntimeError) as exc:  # ArtifactError/LogError/MergeError/BundleError included
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
