#!/usr/bin/env python3
"""Training speed and memory of ref-cnn (DESIGN.md section 7) and of torchvision's deep networks, side by side.

    python tools/bench_train.py                       # 128x128, batch 32, 2 threads: cython vs python
    python tools/bench_train.py --arch densenet121 --size 224 --batch 16 --torch-python /work/venv-bench/bin/python
        # resnet18|resnet34|resnet50|densenet121: chexcy beside torch NCHW / channels_last; training step,
        # forward-only (eval) throughput, peak RSS (ru_maxrss) of each run in a fresh process; --profile adds
        # chexcy's time per op
    python tools/bench_train.py --torch-python /tmp/torchenv/bin/python   # + torch NCHW / channels_last
    python tools/bench_train.py --rss                 # + peak RSS training on 20,000 prepared images
    python tools/bench_train.py --profile             # + time per layer (cython backend)

Speed: one training step = forward, masked BCE, backward, SGD momentum 0.9 update, exactly the code
`chexcy train` runs (model.forward / bce_with_logits / model.backward / optimizer.step) on random
images already in memory, so the figure is the compute of a step. Each backend warms up, then the median
of the timed steps gives images/s and GFLOP/s (training FLOPs = 3 x forward multiply-adds x 2). torch runs
in this interpreter when `import torch` works, else in `--torch-python` (a subprocess), else it is skipped.

Memory: `--rss` writes a prepared folder of 20,000 random 128x128 images (about 330 MB on disk), then
trains ref-cnn on it with `chexcy.train.fit` (the real loader, memory-mapped images) in a child process for
`--rss-steps` steps, sampling /proc/self/status. It reports the peak RSS (VmHWM) and its parts: anonymous
memory (the process's own arrays) and file-backed pages (the memory map of images.npy, clean page cache
the kernel can drop at any time).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))         # run from a checkout without installing


def ref_cnn_flops(size, widths=(16, 32, 64, 128), classes=14):
    """Multiply-adds x 2 of one ref-cnn forward pass on a size x size image (convs and the linear layer)."""
    flops, side, prev = 0, size, 1
    for i, w in enumerate(widths):
        flops += 2 * side * side * w * prev * 9
        prev = w
        if i < len(widths) - 1:
            side //= 2
    return flops + 2 * prev * classes


def bench_chexcy(backend, size, batch, steps, warmup, threads, profile=False):
    from chexcy import nn, ops
    from chexcy.memory import reuse_freed_memory
    from chexcy.optim import SGD
    ops.set_backend(backend)
    if threads:
        ops.set_num_threads(threads)
    reuse_freed_memory()                            # as chexcy.train.fit does
    rng = np.random.default_rng(0)
    model = nn.build_model("simple", widths=[16, 32, 64, 128])
    opt = SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = rng.standard_normal((batch, 1, size, size)).astype(np.float32)
    y = (rng.random((batch, 14)) < 0.3).astype(np.float32)
    times = []
    layer_times = {}
    if profile:
        _instrument(model, layer_times)
    for i in range(warmup + steps):
        if i == warmup:
            layer_times.clear()
        t0 = time.perf_counter()
        logits = model.forward(x)
        loss, dlogits = nn.bce_with_logits(logits, y)
        model.backward(dlogits)
        opt.step()
        times.append(time.perf_counter() - t0)
    return times[warmup:], layer_times


def _instrument(model, table):
    """Wrap every leaf layer's forward/backward with a timer accumulating into table[(name, phase)]."""
    for name, module in _leaves(model):
        for phase in ("forward", "backward"):
            original = getattr(module, phase)

            def timed(*args, _orig=original, _key=(name, phase), **kwargs):
                t0 = time.perf_counter()
                out = _orig(*args, **kwargs)
                table[_key] = table.get(_key, 0.0) + time.perf_counter() - t0
                return out
            setattr(module, phase, timed)


def _leaves(module, prefix=""):
    children = list(module.named_children())
    if not children:
        yield prefix.rstrip(".") + f" {type(module).__name__}", module
    for name, child in children:
        yield from _leaves(child, f"{prefix}{name}.")


TORCH_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import torch
    size, batch, steps, warmup, threads = map(int, sys.argv[1:6])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    results = {}
    for layout in ("nchw", "channels_last"):
        net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(64, 128, 3, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(128, 14))
        x = torch.randn(batch, 1, size, size)
        y = (torch.rand(batch, 14) < 0.3).float()
        if layout == "channels_last":
            net = net.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        loss_fn = torch.nn.BCEWithLogitsLoss()
        times = []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), y)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        results[layout] = times[warmup:]
    results["version"] = torch.__version__
    print(json.dumps(results))
