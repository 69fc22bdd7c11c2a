"""Training-step throughput on CPU, contiguous (NCHW) vs channels_last, side by side in one run.

    .ci/in-venv python benchmarks/channels_last_cpu.py [--threads 2] [--steps 5]

Why: channels_last was GPU-only in the training loop; oneDNN's CPU convolutions are faster with it
too, which buys epochs in the CPU-only NEU benchmark (docs/benchmarks.md).
"""
import argparse
import time

import timm
import torch


def images_per_s(name: str, size: int, channels_last: bool, steps: int, batch: int = 32) -> float:
    model = timm.create_model(name, in_chans=1, num_classes=6)
    x, y = torch.randn(batch, 1, size, size), torch.randint(0, 6, (batch,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters())
    for i in range(steps + 2):          # two warm-up steps
        if i == 2:
            start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name, size in [("resnet18", 96), ("resnet18", 112), ("resnet10t", 112), ("resnet14t", 96)]:
        plain = images_per_s(name, size, False, args.steps)
        last = images_per_s(name, size, True, args.steps)
        print(f"{name} {size}x{size}: contiguous {plain:.1f} img/s, channels_last {last:.1f} img/s "
              f"({last / plain:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
