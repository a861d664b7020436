"""The demo's training job (a copy of examples/train.py shipped inside the package, so the
demo works from an installed gpuhop too): counts steps, checkpoints into $GPUHOP_VOLUME after
each one, resumes from the checkpoint after a relaunch, and checkpoints at once on SIGTERM.

Usage: python demo_train.py [--steps N] [--step-seconds S] [--weights-mb M]

--weights-mb writes a file of M MB of "weights" into the volume once, as a model would: a
checkpoint with some size, so that moving it through object storage has a price to show.
"""
import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--step-seconds", type=float, default=0.5)
    parser.add_argument("--weights-mb", type=int, default=0)
    args = parser.parse_args()

    volume = Path(os.environ.get("GPUHOP_VOLUME", "."))
    volume.mkdir(parents=True, exist_ok=True)
    ckpt = volume / "checkpoint.json"
    steps_log = volume / "steps.log"
    attempt = os.environ.get("GPUHOP_ATTEMPT", "?")
    weights = volume / "weights.bin"
    if args.weights_mb > 0 and not weights.exists():
        tmp = weights.with_suffix(".tmp")
        tmp.write_bytes(os.urandom(args.weights_mb << 20))
        os.replace(tmp, weights)

    step = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
    # a step logged after the last checkpoint was not kept: drop it so it is redone once
    if steps_log.exists():
        kept = [line for line in steps_log.read_text().splitlines() if line and int(line.split()[0]) <= step]
        steps_log.write_text("".join(f"{line}\n" for line in kept))
    print(f"attempt {attempt}: starting at step {step} of {args.steps}", flush=True)

    stopping = False

    def on_term(signum, frame):  # the provider's notice: finish this step, checkpoint, leave
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    loss = 2.0 * (0.97 ** step)
    while step < args.steps:
        time.sleep(args.step_seconds)  # the "work"
        step += 1
        loss *= 0.97
        with open(steps_log, "a") as fh:
            fh.write(f"{step} attempt={attempt}\n")
        tmp = ckpt.with_suffix(".tmp")
        tmp.write_text(json.dumps({"step": step, "loss": loss}))
        os.replace(tmp, ckpt)  # atomic: a kill never leaves half a checkpoint
        print(f"step {step:4d}  loss {loss:.4f}", flush=True)
        if stopping:
            print(f"attempt {attempt}: SIGTERM, checkpointed at step {step}", flush=True)
            return 143
    print(f"attempt {attempt}: done, {step} steps", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
