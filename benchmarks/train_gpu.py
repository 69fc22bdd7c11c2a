"""Training images/s on one GPU: resnet50 multi-label at full 256x1600 sheets, bf16, one worker.

    python benchmarks/train_gpu.py [--n 1024] [--batch 32] [--loader-workers 14]

Runs the training worker's own pieces (``train_data.SheetDataset`` with the ``light`` preset in DataLoader
processes, ``train.train_epoch`` with bf16 autocast and channels_last) in one process, without Ray
Train around it: the figure is what one Ray Train GPU worker's loop can do. Also times the same
steps on one batch already on the GPU, to show whether the data path or the model is the limit.
Sheets: synthetic Severstal 1600x256 JPEGs.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from steelray import config, data, models, synth, train, train_data  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--loader-workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "steelray-train-gpu"))
    args = ap.parse_args()
    assert torch.cuda.is_available(), "no GPU"
    print(f"# {torch.cuda.get_device_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}", flush=True)
    written = synth.make_severstal(args.work, args.n, seed=2, workers=os.cpu_count())
    cfg = config.load("jobs/configs/severstal_multilabel.yaml", [
        f"data.root={written.root}", f"model.name={args.model}", "input.size=[256,1600]", "input.crop=[]",
        "input.augment=light", f"train.batch_size={args.batch}", "data.verify_images=false"])
    manifest = data.build_manifest(cfg)
    records = train_data.records(manifest, cfg.task)
    pre = models.preprocess_for(cfg)
    device = torch.device("cuda")
    model = models.build_model(cfg, len(manifest.classes)).to(device).to(memory_format=torch.channels_last)
    loader = DataLoader(train_data.SheetDataset(records, cfg.task, pre, "light", train=True),
                        batch_size=args.batch, shuffle=True, num_workers=args.loader_workers, pin_memory=True,
                        drop_last=True, persistent_workers=True)
    loss_fn = train.make_loss(cfg.task, None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    for epoch in range(2):  # the first includes cuDNN autotuning and worker start-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        _, seen = train.train_epoch(model, loader, loss_fn, optimizer, scheduler, cfg, pre, device, True)
        torch.cuda.synchronize()
        rate = seen / (time.perf_counter() - start)
        print(f"epoch {epoch + 1}: {rate:.0f} img/s through the training loop ({seen} sheets, "
              f"{args.loader_workers} loader processes)", flush=True)
    x, y = next(iter(loader))
    x, y = x.to(device).contiguous(memory_format=torch.channels_last), y.to(device)
    steps = 30
    for i in range(steps + 3):
        if i == 3:
            torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast("cuda", torch.bfloat16):
            loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    print(f"model alone (one batch resident on the GPU): {steps * args.batch / (time.perf_counter() - start):.0f} img/s "
          f"({args.model} 256x1600 bf16 batch {args.batch})", flush=True)
    print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)


if __name__ == "__main__":
    main()