""")


def bench_torch(python, size, batch, steps, warmup, threads):
    """Step times of torch in NCHW and channels_last, or None when torch is unavailable."""
    args = [str(size), str(batch), str(steps), str(warmup), str(threads)]
    try:
        import torch  # noqa: F401
        python = sys.executable
    except ImportError:
        if not python:
            return None
    done = subprocess.run([python, "-c", TORCH_SCRIPT, *args], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"torch benchmark failed ({python}): {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout)


# -- memory ---------------------------------------------------------------------------------------------
def write_prepared(folder, n, size, seed=0):
    """A prepared folder of n random images in the format chexcy.data.PreparedDataset reads."""
    import pandas as pd

    from chexcy.data import LABELS
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = np.lib.format.open_memmap(os.path.join(folder, "images.npy"), mode="w+", dtype=np.uint8,
                                       shape=(n, 1, size, size))
    for start in range(0, n, 1000):                  # bounded memory while writing
        stop = min(n, start + 1000)
        images[start:stop] = rng.integers(0, 256, (stop - start, 1, size, size), dtype=np.uint8)
    images.flush()
    del images
    labels = rng.choice(np.array([0.0, 1.0, np.nan], np.float32), size=(n, len(LABELS)))
    np.save(os.path.join(folder, "labels.npy"), labels)
    meta = pd.DataFrame({"path": [f"bench/patient{i:05d}/study1/view1_frontal.jpg" for i in range(n)],
                         "csv_row": np.arange(n), "patient": [f"patient{i:05d}" for i in range(n)],
                         "study": "study1", "view": "Frontal", "ap_pa": "AP", "sex": "Male", "age": 50})
    meta.to_csv(os.path.join(folder, "meta.csv"), index=False)
    manifest = {"format_version": 1, "size": size, "count": n, "label_names": list(LABELS),
                "policy": {"uncertain": {name: "ignore" for name in LABELS}, "blank": "ignore"}}
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(manifest, f)


RSS_CHILD = textwrap.dedent("""
    import json, sys, threading, time
    folder, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    stop = False
    def status():
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile", "VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0])
        return out
    def sample():
        while not stop:
            s = status()
            for k in peak:
                peak[k] = max(peak[k], s.get(k, 0))
            time.sleep(0.01)
    threading.Thread(target=sample, daemon=True).start()
    import numpy as np
    from chexcy import nn, ops
    from chexcy.data import BatchLoader, PreparedDataset
    from chexcy.memory import reuse_freed_memory
    from chexcy.optim import SGD
    ops.set_num_threads(threads)
    reuse_freed_memory()                            # as chexcy.train.fit does
    ds = PreparedDataset(folder)                    # images memory-mapped
    model = nn.build_model("simple", widths=[16, 32, 64, 128])
    opt = SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader = BatchLoader(ds, 32, shuffle=True, seed=0)
    t0 = time.perf_counter()
    # The step of chexcy.train.fit, on shuffled batches read from the memory map by the real loader.
    for step, batch in enumerate(loader.batches(0)):
        if step == steps:
            break
        logits = model.forward(batch.images)
        loss, dlogits = nn.bce_with_logits(logits, batch.labels, batch.mask)
        model.backward(dlogits)
        opt.step()
    seconds = time.perf_counter() - t0
    stop = True
    final = status()
    print(json.dumps({"peak_anon_kb": peak["RssAnon"], "peak_file_kb": peak["RssFile"],
                      "peak_rss_kb": final["VmHWM"], "seconds": seconds, "n": len(ds)}))
