"""Training throughput on the real data path: minilearn's fast path against a careful hand-written loop.

The recipe of the label-noise study: CIFAR-10 images decoded once into memory (uint8), the course CNN
(Conv-BN-ReLU, 0.39 M parameters), random crop with 4 pixels of zero padding and horizontal flip,
SGD. Variants, interleaved round by round (the order reversed every other round), one epoch of
`--n-images` each per round, CPU process time (`--clock cpu`), median over rounds of the ratio to
the hand-written loop measured in the same round:

  raw            hand-written: uint8 channels-last tensors, batches gathered by index from a seeded
                 permutation, normalization, crop + flip in one gather on the batch, loss and
                 accuracy summed on the device (what a careful PyTorch user writes)
  raw_again      the same loop again: its ratio is the noise floor
  fast           DataBunch.from_tensors + ChannelsLast + Normalize + RandomCropPad + RandomFlip,
                 with AvgStatsCallback(accuracy), Recorder and ProgressCallback (output discarded)
  datasets       DataBunch.from_datasets(Dataset(x, y)) on float images in memory (per-item reads
                 and collate: NCHW batches), same callbacks without ChannelsLast: a new user's path
  datasets+cl    datasets with ChannelsLast

Then the data path's share of a step: `fast` and `raw` again with the model replaced by a no-op
(one parameter, logits that ignore the input), divided by the full step; and the same less a no-op
step that trains on one fixed batch (`raw_no_data`: loss, backward and SGD step without any data path).
And `--decode`: the 20,000 training JPEGs of CIFAR-10 decoded once by `LabeledData.to_tensors` against
torchvision's ImageFolder + DataLoader with the same workers (each run in a fresh process: images/s,
and peak memory while decoding over the raw uint8 size).

    python bench/train_throughput.py --threads 1 --clock cpu                 # throughput, bs 128 and 32
    python bench/train_throughput.py --decode --decode-workers 2 --skip-throughput
    python bench/train_throughput.py --device cuda --arch resnet18 --batch-sizes 512   # GPU: images/s

With `--device cuda` the data is resident on the GPU (`from_tensors(device=...)`), the fast path
adds MixedPrecision, the hand-written loop uses autocast and a GradScaler-free bf16 forward, and
`--sync-check` runs one more minilearn epoch under `torch.cuda.set_sync_debug_mode('error')`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from _common import add_run_options, start_run  # noqa: E402
from minilearn import (AvgStatsCallback, BatchTransformXCallback, Callback, ChannelsLast,  # noqa: E402
                       DataBunch, Dataset, DeviceCallback, Learner, MixedPrecision, Normalize, ProgressCallback,
                       RandomCropPad, RandomFlip, Recorder, accuracy, cifar10_data, get_cnn_model, init_cnn,
                       resnet18_cifar)

# The shared copy next to the repository, or next to the folder of worktrees.
DEFAULT_DATA = next((p / 'shared' / 'data' / 'cifar10' for p in (REPO.parent, REPO.parent.parent)
                     if (p / 'shared' / 'data' / 'cifar10').is_dir()), REPO.parent / 'shared' / 'data' / 'cifar10')
CNN_WIDTHS = (32, 64, 128, 256)
LR, PAD = 0.05, 4
TARGETS = {('fast', 128): 1.05, ('fast', 32): 1.08}


# ---- data and models ------------------------------------------------------------------------------------
def load_images(args) -> tuple[torch.Tensor, torch.Tensor, str]:
    """`--n-images` CIFAR-10 training images decoded once (uint8, channels-last), or random ones without the data."""
    if args.data.is_dir():
        sd = cifar10_data(args.data, n_per_class=args.n_images // 10, valid_n_per_class=1)
        x, y = sd.train.to_tensors(num_workers=args.decode_workers, progress=False)
        return x, y, f'{len(x)} CIFAR-10 images from {args.data}'
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.n_images, 3, 32, 32), dtype=torch.uint8, generator=g)
    return (x.contiguous(memory_format=torch.channels_last), torch.randint(0, 10, (args.n_images,), generator=g),
            f'{args.n_images} random images ({args.data} not found)')


def make_model(arch: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    if arch == 'resnet18': return resnet18_cifar(10, 3).to(device)
    return init_cnn(get_cnn_model(DataBunch(None, None, c_in=3, c_out=10), CNN_WIDTHS)).to(device)


class NoOpModel(nn.Module):
    """Logits that ignore the input (one parameter, so there is a backward and a step): the step without a model."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], 10)


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.double().div(255).transpose(0, 1).reshape(3, -1)
    return xf.mean(1).float(), xf.std(1).float()


