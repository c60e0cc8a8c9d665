"""GPU benchmark of the device-resident pipeline: one table, goals next to measured values.

Stages (each timed on the device the run is given):

1. clouds/s: forward + backward + optimiser step of the training pass at batch 1024 with
   150-point clouds drawn on the device (bf16 autocast on CUDA);
2. full-cloud inference, warm (the second call, on a new velocity field, clouds searched on the
   device included) of the 40,200-point case (resolution 1, alpha 1; ``--inference-case``):
   the device pass alone, and the whole :meth:`vcnn.closure.Closure.predict_detailed` (field
   tables from the host included);
3. GPU vs CPU agreement: the same network and clouds through the device pass and the CPU
   backend (float32), max relative difference;
4. training of at most ``--train-minutes`` on the half-resolution published cases (train alpha
   1.0:0.05:2.0, validate 0.5), with the GPU utilisation sampled by ``nvidia-smi`` in a
   thread: GPU busy fraction and the validation error reached.

The whole run fits ``--budget-minutes`` (8): the training gets what the other stages leave.
Data: generating the cases takes minutes (``vcnn generate``, FEniCSx; on 2 busy CPU cores 800 s
for the 22 half-resolution cases, 220 s for the 40,200-point case), so generate them beforehand
and carry them along with the command (``--data``, ``--inference-case``); missing ones are
generated (timed, and taken from the budget). ``--cpu-smoke`` runs every stage on the CPU with tiny synthetic cases (under a
minute): it checks the script, not the numbers. Writes ``metrics.json`` and the resolved
settings under ``--out``; exits 1 when the device and CPU predictions disagree (goals missed
are reported, not failed).

    # beforehand, anywhere with FEniCSx (the folders to carry to the GPU machine):
    vcnn generate --config experiments/published/generate_train.toml --resolution 0.5 \
        --out data/published_r0.5/all && vcnn generate --alphas 0.5 --resolution 0.5 \
        --out data/published_r0.5/all
    vcnn generate --alphas 1 --resolution 1 --out data/published_r1
    python experiments/bench_gpu.py                 # one H200: < 8 minutes
    python experiments/bench_gpu.py --cpu-smoke     # any machine, < 1 minute
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vcnn.casefile import write_case  # noqa: E402
from vcnn.datasets import discover_cases  # noqa: E402
from vcnn.engines import CLOUDS, PassData, bind  # noqa: E402
from vcnn.engines.device import DeviceEngine, sample_cloud_rows  # noqa: E402
from vcnn.engines.radius_search import DeviceCloudSearch  # noqa: E402
from vcnn.engines.training_pass import TrainingPass  # noqa: E402
from vcnn.features import FeatureSpec, FieldTable  # noqa: E402
from vcnn.network import VectorCloudNet  # noqa: E402

GOALS = {
    "gpu_busy_percent": (">=", 60.0),
    "clouds_per_second": (">=", 700_000.0),
    "inference_seconds": ("<=", 0.05),
    "gpu_cpu_max_rel": ("<=", 1e-5),
}
SEED = 0


class UtilisationSampler:
    """``nvidia-smi --query-gpu=utilization.gpu`` sampled in a thread (percent, per sample)."""

    def __init__(self, period: float = 0.2) -> None:
        self.period = period
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                text = subprocess.run(
                    ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                    capture_output=True, text=True, timeout=5,
                ).stdout
                self.samples.append(float(text.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return
            self._stop.wait(self.period)

    def __enter__(self) -> UtilisationSampler:
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def mean(self) -> float:
        """Mean utilisation of the samples, percent (nan without nvidia-smi)."""
        return float(np.mean(self.samples)) if self.samples else float("nan")


def smoke_cases(folder: Path) -> Path:
    """Tiny synthetic periodic channel cases (alphas 0.5, 1.0, 1.5, 2.0) for ``--cpu-smoke``."""
    from tests.ddp_scripts.synthetic_cases import channel_case

    folder.mkdir(parents=True, exist_ok=True)
    for alpha in (0.5, 1.0, 1.5, 2.0):
        write_case(folder / f"alpha_{alpha:.2f}.npz", channel_case(alpha, nx=24, ny=10))
    return folder


#: Published training alphas (1.0:0.05:2.0) and the validation alpha of the accuracy stage.
TRAIN_ALPHAS = [round(1.0 + 0.05 * index, 2) for index in range(21)]
VALIDATION_ALPHAS = [0.5]
#: Default folders of the data (carry them along with the command: see the module docstring).
DEFAULT_DATA = ROOT / "data" / "published_r0.5" / "all"
DEFAULT_INFERENCE_CASE = ROOT / "data" / "published_r1" / "hill_a1.000.npz"
#: Minutes kept for the training's set-up (cases read, clouds searched), its last epoch (the
#: time limit stops after the epoch that crosses it) and the final writes.
RESERVE_MINUTES = 1.0


def generate(alphas: list[float], resolution: float, out: Path, *, config: Path | None = None):
    """``vcnn generate`` of some cases into ``out`` (complete cases are skipped); seconds taken."""
    command = [sys.executable, "-m", "vcnn.cli", "generate", "--resolution", str(resolution),
               "--out", str(out), "--no-plots", "--no-xdmf", "-q"]
    command += ["--config", str(config)] if config else ["--alphas", *map(str, alphas)]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    return time.perf_counter() - start


def published_cases(folder: Path) -> tuple[Path, float]:
    """The half-resolution published cases the training stage uses, generated when missing.

    Returns:
        The folder and the seconds spent generating (0 when every case was there).
    """
    names = {f"hill_a{alpha:.3f}.npz" for alpha in TRAIN_ALPHAS + VALIDATION_ALPHAS}
    if folder.is_dir() and names <= {path.name for path in folder.glob("*.npz")}:
        return folder, 0.0
    print(f"generating the half-resolution published cases into {folder} (minutes: carry "
          "them along with --data instead)", file=sys.stderr)
    seconds = generate([], 0.5, folder, config=ROOT / "experiments" / "published" / "generate_train.toml")
    seconds += generate(VALIDATION_ALPHAS, 0.5, folder)
    return folder, seconds


def inference_case(path: Path):
    """The case of the inference goal, generated when missing (resolution 1, alpha 1).

    Returns:
        The case and the seconds spent generating it.
    """
    from vcnn.casefile import read_case

    seconds = 0.0
    if not path.is_file():
        print(f"generating the inference case {path} (carry it along instead)", file=sys.stderr)
        seconds = generate([1.0], 1.0, path.parent)
        if not path.is_file():
            raise SystemExit(f"error: generating the inference case did not write {path}")
    return read_case(path), seconds


def build_model(table: FieldTable, device: torch.device) -> VectorCloudNet:
    torch.manual_seed(SEED)
    spec = table.spec
    return VectorCloudNet.from_preset(
        "default", dim=table.dim, num_scalars=spec.num_scalars, num_vectors=spec.num_vectors,
        point_scalar_columns=spec.point_scalar_columns,
    ).to(device)


def clouds_per_second(
    cases, options, device, *, batch: int, steps: int, amp: bool, cloud_size: int = 150
) -> float:
    """Training steps per second x batch, on clouds drawn on the device (the draw timed too)."""
    table = FieldTable.from_cases(cases, spec=FeatureSpec(), options=options, device=device)
    model = build_model(table, device)
    training_pass = TrainingPass(model, table, None, engine="device" if device.type == "cuda" else "auto")
    search_offsets, search_rows, entries = [torch.zeros(1, dtype=torch.int64, device=device)], [], 0
    for index, case in enumerate(cases):
        found = DeviceCloudSearch(
            torch.as_tensor(case.points, device=device), torch.as_tensor(case.velocity, device=device),
            options, period=torch.as_tensor(case.period),
        ).clouds()
        search_offsets.append(found.offsets[1:] + entries)
        search_rows.append(found.points + int(table.offsets[index]))
        entries += found.num_entries
    offsets, rows = torch.cat(search_offsets), torch.cat(search_rows)
    target = torch.rand(table.num_points, device=device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator(device=device).manual_seed(SEED)

    def run(count: int) -> None:
        # as the training loop: the clouds of all steps drawn at once (one draw per epoch
        # there), then each step a slice of them; no host round trip per step
        queries = torch.randint(
            0, table.num_points, (count * batch,), device=device, generator=generator
        )
        indices = sample_cloud_rows(offsets, rows, queries, cloud_size, generator)
        for first in range(0, count * batch, batch):
            chosen = queries[first : first + batch]
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                prediction = training_pass(chosen, indices[first : first + batch])
            loss = torch.mean((prediction.float() - target[chosen]) ** 2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    run(3)  # warm-up: kernels compiled, memory pools filled
    _sync(device)
    start = time.perf_counter()
    run(steps)
    _sync(device)
    return steps * batch / (time.perf_counter() - start)


@dataclass
class InferenceTimes:
    """Warm full-cloud inference of one case and its agreement with the CPU backend."""

    pass_seconds: float  # clouds searched on the device + the device pass
    closure_seconds: float  # Closure.predict_detailed: field tables from the host included
    closure_engine: str  # the backend the closure used
    gpu_cpu_max_rel: float  # device pass vs the CPU backend, float32, same clouds
    entries: int  # cloud entries of the case


def inference(case, options, device) -> InferenceTimes:
    """Warm full-cloud inference times (s) on a new velocity field, and the GPU-CPU agreement."""
    import dataclasses

    from vcnn.closure import Closure
    from vcnn.engines import CloudSet

    table = FieldTable.from_cases([case], spec=FeatureSpec(), options=options, device=device)
    model = build_model(table, device).eval()
    forward = DeviceEngine(cuda_only=False).full_clouds(model, PassData(table, None))

    def run(velocity: np.ndarray):
        search = DeviceCloudSearch(
            torch.as_tensor(case.points, device=device), torch.as_tensor(velocity, device=device),
            options, period=torch.as_tensor(case.period),
        )
        return forward.case(search)

    run(case.velocity)  # cold: compilation, caches
    _sync(device)
    start = time.perf_counter()
    result, _ = run(case.velocity * 1.01)  # a new velocity field: clouds searched again
    _sync(device)
    pass_seconds = time.perf_counter() - start
    # the one inference path (evaluate, simulate): on CUDA it searches its clouds there too
    closure = Closure(
        model, normalizer=None, target_scale=1.0, spec=FeatureSpec(), cloud_options=options,
        physics_constants=None, dimension=case.dim, device=device,
    )
    closure.predict_detailed(case, warn=False)  # cold
    moved = dataclasses.replace(case, velocity=case.velocity * 1.02)
    _sync(device)
    start = time.perf_counter()
    prediction = closure.predict_detailed(moved, warn=False)
    _sync(device)
    closure_seconds = time.perf_counter() - start
    # agreement: the same net and clouds on the CPU backend (float32)
    cpu_table = FieldTable.from_cases([case], spec=FeatureSpec(), options=options)
    cpu_model = build_model(cpu_table, torch.device("cpu")).eval()
    cpu_model.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    device_result, device_clouds = run(case.velocity)
    clouds_cpu = CloudSet.checked(
        device_clouds.offsets.cpu().numpy(), device_clouds.points.cpu().numpy(),
        device_clouds.queries.cpu().numpy(),
    )
    cpu_result = bind(CLOUDS, cpu_model, PassData(cpu_table, None))(
        clouds_cpu, chunk_entries=1 << 22, compile=False
    )
    scale = np.abs(cpu_result.output).max()
    max_rel = float(np.abs(device_result.output - cpu_result.output).max() / scale)
    return InferenceTimes(
        pass_seconds=pass_seconds, closure_seconds=closure_seconds,
        closure_engine=prediction.engine, gpu_cpu_max_rel=max_rel, entries=result.num_entries,
    )


def train_accuracy(data: Path, out: Path, device: torch.device, minutes: float, smoke: bool):
    """Validation rel L2 (%) reached within ``minutes``, the throughput and GPU busy fraction."""
    from vcnn.training import TrainConfig, train

    config = TrainConfig.from_dict({
        "data": str(data), "out": str(out / "train"),
        "train_alphas": [1.0, 1.5, 2.0] if smoke else TRAIN_ALPHAS,
        "validation_alphas": VALIDATION_ALPHAS, "seed": SEED, "device": device.type,
        "amp": device.type == "cuda", "epochs": 2 if smoke else 10_000,
        "batch_size": 1024, "cloud_size": 150 if not smoke else 40,
        "queries_per_case": "all", "ema_decay": 0.0, "learning_rate": 1e-3,
        "time_limit_minutes": minutes, "overwrite": True,
        "model": {"preset": "default"},
    })
    with UtilisationSampler() as sampler:
        result = train(config)
    return result.best_validation_rel_l2_percent, result.clouds_per_second, sampler.mean


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Generate the data beforehand and carry it along (see the module docstring).",
    )
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA,
        help="folder of the half-resolution published case files (train alpha 1.0:0.05:2.0, "
        "validation 0.5; 16 MB), carried along with the command: generating them took 13 "
        "minutes on 2 busy CPU cores, so missing ones are generated here only as a last resort, "
        "from the budget (default: %(default)s)",
    )
    parser.add_argument(
        "--inference-case", default=str(DEFAULT_INFERENCE_CASE),
        help="case file of the inference goal: the 40,200-point case (resolution 1, alpha 1; "
        "2 MB, carry it along too; generated when missing: 4 minutes on 2 busy CPU cores), or "
        "'largest': the largest "
        "case of --data (the --cpu-smoke default) (default: %(default)s)",
    )
    parser.add_argument("--train-minutes", type=float, default=4.0,
                        help="longest training of the accuracy stage (default: %(default)s)")
    parser.add_argument(
        "--budget-minutes", type=float, default=8.0,
        help="the whole run's wall-clock budget: the training gets what the other stages leave "
        "(0: no budget) (default: %(default)s)",
    )
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny CPU run of every stage")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_gpu")
    args = parser.parse_args(argv)
    run_start = time.perf_counter()
    smoke = args.cpu_smoke
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    metrics: dict[str, float | str | bool] = {"device": str(device), "smoke": smoke}
    try:
        if smoke:
            data, generated = smoke_cases(scratch / "cases"), 0.0
        else:
            data, generated = published_cases(args.data)
        cases = [source.load() for source in discover_cases(data)]
        if smoke or args.inference_case == "largest":
            largest = max(cases, key=lambda case: case.points.shape[0])
        else:
            largest, seconds = inference_case(Path(args.inference_case))
            generated += seconds
        metrics["generation_seconds"] = generated
        from vcnn.clouds import CloudOptions
        from vcnn.physics import DEFAULT_PHYSICS

        options = CloudOptions().resolved(
            diffusivity=DEFAULT_PHYSICS.diffusivity, zeta=DEFAULT_PHYSICS.zeta
        )
        metrics["clouds_per_second"] = clouds_per_second(
            cases, options, device, batch=64 if smoke else 1024, steps=3 if smoke else 100,
            amp=device.type == "cuda",
        )
        times = inference(largest, options, device)
        metrics.update(
            inference_seconds=times.pass_seconds, closure_seconds=times.closure_seconds,
            closure_engine=times.closure_engine, gpu_cpu_max_rel=times.gpu_cpu_max_rel,
            inference_points=float(largest.points.shape[0]), inference_entries=times.entries,
        )
        minutes = 0.2 if smoke else args.train_minutes
        if args.budget_minutes > 0 and not smoke:
            left = args.budget_minutes - (time.perf_counter() - run_start) / 60 - RESERVE_MINUTES
            minutes = max(min(minutes, left), 0.1)
        metrics["train_minutes"] = minutes
        error, rate, busy = train_accuracy(data, scratch if smoke else args.out, device, minutes, smoke)
        metrics.update(validation_rel_l2_percent=error, training_clouds_per_second=rate,
                       gpu_busy_percent=busy)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    metrics["total_seconds"] = time.perf_counter() - run_start
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    (args.out / "settings.json").write_text(json.dumps(
        {"seed": SEED, "train_minutes": args.train_minutes, "budget_minutes": args.budget_minutes,
         "data": str(data), "inference_case": args.inference_case, "smoke": smoke,
         "torch": torch.__version__, "inference": asdict(times)},
        indent=2,
    ))
    print(f"| measure ({device}) | goal (one H200) | measured |")
    print("|---|---|---|")
    rows = [
        ("GPU busy while training, %", "gpu_busy_percent", "{:.1f}"),
        ("clouds/s, batch 1024, 150 points", "clouds_per_second", "{:,.0f}"),
        (f"full-cloud inference warm ({largest.points.shape[0]:,} points), s",
         "inference_seconds", "{:.4f}"),
        ("GPU vs CPU max rel", "gpu_cpu_max_rel", "{:.2e}"),
    ]
    for label, key, form in rows:
        sign, goal = GOALS[key]
        print(f"| {label} | {sign} {goal:g} | {form.format(metrics[key])} |")
    print(f"| closure.predict warm, tables included ({times.closure_engine}), s | - | "
          f"{times.closure_seconds:.4f} |")
    print(f"| validation rel L2 after {metrics['train_minutes']:.2f} min, % | - | "
          f"{metrics['validation_rel_l2_percent']:.2f} |")
    print(f"| training clouds/s (train loop) | - | {metrics['training_clouds_per_second']:,.0f} |")
    print(f"| data generated in this run, s | 0 | {generated:.1f} |")
    budget = f"<= {60 * args.budget_minutes:g}" if args.budget_minutes > 0 else "-"
    print(f"| whole run, s | {budget} | {metrics['total_seconds']:.1f} |")
    # The check: the device pass must agree with the CPU backend (an error, not a goal).
    if not times.gpu_cpu_max_rel <= 1e-4:
        print(f"error: device and CPU predictions differ by {times.gpu_cpu_max_rel:.2e} (> 1e-4)")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
