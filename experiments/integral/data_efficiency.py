"""Data efficiency of the pointwise closure: symmetric network against the non-symmetric baseline.

Usage::

    python experiments/integral/data_efficiency.py [--quick] [--data data/integral]
        [--out results/integral]

The training sets are N clouds (nested: each set holds the smaller ones), drawn once from the
structured cases of the published family (frozen production, alpha in [1, 2]) that
``experiments/integral/run.py`` generates into ``--data``; N spans two decades. For every N,
``vcnn.network.VectorCloudNet`` (volume pooling, frame independent) and
``vcnn.network.BaselineNet`` (raw coordinates, mean pooling: not frame independent) of about
the same number of parameters are trained for the same number of Adam steps, and tested on
clouds of held-out alphas, in the frame of the data and in a randomly rotated frame (the
hills of the family all lie in one orientation, so only the rotated test asks for what the
baseline was never shown). Prints the table, writes ``data_efficiency.json`` and
``data_efficiency.png``, and checks that the symmetric network's rotated-frame error is the
same as its data-frame error (to 1e-4 relative), the property the comparison rests on.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from vcnn.clouds import CloudOptions  # noqa: E402
from vcnn.datasets import CloudDataset, TargetScaler, as_case_sources  # noqa: E402
from vcnn.features import FeatureSpec  # noqa: E402
from vcnn.network import BaselineNet, VectorCloudNet, count_parameters  # noqa: E402
from vcnn.physics import Physics  # noqa: E402
from vcnn.symmetry import random_orthogonal  # noqa: E402
from vcnn.system import machine_summary  # noqa: E402

logger = logging.getLogger("data_efficiency")
SEED = 0
TRAIN_ALPHAS = (1.25, 1.625, 2.0)
TEST_ALPHAS = (1.1, 1.8)
MESH = "s0.25"
CLOUD_SIZE = 64


def _paths(data: Path, alphas) -> list[Path]:
    paths = [data / f"hill_a{a:.4f}_{MESH}.npz" for a in alphas]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(
            f"missing cases {[p.name for p in missing]}: run experiments/integral/run.py first"
        )
    return paths


def _networks(spec: FeatureSpec) -> dict[str, torch.nn.Module]:
    symmetric = VectorCloudNet.from_preset(
        "dense",
        dim=2,
        num_scalars=spec.num_scalars,
        num_vectors=spec.num_vectors,
        embedding=(16, 32),
        fitting=(64, 64),
        pooling="volume",
    )
    baseline = BaselineNet(
        dim=2,
        num_scalars=spec.num_scalars,
        num_vectors=spec.num_vectors,
        point_widths=(48, 64),
        head_widths=(64, 64),
    )
    return {"symmetric": symmetric, "baseline": baseline}


def _relative_error(model, batch, target, rotation=None) -> float:
    inputs = batch.model_inputs()
    if rotation is not None:
        inputs = {**inputs, "pos": inputs["pos"] @ rotation.T, "vec": inputs["vec"] @ rotation.T}
    model.eval()
    with torch.no_grad():
        prediction = model(**inputs)
    return float(100 * torch.linalg.norm(prediction - target) / torch.linalg.norm(target))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (about 2 min)")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "integral")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "integral")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.manual_seed(SEED)
    start = time.perf_counter()
    sizes = [60, 200, 600, 2000, 6000]
    steps = 600 if args.quick else 3000
    batch_size = 64

    spec = FeatureSpec()
    train_sources = as_case_sources(_paths(args.data, TRAIN_ALPHAS))
    test_sources = as_case_sources(_paths(args.data, TEST_ALPHAS))
    physics = Physics()
    options = CloudOptions().resolved(diffusivity=physics.diffusivity, zeta=physics.zeta)
    scaler = TargetScaler.fit(source.load() for source in train_sources)
    common = dict(spec=spec, target_scaler=scaler, cloud_options=options)
    train_data = CloudDataset(train_sources, **common)
    pool = train_data.draw(CLOUD_SIZE, seed=SEED, queries_per_case=max(sizes) // 3 + 1)
    order = torch.from_numpy(np.random.default_rng(SEED).permutation(pool.queries.numel()))
    normalizer = train_data.fit_normalizer(pool)
    test_data = CloudDataset(test_sources, normalizer=normalizer, **common)
    test_plan = test_data.draw(CLOUD_SIZE, seed=SEED + 1, queries_per_case=1500)
    test = test_data.gather(test_plan.queries, test_plan.indices)
    rotation = torch.as_tensor(
        random_orthogonal(2, determinant=1, rng=np.random.default_rng(SEED + 2)),
        dtype=torch.float32,
    )

    rows = []
    for size in sizes:
        rows_of_set = order[:size]
        batch = train_data.gather(pool.queries[rows_of_set], pool.indices[rows_of_set])
        for name, model in _networks(spec).items():
            torch.manual_seed(SEED)
            optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, 3e-5)
            generator = torch.Generator().manual_seed(SEED)
            tick = time.perf_counter()
            model.train()
            for _ in range(steps):
                pick = torch.randint(size, (min(batch_size, size),), generator=generator)
                inputs = {key: (None if value is None else value[pick])
                          for key, value in batch.inputs.model_inputs().items()}
                loss = torch.mean((model(**inputs) - batch.target[pick]) ** 2)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
            row = {
                "network": name,
                "training_clouds": size,
                "parameters": count_parameters(model),
                "train_rel_l2_percent": _relative_error(model, batch.inputs, batch.target),
                "test_rel_l2_percent": _relative_error(model, test.inputs, test.target),
                "test_rotated_rel_l2_percent": _relative_error(
                    model, test.inputs, test.target, rotation
                ),
                "seconds": time.perf_counter() - tick,
            }
            logger.info("%s", row)
            rows.append(row)

    def errors(name: str, key: str) -> list[float]:
        return [r[key] for r in rows if r["network"] == name]

    def clouds_needed(target: float, name: str, key: str) -> float | None:
        """Clouds the network needs for ``target`` (log-log interpolation; None: not reached)."""
        values = errors(name, key)
        for (n0, e0), (n1, e1) in zip(
            zip(sizes, values, strict=True), zip(sizes[1:], values[1:], strict=True), strict=False
        ):
            if e0 <= target:
                return float(n0)
            if e1 <= target:
                t = np.log(target / e0) / np.log(e1 / e0)
                return float(np.exp(np.log(n0) + t * np.log(n1 / n0)))
        return None

    reference = {
        size: e for size, e in zip(sizes, errors("symmetric", "test_rel_l2_percent"), strict=True)
    }
    ratios = {}
    for size, target in reference.items():
        for key in ("test_rel_l2_percent", "test_rotated_rel_l2_percent"):
            needed = clouds_needed(target, "baseline", key)
            ratios.setdefault(key, {})[size] = None if needed is None else needed / size
    symmetric_rotation = max(
        abs(a - b) / b
        for a, b in zip(
            errors("symmetric", "test_rotated_rel_l2_percent"),
            errors("symmetric", "test_rel_l2_percent"),
            strict=True,
        )
    )
    result = {
        "quick": bool(args.quick),
        "seed": SEED,
        "sizes": sizes,
        "steps": steps,
        "batch_size": batch_size,
        "cloud_size": CLOUD_SIZE,
        "train_alphas": TRAIN_ALPHAS,
        "test_alphas": TEST_ALPHAS,
        "mesh": MESH,
        "rows": rows,
        "baseline_data_ratio": ratios,
        "symmetric_rotation_relative_change": symmetric_rotation,
        "seconds": time.perf_counter() - start,
        "machine": machine_summary(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data_efficiency.json").write_text(json.dumps(result, indent=2) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, color in (("symmetric", "C0"), ("baseline", "C3")):
        ax.loglog(sizes, errors(name, "test_rel_l2_percent"), "o-", color=color,
                  label=f"{name}, data frame")
        ax.loglog(sizes, errors(name, "test_rotated_rel_l2_percent"), "s--", color=color,
                  label=f"{name}, rotated frame")
    ax.set_xlabel("training clouds")
    ax.set_ylabel("test relative L2 error of tau (%)")
    ax.set_title("pointwise closure, held-out alphas 1.1 and 1.8")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "data_efficiency.png", dpi=120)
    plt.close(fig)

    print("| training clouds | symmetric test % | baseline test % | symmetric rotated % "
          "| baseline rotated % |")
    print("|---|---|---|---|---|")
    for index, size in enumerate(sizes):
        print(f"| {size} | {errors('symmetric', 'test_rel_l2_percent')[index]:.2f} | "
              f"{errors('baseline', 'test_rel_l2_percent')[index]:.2f} | "
              f"{errors('symmetric', 'test_rotated_rel_l2_percent')[index]:.2f} | "
              f"{errors('baseline', 'test_rotated_rel_l2_percent')[index]:.2f} |")
    print(f"\nsymmetric network, rotated against data frame: {symmetric_rotation:.2e} relative; "
          f"{result['seconds']:.0f} s; results in {args.out}")
    if not symmetric_rotation <= 1e-4:
        print("FAILED: the symmetric network's error changed under rotation")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