# ---- the variants -----------------------------------------------------------------------------------------
class RawLoop:
    """The careful hand-written loop."""

    def __init__(self, x, y, bs, model, mean, std, device, amp, data_path=True):
        self.data_path = data_path  # False: the first batch every step, nothing gathered or augmented
        self.x, self.y, self.bs, self.model, self.device, self.amp = x.to(device), y.to(device), bs, model, device, amp
        # Stats over the whole channels-last image plane: a (1, 3, 1, 1) broadcast runs a 3-wide inner loop.
        h, w = x.shape[-2:]
        self.mean, self.std = (s.view(1, 3, 1, 1).expand(1, 3, h, w).contiguous(memory_format=torch.channels_last)
                               .to(device) for s in (mean, std))
        self.model.to(memory_format=torch.channels_last)
        self.opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
        self.g = torch.Generator().manual_seed(0)
        self.base_rows, self.base_cols = torch.arange(h, device=device), torch.arange(w, device=device)

    def crop_flip(self, xb: torch.Tensor) -> torch.Tensor:
        n, c, h, w = xb.shape
        padded = F.pad(xb, (PAD,) * 4)  # channels-last stays channels-last
        hp, wp = h + 2 * PAD, w + 2 * PAD
        top, left = torch.randint(0, 2 * PAD + 1, (2, n, 1), device=xb.device)
        flip = torch.rand(n, 1, device=xb.device) < 0.5
        cols = left + torch.where(flip, self.base_cols.flip(0), self.base_cols)
        flat = ((top + self.base_rows)[:, :, None] * wp + cols[:, None, :]).reshape(n, h * w, 1).expand(n, h * w, c)
        out = padded.permute(0, 2, 3, 1).reshape(n, hp * wp, c).gather(1, flat)
        return out.view(n, h, w, c).permute(0, 3, 1, 2)

    def epoch(self) -> None:
        model, opt, bs = self.model, self.opt, self.bs
        model.train()
        perm = torch.randperm(len(self.x), generator=self.g).to(self.device)
        total_loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        fixed = None if self.data_path else ((self.x[:bs].float().div_(255) - self.mean) / self.std, self.y[:bs])
        for i in range(0, len(perm), bs):
            if fixed is None:
                idx = perm[i:i + bs]
                xb, yb = self.x[idx].float().div_(255), self.y[idx]
                xb = self.crop_flip((xb - self.mean) / self.std)
            else:
                xb, yb = fixed
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                pred = model(xb)
            loss = F.cross_entropy(pred.float(), yb)
            loss.backward()
            opt.step()
            opt.zero_grad()
            total_loss += loss.detach() * len(yb)
            correct += (pred.argmax(1) == yb).sum()
        self.summary = (total_loss / len(perm), correct / len(perm))  # read once per epoch
        self.summary = [float(v) for v in self.summary]


