"""Images per second of the ImageList pipeline against torchvision's ImageFolder, same transforms.

    python bench/data_pipeline.py                        # a generated folder of JPEGs
    python bench/data_pipeline.py --data /work/shared/data/cifar10/train --max-images 5000
    python bench/data_pipeline.py --scan-files 100000    # also time listing 10^5 files (empty ones)

Both read the same files with the same item transforms ([make_rgb, ResizeFixed, to_byte_tensor,
to_float_tensor]) through a torch DataLoader, for each `--workers` count; a pass includes worker
start-up. The listing rows time building the item list (get_files + labelling) against
ImageFolder's own scan, on the same tree.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minilearn.data.items import (CategoryProcessor, ImageList, LabeledData, get_files,  # noqa: E402
                                  image_extensions, parent_labeler)
from minilearn.data.transforms import ResizeFixed, compose, make_rgb, to_byte_tensor, to_float_tensor  # noqa: E402


class Pipeline:
    """The item transforms as one picklable callable (ImageFolder's `transform`)."""

    def __init__(self, tfms: list):
        self.tfms = tfms

    def __call__(self, x):
        return compose(x, self.tfms)


def make_image_folder(root: Path, n_classes: int, n_per_class: int, size: int, seed: int = 0) -> Path:
    """`root/<class>/NNNN.jpg`: smooth colour fields with noise, `size`×`size`."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for c in range(n_classes):
        folder = root / f'class{c:02d}'
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            base = np.stack([xx * 255, yy * 255, np.full_like(xx, 25.0 * c)], -1)
            arr = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            PIL.Image.fromarray(arr).save(folder / f'{i:04d}.jpg', quality=90)
    return root


def make_empty_tree(root: Path, n_files: int, n_folders: int = 100) -> Path:
    for i in range(n_files):
        folder = root / f'c{i % n_folders:03d}'
        if i < n_folders: folder.mkdir(parents=True)
        (folder / f'{i:07d}.jpg').touch()
    return root


def build_imagelist(root: Path, tfms: list) -> LabeledData:
    il = ImageList.from_files(root, tfms=tfms)
    return LabeledData.label_by_func(il, parent_labeler, proc_y=CategoryProcessor())


def build_imagefolder(root: Path, tfms: list):
    from torchvision.datasets import ImageFolder
    return ImageFolder(str(root), transform=Pipeline(tfms))


def images_per_second(ds, bs: int, workers: int, repeats: int) -> float:
    best = float('inf')
    for _ in range(repeats):
        dl = DataLoader(ds, batch_size=bs, shuffle=False, num_workers=workers)
        start = time.perf_counter()
        n = sum(len(xb) for xb, _ in dl)
        best = min(best, time.perf_counter() - start)
    return n / best


def best_time(f, repeats: int, clock=time.perf_counter) -> float:
    times = []
    for _ in range(repeats):
        start = clock()
        f()
        times.append(clock() - start)
    return min(times)


def course_get_files(path: Path, extensions: set) -> list[Path]:
    """course-v3 08_data_block's recursive get_files (os.walk), the reference for listing speed."""
    res = []
    for p, d, f in os.walk(path):
        d[:] = [o for o in d if not o.startswith('.')]
        p = Path(p)
        res += [p / o for o in f if not o.startswith('.') and f'.{o.split(".")[-1].lower()}' in extensions]
    return res


def scan_rows(n_files: int, repeats: int) -> list[str]:
    """Listing `n_files` files (CPU seconds, best of `repeats`): ours, the course's, torchvision's."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
    with tempfile.TemporaryDirectory() as tmp:
        root = make_empty_tree(Path(tmp), n_files)
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        ours = best_time(lambda: get_files(root, image_extensions), repeats, time.process_time)
        labelled = best_time(lambda: build_imagelist(root, []), repeats, time.process_time)
        course = best_time(lambda: course_get_files(root, set(image_extensions)), repeats, time.process_time)
        theirs = best_time(lambda: make_dataset(str(root), {c: i for i, c in enumerate(classes)}, IMG_EXTENSIONS),
                           repeats, time.process_time)
    return [f'\n| list {n_files} files | CPU seconds | its time / minilearn get_files time |', '|---|---|---|',
            f'| minilearn get_files (sorted Paths) | {ours:.3f} | |',
            f'| minilearn ImageList + labels | {labelled:.3f} | |',
            f'| course-v3 get_files (os.walk, unsorted Paths) | {course:.3f} | {course / ours:.2f} |',
            f'| torchvision make_dataset (sorted str) | {theirs:.3f} | {theirs / ours:.2f} |']


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data', type=Path, help='a folder of class folders (default: generate one)')
    parser.add_argument('--classes', type=int, default=10, help='generated classes')
    parser.add_argument('--n-per-class', type=int, default=100, help='generated images per class')
    parser.add_argument('--size', type=int, default=64, help='generated image side')
    parser.add_argument('--resize', type=int, default=32, help='ResizeFixed size')
    parser.add_argument('--bs', type=int, default=64)
    parser.add_argument('--workers', type=int, nargs='+', default=[0, 2])
    parser.add_argument('--max-images', type=int, default=None, help='time only the first N images')
    parser.add_argument('--repeats', type=int, default=2, help='best of N passes')
    parser.add_argument('--scan-files', type=int, default=0, help='also time listing N empty files')
    args = parser.parse_args(argv)

    tfms = [make_rgb, ResizeFixed(args.resize), to_byte_tensor, to_float_tensor]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or make_image_folder(Path(tmp), args.classes, args.n_per_class, args.size)
        build_ours = best_time(lambda: build_imagelist(root, tfms), args.repeats)
        build_theirs = best_time(lambda: build_imagefolder(root, tfms), args.repeats)
        ours, theirs = build_imagelist(root, tfms), build_imagefolder(root, tfms)
        assert len(ours) == len(theirs), (len(ours), len(theirs))
        if args.max_images:
            ours, theirs = Subset(ours, range(args.max_images)), Subset(theirs, range(args.max_images))
        torch.testing.assert_close(ours[0][0], theirs[0][0])  # same pixels, same label index
        assert ours[len(ours) - 1][1] == theirs[len(theirs) - 1][1]
        print(f'data: {args.data or "generated"} ({len(ours)} images timed), transforms: {tfms}, bs {args.bs}, '
              f'torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}\n')
        print('| pipeline | minilearn ImageList | torchvision ImageFolder | minilearn / torchvision |')
        print('|---|---|---|---|')
        for workers in args.workers:
            a = images_per_second(ours, args.bs, workers, args.repeats)
            b = images_per_second(theirs, args.bs, workers, args.repeats)
            print(f'| images/s, num_workers={workers} (higher is better) | {a:.0f} | {b:.0f} | {a / b:.2f}× |')
        print(f'| build the dataset (s, lower is better) | {build_ours:.3f} | {build_theirs:.3f} | '
              f'{build_ours / build_theirs:.2f}× the time |')
    if args.scan_files:
        for row in scan_rows(args.scan_files, args.repeats): print(row)


if __name__ == '__main__':
    main()
