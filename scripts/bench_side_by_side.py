#!/usr/bin/env python3
"""unclip-rs next to diffusers 0.42.1 / torch 2.13.0 on the same unCLIP folders: one sampler step of
each stage and the whole text-to-image pipeline, plus each process's peak memory, as one table.

Ours: benches/side_by_side.rs (release build); theirs: scripts/bench/theirs.py. Both load the same
safetensors into f32 on the CPU (or both into bf16 with --dtype bf16), use the same thread count
(tch::set_num_threads / torch.set_num_threads) and the same steps, and time the same work (see
the two files). Every configuration runs in a fresh process per side, so each peak RSS belongs to one configuration;
the two sides alternate (ours, theirs, then theirs, ours, ...) so both see the same machine load.
Each timing is the median over its repetitions within a run, then the minimum over rounds
(karlo: one round, one timed call per step after one warm-up call for the prior and decoder, none
for the upsampler (a call takes about a minute); whole pipeline 2/2/2 steps, the fewest UnCLIPScheduler allows).

Configurations: `tiny` (fixtures/data/pipeline/text2img, diffusers' test-sized components),
`embedded` (models/shapes/, skipped when absent), `karlo` (Karlo's real configs with random
weights, written once by scripts/bench/make_karlo_random.py into target/bench/karlo-random; the
architecture is Karlo's, only the step counts are reduced to fit a small CPU).

--train: one training step instead (forward, backward, AdamW, EMA) of the decoder, the prior and
a two-tower CLIP, ours (benches/train_side_by_side.rs, the library's training code) against a plain
PyTorch loop over diffusers' and transformers' models (scripts/bench/theirs_train.py) on the same
folders, batches and loss; tiny and embedded (batch: the shapes recipe's, configs/shapes/embedded.toml).
Besides the wall-clock medians it reports each side's median CPU time per step, the steadier figure
on a machine shared with other work.

usage: .venv/bin/python scripts/bench_side_by_side.py [--configs tiny,embedded,karlo] [--threads 1] [--train]
       [--rounds 2] [--dtype f32|bf16] [--profile release|dev] [--out benches/side_by_side.md]
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
PROFILE_DIR = {"release": "release", "dev": "debug"}
KARLO_DIR = os.path.join(ROOT, "target", "bench", "karlo-random")

# name -> (folder, steps prior/decoder/super-res, warmup (prior, decoder), warmup (upsamplers), reps,
#          pipeline reps, time super_res_last too)
CONFIGS = {
    "tiny": (os.path.join(ROOT, "fixtures", "data", "pipeline", "text2img"), "25,25,7", 3, 3, 21, 3, True),
    "embedded": (os.path.join(ROOT, "models", "shapes"), "25,25,7", 2, 2, 11, 2, True),
    "karlo": (KARLO_DIR, "2,2,2", 1, 0, 1, 1, False),
}
# --train: name -> (decoder,prior batch, CLIP folder, CLIP batch, warmup, reps). CLIP: tiny is the
# transformers-test-sized CLIPModel fixture, embedded the shipped encoders (configs/shapes/embedded.toml
# [clip.model]: width 128, 3 layers, 4 heads, 32 px images in 4 px patches) at the recipe's batch.
TRAIN_CONFIGS = {
    "tiny": ("4,4", os.path.join(ROOT, "fixtures", "data", "clip", "full"), 8, 3, 31),
    "embedded": ("32,128", os.path.join(ROOT, "models", "shapes"), 128, 1, 5),
}
TRAIN_ROWS = [("decoder", "decoder train step (batch {0})"), ("prior", "prior train step (batch {1})"),
              ("clip", "CLIP train step (batch {2})")]
ROWS = [("decoder_train_step", "decoder train step (batch {0})"),
              ("prior_train_step", "prior train step (batch {1})")]
ROWS = [("prior_step", "prior step (guided, 2 rows)"), ("decoder_step", "decoder step (guided, 2 rows)"),
        ("super_res_first_step", "super_res_first step"), ("super_res_last_step", "super_res_last step"),
        ("pipeline", "whole pipeline"), ("load_s", "load the folder (from_pretrained)")]


def run(cmd):
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1]
    return json.loads(line)


def fmt_s(s):
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def run_sides(name, ours_cmd, theirs_cmd, rounds):
    """`rounds` runs per side, alternating (ours, theirs, then theirs, ours, ...)."""
    results = {"ours": [], "theirs": []}
    for r in range(rounds):
        order = [("ours", ours_cmd), ("theirs", theirs_cmd)]
        for side, cmd in (order if r % 2 == 0 else order[::-1]):
            print(f"{name} round {r + 1}: {side}", file=sys.stderr, flush=True)
            results[side].append(run(cmd))
    return results


def train_table(a):
    import torch, diffusers, transformers  # noqa: E401
    subprocess.run(["cargo", "build", "--profile", a.profile, "-q", "-p", "unclip-benches", "--bin",
                    "train_side_by_side"], cwd=ROOT, check=True)
    ours_bin = os.path.join(ROOT, "target", PROFILE_DIR[a.profile], "train_side_by_side")
    header = (f"training step; diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
              f"torch {torch.__version__}, CPU f32, {a.threads} thread(s) each, {a.rounds} interleaved round(s), "
              f"ours built with --profile {a.profile}; wall: median step, best round; CPU: median CPU time of "
              f"the process per step, best round")
    lines = [header, "",
             "| config | what | ours wall | PyTorch wall | ratio wall | ours CPU | PyTorch CPU | ratio CPU |",
             "|---|---|---|---|---|---|---|---|"]
    raw = {}
    for name in a.configs.split(","):
        if name not in TRAIN_CONFIGS:
            print(f"skipping {name}: no training configuration", file=sys.stderr)
            continue
        folder = CONFIGS[name][0]
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            print(f"skipping {name}: no pipeline folder at {folder}", file=sys.stderr)
            continue
        batch, clip, clip_batch, warmup, reps = TRAIN_CONFIGS[name]
        args = ["--model", folder, "--threads", str(a.threads), "--batch", batch, "--warmup", str(warmup),
                "--reps", str(reps), "--clip", clip, "--clip-batch", str(clip_batch)]
        results = run_sides(name, [ours_bin] + args + ["--json"],
                            [PY, os.path.join(ROOT, "scripts", "bench", "theirs_train.py")] + args, a.rounds)
        raw[name] = results
        best = {side: {k: min(x[k] for x in v) for k in v[0] if isinstance(v[0][k], float)}
                for side, v in results.items()}
        labels = batch.split(",") + [str(clip_batch)]
        for key, label in TRAIN_ROWS:
            o, t = best["ours"][f"{key}_train_step"], best["theirs"][f"{key}_train_step"]
            oc, tc = best["ours"][f"{key}_train_step_cpu"], best["theirs"][f"{key}_train_step_cpu"]
            lines.append(f"| {name} | {label.format(*labels)} | {fmt_s(o)} | {fmt_s(t)} | {o / t:.2f} "
                         f"| {fmt_s(oc)} | {fmt_s(tc)} | {oc / tc:.2f} |")
        o, t = (max(x["peak_rss_bytes"] for x in results[s]) / 2**20 for s in ("ours", "theirs"))
        lines.append(f"| {name} | peak RSS (whole process) | {o:.0f} MiB | {t:.0f} MiB | {o / t:.2f} | | | |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(os.path.join(ROOT, "target", "bench"), exist_ok=True)
    with open(os.path.join(ROOT, "target", "bench", "train_side_by_side.json"), "w") as f:
        json.dump(raw, f, indent=1)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="tiny,embedded,karlo")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32", help="both sides' weights and activations")
    ap.add_argument("--train", action="store_true", help="time one training step instead (tiny, embedded)")
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    ap.add_argument("--profile", choices=sorted(PROFILE_DIR), default="release",
                    help="cargo profile of our binary (dev: dependencies at opt-level 3, ours at 1; quicker to build)")
    a = ap.parse_args()
    ours_bin = os.path.join(ROOT, "target", PROFILE_DIR[a.profile], "side_by_side")
    if a.train:
        return train_table(a)

    try:
        import torch, diffusers  # noqa: E401  (versions for the header)
    except ImportError as e:
        sys.exit(f"{e}: install the reference packages into this Python first:\n"
                 "  grep -v '^open-clip' fixtures/requirements.txt | .venv/bin/pip install -r /dev/stdin")
    subprocess.run(["cargo", "build", "--profile", a.profile, "-q", "-p", "unclip-benches", "--bin", "side_by_side"],
                   cwd=ROOT, check=True)
    header = (f"diffusers {diffusers.__version__}, torch {torch.__version__}, CPU {a.dtype}, "
              f"{a.threads} thread(s) each; tiny/embedded: {a.rounds} interleaved round(s), karlo: 1 round")
    lines = [header, "", "| config | what | ours | diffusers | ours / diffusers |", "|---|---|---|---|---|"]
    raw = {}
    for name in a.configs.split(","):
        folder, steps, warmup, sr_warmup, reps, preps, sr_last = CONFIGS[name]
        if name == "karlo" and not os.path.isdir(folder):
            subprocess.run([PY, os.path.join(ROOT, "scripts", "bench", "make_karlo_random.py"), folder], check=True)
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            print(f"skipping {name}: no pipeline folder at {folder}", file=sys.stderr)
            continue
        args = ["--model", folder, "--threads", str(a.threads), "--warmup", str(warmup), "--sr-warmup", str(sr_warmup), "--reps", str(reps),
                "--pipeline-reps", str(preps), "--steps", steps, "--dtype", a.dtype] + (["--sr-last"] if sr_last else [])
        ours_cmd = [ours_bin] + args + ["--json"]
        theirs_cmd = [PY, os.path.join(ROOT, "scripts", "bench", "theirs.py")] + args
        # Karlo-sized runs take minutes per process on a small CPU: one round (ours, then theirs).
        results = run_sides(name, ours_cmd, theirs_cmd, 1 if name == "karlo" else a.rounds)
        raw[name] = results
        best = {side: {k: min(x[k] for x in v) for k in v[0]} for side, v in results.items()}
        peak = {side: max(x["peak_rss_bytes"] for x in v) for side, v in results.items()}
        for key, label in ROWS:
            if key not in best["ours"] or key not in best["theirs"]:
                continue
            o, t = best["ours"][key], best["theirs"][key]
            if key == "pipeline":
                label += f" ({steps.replace(',', '/')} steps)"
            lines.append(f"| {name} | {label} | {fmt_s(o)} | {fmt_s(t)} | {o / t:.2f} |")
        o, t = peak["ours"] / 2**20, peak["theirs"] / 2**20
        lines.append(f"| {name} | peak RSS (whole process) | {o:.0f} MiB | {t:.0f} MiB | {o / t:.2f} |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(os.path.join(ROOT, "target", "bench"), exist_ok=True)
    with open(os.path.join(ROOT, "target", "bench", "side_by_side.json"), "w") as f:
        json.dump(raw, f, indent=1)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