""")


def bench_rss(n, size, steps, threads, keep=None):
    folder = keep or tempfile.mkdtemp(prefix="chexcy-bench-rss-")
    if not os.path.exists(os.path.join(folder, "manifest.json")):
        print(f"writing {n:,} random {size}x{size} images to {folder} ...", flush=True)
        write_prepared(folder, n, size)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(HERE) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    done = subprocess.run([sys.executable, "-c", RSS_CHILD, folder, str(steps), str(threads)], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"RSS child failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if keep is None:
        import shutil
        shutil.rmtree(folder, ignore_errors=True)
    return result


# -- torchvision's networks (--arch resnet18|resnet34|resnet50|densenet121) ---------------------------------
DEEP_ARCHS = ("resnet18", "resnet34", "resnet50", "densenet121")

# Each run is a fresh child process, so ru_maxrss is the peak of that run alone. A run: build the model,
# `warmup` + `steps` training steps (forward, BCE, backward, SGD momentum 0.9), the peak RSS so far, then
# `warmup` + `steps` forward-only batches in eval mode (torch: under no_grad, as evaluation runs).
CHILD_COMMON = textwrap.dedent("""
    import json, resource, sys, time
    arch, size, batch, steps, warmup, threads, layout = sys.argv[1:8]
    size, batch, steps, warmup, threads = map(int, (size, batch, steps, warmup, threads))
    def rss_now_kb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    def peak_kb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
""")

CHEXCY_DEEP_CHILD = CHILD_COMMON + textwrap.dedent("""
    import numpy as np
    from chexcy import nn, ops
    from chexcy.memory import reuse_freed_memory
    from chexcy.optim import SGD
    ops.set_num_threads(threads)
    reuse_freed_memory()                            # as chexcy.train.fit does
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 1, size, size)).astype(np.float32)
    y = (rng.random((batch, 14)) < 0.3).astype(np.float32)
    base = rss_now_kb()
    model = nn.build_model(arch)
    opt = SGD(model.parameters(), lr=0.01, momentum=0.9)
    profile = {}
    if layout == "profile":                         # time per op: wrap chexcy.ops, which every layer calls
        def wrap(name):
            original = getattr(ops, name)
            def timed(*args, **kwargs):
                t0 = time.perf_counter()
                out = original(*args, **kwargs)
                key = name
                if name.startswith("conv2d"):
                    w = args[2] if name == "conv2d_backward" else args[1]
                    stride = args[3] if name == "conv2d_backward" else args[3]
                    key = f"{name} {w.shape[2]}x{w.shape[3]} s{stride[0] if isinstance(stride, tuple) else stride}"
                profile[key] = profile.get(key, 0.0) + time.perf_counter() - t0
                return out
            setattr(ops, name, timed)
        for name in ("conv2d_forward", "conv2d_backward", "batch_norm2d_forward", "batch_norm2d_backward",
                     "max_pool2d_forward", "max_pool2d_backward", "avg_pool2d_forward", "avg_pool2d_backward",
                     "global_avg_pool2d_forward", "global_avg_pool2d_backward", "linear_forward",
                     "linear_backward", "relu_forward", "relu_backward"):
            wrap(name)
    train = []
    phases = {"forward": 0.0, "loss": 0.0, "backward": 0.0, "optimizer step": 0.0}
    for i in range(warmup + steps):
        if i == warmup:
            profile.clear()
            phases = dict.fromkeys(phases, 0.0)
        t0 = time.perf_counter()
        logits = model.forward(x)
        t1 = time.perf_counter()
        loss, dlogits = nn.bce_with_logits(logits, y)
        t2 = time.perf_counter()
        model.backward(dlogits)
        t3 = time.perf_counter()
        opt.step()
        t4 = time.perf_counter()
        train.append(t4 - t0)
        for key, seconds in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            phases[key] += seconds
    peak_train = peak_kb()
    train_profile = dict(profile)                   # the training steps' op times, not the forward-only ones
    train_profile.update({f"phase {k}": v for k, v in phases.items()})
    model.eval()
    forward = []
    for i in range(warmup + (0 if layout == "profile" else steps)):
        t0 = time.perf_counter()
        model.forward(x)
        forward.append(time.perf_counter() - t0)
    keys = {k: list(v.shape) for k, v in model.state_dict().items()}
    print(json.dumps(dict(train=train[warmup:], forward=forward[warmup:], peak_train_kb=peak_train,
                          base_kb=base, profile={k: v / max(1, steps) for k, v in train_profile.items()},
                          keys=keys, version=ops.get_backend())))