class MinilearnLoop:
    def __init__(self, data, model, mean, std, device, amp, channels_last=True):
        cbs = [DeviceCallback(device), BatchTransformXCallback(Normalize(mean, std)), RandomCropPad(PAD),
               RandomFlip(), AvgStatsCallback([accuracy]), Recorder(), ProgressCallback(interactive=True)]
        if channels_last: cbs.insert(1, ChannelsLast())
        if amp: cbs.append(MixedPrecision(torch.bfloat16))
        opt_func = lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
        self.learn = Learner(model, data, F.cross_entropy, opt_func=opt_func, lr=LR, cbs=cbs)
        self.learn.logger = lambda *a: None

    def epoch(self) -> None:
        self.learn.fit(1)


def build_variants(names, x, y, bs, args, device, model_factory) -> dict:
    mean, std = channel_stats(x)
    amp = device.type == 'cuda'
    builders = {
        'raw': lambda: RawLoop(x, y, bs, model_factory(), mean, std, device, amp),
        'raw_again': lambda: RawLoop(x, y, bs, model_factory(), mean, std, device, amp),
        'raw_no_data': lambda: RawLoop(x, y, bs, model_factory(), mean, std, device, amp, data_path=False),
        'fast': lambda: MinilearnLoop(DataBunch.from_tensors(x, y, bs=bs, device=device, seed=0), model_factory(),
                                      mean, std, device, amp),
        'datasets': lambda: MinilearnLoop(DataBunch.from_datasets(Dataset(x.float().div(255), y), None, bs=bs),
                                          model_factory(), mean, std, device, amp, channels_last=False),
        'datasets+cl': lambda: MinilearnLoop(DataBunch.from_datasets(Dataset(x.float().div(255), y), None, bs=bs),
                                             model_factory(), mean, std, device, amp),
    }
    return {name: builders[name]() for name in names}


def timed(loop, device, clock) -> float:
    if device.type == 'cuda': torch.cuda.synchronize()
    start = clock()
    loop.epoch()
    if device.type == 'cuda': torch.cuda.synchronize()
    return clock() - start


def run_rounds(variants: dict, args, device, clock) -> dict[str, list[float]]:
    times = {name: [] for name in variants}
    with open(os.devnull, 'w') as devnull, contextlib.redirect_stdout(devnull):
        for loop in variants.values(): loop.epoch()  # warm-up
        for r in range(args.rounds):
            names = list(variants)
            if r % 2: names.reverse()
            for name in names: times[name].append(timed(variants[name], device, clock))
    return times


def ratio(samples: list[float], base: list[float]) -> float:
    return statistics.median(t / b for t, b in zip(samples, base))


