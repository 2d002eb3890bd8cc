"""A/B runs of the trainer: arms × seeds, one table, the significance test, the loss curves.

  python -m bench.ab --out runs/ab --preset smoke --seeds 1,2,3 --jobs 2 \\
      --arm "mlp175: MLP_MULT=1.75 QUANT_CLIP=mse GPTQ=0" \\
      --arm "mlp3:   MLP_MULT=3 QUANT_CLIP=sdclip SD_K_MATRIX=9 GPTQ=1" \\
      --env DATA_PATH=./data/datasets/debdocs_sp1024 --env TOKENIZER_PATH=./data/tokenizers/debdocs_1024_bpe.model

Every (arm, seed) is one `python train_gpt.py` process with the common `--env` settings, then the
arm's, then RUN_ID=<arm>_s<seed>, SEED=<seed>, LOG_DIR=<out>. A run whose log already ends with a
round-trip score is not repeated, so an interrupted A/B continues where it stopped. `--jobs 2` runs
two processes at once with one thread each (on a 2-core machine that is faster in total than one
process with two threads, and the runs do not thrash each other).

`--sweep VAR=v1,v2,...` tunes one setting per arm first (each arm runs every value on the first
seed; the lowest round-trip val_loss wins and its run counts as that arm's first seed), so no arm
loses to a bad recipe. `--equal-time` gives every arm the first arm's estimated H100 time
(bench/h100_time.py) by scaling its ITERATIONS and WARMDOWN_ITERS.

Output: per run and per arm (mean ± sample std over seeds) the round-trip val_bpb, the pre-quant
val_bpb, the quantization gap, model and code bytes, steps and training time; the train-loss curves as
a table (each arm's mean at five steps and at its end); then each later arm against the first with
`records compare`'s one-sided Welch t-test on val_loss (nats) at margin 0 (is it better at all?) and at
the challenge's 0.005, and the first against it at margin 0 (is the base better?). A markdown copy goes to
<out>/ab.md, the numbers to <out>/ab.json, and with matplotlib the train-loss curves of every run
to <out>/curves.png.

The arm table's "est. H100 ms/step" is bench/h100_time.py's analytic estimate for the arm's run at the
challenge's full size: its own settings (--env, then the arm's) without the --preset, so at the
full-size width and window, with TRAIN_SEQ_LEN 2048 and TRAIN_BATCH_TOKENS 786,432 on 8 GPUs whatever
the arm sets there. The CPU runs are narrow (the smoke preset is 128 wide at seq 256), where a token
shift and an attention layer cost about the same; the time ratio that decides the challenge is the one
at the size that is submitted, so that is the one estimated. It is an estimate, not a measurement.

`--equal-time` gives every arm the estimated H100 time of the first arm at its ITERATIONS: arm k runs
round(ITERATIONS_1 · ms_1 / ms_k) steps, and its WARMDOWN_ITERS is scaled by the same factor against
its own resolved ITERATIONS (other step counts, such as the Muon momentum warm-up, are kept). The
chosen iterations are printed before the runs start; a finished log is reused only if it ran them.
Without the option nothing changes: every arm runs its own ITERATIONS.

`--screen` runs the first arm on every seed and each other arm on the first seed only: a cheap pass
over many variants. A one-seed variant has no spread of its own, so instead of the Welch test it is
placed in the base's seed spread (records/stats.py, `screen_one_run`: the prediction t for one new
run, which assumes the variant's seeds spread like the base's). A screen picks what deserves the
full seeds; it does not establish a default.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from records.logs import LogError, parse_log
from records.stats import compare_losses, screen_one_run

ROOT = Path(__file__).resolve().parents[1]


def parse_assignments(text: str, where: str) -> dict[str, str]:
    """"A=1 B=x" -> {"A": "1", "B": "x"}; SystemExit naming `where` on a malformed item."""
    out = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep or not key.isupper():
            raise SystemExit(f"{where}: {item!r} is not VAR=value (upper-case variable names)")
        out[key] = value
    return out


def parse_arm(spec: str) -> tuple[str, dict[str, str]]:
    """"name: VAR=v VAR2=w" -> ("name", {...})."""
    name, sep, rest = spec.partition(":")
    name = name.strip()
    if not sep or not name or not name.replace("-", "").replace("_", "").isalnum():
        raise SystemExit(f"--arm {spec!r}: write it as 'name: VAR=value ...' (name of letters, digits, - or _)")
    return name, parse_assignments(rest, f"--arm {name}")


def finished(log: Path) -> bool:
    try:
        return parse_log(log).val_bpb is not None
    except (OSError, LogError):
        return False


def ran_iterations(log: Path) -> int | None:
    try:
        return int(parse_log(log).hparams.get("iterations"))
    except (OSError, LogError, TypeError, ValueError):
        return None


def run_one(out: Path, name: str, seed: int, env: dict[str, str], preset: str, threads: int,
            iterations: int | None = None) -> Path:
    """Run one (arm, seed) unless its log is finished (and, when `iterations` is given, ran that many)."""
    run_id = f"{name}_s{seed}"
    log = out / f"{run_id}.txt"
    if finished(log) and (iterations is None or ran_iterations(log) == iterations):
        return log
    log.unlink(missing_ok=True)  # a half-written log from an interrupted run would be appended to
    child = dict(os.environ, **env, RUN_ID=run_id, SEED=str(seed), LOG_DIR=str(out),
                 ARTIFACT_PATH=str(out / f"{run_id}.ptz"), CHECKPOINT_DIR=str(out / "ck" / run_id))
    if threads:
        child["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, str(ROOT / "train_gpt.py")] + (["--preset", preset] if preset else [])
    t = time.perf_counter()
    with open(out / f"{run_id}.stdout", "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=child, stdout=f, stderr=subprocess.STDOUT).returncode
    print(f"{run_id}: exit {rc} in {time.perf_counter() - t:.0f}s", flush=True)
    if rc != 0:
        raise SystemExit(f"{run_id} failed (exit {rc}); see {out / (run_id + '.stdout')}")
    return log


# The size the estimate describes: the challenge's run (8×H100, seq 2048, 786,432 tokens per step).
FULL_SEQ_LEN, FULL_BATCH_TOKENS, FULL_WORLD = 2048, 786432, 8
SCALE_SETTINGS = ("PRESET", "TRAIN_SEQ_LEN", "TRAIN_BATCH_TOKENS")  # replaced by the full size


def h100_estimate(env: dict[str, str]) -> float:
    """Estimated H100 ms/step of the run `env` describes, at the full size (module docstring)."""
    from bench.h100_time import estimate_settings

    env = {k: v for k, v in env.items() if k not in SCALE_SETTINGS}
    return estimate_settings([], env, FULL_SEQ_LEN, FULL_BATCH_TOKENS, FULL_WORLD)["ms_per_step"]


def arm_schedule(env: dict[str, str], preset: str) -> tuple[int, int]:
    """(ITERATIONS, WARMDOWN_ITERS) that train_gpt.py resolves for this run (preset, then env)."""
    from bench.h100_time import resolve_config

    h, _ = resolve_config(["--preset", preset] if preset else [], env)
    return h.iterations, h.warmdown_iters


def equal_time_plan(arms: dict[str, dict[str, str]], common: dict[str, str], preset: str,
                    est_ms: dict[str, float]) -> dict[str, dict]:
    """{arm: {ms, iterations, warmdown_iters}} giving every arm the first arm's ITERATIONS × its est.
    ms/step: iterations = round(that budget / the arm's ms) (at least 1), warmdown scaled alike."""
    names = list(arms)
    base_iters, _ = arm_schedule({**common, **arms[names[0]]}, preset)
    budget = base_iters * est_ms[names[0]]
    plan = {}
    for name in names:
        iters, warmdown = arm_schedule({**common, **arms[name]}, preset)
        new = max(1, round(budget / est_ms[name]))
        plan[name] = dict(ms=est_ms[name], iterations=new,
                          warmdown_iters=round(warmdown * new / iters) if iters > 0 else warmdown)
    return plan


def run_sweep(spec: str, arms: dict, common: dict, extra: dict, plan: dict, seed: int, out: Path, preset: str,
              jobs: int, threads: int) -> dict:
    """--sweep VAR=v1,v2,...: every arm runs once per value on `seed` (run id <arm>__<VAR><v>); the
    value with the lowest round-trip val_loss is written into the arm's settings (so no arm loses to a
    bad recipe) and its run is copied to <arm>_s<seed>, which the main runs then reuse. Returns
    {arm: {"var", "values": {v: val_loss}, "best"}}; prints one line per arm."""
    var, sep, values = spec.partition("=")
    values = [v for v in values.split(",") if v]
    if not sep or not var.isupper() or len(values) < 2:
        raise SystemExit(f"--sweep {spec!r}: write VAR=v1,v2[,...] (upper-case name, two values or more)")
    runs = {(name, v): f"{name}__{var.lower()}{v}" for name in arms for v in values}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {key: pool.submit(run_one, out, rid, seed, {**common, **arms[key[0]], **extra.get(key[0], {}),
                                                               var: key[1]}, preset, threads,
                                    plan[key[0]]["iterations"] if plan else None)
                   for key, rid in runs.items()}
        logs = {key: fut.result() for key, fut in futures.items()}
    result = {}
    for name in arms:
        losses = {v: parse_log(logs[(name, v)]).val_loss for v in values}
        best = min(values, key=lambda v: losses[v])
        arms[name] = {**arms[name], var: best}
        for suffix in (".txt", ".ptz"):
            src = logs[(name, best)].with_suffix(suffix)
            if src.exists():
                shutil.copyfile(src, out / f"{name}_s{seed}{suffix}")
        result[name] = {"var": var, "values": losses, "best": best}
        print(f"sweep: {name}: " + " ".join(f"{var}={v}:{losses[v]:.4f}" for v in values) + f" -> {best}", flush=True)
    return result


def summarize(arms: list[str], logs: dict[tuple[str, int], Path]) -> dict:
    runs = {}
    for (name, seed), path in logs.items():
        r = parse_log(path)
        runs[f"{name}_s{seed}"] = dict(arm=name, seed=seed, val_bpb=r.val_bpb, val_loss=r.val_loss,
                                       pre_bpb=r.pre_val_bpb, gap=(r.val_bpb - r.pre_val_bpb
                                                                   if r.pre_val_bpb is not None else None),
                                       model_bytes=r.model_bytes, code_bytes=r.code_bytes, steps=r.steps,
                                       train_s=r.train_seconds, curve=[(s, l) for s, l, _ in r.train])
    per_arm = {}
    for name in arms:
        rs = [v for v in runs.values() if v["arm"] == name]

        def stat(key):
            xs = [v[key] for v in rs if v[key] is not None]
            return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0) if xs else (None, None)

        per_arm[name] = {k: stat(k) for k in ("val_bpb", "val_loss", "pre_bpb", "gap", "model_bytes", "train_s")}
        per_arm[name]["n"] = len(rs)
    tests = []
    losses = {name: [v["val_loss"] for v in runs.values() if v["arm"] == name] for name in arms}
    screens = []
    for name in arms[1:]:
        if len(losses[name]) == 1 and len(losses[arms[0]]) >= 2:
            # A one-seed variant: where its run falls in the base's seed spread (a screen, not a test
            # of a default; records/stats.py's screen_one_run says what it assumes).
            sc = screen_one_run(losses[name][0], losses[arms[0]])
            screens.append(dict(new=name, base=arms[0], line=sc.line(), p_better=sc.p_better, p_worse=sc.p_worse))
        if len(losses[name]) < 2 or len(losses[arms[0]]) < 2:
            continue
        # Is the arm better than the base (at margin 0 and at the challenge's 0.005), and is the base
        # better than the arm? The second question is the one a default must answer against a control.
        for new, base, margin in ((name, arms[0], 0.0), (name, arms[0], 0.005), (arms[0], name, 0.0)):
            c = compare_losses(losses[new], losses[base], margin=margin)
            tests.append(dict(new=new, base=base, margin=margin, lines=c.lines(), significant=c.significant))
    return dict(runs=runs, arms=per_arm, tests=tests, screens=screens)