""")

TORCH_DEEP_CHILD = CHILD_COMMON + textwrap.dedent("""
    from collections import OrderedDict
    import torch
    from torch import nn
    import torch.nn.functional as F
    torch.set_num_threads(threads)
    torch.manual_seed(0)

    # torchvision's ResNet and DenseNet, written out with its module names (its wheel does not load beside
    # this CPU build of torch), so the state-dict keys can be compared with chexcy's.
    class BasicBlock(nn.Module):
        expansion = 1
        def __init__(self, inplanes, planes, stride=1, downsample=None):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample = downsample
        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
            out += identity
            return self.relu(out)

    class Bottleneck(nn.Module):
        expansion = 4
        def __init__(self, inplanes, planes, stride=1, downsample=None):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes * 4)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = downsample
        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            out += identity
            return self.relu(out)

    class ResNet(nn.Module):
        def __init__(self, block, layers, in_channels=1, num_classes=14):
            super().__init__()
            self.inplanes = 64
            self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            self.layer1 = self._make_layer(block, 64, layers[0], 1)
            self.layer2 = self._make_layer(block, 128, layers[1], 2)
            self.layer3 = self._make_layer(block, 256, layers[2], 2)
            self.layer4 = self._make_layer(block, 512, layers[3], 2)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512 * block.expansion, num_classes)
        def _make_layer(self, block, planes, blocks, stride):
            downsample = None
            if stride != 1 or self.inplanes != planes * block.expansion:
                downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                           nn.BatchNorm2d(planes * block.expansion))
            layers = [block(self.inplanes, planes, stride, downsample)]
            self.inplanes = planes * block.expansion
            layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
            return nn.Sequential(*layers)
        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    class DenseLayer(nn.Module):
        def __init__(self, c, growth, bn_size):
            super().__init__()
            self.norm1 = nn.BatchNorm2d(c)
            self.relu1 = nn.ReLU(inplace=True)
            self.conv1 = nn.Conv2d(c, bn_size * growth, 1, bias=False)
            self.norm2 = nn.BatchNorm2d(bn_size * growth)
            self.relu2 = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)
        def forward(self, features):
            x = torch.cat(features, 1)
            return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))

    class DenseBlock(nn.ModuleDict):
        def __init__(self, n, c, bn_size, growth):
            super().__init__()
            for i in range(n):
                self.add_module(f"denselayer{i + 1}", DenseLayer(c + i * growth, growth, bn_size))
        def forward(self, x):
            features = [x]
            for layer in self.values():
                features.append(layer(features))
            return torch.cat(features, 1)

    class Transition(nn.Sequential):
        def __init__(self, c, c_out):
            super().__init__()
            self.norm = nn.BatchNorm2d(c)
            self.relu = nn.ReLU(inplace=True)
            self.conv = nn.Conv2d(c, c_out, 1, bias=False)
            self.pool = nn.AvgPool2d(2, 2)

    class DenseNet(nn.Module):
        def __init__(self, growth=32, blocks=(6, 12, 24, 16), init=64, bn_size=4, in_channels=1, num_classes=14):
            super().__init__()
            self.features = nn.Sequential(OrderedDict([
                ("conv0", nn.Conv2d(in_channels, init, 7, 2, 3, bias=False)), ("norm0", nn.BatchNorm2d(init)),
                ("relu0", nn.ReLU(inplace=True)), ("pool0", nn.MaxPool2d(3, 2, 1))]))
            c = init
            for i, n in enumerate(blocks):
                self.features.add_module(f"denseblock{i + 1}", DenseBlock(n, c, bn_size, growth))
                c += n * growth
                if i != len(blocks) - 1:
                    self.features.add_module(f"transition{i + 1}", Transition(c, c // 2))
                    c //= 2
            self.features.add_module("norm5", nn.BatchNorm2d(c))
            self.classifier = nn.Linear(c, num_classes)
        def forward(self, x):
            out = F.relu(self.features(x), inplace=True)
            return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))

    builders = {"resnet18": lambda: ResNet(BasicBlock, [2, 2, 2, 2]), "resnet34": lambda: ResNet(BasicBlock, [3, 4, 6, 3]),
                "resnet50": lambda: ResNet(Bottleneck, [3, 4, 6, 3]), "densenet121": lambda: DenseNet()}
    x = torch.randn(batch, 1, size, size)
    y = (torch.rand(batch, 14) < 0.3).float()
    base = rss_now_kb()
    net = builders[arch]()
    if layout == "channels_last":
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.BCEWithLogitsLoss()
    train = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt.step()
        train.append(time.perf_counter() - t0)
    peak_train = peak_kb()
    net.eval()
    forward = []
    with torch.no_grad():
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            net(x)
            forward.append(time.perf_counter() - t0)
    keys = {k: list(v.shape) for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    print(json.dumps(dict(train=train[warmup:], forward=forward[warmup:], peak_train_kb=peak_train, base_kb=base,
                          keys=keys, version=torch.__version__)))
""")


def run_deep_child(python, script, args, env=None):
    done = subprocess.run([python, "-c", script, *map(str, args)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        print(f"  run failed ({python} {args[6]}): {done.stderr.strip()[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_deep(args):
    """chexcy (cython backend) beside torch NCHW and channels_last on one of torchvision's networks."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(HERE) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    common = [args.arch, args.size, args.batch, args.steps, args.warmup, args.threads]
    print(f"{args.arch} at {args.size}x{args.size}, 1 input channel, 14 outputs, batch {args.batch}, "
          f"{args.threads} threads; medians of {args.steps} timed steps after {args.warmup} warm-up, each run a "
          f"fresh process")
    if hasattr(os, "getloadavg"):
        print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs")
    runs = []
    mine = run_deep_child(sys.executable, CHEXCY_DEEP_CHILD, common + ["nchw"], env)
    if mine:
        runs.append(("chexcy cython", mine))
    torch_python = args.torch_python
    if args.no_torch:
        torch_python = None
    elif not torch_python:
        try:
            import torch  # noqa: F401
            torch_python = sys.executable
        except ImportError:
            print("  torch: not installed here (pass --torch-python PATH to include it)")
    if torch_python:
        for layout in ("nchw", "channels_last"):
            result = run_deep_child(torch_python, TORCH_DEEP_CHILD, common + [layout])
            if result:
                runs.append((f"torch {result['version']} {'NCHW' if layout == 'nchw' else layout}", result))
    print(f"{'':34s} {'train ms/step':>13s} {'img/s':>7s} {'forward ms':>10s} {'img/s':>7s} "
          f"{'peak RSS MB':>11s} {'(start MB)':>10s}")
    medians = {}
    for name, r in runs:
        t, f = statistics.median(r["train"]), statistics.median(r["forward"])
        medians[name] = (t, f, r["peak_train_kb"])
        print(f"  {name:32s} {1000 * t:13.0f} {args.batch / t:7.1f} {1000 * f:10.0f} {args.batch / f:7.1f} "
              f"{r['peak_train_kb'] / 1024:11.0f} {r['base_kb'] / 1024:10.0f}")
    torch_runs = [(n, m) for n, m in medians.items() if n.startswith("torch")]
    if mine and torch_runs:
        t, f, rss = medians["chexcy cython"]
        best_t = min(m[0] for _, m in torch_runs)
        best_f = min(m[1] for _, m in torch_runs)
        best_rss = min(m[2] for _, m in torch_runs)
        print(f"  chexcy vs torch's faster layout: training {best_t / t:.2f}x the images/s, forward "
              f"{best_f / f:.2f}x; peak RSS {rss / best_rss:.2f}x torch's smallest")
        theirs = dict(runs)[torch_runs[0][0]]["keys"]
        same = theirs == mine["keys"]
        print(f"  state_dict keys and shapes identical to the torch definition's: {'yes' if same else 'NO'}")
        if not same:
            print(f"    only chexcy: {sorted(set(mine['keys']) - set(theirs))[:5]}; only torch: "
                  f"{sorted(set(theirs) - set(mine['keys']))[:5]}")
    if hasattr(os, "getloadavg"):
        print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.profile:
        prof = run_deep_child(sys.executable, CHEXCY_DEEP_CHILD, common[:3] + [max(2, args.steps // 2), 1,
                                                                               args.threads, "profile"], env)
        if prof:
            step = statistics.mean(prof["train"])     # the op times are means over the same steps
            phases = {k[len("phase "):]: v for k, v in prof["profile"].items() if k.startswith("phase ")}
            ops_only = {k: v for k, v in prof["profile"].items() if not k.startswith("phase ")}
            print(f"\nwhere a chexcy training step goes ({args.arch}, {1000 * step:.0f} ms, mean of "
                  f"{len(prof['train'])} steps): " + ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in phases.items())
                  + "; time per op per step:")
            for name, seconds in sorted(ops_only.items(), key=lambda kv: -kv[1]):
                print(f"  {name:36s} {1000 * seconds:9.1f} ms {100 * seconds / step:5.1f}%")
            rest = step - sum(ops_only.values()) - phases.get("optimizer step", 0.0) - phases.get("loss", 0.0)
            print(f"  {'NumPy between the ops (ReLU, sums, ...)':36s} {1000 * rest:9.1f} ms {100 * rest / step:5.1f}%")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per backend (python: a third)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--backends", default="cython,python")
    parser.add_argument("--torch-python", help="an interpreter with torch, when this one has none")
    parser.add_argument("--profile", action="store_true", help="time per layer for the first backend")
    parser.add_argument("--no-torch", action="store_true", help="deep networks: chexcy alone (e.g. with --profile)")
    parser.add_argument("--rss", action="store_true", help="also measure peak RSS on 20,000 prepared images")
    parser.add_argument("--rss-images", type=int, default=20000)
    parser.add_argument("--rss-steps", type=int, default=100)
    parser.add_argument("--rss-folder", help="reuse/keep the prepared folder for --rss here")
    parser.add_argument("--arch", default="simple", choices=("simple",) + DEEP_ARCHS,
                        help="simple: ref-cnn (every backend, GFLOP/s); or one of torchvision's networks: chexcy's "
                             "compiled backend beside torch, training step, forward-only and peak RSS")
    args = parser.parse_args()
    if args.arch in DEEP_ARCHS:
        return bench_deep(args)

    from chexcy import ops
    flops_step = 3 * ref_cnn_flops(args.size) * args.batch
    print(f"ref-cnn training step: {args.size}x{args.size}, batch {args.batch}, {args.threads} threads, "
          f"{flops_step / args.batch / 1e9:.3f} GFLOP per image; median of timed steps after {args.warmup} warm-up")
    if hasattr(os, "getloadavg"):
        # On a shared machine the figures mean little without this: an OpenMP region waits for its slowest
        # thread, and a descheduled thread costs milliseconds per region.
        print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs")
    rows = []
    layer_tables = {}
    for i, backend in enumerate(args.backends.split(",")):
        if backend not in ops.available_backends():
            print(f"  {backend}: not available")
            continue
        steps = args.steps if backend == "cython" else max(3, args.steps // 3)
        times, layers = bench_chexcy(backend, args.size, args.batch, steps, args.warmup, args.threads,
                                     profile=args.profile and i == 0)
        if layers:
            layer_tables[backend] = (layers, steps)
        rows.append((f"chexcy {backend}", times))
    torch_times = bench_torch(args.torch_python, args.size, args.batch, args.steps, args.warmup, args.threads)
    if torch_times:
        rows.append((f"torch {torch_times['version']} NCHW", torch_times["nchw"]))
        rows.append((f"torch {torch_times['version']} channels_last", torch_times["channels_last"]))
    else:
        print("  torch: not installed here (pass --torch-python PATH to include it)")
    base = None
    print(f"{'':34s} {'ms/step':>9s} {'images/s':>9s} {'GFLOP/s':>8s} {'vs python':>9s}")
    medians = {name: statistics.median(t) for name, t in rows}
    base = medians.get("chexcy python")
    for name, _ in rows:
        m = medians[name]
        ratio = f"{base / m:8.2f}x" if base else "      n/a"
        print(f"  {name:32s} {1000 * m:9.1f} {args.batch / m:9.1f} {flops_step / m / 1e9:8.1f} {ratio}")
    cy = medians.get("chexcy cython")
    if cy and torch_times:
        best_torch = min(statistics.median(torch_times[k]) for k in ("nchw", "channels_last"))
        print(f"  cython vs torch's fastest layout: {best_torch / cy:.2f}x the images/s")
    if hasattr(os, "getloadavg"):
        print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for backend, (layers, steps) in layer_tables.items():
        print(f"\nper layer, {backend} backend (ms per step, mean of {steps} steps):")
        for (name, phase), seconds in sorted(layers.items(), key=lambda kv: -kv[1]):
            print(f"  {name:40s} {phase:8s} {1000 * seconds / steps:8.2f}")
    if args.rss:
        r = bench_rss(args.rss_images, args.size, args.rss_steps, args.threads, args.rss_folder)
        print(f"\npeak RSS training ref-cnn {args.size}x{args.size} batch 32 on {r['n']:,} prepared images "
              f"({args.rss_steps} steps, {r['seconds']:.0f} s): {r['peak_rss_kb'] / 1024:.0f} MB "
              f"(VmHWM); sampled peaks: anonymous {r['peak_anon_kb'] / 1024:.0f} MB, "
              f"file-backed (memory-mapped images) {r['peak_file_kb'] / 1024:.0f} MB")


if __name__ == "__main__":
    main()
