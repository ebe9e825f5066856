"""V-MoE on scikit-learn's 8x8 digits: a dense ViT against V-MoE at equal active FLOPs.

  python experiments/vmoe_digits.py                 # about 5 minutes on 2 CPU cores
  python experiments/vmoe_digits.py --steps=300 --seeds=0   # a quick look

Models (``moejax.models.vit``): 4 layers, d_model 64, 4 heads, 2x2 patches of the 8x8 image (16
patches). Dense: every FFN 128 wide. V-MoE: layers 1 and 3 are MoE with 8 experts of width 64,
top-2 (the same 128 active FFN width per patch), V-MoE routing (top-k of the router softmax, a
load-balancing loss), capacity dispatch in batch-priority order at capacity factor 1.0; and the
same MoE with dropless dispatch. Each is trained with :func:`moejax.vision.train` (AdamW, cosine
schedule, batch 64) and evaluated on the 360 test images.

Writes ``experiments/results/vmoe_digits/results.json`` (per model and seed: test accuracy, loss,
dropped fraction, parameter counts) and ``expert_by_class.png`` (for the first seed's capacity
V-MoE: the fraction of each digit's patches that each expert of each MoE layer processes), and
prints a table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np
from flax import nnx

from moejax import vision
from moejax.data.images import create_image_iterator
from moejax.models import vit

OUT = pathlib.Path(__file__).resolve().parent / "results" / "vmoe_digits"


def model_configs() -> dict[str, vit.ViTConfig]:
    base = dict(image_size=8, channels=1, patch_size=2, num_classes=10, d_model=64, num_layers=4,
                num_heads=4, moe_every=2)
    return {
        "dense ViT (FFN 128)": vit.ViTConfig(d_ff=128, **base),
        "V-MoE E8 top-2, capacity 1.0": vit.ViTConfig(
            d_ff=128, moe=vit.vmoe_config(64, 64, 8, capacity_factor=1.0), **base),
        "V-MoE E8 top-2, dropless": vit.ViTConfig(
            d_ff=128, moe=vit.vmoe_config(64, 64, 8, dispatch="dropless"), **base),
    }


def plot_expert_by_class(table: np.ndarray, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(table), figsize=(4.2 * len(table), 3.6), squeeze=False)
    for i, (ax, layer) in enumerate(zip(axes[0], table)):
        image = ax.imshow(layer, cmap="viridis", vmin=0, vmax=max(0.5, float(table.max())))
        ax.set_xlabel("expert")
        ax.set_ylabel("digit")
        ax.set_xticks(range(layer.shape[1]))
        ax.set_yticks(range(layer.shape[0]))
        ax.set_title(f"MoE layer {i}")
    fig.colorbar(image, ax=list(axes[0]), shrink=0.8)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    test = next(create_image_iterator("digits_images", split="test", batch_size=360,
                                      shuffle=False, num_epochs=1, data_dir=args.data_dir))
    results = []
    for name, config in model_configs().items():
        counts = vit.count_params(config)
        for seed in seeds:
            model = vit.ViT(config, rngs=nnx.Rngs(seed))
            start = time.perf_counter()
            history = vision.train(model, steps=args.steps, seed=seed, data_dir=args.data_dir,
                                   log=None)
            seconds = time.perf_counter() - start
            result = vision.evaluate(model, split="test", data_dir=args.data_dir)
            row = dict(model=name, seed=seed, steps=args.steps, train_seconds=round(seconds, 1),
                       final_train_loss=history[-1]["cross_entropy"], **result, **counts)
            results.append(row)
            print(f"{name:32s} seed {seed}: test accuracy {result['accuracy']:.4f}  loss "
                  f"{result['loss']:.4f}  dropped {result['dropped_fraction']:.3f}  "
                  f"({seconds:.0f} s)", flush=True)
            if config.moe is not None and config.moe.dispatch == "capacity" and seed == seeds[0]:
                table = vision.expert_by_class(model, test["images"], test["labels"], 10)
                np.save(out / "expert_by_class.npy", table)
                plot_expert_by_class(table, out / "expert_by_class.png")
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")

    print(f"\n| model | params (active) | test accuracy (mean over seeds {seeds}) | test loss | "
          f"dropped |\n|---|---|---|---|---|")
    for name in model_configs():
        rows = [r for r in results if r["model"] == name]
        acc = [r["accuracy"] for r in rows]
        print(f"| {name} | {rows[0]['total']:,} ({rows[0]['active']:,}) | "
              f"{np.mean(acc):.4f} ({', '.join(f'{a:.4f}' for a in acc)}) | "
              f"{np.mean([r['loss'] for r in rows]):.4f} | "
              f"{np.mean([r['dropped_fraction'] for r in rows]):.3f} |")


if __name__ == "__main__":
    main()
