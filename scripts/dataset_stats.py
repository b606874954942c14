"""Dataset statistics: ``python scripts/dataset_stats.py dataset=<name> [dataset.root=...] [+out_dir=...]``.

Prints a table per split (images, faces, faces per image, face sizes by the larger side, attribute
counts) for the records training would see (the dataset filters apply), and writes ``stats.json``
and ``face_sizes.png`` into the Hydra output directory, or into ``out_dir`` when given.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from detlab.config import register_configs, to_config
from detlab.errors import report_user_errors
from detlab.runtime.fileio import atomic_write_text

log = logging.getLogger("dataset_stats")
register_configs()

SIZE_EDGES = (0, 8, 16, 32, 64, 128, 256)  # larger face side, pixels; the last bucket is open


def size_buckets(sizes: np.ndarray) -> dict[str, int]:
    edges = list(SIZE_EDGES) + [np.inf]
    names = [f"{lo}-{hi}" if np.isfinite(hi) else f">={lo}" for lo, hi in zip(edges[:-1], edges[1:])]
    counts = np.histogram(sizes, bins=edges)[0] if len(sizes) else np.zeros(len(names), int)
    return {name: int(c) for name, c in zip(names, counts)}


def split_stats(records) -> dict:
    from detlab.data.wider import ATTRIBUTE_NAMES

    per_image = np.array([r.num_faces for r in records], dtype=np.int64)
    boxes = np.concatenate([r.boxes for r in records]) if records else np.zeros((0, 4), np.float32)
    attributes = np.concatenate([r.attributes for r in records]) if records else np.zeros((0, 6), np.int64)
    sizes = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    return {
        "images": len(records),
        "faces": int(per_image.sum()),
        "images_without_faces": int((per_image == 0).sum()),
        "faces_per_image": {"mean": float(per_image.mean()) if len(per_image) else 0.0,
                            "median": float(np.median(per_image)) if len(per_image) else 0.0,
                            "max": int(per_image.max()) if len(per_image) else 0},
        "face_size": {"median": float(np.median(sizes)) if len(sizes) else 0.0,
                      "share_under_32": float((sizes < 32).mean()) if len(sizes) else 0.0,
                      "buckets": size_buckets(sizes)},
        "attributes": {name: {str(int(v)): int(c) for v, c in zip(*np.unique(attributes[:, k], return_counts=True))}
                       for k, name in enumerate(ATTRIBUTE_NAMES)},
        "_sizes": sizes,
        "_per_image": per_image,
    }


def print_table(stats: dict[str, dict]) -> None:
    names = list(stats)
    rows: list[tuple[str, list[str]]] = [
        ("images", [str(s["images"]) for s in stats.values()]),
        ("faces", [str(s["faces"]) for s in stats.values()]),
        ("images without faces", [str(s["images_without_faces"]) for s in stats.values()]),
        ("faces/image mean", [f"{s['faces_per_image']['mean']:.2f}" for s in stats.values()]),
        ("faces/image median", [f"{s['faces_per_image']['median']:g}" for s in stats.values()]),
        ("faces/image max", [str(s["faces_per_image"]["max"]) for s in stats.values()]),
        ("face size median (px)", [f"{s['face_size']['median']:.1f}" for s in stats.values()]),
        ("faces < 32 px", [f"{100 * s['face_size']['share_under_32']:.1f} %" for s in stats.values()]),
    ]
    for bucket in next(iter(stats.values()))["face_size"]["buckets"]:
        rows.append((f"  size {bucket} px", [str(s["face_size"]["buckets"][bucket]) for s in stats.values()]))
    for attr in next(iter(stats.values()))["attributes"] or {}:
        values = sorted({v for s in stats.values() for v in s["attributes"].get(attr, {})}, key=int)
        for v in values:
            rows.append((f"  {attr}={v}", [str(s["attributes"].get(attr, {}).get(v, 0)) for s in stats.values()]))
    width = max(len(r[0]) for r in rows) + 2
    print("".ljust(width) + "".join(n.rjust(10) for n in names))
    for label, cells in rows:
        print(label.ljust(width) + "".join(c.rjust(10) for c in cells))


def plot(stats: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    bins = np.logspace(0, np.log10(1024), 40)
    for name, s in stats.items():
        ax1.hist(np.clip(s["_sizes"], 1, 1024), bins=bins, histtype="step", label=f"{name} ({s['faces']} faces)")
        ax2.hist(s["_per_image"], bins=np.arange(0, max(int(s["_per_image"].max(initial=0)), 1) + 2) - 0.5,
                 histtype="step", label=name)
    ax1.set_xscale("log")
    ax1.axvline(32, color="grey", linestyle=":")
    ax1.set(xlabel="face size, larger side (px)", ylabel="faces", title=f"{title}: face sizes")
    ax2.set(xlabel="faces per image", ylabel="images", title="faces per image")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def main(raw: DictConfig) -> None:
    with open_dict(raw):
        out_dir = raw.pop("out_dir", None)
    # A bad value, annotation file or dataset.root: one line on stderr and exit code 2
    # (DETLAB_DEBUG=1 or HYDRA_FULL_ERROR=1 shows the traceback).
    with report_user_errors():
        cfg = to_config(raw)
        from detlab.data import load_split

        split = load_split(cfg.dataset)
    stats = {"train": split_stats(split.train), "val": split_stats(split.val)}
    if split.test:
        stats["held_out"] = split_stats(split.test)
    records = split.train + split.val + (split.test or [])
    stats["all"] = split_stats(records)
    print(f"dataset {cfg.dataset.name} at {cfg.dataset.root} (split {cfg.dataset.split.mode}, "
          f"drop_invalid={cfg.dataset.drop_invalid}, min_face_size={cfg.dataset.min_face_size}, "
          f"keep_empty={cfg.dataset.keep_empty})")
    print_table(stats)

    out = Path(out_dir) if out_dir else Path(HydraConfig.get().runtime.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    public = {name: {k: v for k, v in s.items() if not k.startswith("_")} for name, s in stats.items()}
    summary = {"dataset": cfg.dataset.name, "root": str(Path(cfg.dataset.root).resolve()),
               "config": OmegaConf.to_container(OmegaConf.structured(cfg.dataset)),
               "images": public["all"]["images"], "faces": public["all"]["faces"], "splits": public}
    atomic_write_text(out / "stats.json", json.dumps(summary, indent=2))
    plot(stats, out / "face_sizes.png", cfg.dataset.name)
    print(f"wrote {out / 'stats.json'} and {out / 'face_sizes.png'}")


if __name__ == "__main__":
    sys.exit(main())
