"""End-to-end video de-identification on a clip of real faces.

Makes a clip of three people (tests/data/face_clip.py: the astronaut, Grace
Hopper and an LFW face, moving and scaling over a textured background, with
audio), runs ``pyfici deid --input clip.mp4`` on it as a user would, and
prints what the run gives: wall time and CPU seconds of the command, frames,
tracks and people found, whether every track carries one surrogate (one
cluster per person, and each track of the clip is one of the three people),
and the re-identification rate per track and for the clip by the dlib
descriptor and by LBPH (chance with 3 people: 1/3; the k-Same bound: 1/k).

    python benchmarks/deid_video_clip.py [--checkpoint final.pt] [--width 854 --height 480 --seconds 10 --fps 25]
        [--k 3] [--work DIR] [-- extra pyfici deid options]

Without ``--checkpoint`` the built-in model is trained first
(``pyfici.methods.ficgan.train.train_builtin``, ``--train-steps`` steps; not
counted in the de-identification time).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "data"))


def child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--train-steps", type=int, default=200)
    ap.add_argument("--width", type=int, default=854)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--fps", type=int, default=25)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--work", default=None, help="folder for the clip, the model and the output (default: a temp dir)")
    ap.add_argument("extra", nargs="*", help="more pyfici deid options (after --)")
    args = ap.parse_args(argv)
    import face_clip

    work = Path(args.work or tempfile.mkdtemp(prefix="pyfici-deid-clip-"))
    work.mkdir(parents=True, exist_ok=True)
    frames = int(round(args.seconds * args.fps))
    clip = work / "clip.mp4"
    t = time.time()
    face_clip.make_clip(clip, args.width, args.height, frames, args.fps)
    print(f"clip: {clip} ({args.width}x{args.height}, {frames} frames at {args.fps} fps, "
          f"{face_clip.CLIP_PEOPLE} people, audio) made in {time.time() - t:.1f} s", flush=True)
    ckpt = args.checkpoint
    if ckpt is None:
        t = time.time()
        subprocess.run([sys.executable, "-c", "import sys; from pyfici.methods.ficgan.train import train_builtin; "
                        f"train_builtin(sys.argv[1], steps={args.train_steps}, size=64)", str(work / "model")],
                       check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        ckpt = str(work / "model" / "final.pt")
        print(f"built-in model trained ({args.train_steps} steps) in {time.time() - t:.0f} s: {ckpt}", flush=True)
    out = work / "out"
    cmd = [sys.executable, "-m", "pyfici", "deid", "--checkpoint", ckpt, "--input", str(clip), "--k", str(args.k),
           "--out", str(out), "--device", "cpu", "--quiet", *args.extra]
    print("$ " + " ".join(cmd), flush=True)
    c0, t0 = child_cpu(), time.time()
    subprocess.run(cmd, check=True)
    wall, cpu = time.time() - t0, child_cpu() - c0
    r = json.loads((out / "report.json").read_text(encoding="utf-8"))
    rows = r["tracks"]
    people = {t["person"] for t in rows}
    one_surrogate = all(len({t["cluster"] for t in rows if t["person"] == p}) == 1 for p in people)
    faces = sum(t["n_frames"] for t in rows)

    def clip_rate(key):
        n = sum(t["n_frames"] for t in rows if t.get(key) is not None)
        return sum(t[key] * t["n_frames"] for t in rows if t.get(key) is not None) / n if n else None

    res = {"frames": r["n_frames"], "size": f"{args.width}x{args.height}", "k": args.k, "wall_s": wall,
           "cpu_s": cpu, "cpu_s_per_frame": cpu / max(1, r["n_frames"]), "n_tracks": r["n_tracks"],
           "n_people": r["n_people"], "one_surrogate_per_track": one_surrogate, "cluster_sizes": r["cluster_sizes"],
           "tracked_faces": faces, "expected_faces": frames * face_clip.CLIP_PEOPLE,
           "fallback_faces": len(r["fallbacks"]), "k_anonymous": r["k_anonymous"],
           "reid_dlib": r["reidentification_rate"], "reid_lbph": clip_rate("reidentification_rate_lbph"),
           "bound_1_over_k": 1 / args.k, "tracks": rows, "output": r["output"]}
    print(f"wall {wall:.1f} s, CPU {cpu:.1f} s ({res['cpu_s_per_frame']:.2f} CPU s / frame); "
          f"{res['n_tracks']} tracks, {res['n_people']} people, one surrogate per track: {one_surrogate}; "
          f"tracked faces {faces} of {res['expected_faces']}, fallbacks {res['fallback_faces']}")
    print(f"re-identification: dlib {res['reid_dlib']:.3f}, LBPH {res['reid_lbph']:.3f} (1/k = {1 / args.k:.3f})")
    for t in rows:
        print(f"  track {t['track']}: frames {t['first_frame']}-{t['last_frame']} ({t['n_frames']}), person "
              f"{t['person']}, cluster {t['cluster']}, reid dlib {t['reidentification_rate']:.3f} "
              f"LBPH {t['reidentification_rate_lbph']:.3f}")
    (work / "result.json").write_text(json.dumps(res, indent=1), encoding="utf-8")
    return res


if __name__ == "__main__":
    main()
