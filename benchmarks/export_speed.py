"""Sheets/s of the four ways a model actor can run a model on CPU, side by side in one run: PyTorch
eager, PyTorch compiled (``score.compile``), ONNX Runtime fp32 and ONNX Runtime INT8
(``score.engine=onnxruntime``), each through the scoring actor's own model call (uint8 sheets in,
probabilities out), on the same batches, in alternating rounds. Plus the NEU model's macro-F1 of
each on its validation split (``evaluate.run``'s metrics; the compiled model through the same path).

    .ci/in-venv python benchmarks/export_speed.py --neu-checkpoint /tmp/neuexp/neu-export/epoch-0069 \
        --neu ../shared/data/neu-det --severstal ../shared/data/severstal-sample

Models: the NEU checkpoint given (trained with jobs/configs/neu.yaml) and an untrained resnet18
(multi-label, 4 classes, 1 channel) at 256x1600, calibrated on the real Severstal sample's sheets.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np
import torch


def engines(ckpt: str, fp32: str, int8: str, threads: int, batch: int):
    from steelray import config
    from steelray.scoring.actor import ActorSettings, ExportedModel, TorchModel
    from steelray.scoring.plan import make_plan

    def info(uri, engine):
        return make_plan(config.load(None, [f"score.checkpoint={uri}", f"score.engine={engine}"],
                                     config.ScoreJob).score, None).primary

    plain = ActorSettings(threads=threads, batch=batch)
    compiled = ActorSettings(threads=threads, batch=batch, compile=True)
    return {"PyTorch eager": TorchModel(info(ckpt, "torch"), plain, None),
            "PyTorch compiled": TorchModel(info(ckpt, "torch"), compiled, None),
            "ONNX Runtime fp32": ExportedModel(info(fp32, "onnxruntime"), plain),
            "ONNX Runtime INT8": ExportedModel(info(int8, "onnxruntime"), plain)}


def speed(models: dict, batch: np.ndarray, rounds: int, seconds: float) -> dict:
    """Median sheets/s per engine over ``rounds`` alternating rounds of about ``seconds`` each."""
    rates = {name: [] for name in models}
    for m in models.values():  # warm-up (the compile happens here)
        m.probabilities(batch)
        m.probabilities(batch)
    for _ in range(rounds):
        for name, m in models.items():
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                m.probabilities(batch)
                n += len(batch)
            rates[name].append(n / (time.perf_counter() - start))
    return {name: {"median": statistics.median(r), "rounds": [round(x, 1) for x in r]} for name, r in rates.items()}


def sheet_model(folder: str, severstal: str) -> tuple[str, np.ndarray]:
    """An untrained resnet18 checkpoint (multi-label, 4 classes, 1 channel, 256x1600) in ``folder``,
    and the real sheets of ``severstal``/train_images at its input size."""
    from steelray import checkpoint, config, data, export, model_io, models

    cfg = config.load(None, ["task=multilabel", "model.name=resnet18", "input.size=[256,1600]", "data.format=severstal"])
    torch.manual_seed(0)
    checkpoint.write(folder, models.build_model(cfg, 4),
                     checkpoint.make_meta(cfg, list(data.SEVERSTAL_CLASSES), models.preprocess_for(cfg)))
    images = os.path.join(severstal, "train_images")
    return folder, export.sheets(sorted(os.path.join(images, n) for n in os.listdir(images)),
                                 model_io.Preprocess.from_dict(checkpoint.read_meta(folder)["preprocess"]))


def validation_batch(ckpt: str, data_root: str, n: int) -> np.ndarray:
    """The first ``n`` images of the checkpoint's validation split (its data at ``data_root``) at its
    input size, as the decode stage gives them to a model actor."""
    from steelray import checkpoint, config, data, evaluate, export, model_io

    meta = checkpoint.read_meta(ckpt)
    job = config.load(None, [f"export.checkpoint={ckpt}", f"data.root={data_root}"], config.ExportJob)
    labelled = evaluate.labelled_set_config(meta, export.gate_job(job, ckpt))
    val = data.split(data.build_manifest(labelled), labelled.data)[1]
    return export.sheets(val.records.uri.tolist()[:n], model_io.Preprocess.from_dict(meta["preprocess"]))


def write_results(results: dict, folder: str) -> None:
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"results: {folder}/results.json")


def repeated(sheets: np.ndarray, n: int) -> np.ndarray:
    """``n`` of ``sheets``, repeating them where there are fewer."""
    return np.resize(sheets, (n, *sheets.shape[1:])) if n > len(sheets) else sheets[:n]


def neu_f1(ckpt: str, fp32: str, int8: str, data_root: str) -> dict:
    from steelray import config, evaluate, metrics, predict

    def job(uri):
        return config.load(None, [f"evaluate.checkpoint={uri}", "evaluate.robustness=false", "evaluate.device=cpu",
                                  f"data.root={data_root}"], config.EvaluateJob)

    out = {}
    eager = evaluate.run(job(ckpt))
    out["PyTorch eager"] = eager.before["macro_f1"]
    module = torch.compile(predict.load_model(job(ckpt)), dynamic=False)
    probs = predict.predict(module, eager.meta, eager.manifest, eager.job)
    out["PyTorch compiled"] = metrics.classification_detail(eager.task, probs, eager.targets, eager.classes,
                                                            eager.meta["thresholds"])["macro_f1"]
    out["ONNX Runtime fp32"] = evaluate.run(job(fp32)).before["macro_f1"]
    out["ONNX Runtime INT8"] = evaluate.run(job(int8)).before["macro_f1"]
    out["images"] = len(eager.manifest)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--neu-checkpoint", required=True)
    p.add_argument("--neu", required=True, help="the NEU data root the checkpoint was trained on")
    p.add_argument("--severstal", required=True, help="folder with train_images/ of real sheets (calibration)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16, help="the CPU actor's model batch (score.batch_size default)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=8.0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from steelray import checkpoint, config, export, model_io, onnx_model, quantize

    tmp = tempfile.mkdtemp(prefix="export-speed-")
    results = {"threads": args.threads, "batch": args.batch, "torch": torch.__version__}
    # The NEU model: jobs/export.py's own run (parity, calibration on 128 training images, the gate).
    job = config.load(None, [f"export.checkpoint={args.neu_checkpoint}", f"export.out={tmp}/neu",
                             f"data.root={args.neu}"], config.ExportJob)
    start = time.perf_counter()
    ex = export.run(job)
    results["neu_export"] = {**ex.summary(), "seconds": time.perf_counter() - start}
    print(json.dumps(results["neu_export"], indent=1), flush=True)
    batch = validation_batch(args.neu_checkpoint, args.neu, args.batch)
    int8 = ex.int8.get("uri") or os.path.join(tmp, "neu", export.INT8)
    results["neu_speed"] = speed(engines(args.neu_checkpoint, ex.fp32["uri"], int8, args.threads, args.batch),
                                 batch, args.rounds, args.seconds)
    print("NEU", json.dumps(results["neu_speed"]), flush=True)
    results["neu_macro_f1"] = neu_f1(args.neu_checkpoint, ex.fp32["uri"], int8, args.neu)
    print("NEU macro-F1", json.dumps(results["neu_macro_f1"]), flush=True)

    # resnet18 at 256x1600, untrained: speed only; INT8 calibrated on the real sheets.
    r18, calib = sheet_model(f"{tmp}/r18", args.severstal)
    model, r18_meta = checkpoint.load_model(r18)
    fp32 = export.to_onnx(model, {**r18_meta, "export": {"precision": "fp32", "checkpoint": r18}})
    q = quantize.quantize(fp32, (calib[i:i + 4] for i in range(0, len(calib), 4)))
    q = export.with_meta(q, {**r18_meta, "export": {"precision": "int8", "checkpoint": r18}})
    for name, blob in (("model.onnx", fp32), ("model.int8.onnx", q)):
        with open(f"{r18}/{name}", "wb") as f:
            f.write(blob)
    r18_pre = model_io.Preprocess.from_dict(r18_meta["preprocess"])
    diff = export.parity(export.Graph(model, r18_pre, "multilabel"), onnx_model.OnnxModel(fp32), calib, step=4)
    results["r18_parity_max_abs_diff"] = diff
    results["r18_speed"] = speed(engines(r18, f"{r18}/model.onnx", f"{r18}/model.int8.onnx", args.threads, args.batch),
                                 repeated(calib, args.batch), args.rounds, args.seconds)
    print("resnet18 256x1600", json.dumps(results["r18_speed"]), flush=True)
    write_results(results, tmp)


if __name__ == "__main__":
    main()