def bench_batch_size(bs: int, x, y, args, device, clock) -> None:
    n_batches = -(-len(x) // bs)
    names = args.variants or ['raw', 'raw_again', 'fast', 'datasets', 'datasets+cl']
    times = run_rounds(build_variants(names, x, y, bs, args, device, lambda: make_model(args.arch, device)),
                       args, device, clock)
    print(f'\nbatch size {bs}: {n_batches} batches of {args.arch} x {args.rounds} rounds, {args.clock} clock')
    print(f"{'variant':<14}{'ms/batch':>10}{'images/s':>10}{'ratio to raw':>14}{'target':>12}")
    for name, samples in times.items():
        med = statistics.median(samples)
        r = ratio(samples, times['raw']) if 'raw' in times and name != 'raw' else None
        target = TARGETS.get((name, bs)) if device.type == 'cpu' else None
        verdict = '' if target is None or r is None else f"<={target:.2f} {'ok' if r <= target else 'MISS'}"
        shown = f'{r:.3f}x' if r else ''
        print(f"{name:<14}{med / n_batches * 1e3:>10.2f}{len(x) / med:>10.0f}{shown:>14}{verdict:>12}")
    if args.no_op and {'raw', 'fast'} <= set(times):
        no_op = run_rounds(build_variants(['raw', 'fast', 'raw_no_data'], x, y, bs, args, device,
                                          lambda: NoOpModel().to(device)), args, device, clock)
        print(f'data path share of a step (model replaced by a no-op; target <= 5 % at bs 128 for 32x32):')
        for name in ('raw', 'fast'):
            share = ratio(no_op[name], times[name])
            data_only = statistics.median((a - b) / t for a, b, t in
                                          zip(no_op[name], no_op['raw_no_data'], times[name]))
            print(f"  {name:<12}{statistics.median(no_op[name]) / n_batches * 1e3:>8.2f} ms/batch without the model: "
                  f"{share:.1%} of the full step; less the no-op step on one fixed batch (loss, backward, SGD, "
                  f"{statistics.median(no_op['raw_no_data']) / n_batches * 1e3:.2f} ms): {data_only:.1%}")
    if args.sync_check and device.type == 'cuda': sync_check(x, y, bs, args, device)


class SyncArm(Callback):
    """torch.cuda.set_sync_debug_mode('error') from the second training batch to the end of the training pass:
    the loader's gathers between batches are covered too; the once-per-fit preflight read is not."""
    _order = -1000

    def begin_batch(self) -> None:
        if self.in_train and self.iter >= 1: torch.cuda.set_sync_debug_mode('error')

    def begin_validate(self) -> None: torch.cuda.set_sync_debug_mode(0)
    def after_fit(self) -> None: torch.cuda.set_sync_debug_mode(0)


def sync_check(x, y, bs, args, device) -> None:
    """One epoch of the fast path (without the throttled progress read and the per-epoch AvgStats read)."""
    loop = build_variants(['fast'], x, y, bs, args, device, lambda: make_model(args.arch, device))['fast']
    learn = loop.learn
    learn.remove_cbs([learn.find_cb(ProgressCallback), learn.find_cb(AvgStatsCallback)])
    learn.fit(1, cbs=[SyncArm()])
    print(f'sync check (bs {bs}): {len(learn.data.train_dl) - 1} training batches under '
          f'set_sync_debug_mode("error") without a host sync')


# ---- decode once ------------------------------------------------------------------------------------------
def rss_bytes() -> int:
    with open('/proc/self/statm') as f: return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def decode_worker(kind: str, path: Path, workers: int) -> dict:
    """One decode in this (fresh) process: listing and decoding seconds, images, bytes kept, peak memory growth."""
    import torchvision
    from torch.utils.data import DataLoader
    from minilearn import label_image_folder, make_rgb, to_byte_tensor, to_float_tensor
    torch.set_num_threads(1)
    start = time.perf_counter()
    if kind == 'minilearn':
        sd = label_image_folder(path, tfms=[make_rgb, to_byte_tensor, to_float_tensor], train_name='train',
                                valid_name='test', valid_n_per_class=1)  # cifar10_data's transforms
    else:
        ds = torchvision.datasets.ImageFolder(path / 'train', transform=torchvision.transforms.PILToTensor())
    listed = time.perf_counter()
    # Warm-up on 512 images (untimed): the code pages and buffers every decode touches are not counted as data.
    if kind == 'minilearn':
        from minilearn import LabeledData
        LabeledData(sd.train.x.new(sd.train.x.items[:512]), sd.train.y.new(sd.train.y.items[:512])).to_tensors(
            num_workers=workers, progress=False)
    else:
        for _ in DataLoader(torch.utils.data.Subset(ds, range(512)), batch_size=256, num_workers=workers): pass
    before = rss_bytes()
    decode_start = time.perf_counter()
    if kind == 'minilearn':
        x, y = sd.train.to_tensors(num_workers=workers, progress=False)
    else:
        xs, ys = [], []
        for xb, yb in DataLoader(ds, batch_size=256, num_workers=workers):
            xs.append(xb)
            ys.append(yb)
        x, y = torch.cat(xs), torch.cat(ys)
        del xs, ys
    done = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {'kind': kind, 'list_s': listed - start, 'decode_s': done - decode_start, 'images': len(x),
            'raw_bytes': x.numel() * x.element_size(), 'peak_growth': peak, 'dtype': str(x.dtype)}


def bench_decode(args) -> None:
    print(f'\ndecode once: {args.data / "train"}, {args.decode_workers} workers, {args.decode_rounds} rounds, '
          f'wall clock, each run in a fresh process')
    results = {'minilearn': [], 'torchvision': []}
    for r in range(args.decode_rounds):
        order = list(results) if r % 2 == 0 else list(results)[::-1]
        for kind in order:
            out = subprocess.run([sys.executable, __file__, '--decode-worker', kind, '--data', str(args.data),
                                  '--decode-workers', str(args.decode_workers)], capture_output=True, text=True)
            if out.returncode: raise SystemExit(f'{kind} decode failed:\n{out.stderr}')
            results[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'loader':<13}{'images':>8}{'listing s':>11}{'decode images/s':>17}{'end-to-end images/s':>21}"
          f"{'peak memory while decoding / raw uint8':>40}")
    for kind, runs in results.items():
        med = lambda f: statistics.median(f(run) for run in runs)
        print(f"{kind:<13}{runs[0]['images']:>8}{med(lambda r: r['list_s']):>11.2f}"
              f"{med(lambda r: r['images'] / r['decode_s']):>17.0f}"
              f"{med(lambda r: r['images'] / (r['list_s'] + r['decode_s'])):>21.0f}"
              f"{med(lambda r: r['peak_growth'] / r['raw_bytes']):>39.2f}x")
    pairs = list(zip(results['torchvision'], results['minilearn']))
    print(f"minilearn / torchvision images/s (median over rounds): decoding "
          f"{statistics.median(a['decode_s'] / b['decode_s'] for a, b in pairs):.2f}x, end to end "
          f"{statistics.median((a['list_s'] + a['decode_s']) / (b['list_s'] + b['decode_s']) for a, b in pairs):.2f}x;"
          f" raw uint8 size {results['minilearn'][0]['raw_bytes'] / 2 ** 20:.1f} MiB, kept as "
          f"{results['minilearn'][0]['dtype']} (torchvision: {results['torchvision'][0]['dtype']})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--data', type=Path, default=DEFAULT_DATA, help='CIFAR-10 folder (train/<class>/*.jpg)')
    parser.add_argument('--n-images', type=int, default=2560, help='training images per epoch of the throughput runs')
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[128, 32])
    parser.add_argument('--rounds', type=int, default=7)
    parser.add_argument('--arch', choices=('cnn', 'resnet18'), default='cnn')
    parser.add_argument('--variants', nargs='*', help="only these (names as printed; 'raw' is the baseline)")
    parser.add_argument('--no-op', action=argparse.BooleanOptionalAction, default=True,
                        help='also time the data path alone (model replaced by a no-op)')
    parser.add_argument('--skip-throughput', action='store_true')
    parser.add_argument('--decode', action='store_true', help='time decoding the 20,000 training JPEGs once')
    parser.add_argument('--decode-workers', type=int, default=0)
    parser.add_argument('--decode-rounds', type=int, default=3)
    parser.add_argument('--sync-check', action='store_true', help='CUDA: an epoch under set_sync_debug_mode("error")')
    parser.add_argument('--decode-worker', choices=('minilearn', 'torchvision'), help=argparse.SUPPRESS)
    add_run_options(parser)
    args = parser.parse_args(argv)
    if args.decode_worker:
        print(json.dumps(decode_worker(args.decode_worker, args.data, args.decode_workers)))
        return
    device = start_run(args)
    clock = time.process_time if args.clock == 'cpu' else time.perf_counter
    if not args.skip_throughput:
        x, y, source = load_images(args)
        print(f'data: {source}, uint8 {tuple(x.shape)} channels-last in memory')
        for bs in args.batch_sizes: bench_batch_size(bs, x, y, args, device, clock)
    if args.decode: bench_decode(args)


if __name__ == '__main__':
    main()
