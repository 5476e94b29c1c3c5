#!/usr/bin/env python3
"""Inference time of a chexcy model in onnxruntime vs chexcy's own forward (eval mode), side by side.

    python tools/bench_onnx.py                          # every architecture, batch 16, 2 threads
    python tools/bench_onnx.py --arch resnet18 --size 320 --repeats 20

For each model: build it (random weights, randomised BatchNorm statistics), export it with
chexcy.onnx_export.build_onnx_model, check that onnxruntime's logits equal chexcy's, then time one
forward pass of a batch of random images, alternating chexcy and onnxruntime so both see the same machine
load, and report the median milliseconds per batch, images/s and the ratio. chexcy runs on the compiled
kernels with `--threads` OpenMP threads; onnxruntime's CPU provider gets the same number of intra-op
threads (one inter-op thread, sequential execution). Multiview is timed on studies with both views.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))         # run from a checkout without installing

MODELS = {      # name -> (arch, config, image size): the small models at 128, torchvision's at their 224
    "simple (ref-cnn)": ("simple", dict(widths=[16, 32, 64, 128]), 128),
    "resnet": ("resnet", dict(widths=[16, 32, 64, 128], blocks=1), 128),
    "multiview": ("multiview", dict(backbone="simple", widths=[16, 32, 64, 128], hidden=64), 128),
    "resnet18": ("resnet18", dict(), 224),
    "densenet121": ("densenet121", dict(), 224),
}


def timed(fn, repeats):
    fn()                                             # warm-up (allocations, onnxruntime's first run)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted({arch for arch, _, _ in MODELS.values()}),
                        help="only this architecture")
    parser.add_argument("--size", type=int, help="image size (default 128, and 224 for resnet18/densenet121)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15, help="timed batches per engine (default 15)")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    from chexcy import __version__, ops
    from chexcy.nn import BatchNorm2d, build_model
    from chexcy.onnx_export import build_onnx_model
    ops.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"chexcy {__version__} ({ops.get_backend()} x{ops.get_num_threads()}) vs onnxruntime {ort.__version__} "
          f"(CPU, {args.threads} intra-op threads); batch {args.batch}, median of {args.repeats}")
    print(f"{'model':<18} {'size':>5} {'chexcy ms':>10} {'ort ms':>9} {'chexcy img/s':>13} {'ort img/s':>10} "
          f"{'ort speed-up':>13} {'max |diff|':>11}")
    for name, (arch, config, size) in MODELS.items():
        if args.arch and arch != args.arch:
            continue
        size = args.size or size
        model = build_model(arch, **config)
        for m in model.modules():
            if isinstance(m, BatchNorm2d):
                m.running_mean[:] = rng.normal(0, 0.5, m.num_features)
                m.running_var[:] = rng.uniform(0.5, 2.0, m.num_features)
        model.eval()
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session = ort.InferenceSession(build_onnx_model(model, size).SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        x = rng.normal(size=(args.batch, 1, size, size)).astype(np.float32)
        if arch == "multiview":
            ones = np.ones(args.batch, np.float32)
            feeds = dict(frontal=x, lateral=x[::-1].copy(), has_frontal=ones, has_lateral=ones,
                         tabular=np.full((args.batch, 2), 0.5, np.float32))
        else:
            feeds = dict(image=x)

        def run_chexcy(model=model, feeds=feeds, arch=arch, x=x):
            return model.forward(**feeds) if arch == "multiview" else model.forward(x)

        def run_ort(session=session, feeds=feeds):
            return session.run(None, feeds)[0]

        diff = float(np.abs(run_chexcy() - run_ort()).max())
        t_chexcy, t_ort = [], []
        for _ in range(3):          # alternate in rounds so drifting machine load hits both engines
            t_chexcy += timed(run_chexcy, max(1, args.repeats // 3))
            t_ort += timed(run_ort, max(1, args.repeats // 3))
        mc, mo = statistics.median(t_chexcy), statistics.median(t_ort)
        print(f"{name:<18} {size:>5} {mc * 1e3:>10.1f} {mo * 1e3:>9.1f} {args.batch / mc:>13.0f} "
              f"{args.batch / mo:>10.0f} {mc / mo:>12.2f}x {diff:>11.1e}")


if __name__ == "__main__":
    main()