def curve_table(summary: dict, columns: int = 5) -> list[str]:
    """Markdown rows: each arm's train loss, averaged over its seeds and over the logged steps in
    (p − w, p], at `columns` evenly spaced steps p of the longest run (w = a tenth of it), and over the
    last w steps of each run ("end"), so curves of arms with different step counts sit side by side."""
    last = max((s for v in summary["runs"].values() for s, _ in v["curve"]), default=0)
    if last == 0:
        return []
    w = max(1, last // 10)
    points = sorted({max(1, round(last * i / columns)) for i in range(1, columns + 1)})

    def at(arm, p=None):  # p None: each run's own last step
        vals = []
        for v in summary["runs"].values():
            if v["arm"] == arm and v["curve"]:
                end = v["curve"][-1][0]
                q = end if p is None else p
                xs = [l for s, l in v["curve"] if q - w < s <= q]
                if xs and end >= q:
                    vals.append(sum(xs) / len(xs))
        return f"{sum(vals) / len(vals):.4f}" if vals else "-"

    out = [f"| train loss (mean of steps (p−{w}, p], over seeds) | " + " | ".join(f"p = {p}" for p in points)
           + " | end |", "|---|" + "---|" * (len(points) + 1)]
    for arm in summary["arms"]:
        out.append(f"| {arm} | " + " | ".join(at(arm, p) for p in points) + f" | {at(arm)} |")
    return out


def markdown(summary: dict) -> str:
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    out = ["| run | steps | train s | pre-quant val_bpb | round-trip val_bpb | quant gap | model bytes | code bytes |",
           "|---|---|---|---|---|---|---|---|"]
    for rid, v in sorted(summary["runs"].items()):
        out.append(f"| {rid} | {v['steps']} | {f(v['train_s'], '.0f')} | {f(v['pre_bpb'], '.4f')} | "
                   f"{f(v['val_bpb'], '.4f')} | {f(v['gap'], '+.4f')} | {f(v['model_bytes'], ',')} | "
                   f"{f(v['code_bytes'], ',')} |")
    out += ["", "| arm | seeds | round-trip val_bpb (mean ± std) | pre-quant val_bpb | quant gap | model bytes | "
            "est. H100 ms/step |", "|---|---|---|---|---|---|---|"]
    for name, a in summary["arms"].items():
        m, s = a["val_bpb"]
        out.append(f"| {name} | {a['n']} | {f(m, '.4f')} ± {f(s, '.4f')} | {f(a['pre_bpb'][0], '.4f')} | "
                   f"{f(a['gap'][0], '+.4f')} | {f(a['model_bytes'][0], ',.0f')} | "
                   f"{f(a.get('est_h100_ms'), '.2f')} |")
    curves = curve_table(summary)
    if curves:
        out += ["", *curves]
    for name, sw in summary.get("sweep", {}).items():
        out += ["", f"sweep {name}: " + ", ".join(f"{sw['var']}={v}: val_loss {l:.4f}" for v, l in sw["values"].items())
                + f" -> {sw['best']}"]
    for sc in summary.get("screens", []):
        out += ["", f"{sc['new']} (one seed) vs {sc['base']}: {sc['line']}"]
    for t in summary["tests"]:
        out += ["", f"{t['new']} vs {t['base']}, margin {t['margin']} nats:", "```", *t["lines"], "```"]
    return "\n".join(out) + "\n"


def plot(summary: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    # Every run reads the same stream, so the text moves all curves together (left); the right panel
    # subtracts the first arm's mean at each step, which leaves what the arms do differently.
    fig, (ax, dx) = plt.subplots(1, 2, figsize=(14, 5))
    colors = {name: f"C{i}" for i, name in enumerate(summary["arms"])}
    base_arm = next(iter(summary["arms"]))
    base_curves = [dict(v["curve"]) for v in summary["runs"].values() if v["arm"] == base_arm and v["curve"]]
    common = set.intersection(*(set(c) for c in base_curves)) if base_curves else set()
    base = {s: sum(c[s] for c in base_curves) / len(base_curves) for s in common}
    for rid, v in sorted(summary["runs"].items()):
        if v["curve"]:
            xs, ys = zip(*v["curve"])
            ax.plot(xs, ys, color=colors[v["arm"]], alpha=0.7, label=rid)
            diff = [(s, l - base[s]) for s, l in v["curve"] if s in base]
            if diff:
                dx.plot(*zip(*diff), color=colors[v["arm"]], alpha=0.7, label=rid)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats)")
    ax.legend(fontsize=7)
    dx.axhline(0.0, color="k", lw=0.5)
    dx.set_xlabel("step")
    dx.set_ylabel(f"train loss − mean of {base_arm} at the same step (nats)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arm", action="append", required=True, help="'name: VAR=value ...' (the first is the base)")
    ap.add_argument("--env", action="append", default=[], help="VAR=value for every run")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--preset", default="smoke")
    ap.add_argument("--out", default="runs/ab")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (each with 1 thread when > 1)")
    ap.add_argument("--sweep", default="",
                    help="VAR=v1,v2,...: tune VAR per arm on the first seed first (the lowest round-trip val_loss "
                         "wins), then run every seed of the arm at its winner")
    ap.add_argument("--screen", action="store_true",
                    help="a one-seed screen: the first arm runs every seed, the others only the first seed")
    ap.add_argument("--equal-time", action="store_true",
                    help="scale each arm's ITERATIONS (and WARMDOWN_ITERS) to the first arm's estimated H100 time")
    a = ap.parse_args(argv)
    arms = dict(parse_arm(s) for s in a.arm)
    if len(arms) != len(a.arm):
        raise SystemExit("--arm names must be unique")
    common = parse_assignments(" ".join(a.env), "--env")
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    est_ms: dict[str, float | None] = {}
    for name in arms:
        try:
            est_ms[name] = h100_estimate({**common, **arms[name]})
        except Exception as exc:  # the column is informative; --equal-time below needs every estimate
            if a.equal_time:
                raise SystemExit(f"--equal-time: no H100 estimate for arm {name}: {exc}") from None
            print(f"warning: no H100 estimate for arm {name}: {exc}", file=sys.stderr)
            est_ms[name] = None
    plan = equal_time_plan(arms, common, a.preset, est_ms) if a.equal_time else {}
    for name, p in plan.items():
        print(f"equal-time: {name}: est. {p['ms']:.2f} H100 ms/step -> ITERATIONS={p['iterations']} "
              f"WARMDOWN_ITERS={p['warmdown_iters']}", flush=True)
    extra = {name: {"ITERATIONS": str(p["iterations"]), "WARMDOWN_ITERS": str(p["warmdown_iters"])}
             for name, p in plan.items()}
    threads = 1 if a.jobs > 1 else 0
    sweep = run_sweep(a.sweep, arms, common, extra, plan, seeds[0], out, a.preset, a.jobs, threads) if a.sweep else {}
    base = next(iter(arms))
    jobs = [(name, seed) for seed in seeds for name in arms  # seed-major: early results cover every arm
            if not a.screen or name == base or seed == seeds[0]]
    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        futures = {job: pool.submit(run_one, out, job[0], job[1], {**common, **arms[job[0]], **extra.get(job[0], {})},
                                    a.preset, threads, plan[job[0]]["iterations"] if plan else None)
                   for job in jobs}
        logs = {job: fut.result() for job, fut in futures.items()}
    summary = summarize(list(arms), logs)
    for name in arms:
        summary["arms"][name]["est_h100_ms"] = est_ms[name]
    if plan:
        summary["equal_time"] = plan
    if sweep:
        summary["sweep"] = sweep
    summary["command"] = " ".join([sys.executable.split("/")[-1], "-m", "bench.ab"] + (argv or sys.argv[1:]))
    text = markdown(summary)
    print(text)
    (out / "ab.md").write_text(text)
    (out / "ab.json").write_text(json.dumps(summary, indent=1))
    if plot(summary, out / "curves.png"):
        print(f"curves: {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
