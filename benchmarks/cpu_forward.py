"""The bare model on CPU: images/s by batch size, eager against ``torch.compile``, in one process.

    .ci/in-venv python benchmarks/cpu_forward.py [--threads 2] [--model resnet18 --size 128 800]
                                                 [--batches 1 4 8 16 32] [--rounds 2]

Why: the scoring job's CPU default batch (16) and ``score.compile=auto`` rest on how the model alone
behaves on CPU. Random weights and inputs (speed does not depend on them), channels_last, inference
mode; each figure is the rate over a few calls after one warm-up call (the compile happens there and
is timed separately).
"""

import argparse
import time

import timm
import torch


def rate(model, batch: int, size: tuple[int, int], calls: int) -> float:
    x = torch.randn(batch, 1, *size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        model(x)  # warm-up (and the compile, for a compiled model)
        start = time.perf_counter()
        for _ in range(calls):
            model(x)
    return calls * batch / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, nargs=2, default=[128, 800])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--images", type=int, default=64, help="images per measurement")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    size = tuple(args.size)
    model = timm.create_model(args.model, num_classes=4, in_chans=1).eval().to(memory_format=torch.channels_last)
    print(f"# {args.model} {size[0]}x{size[1]}, {args.threads} threads, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}")
    for r in range(args.rounds):
        line = [f"b{b}: {rate(model, b, size, max(1, args.images // b)):.1f}" for b in args.batches]
        print(f"round {r + 1} eager img/s  " + "  ".join(line), flush=True)
    b16 = 16
    torch._dynamo.reset()
    compiled = torch.compile(model, dynamic=False)
    start = time.perf_counter()
    with torch.inference_mode():
        compiled(torch.randn(b16, 1, *size).contiguous(memory_format=torch.channels_last))
    print(f"compile (batch {b16}): {time.perf_counter() - start:.1f} s", flush=True)
    for r in range(args.rounds):
        eager, comp = rate(model, b16, size, args.images // b16), rate(compiled, b16, size, args.images // b16)
        print(f"round {r + 1} batch {b16}: eager {eager:.1f} img/s, compiled {comp:.1f} img/s ({comp / eager:.2f}x)",
              flush=True)


if __name__ == "__main__":
    main()
